#!/usr/bin/env bash
# Scale-out check: two replicas of the Docker image behind nginx (deploy/nginx.conf), load through
# nginx for 60 s while one replica is stopped with SIGTERM and started again; no request may fail
# and both replicas must have served.
#
#   bash scripts/scale_out_check.sh
#
# Needs the docker-sandbox tool (a local Docker engine), found at ../shared/tools/docker-sandbox
# beside the repository or at $DOCKER_SANDBOX; without it the check is skipped with a message and
# exit 0. The engine has host networking only, so the replicas listen on two loopback ports and
# nginx's upstream (`cifar10:8000`, Compose's service name, in deploy/nginx.conf) is rewritten to
# them; every other line of deploy/nginx.conf is used as it is, in an nginx image built from
# Debian's package (no registry is reachable for the official one). The load stays under the
# config's per-client rate limit (100 requests/s), as one address sends it all.
#
# Environment: SCALE_TAG (image tag, default cifar10-cnn:scale), SCALE_SECONDS (load, 60),
# SCALE_CLIENTS (concurrent clients, 4), SCALE_RATE (requests/s in all, 60), SCALE_STOP_AT
# (seconds into the load when the replica gets SIGTERM, 15).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
check="scale-out check"
tag=${SCALE_TAG:-cifar10-cnn:scale}
seconds=${SCALE_SECONDS:-60}
clients=${SCALE_CLIENTS:-4}
rate=${SCALE_RATE:-60}
stop_at=${SCALE_STOP_AT:-15}
# shellcheck source=scripts/docker_lib.sh
. "$repo/scripts/docker_lib.sh"

say "starting the Docker engine and building $tag and an nginx image"
start_engine
ds build "$repo" "$tag" "${build_args[@]}" >"$workdir/build.log" 2>&1 || {
    tail -n 40 "$workdir/build.log" >&2
    fail "docker build of the service failed"
}
. /etc/os-release
mkdir -p "$workdir/nginx"
cat >"$workdir/nginx/Dockerfile" <<EOF
FROM debian:${VERSION_CODENAME}-slim
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default
CMD ["nginx", "-g", "daemon off;"]
EOF
ds build "$workdir/nginx" cifar10-cnn-nginx:scale >"$workdir/nginx-build.log" 2>&1 || {
    tail -n 40 "$workdir/nginx-build.log" >&2
    fail "docker build of the nginx image failed"
}

ports=("$(free_port)" "$(free_port)")
lb_port=$(free_port)
replicas=()
for i in 0 1; do
    id=$(ds run "$tag" --name "cifar10-scale-$i-$$" -e "UVICORN_PORT=${ports[$i]}" \
        --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges --stop-timeout 30)
    containers+=("$id")
    replicas+=("$id")
done
upstream="server 127.0.0.1:${ports[0]} max_fails=2 fail_timeout=5s;\n    server 127.0.0.1:${ports[1]} max_fails=2 fail_timeout=5s;"
sed -e "s|server cifar10:8000 max_fails=2 fail_timeout=5s;|$upstream|" -e "s|listen 8000;|listen $lb_port;|" \
    "$repo/deploy/nginx.conf" >"$workdir/default.conf"
grep -q "127.0.0.1:${ports[1]}" "$workdir/default.conf" || fail "deploy/nginx.conf's upstream line was not found"
lb=$(ds run cifar10-cnn-nginx:scale --name "cifar10-scale-lb-$$" \
    -v "$workdir/default.conf:/etc/nginx/conf.d/default.conf:ro")
containers+=("$lb")
for id in "${replicas[@]}"; do ds wait "$id" 180 || fail "replica $id did not turn healthy"; done
say "replicas on ports ${ports[*]}, nginx on $lb_port"

cat >"$workdir/load.py" <<'PY'
"""Paced clients posting real JPEGs to nginx for a while; prints their outcome as JSON."""
import http.client
import json
import pathlib
import sys
import threading
import time
import uuid

port, seconds, clients, rate, samples = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
images = sorted(pathlib.Path(samples).glob("*.jpg"))
counts = {"ok": 0, "failed": 0}
failures = []
lock = threading.Lock()
stop = time.monotonic() + seconds


def client(k: int) -> None:
    interval = clients / rate
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i, next_at = k, time.monotonic()
    while time.monotonic() < stop:
        image = images[i % len(images)]
        boundary = uuid.uuid4().hex
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"\r\n'
                "Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        try:
            connection.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            response = connection.getresponse()
            answer = response.read()
            ok = response.status == 200
            what = f"{response.status} {answer[:120]!r}"
        except (OSError, http.client.HTTPException) as exc:
            ok, what = False, f"{type(exc).__name__}: {exc}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        with lock:
            counts["ok" if ok else "failed"] += 1
            if not ok and len(failures) < 10:
                failures.append(f"{time.monotonic() - stop + seconds:.1f} s: {what}")
        i += clients
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({**counts, "failures": failures}))
PY

say "load through nginx: $clients clients, $rate requests/s, $seconds s; replica 0 gets SIGTERM at $stop_at s"
python3 "$workdir/load.py" "$lb_port" "$seconds" "$clients" "$rate" "$repo/samples" >"$workdir/load.json" &
load_pid=$!
sleep "$stop_at"
t0=$(date +%s.%N)
"$DOCKER" stop -t 30 "${replicas[0]}" >/dev/null  # SIGTERM: it drains, then exits
stopped=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "${replicas[0]}")
"$DOCKER" start "${replicas[0]}" >/dev/null
ds wait "${replicas[0]}" 180 || fail "replica 0 did not turn healthy again"
back=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
say "replica 0 stopped in ${stopped} s (exit code $exit_code) and was healthy again ${back} s after the SIGTERM"
wait "$load_pid" || fail "the load generator failed"

served=()
for i in 0 1; do
    n=$(python3 - "${ports[$i]}" <<'PY'
import re, sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print(int(sum(float(v) for v in re.findall(r'^cifar10_predictions_total\{[^}]*\} (\S+)$', text, re.M))))
PY
)
    served+=("$n")
done
python3 - "$workdir/load.json" "${served[@]}" "$exit_code" <<'PY'
import json, sys
load = json.load(open(sys.argv[1]))
served, exit_code = [int(n) for n in sys.argv[2:4]], sys.argv[4]
print(f"requests: {load['ok']:,} answered 200, {load['failed']} failed")
print(f"images served (from each replica's /metrics): replica 0 {served[0]:,} (since its restart), replica 1 {served[1]:,}")
for line in load["failures"]:
    print(f"  failed at {line}")
problems = []
if load["failed"]:
    problems.append(f"{load['failed']} requests failed")
if min(served) == 0:
    problems.append("a replica served nothing")
if exit_code != "0":
    problems.append(f"the stopped replica exited with code {exit_code}, not 0")
if problems:
    sys.exit("FAIL: " + "; ".join(problems))
print("PASS")
PY
