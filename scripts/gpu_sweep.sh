#!/usr/bin/env bash
# One GPU session's work: train the distillation teacher (python -m training.teacher), then
# FinalModel recipes side by side within a time budget (python -m training.sweep picks the epoch
# count after timing a probe): today's default against distillation from that teacher, with weight
# averaging and mixup. Then evaluate the run with the best validation accuracy on the full test
# split, end to end through the service on the same device. Everything worth keeping lands in
# RESULTS: log.txt, summary.json, teacher.tar.gz and one <run>.tar.gz per recipe (final_model.pt,
# resumable last.pt, history, pictures, train.log).
#
#   scripts/gpu_sweep.sh DATA RESULTS [BUDGET_S [extra training flags...]]
#   scripts/gpu_sweep.sh data/cifar10-jpeg.tar.gz results 420
#
# BUDGET_S is the sweep's (the teacher comes before it: about a minute on an H200).
# TEACHER_EPOCHS (default 18) and TEACHER_FLAGS (say "--limit 512 --val-size 64" for a dry run;
# the split flags must match the extra training flags) tune the teacher; a readable
# $TEACHER (a teacher.pt from an earlier run on the same split) skips training one.
# Needs the project's dependencies with the [train] extra; the service check also needs the app's.
set -uo pipefail
data=$1 results=$2 budget=${3:-420}
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

teacher=${TEACHER:-$runs/teacher/teacher.pt}
if [ -z "${TEACHER:-}" ]; then
    # shellcheck disable=SC2086  # TEACHER_FLAGS is a list of flags
    python3 -m training.teacher --data "$data" --out "$runs/teacher" --epochs "${TEACHER_EPOCHS:-18}" \
        --test ${TEACHER_FLAGS:-} 2>&1 | tee -a "$log"
    tar -czf "$results/teacher.tar.gz" -C "$runs" teacher
fi
if [ ! -f "$teacher" ]; then
    echo "no teacher at $teacher: the sweep runs without distillation" | tee -a "$log"
    recipes=(--recipe "" --recipe ema=0.999 --recipe mixup=0.2,ema=0.999)
else
    # first: the recipes most likely to win, since the sweep drops from the end when time is short
    recipes=(
        --recipe "teacher=$teacher,ema=0.999"
        --recipe "teacher=$teacher,ema=0.999,kd_weight=0.5"
        --recipe "teacher=$teacher,ema=0.999,mixup=0.2"
        --recipe ""
    )
fi
python3 -m training.sweep --out "$runs" --budget "$budget" --min-epochs 96 --max-epochs 300 \
    "${recipes[@]}" -- --data "$data" "$@" 2>&1 | tee -a "$log"
sweep=${PIPESTATUS[0]}

cp "$runs/summary.json" "$results/" 2>/dev/null
for dir in "$runs"/*/; do
    name=$(basename "$dir")
    case $name in probe-* | warmup | eval-* | teacher) continue ;; esac
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
