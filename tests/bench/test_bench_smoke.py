"""Every script under bench/ runs end to end in its --smoke mode and prints its table.

The figures of a smoke run mean nothing (seconds of load on a shared machine); these tests
check that each script still starts its server or workers, runs every phase and reports,
so that a broken benchmark fails CI instead of the next person who measures.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)

BENCH_SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py"))
# each has a test below
SMOKE_TESTED = {
    "backends.py", "before_after.py", "explain_latency.py", "models_load.py", "overload.py", "serve_load.py",
    "soak.py", "train_throughput.py",
}  # fmt: skip


SMOKE_ARGS = {  # script -> its arguments besides --smoke; "{data}" is the tiny archive
    "backends.py": ["--data", "{data}", "--labels"],
    "before_after.py": ["--data", "{data}", "--ref", "HEAD"],
    "explain_latency.py": ["--data", "{data}"],
    "models_load.py": ["--data", "{data}"],
    "overload.py": ["--data", "{data}"],
    "soak.py": ["--data", "{data}"],
    "serve_load.py": ["--data", "{data}"],
    "train_throughput.py": [],
}
TIMEOUT_S = 300  # all together; a smoke run takes seconds alone, but the machine may be busy


@pytest.fixture(scope="module")
def smoke_runs(jpeg_archive, tmp_path_factory):
    """All smoke runs start at once (they spend most of their time importing torch and starting
    servers, so side by side they finish sooner, most of all on a busy machine); calling the
    result with a script's name waits for that one and returns (exit code, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIFAR10_")}  # no stray settings
    logs = tmp_path_factory.mktemp("smoke-logs")
    running = {}
    for script, args in SMOKE_ARGS.items():
        args = [a.replace("{data}", str(jpeg_archive)) for a in args]
        out, err = (logs / f"{script}.out").open("w+"), (logs / f"{script}.err").open("w+")
        cmd = [sys.executable, f"bench/{script}", "--smoke", *args]
        running[script] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err), out, err)
    deadline = time.monotonic() + TIMEOUT_S

    def result(script: str) -> str:
        proc, out, err = running[script]
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        assert proc.returncode == 0, f"exit {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
        assert "smoke run" in stdout
        return stdout

    yield result
    for proc, out, err in running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close(), err.close()


def test_every_bench_script_has_a_smoke_test():
    assert set(BENCH_SCRIPTS) == SMOKE_TESTED == set(SMOKE_ARGS), (
        "a new bench/ script needs --smoke and a test"
    )
    for script in BENCH_SCRIPTS:
        assert "--smoke" in (REPO / "bench" / script).read_text(), script


def test_soak_smoke(smoke_runs):
    out = smoke_runs("soak.py")
    assert "| kind | status | code | count | expected |" in out
    for kind in ("valid", "empty", "truncated", "text", "bomb", "too_many_files", "wrong_field", "json_body"):
        assert re.search(rf"^\| {kind} \| \d+ \| .* \| yes \|$", out, re.M), f"no row for {kind}\n{out}"
    assert "5xx: 0; dropped connections: 0; other unexpected answers: 0" in out
    assert "| window | requests | valid/s | valid p50 ms | valid p99 ms | all p99 ms | server RSS MB |" in out
    assert re.search(r"^\| 0-1 s \| [\d,]+ \|", out, re.M), out
    assert "server RSS:" in out and out.rstrip().endswith("PASS")


def test_overload_smoke(smoke_runs):
    """--smoke: the capacity phase and two overload phases (ignoring and honouring Retry-After)."""
    out = smoke_runs("overload.py")
    assert "| connections | Retry-After | goodput /s | / capacity | p50 ms | p99 ms | max ms |" in out
    for row in (r"4 \| ignore", r"16 \| ignore", r"16 \| honour"):
        assert re.search(rf"^\| {row} \| [\d,]+ \| [\d.]+ \| ", out, re.M), f"no row {row}\n{out}"
    assert re.search(r"^capacity \(4:ignore\): [\d,]+ answers/s$", out, re.M), out
    assert "server: slow clients cut off headers 0, body 0; connections refused over the cap 0" in out


def test_explain_latency_smoke(smoke_runs):
    out = smoke_runs("explain_latency.py")
    for name in ("plain", "heatmap"):
        assert re.search(rf"^round 1 {name} +p50 [\d.]+ ms$", out, re.M), out
    assert re.search(r"heatmap / plain [\d.]+$", out, re.M), out


def test_before_after_smoke(smoke_runs):
    """--smoke: this tree against HEAD's code, one round of the default mode."""
    out = smoke_runs("before_after.py")
    assert re.search(r"^on round 1 this tree: [\d,]+ images/s, p50 [\d.]+ ms$", out, re.M), out
    assert re.search(r"^on round 1 HEAD: [\d,]+ images/s, p50 [\d.]+ ms$", out, re.M), out
    assert re.search(r"^\| on \| 2 \| [\d,]+ \| [\d,]+ \| [\d.]+ \|$", out, re.M), out


def test_models_load_smoke(smoke_runs):
    out = smoke_runs("models_load.py")
    assert "| model | images/s, 4 clients | p50 ms | p99 ms | / FinalModel | one client p50 ms |" in out
    for model in ("final", "lite", "best"):  # the shipped weights, all three served
        assert re.search(rf"^\| {model} \| [\d,]+ \| ", out, re.M), f"no row for {model}\n{out}"


def test_serve_load_smoke(smoke_runs):
    """--smoke serves one mode (batching on, fast path on): each mode is a server start."""
    out = smoke_runs("serve_load.py")
    assert "| configuration | clients | images/s | p50 ms | p99 ms |" in out
    for row in (
        r"bare model, batch 32, \d+ worker\(s\) x 1 thread",
        r"bare model, batch 32, 1 worker x \d+ thread\(s\)",
        r"bare model, batch 1 forward, 1 thread",
        r"server, batching on",
    ):
        assert re.search(rf"^\| {row} \| ", out, re.M), f"no row {row}\n{out}"
    servers = re.findall(r"^\| server, .*$", out, re.M)
    assert len(servers) == 2, out  # the loaded and the one-client phase
    for line in servers:  # no answer but 200 (a busy machine may finish none in the short window)
        assert "errors" not in line, line
    assert "one client: p50" in out


def test_every_server_mode_the_scripts_name_exists():
    """The modes --modes offers, and the mode each start_server call passes, are keys of MODES
    (soak.py once passed True, a flag from before the modes, and crashed on start)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import serve_load
    finally:
        sys.path.remove(str(REPO / "bench"))
    default_modes = serve_load.build_parser().get_default("modes").split(",")
    assert set(default_modes) == set(serve_load.MODES)
    for script in BENCH_SCRIPTS:
        tree = ast.parse((REPO / "bench" / script).read_text())
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "start_server":
                mode = call.args[2]
                if isinstance(mode, ast.Constant):
                    assert mode.value in serve_load.MODES, f"{script}:{call.lineno}: mode {mode.value!r}"
                else:  # a variable: serve_load checks --modes against MODES before starting
                    assert script == "serve_load.py", f"{script}:{call.lineno}: pass a mode name"


def test_backends_smoke(smoke_runs):
    """Every candidate that is installed gets a row with its figures and its label count; openvino
    (not a project dependency) is left out, and said so, where it is missing."""
    out = smoke_runs("backends.py")
    assert "| backend | batch 1 img/s | / onnxruntime | batch 8 img/s |" in out
    number = r"[\d,]+ \| [\d.]+"
    for name in ("onnxruntime", "pytorch", "openvino"):
        row = rf"^\| {name} \(.*\) \| {number} \| {number} \| {number} \| [\d.]+ \| \d+ \|$"
        assert re.search(row, out, re.M) or (name == "openvino" and "openvino: left out" in out), out
    assert re.search(r"^\| onnxruntime \(.*\) \| [\d,]+ \| 1\.00 \|", out, re.M), out
    assert "labels compared on 20 test images" in out


@pytest.mark.skipif(sys.platform != "linux", reason="the DDP row spawns gloo processes (Linux here)")
def test_train_throughput_smoke(smoke_runs):
    out = smoke_runs("train_throughput.py")
    row = r"^1 proc x \d+ thr, batch \d+, .* bare +[\d.]+ img/s +full +[\d.]+ img/s +full/bare [\d.]+$"
    rows = re.findall(row, out, re.M)
    assert len(rows) == 2, out  # --smoke: plain fp32 NCHW, and bf16 + channels_last
    assert re.search(r"^DDP \(gloo\) 2 procs x 1 thread, full step: +[\d.]+ img/s", out, re.M), out


def test_train_throughput_distill_smoke():
    """--distill times the distilled step against the plain one and prints their ratio."""
    args = ["--smoke", "--distill", "--teacher-widths", "8,16,16"]
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = (
        r"^1 proc x 1 thr, batch 8, (fp32|bf16) \+ channels_last, .* full step: "
        r"plain [\d.]+ then [\d.]+ img/s, distilled from a 11,000-parameter teacher \((bf16|float32), "
        r"channels_last, inference mode \(bf16 labels agree with float32 on [\d.]+% of [\d,]+ images\)\) "
        r"[\d.]+ img/s; "
        r"distilled / plain [\d.]+$"
    )
    assert re.search(row, proc.stdout, re.M), proc.stdout
