#!/usr/bin/env bash
# Docker smoke test: build the image, run it as a user would, check it, stop it.
#
#   bash scripts/docker_smoke.sh
#
# Needs the docker-sandbox tool (a local Docker engine for machines without one), found at
# ../shared/tools/docker-sandbox beside the repository or at $DOCKER_SANDBOX; without it the test
# is skipped with a message and exit 0. Checks: the container turns healthy; POST /predict with
# real images answers CIFAR-10 labels in the documented shape; a non-image gets a 4xx; the
# server is not root and is PID 1 (exec-form CMD); torchvision is not installed; the container
# serves with ONNX Runtime (the CPU default backend) and gives 100 CIFAR-10 test JPEGs the labels
# PyTorch fp32 gives them on the host (when the host has the project installed); mounted weights
# chosen with CIFAR10_WEIGHTS are served; SIGTERM stops it cleanly. The root filesystem is
# read-only with a tmpfs on /tmp, as in deploy/k8s. Prints image size, build time and
# time-to-healthy.
#
# Environment: SMOKE_TAG (image tag, default cifar10-cnn:smoke), SMOKE_NO_CACHE=1 (build
# without the layer cache, for a cold build time), SMOKE_BUILD_ARGS (more `docker build`
# arguments, split on spaces), SMOKE_TIMEOUT (seconds to turn healthy, 180).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
check="docker smoke test"
tag=${SMOKE_TAG:-cifar10-cnn:smoke}
timeout_s=${SMOKE_TIMEOUT:-180}
data=$(dirname "$repo")/shared/data/cifar10-jpeg.tar.gz
cid=""
# shellcheck source=scripts/docker_lib.sh
. "$repo/scripts/docker_lib.sh"

say "starting the Docker engine (docker-sandbox up)"
start_engine
if [[ ${SMOKE_NO_CACHE:-0} == 1 ]]; then build_args+=(--no-cache); fi
read -r -a extra_build_args <<<"${SMOKE_BUILD_ARGS:-}"
build_args+=(${extra_build_args[@]+"${extra_build_args[@]}"})

say "building $tag ${build_args[*]}"
t0=$(now)
ds build "$repo" "$tag" "${build_args[@]}" >"$workdir/build.log" 2>&1 || {
    tail -n 40 "$workdir/build.log" >&2
    fail "docker build failed"
}
build_s=$(since "$t0")
image_bytes=$("$DOCKER" image inspect --format '{{.Size}}' "$tag")
image_mb=$(awk -v b="$image_bytes" 'BEGIN { printf "%.0f", b / 1e6 }')
say "built in ${build_s} s; image size ${image_mb} MB"

# run_service NAME PORT [DOCKER-RUN-OPTIONS...]: start the image, hardened as in deploy/k8s;
# sets cid (not a $(...) call, so that the cleanup list survives).
run_service() {
    local name=$1 port=$2
    shift 2
    cid=$(ds run "$tag" --name "$name" -e "UVICORN_PORT=$port" \
        --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges "$@")
    containers+=("$cid")
}

# wait_ready ID PORT: poll GET /health/ready until 200; fail if the container stops or time runs out.
wait_ready() {
    local id=$1 port=$2 t0
    t0=$(now)
    until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health/ready', timeout=2)" 2>/dev/null; do
        if [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$id") != true ]]; then
            fail "the container stopped before it was ready"
        fi
        if awk -v s="$(since "$t0")" -v l="$timeout_s" 'BEGIN { exit !(s >= l) }'; then
            fail "not ready after $timeout_s s"
        fi
        sleep 0.25
    done
}

port=$(free_port)
name=cifar10-smoke-$$
say "running $tag as $name on port $port"
t0=$(now)
run_service "$name" "$port"
wait_ready "$cid" "$port"
ready_s=$(since "$t0")
ds wait "$cid" "$timeout_s" || fail "the container did not turn healthy"
healthy_s=$(since "$t0")
say "ready (GET /health/ready 200) after ${ready_s} s; Docker reports healthy after ${healthy_s} s"

say "the process: user, PID 1, no torchvision"
uid=$("$DOCKER" exec "$cid" sh -c 'sed -n "s/^Uid:[[:space:]]*\([0-9]*\).*/\1/p" /proc/1/status')
[[ $uid =~ ^[0-9]+$ ]] || fail "could not read the server's uid"
((uid != 0)) || fail "the server runs as root"
pid1=$("$DOCKER" exec "$cid" sh -c 'tr "\0" " " </proc/1/cmdline')
[[ $pid1 == *uvicorn* ]] || fail "PID 1 is not uvicorn ($pid1): CMD is not in exec form"
"$DOCKER" exec "$cid" python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is not None)" ||
    fail "torchvision is installed in the image"
baked_sha=$("$DOCKER" exec "$cid" sha256sum /app/weights/final_model.pt | cut -d' ' -f1)
baked_lite_sha=$("$DOCKER" exec "$cid" sha256sum /app/weights/lite_model.pt | cut -d' ' -f1)
baked_best_sha=$("$DOCKER" exec "$cid" sha256sum /app/weights/best_model.pt | cut -d' ' -f1)
echo "uid $uid; PID 1: $pid1"

say "POST /predict with real images (FinalModel, then LiteModel and AirbenchNet), a non-image, GET /model/summary and /metrics"
images=$workdir/images
mkdir -p "$images"
python3 - "$data" "$images" <<'PY'
"""One CIFAR-10 test JPEG per class from the data archive (when it is here), and a PNG written
with the standard library alone (the host needs no Pillow)."""
import pathlib
import struct
import sys
import tarfile
import zlib

data, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if data.is_file():
    seen = {}  # class -> test JPEGs kept: the first in images/, ten in labels/ for the label check
    (out.parent / "labels").mkdir(exist_ok=True)
    with tarfile.open(data) as tf:
        for member in tf:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "test" and seen.get(parts[1], 0) < 10:
                content = tf.extractfile(member).read()
                if parts[1] not in seen:
                    (out / f"{parts[1]}.jpg").write_bytes(content)
                (out.parent / "labels" / f"{parts[1]}-{seen.get(parts[1], 0)}.jpg").write_bytes(content)
                seen[parts[1]] = seen.get(parts[1], 0) + 1
            if len(seen) == 10 and all(n == 10 for n in seen.values()):
                break


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


width, height = 40, 30  # not 32x32: the service must resize
rows = b"".join(
    b"\0" + bytes(v for x in range(width) for v in (6 * x, 8 * y, 200 - 4 * x)) for y in range(height)
)
png = (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    + chunk(b"IDAT", zlib.compress(rows))
    + chunk(b"IEND", b"")
)
(out / "gradient.png").write_bytes(png)
PY

python3 - "$port" "$images" "$baked_sha" "$baked_lite_sha" "$baked_best_sha" <<'PY'
"""Check the answers of the running service (standard library only)."""
import json
import pathlib
import sys
import urllib.error
import urllib.request
import uuid

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TOP_K = 3
port, images = sys.argv[1], sorted(pathlib.Path(sys.argv[2]).iterdir())
baked_sha, baked_lite_sha, baked_best_sha = sys.argv[3:6]
base = f"http://127.0.0.1:{port}"


def post_files(files, query=""):
    boundary = uuid.uuid4().hex
    body = b""
    for name, content, ctype in files:
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{base}/predict{query}", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def fail(message):
    sys.exit(f"FAIL: {message}")


files = [(p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg") for p in images]
status, answer = post_files(files, f"?top_k={TOP_K}")
if status != 200:
    fail(f"/predict answered {status}: {answer}")
predictions = answer.get("predictions")
if not isinstance(predictions, list) or len(predictions) != len(files):
    fail(f"expected {len(files)} predictions, got {answer}")
correct = 0
for (name, _, _), p in zip(files, predictions, strict=True):
    if p.get("filename") != name:
        fail(f"predictions out of upload order: {p.get('filename')!r} for {name!r}")
    if p.get("label") not in CLASSES or p.get("index") != CLASSES.index(p["label"]):
        fail(f"not a CIFAR-10 label/index pair: {p}")
    if not 0.0 <= p.get("confidence", -1) <= 1.0:
        fail(f"confidence out of [0, 1]: {p}")
    top = p.get("top_k")
    if not isinstance(top, list) or len(top) != TOP_K or top[0].get("label") != p["label"]:
        fail(f"top_k should list {TOP_K} classes, the label first: {p}")
    correct += p["label"] == pathlib.Path(name).stem
    print(f"  {name:16s} -> {p['label']:10s} {p['confidence']:.3f}")
real = sum(name.endswith(".jpg") for name, _, _ in files)
if real:
    print(f"  {correct} of {real} CIFAR-10 test images labelled right")

for model, name, sha in (("lite", "LiteModel", baked_lite_sha), ("best", "AirbenchNet", baked_best_sha)):
    status, answer = post_files(files, f"?model={model}")
    if status != 200 or len(answer.get("predictions", [])) != len(files):
        fail(f"/predict?model={model} answered {status}: {answer}")
    if answer.get("model", {}).get("id") != model or answer["model"].get("sha256") != sha:
        fail(f"/predict?model={model} should answer with the baked-in {name}, not {answer.get('model')}")
    right = sum(p["label"] == pathlib.Path(n).stem for (n, _, _), p in zip(files, answer["predictions"]))
    print(f"  {name}: {right} of {real} CIFAR-10 test images labelled right")

status, answer = post_files([("notes.txt", b"this is not an image", "text/plain")])
if not 400 <= status < 500 or not isinstance(answer, dict):
    fail(f"a non-image should get a 4xx with a JSON body, got {status}: {answer}")
print(f"  a non-image -> {status} {json.dumps(answer)[:120]}")

with urllib.request.urlopen(f"{base}/model/summary", timeout=10) as response:
    summary = response.read().decode()
if baked_sha not in summary:
    fail("/model/summary does not report the sha256 of the weights baked into the image")
with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
    if response.status != 200 or b"# TYPE" not in response.read():
        fail("/metrics does not serve Prometheus text")
print("  /model/summary reports the baked-in weights; /metrics serves Prometheus text")
PY

say "the runtime inside: the backend it serves with, and its labels against PyTorch fp32 on the host"
expected=$workdir/expected.json
if [[ -d $workdir/labels ]] && (cd "$repo" && python3 - "$workdir/labels" "$expected") <<'PY'; then
"""The labels evaluation's reference forward pass (PyTorch fp32 NCHW) gives the label-check JPEGs."""
import json
import pathlib
import sys

import torch

from app.checkpoint import build_model, load_checkpoint
from app.preprocess import load_image
from training.evaluate import predict

files = sorted(pathlib.Path(sys.argv[1]).iterdir())
model = build_model(load_checkpoint("weights/final_model.pt"))
logits = predict(model, torch.stack([load_image(f) for f in files]), torch.device("cpu"))
pathlib.Path(sys.argv[2]).write_text(json.dumps(dict(zip([f.name for f in files], logits.argmax(1).tolist()))))
PY
    :
else
    echo "  (no label check: the data archive or the project's Python packages are not on this host)"
    rm -f "$expected"
fi
python3 - "$port" "$workdir/labels" "$expected" <<'PY'
"""The summary names ONNX Runtime; the served labels equal the host's PyTorch fp32 labels."""
import json
import pathlib
import sys
import urllib.request
import uuid

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
port, folder, expected_file = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
base = f"http://127.0.0.1:{port}"
with urllib.request.urlopen(f"{base}/model/summary", timeout=10) as response:
    inference = json.load(response)["inference"]
print(f"  inference: {inference}")
if inference["backend"] != "onnxruntime" or inference["precision"] != "fp32":
    sys.exit(f"FAIL: the image should serve with onnxruntime fp32 by default, not {inference}")
if not expected_file.is_file():
    sys.exit(0)
expected = json.loads(expected_file.read_text())
names = sorted(expected)
served = {}
for start in range(0, len(names), 20):
    chunk = names[start : start + 20]
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode() + (folder / name).read_bytes() + b"\r\n"
        for name in chunk
    ) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{base}/predict?top_k=1", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        for p in json.load(response)["predictions"]:
            served[p["filename"]] = CLASSES.index(p["label"])
differ = [name for name in names if served.get(name) != expected[name]]
for name in differ:
    print(f"  {name}: served {CLASSES[served[name]]}, PyTorch fp32 on the host {CLASSES[expected[name]]}")
if differ:
    sys.exit(f"FAIL: {len(differ)} of {len(names)} served labels differ from PyTorch fp32 on the host")
right = sum(CLASSES[served[name]] == name.split("-")[0] for name in names)
print(f"  {len(names)} of {len(names)} served labels equal PyTorch fp32's on the host; {right} right")
PY

if "$DOCKER" logs "$cid" 2>&1 | grep -q Traceback; then
    fail "the server logged a traceback while answering these requests"
fi

say "stopping it with SIGTERM (docker stop)"
t0=$(now)
"$DOCKER" stop -t 30 "$cid" >/dev/null
stop_s=$(since "$t0")
exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$cid")
((exit_code == 0)) || fail "the server exited with $exit_code after SIGTERM (137: it had to be killed)"
echo "stopped in ${stop_s} s, exit code 0"

say "weights from a mounted volume, chosen with CIFAR10_WEIGHTS"
mounted=$workdir/models
mkdir -p "$mounted"
cp "$repo/weights/final_model.pt" "$mounted/mounted.pt"
chmod -R a+rX "$mounted"
mounted_sha=$(sha256sum "$mounted/mounted.pt" | cut -d' ' -f1)
port=$(free_port)
run_service "$name-volume" "$port" -v "$mounted:/models:ro" -e CIFAR10_WEIGHTS=/models/mounted.pt
wait_ready "$cid" "$port"
python3 - "$port" "$mounted_sha" <<'PY'
import sys
import urllib.request

port, sha = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(f"http://127.0.0.1:{port}/model/summary", timeout=10) as response:
    summary = response.read().decode()
if sha not in summary or "mounted.pt" not in summary:
    sys.exit("FAIL: /model/summary does not report the mounted weights file")
print("  /model/summary reports /models/mounted.pt")
PY
"$DOCKER" stop -t 30 "$cid" >/dev/null

say "passed"
echo "image $tag: ${image_mb} MB; build ${build_s} s; ready after ${ready_s} s, healthy after ${healthy_s} s; stop ${stop_s} s"
