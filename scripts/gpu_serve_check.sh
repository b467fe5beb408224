#!/usr/bin/env bash
# Serving on a CUDA GPU, checked and measured in one go: the service on CUDA with PyTorch fp32 and
# bf16 (channels_last), each evaluated on the full test split and checked end to end (every test
# JPEG posted to the service on the same backend must get the evaluated label, at most 3 flips),
# then bench/serve_load.py against the old path (fp32 NCHW) on the same GPU. Everything lands in
# RESULTS (log.txt, evaluation-*/, serve_load.txt) and RESULTS.tar.gz.
#
#   # 1. here, where PyPI is reachable: the wheels of every dependency the project declares
#   scripts/gpu_serve_check.sh wheelhouse wheels/
#   # 2. on the GPU machine (no network), from the repository root:
#   WHEELHOUSE=wheels scripts/gpu_serve_check.sh run DATA RESULTS
#   # a dry run of step 2 on the CPU, small and quick (what was done before shipping this script):
#   DEVICE=cpu DRY_RUN=1 scripts/gpu_serve_check.sh run ../shared/data/cifar10-jpeg.tar.gz /tmp/gpu-dry
#
# The wheelhouse is `pip download` of pyproject.toml's own dependency list (the runtime and the
# [train] extra, which evaluation needs), torch and torchvision left out: the GPU machine keeps its
# CUDA build (torchvision only downloads CIFAR-10, which the archive DATA replaces).
# An earlier GPU attempt could not start the service because one import was missing there; the
# run step therefore imports the whole app before anything else and stops with that error.
# Environment: WHEELHOUSE (install from it first), DEVICE (default cuda), DRY_RUN=1 (200 test
# images, seconds-long benchmark phases), WEIGHTS (default weights/final_model.pt).
set -uo pipefail
cd "$(dirname "$0")/.."

requirements() {  # the project's dependencies, one per line, but torch and torchvision (the machine's own)
    python3 - <<'PY'
import re
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["train"]:
    if re.split(r"[<>=!~;\[ ]", requirement)[0].lower() not in ("torch", "torchvision"):
        print(requirement)
PY
}

case ${1:-} in
wheelhouse)
    dest=${2:?usage: $0 wheelhouse DIR}
    mkdir -p "$dest"
    requirements >"$dest/requirements.txt"
    # Wheels for the GPU machine's platform and Python (override with PIP_DOWNLOAD_ARGS).
    # shellcheck disable=SC2086  # a list of pip flags
    python3 -m pip download -d "$dest" -r "$dest/requirements.txt" \
        ${PIP_DOWNLOAD_ARGS:---only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64}
    echo "wheelhouse $dest: $(find "$dest" -name '*.whl' | wc -l) wheels for $(wc -l <"$dest/requirements.txt") requirements"
    exit $?
    ;;
run) ;;
*)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac

data=${2:?usage: $0 run DATA RESULTS} results=${3:?usage: $0 run DATA RESULTS}
device=${DEVICE:-cuda} weights=${WEIGHTS:-weights/final_model.pt}
mkdir -p "$results"
log=$results/log.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say() { echo "== $*" | tee -a "$log"; }
failed=0
step() {  # step NAME COMMAND...: run, log, remember a failure and go on
    local name=$1
    shift
    say "$name: $*"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        say "$name FAILED (exit $rc)"
        failed=1
    fi
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    git rev-parse --short HEAD 2>/dev/null || true
} >"$log" 2>&1

if [[ -n ${WHEELHOUSE:-} ]]; then
    # torch held at the machine's own build, whatever a requirement would like
    python3 -m pip freeze | grep -i '^torch==' >"$results/torch-pin.txt" || true
    step install python3 -m pip install --no-index --find-links "$WHEELHOUSE" \
        -r "$WHEELHOUSE/requirements.txt" -c "$results/torch-pin.txt"
fi
# Everything the service and the checks import, before any of them runs.
step imports python3 -c "import app.main, app.predictor, training.evaluate, onnxruntime, httpx; print('imports ok')"
if ((failed)); then
    say "stopping: the service cannot start without its dependencies"
    exit 1
fi

limit=() bench=()
if [[ ${DRY_RUN:-0} == 1 ]]; then
    limit=(--limit 200)
    bench=(--images 50 --duration 1 --warmup 0.5 --single-duration 0.5 --bare-duration 0.3 --modes on)
fi

for precision in fp32 bf16; do
    step "evaluate-$precision" python3 -m training.evaluate --weights "$weights" --data "$data" \
        --device "$device" --backend pytorch --precision "$precision" --layout channels_last \
        --check-service --max-disagree 3 --out "$results/evaluation-$precision" "${limit[@]}"
done

say "serve benchmark: the old path (fp32 NCHW) against fp32 and bf16 channels_last, on $device"
python3 bench/serve_load.py --data "$data" --weights "$weights" --device "$device" \
    --backends pytorch-nchw,pytorch,bf16 "${bench[@]}" 2>&1 | tee "$results/serve_load.txt" | tee -a "$log"
if ((PIPESTATUS[0] != 0)); then
    say "serve benchmark FAILED"
    failed=1
fi

tar -czf "$results.tar.gz" -C "$(dirname "$results")" "$(basename "$results")"
say "results in $results and $results.tar.gz; $([[ $failed == 0 ]] && echo 'all steps passed' || echo 'some steps FAILED')"
exit "$failed"
