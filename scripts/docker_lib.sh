# Shared by scripts/docker_smoke.sh and scripts/scale_out_check.sh (sourced, not run): finding the
# docker-sandbox tool (or skipping), starting its engine and building the image with its torch
# wheel, and cleaning up the containers started. The caller sets `repo` and `check` (its name
# for messages) before sourcing.

sandbox=${DOCKER_SANDBOX:-$(dirname "$repo")/shared/tools/docker-sandbox}
if [[ ! -f $sandbox ]]; then
    echo "skipped: $check: the docker-sandbox tool is not at $sandbox (set DOCKER_SANDBOX to use another)"
    exit 0
fi
if [[ $EUID -ne 0 ]]; then
    echo "skipped: $check: docker-sandbox must run as root"
    exit 0
fi

# The tool is a bash script; a copy may have lost its execute bit.
ds() { if [[ -x $sandbox ]]; then "$sandbox" "$@"; else bash "$sandbox" "$@"; fi; }
say() { printf '== %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Leave a sandbox engine that was already running (someone else's) as it was.
engine_was_up=0
status=$(ds status 2>/dev/null || true)
if [[ $status == *"dockerd: pid"* ]]; then engine_was_up=1; fi

containers=()
workdir=$(mktemp -d)
# On a failure, the last log lines of every container started; then remove them, stop the engine
# if this script started it, and delete the scratch folder.
cleanup() {
    local rc=$?
    if ((rc != 0)) && ((${#containers[@]})) && [[ -n ${DOCKER:-} ]]; then
        for id in "${containers[@]}"; do
            echo "-- the last log lines of $id:" >&2
            "$DOCKER" logs --tail 40 "$id" >&2 || true
        done
    fi
    if ((${#containers[@]})) && [[ -n ${DOCKER:-} ]]; then
        "$DOCKER" rm -f "${containers[@]}" >/dev/null 2>&1 || true
    fi
    if ((engine_was_up == 0)); then ds down >/dev/null 2>&1 || true; fi
    rm -rf "$workdir"
    exit "$rc"
}
trap cleanup EXIT

# start_engine: `docker-sandbox up`; sets DOCKER and build_args (the sandbox serves its torch
# wheel with --find-links, on top of PyPI: pin that wheel's version, or pip would prefer PyPI's
# newer CUDA torch).
start_engine() {
    local up_out torch_version
    up_out=$(ds up)
    eval "$up_out"
    : "${DOCKER:?docker-sandbox up did not export DOCKER}"
    build_args=()
    torch_version=$(sed -n 's/^# wheel served: torch-\([^-]*\)-.*\.whl$/\1/p' <<<"$up_out" | head -n 1)
    if [[ -n $torch_version ]]; then build_args+=(--build-arg "TORCH_SPEC=torch==$torch_version"); fi
}
