#!/usr/bin/env bash
# One GPU session's work: train FinalModel recipes side by side within a time budget
# (python -m training.sweep picks the epoch count after timing a probe), then evaluate the run
# with the best validation accuracy on the full test split, end to end through the service on
# the same device. Everything worth keeping lands in RESULTS: log.txt, summary.json and one
# <run>.tar.gz per recipe (final_model.pt, resumable last.pt, history, pictures, train.log).
#
#   scripts/gpu_sweep.sh DATA RESULTS [BUDGET_S [extra training flags...]]
#   scripts/gpu_sweep.sh data/cifar10-jpeg.tar.gz results 450
#
# Needs the project's dependencies with the [train] extra; the service check also needs the app's.
set -uo pipefail
data=$1 results=$2 budget=${3:-450}
shift $(($# < 3 ? $# : 3))
runs=runs/gpu-sweep
mkdir -p "$results"
rm -rf "$runs"
log="$results/log.txt"
export PYTHONUNBUFFERED=1
export CIFAR10_CODE_VERSION=${CIFAR10_CODE_VERSION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo "code version $CIFAR10_CODE_VERSION"
} >"$log" 2>&1

python3 -m training.sweep --out "$runs" --budget "$budget" --min-epochs 80 --max-epochs 200 \
    --recipe "" \
    --recipe label_smoothing=0 \
    --recipe cutout=4 \
    --recipe weight_decay=0.0007 \
    --recipe lr=0.3 \
    -- --data "$data" "$@" 2>&1 | tee -a "$log"
sweep=${PIPESTATUS[0]}

cp "$runs/summary.json" "$results/" 2>/dev/null
for dir in "$runs"/*/; do
    name=$(basename "$dir")
    case $name in probe-* | warmup | eval-*) continue ;; esac
    tar -czf "$results/$name.tar.gz" -C "$runs" "$name"
done

best=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['runs'][0]['name'])" \
    "$runs/summary.json" 2>>"$log")
if [ -n "$best" ] && [ -f "$runs/$best/final_model.pt" ]; then
    echo "== $best through the service on this device" | tee -a "$log"
    timeout 90 python3 -m training.evaluate --weights "$runs/$best/final_model.pt" --data "$data" \
        --check-service --max-disagree 20 --out "$runs/eval-$best" 2>&1 | tee -a "$log"
    cp "$runs/eval-$best/evaluation.json" "$results/evaluation.json" 2>/dev/null
fi
date -u >>"$log"
exit "$sweep"
