"""Load test of the real service against the bare model, with dynamic batching on and off.

    python bench/serve_load.py --data cifar10-jpeg.tar.gz [--weights weights/final_model.pt]
    python bench/serve_load.py --data cifar10-jpeg.tar.gz --smoke   # a check that it works, in seconds

Measures, in one run on this machine, for each inference backend of --backends (the old path,
PyTorch fp32 NCHW, and ONNX Runtime, the CPU default, unless told otherwise):
1. the bare model (no HTTP) through that backend's predictor on the same images: batch-32
   throughput with N workers x 1 thread and with 1 worker x N threads, and the batch-1 forward time;
2. for each mode (batching on; batching off; batching on with the /predict fast path off, so
   every request goes through the FastAPI route): `uvicorn app.main:app` started as a subprocess
   on 127.0.0.1 and a free port, driven by --clients concurrent clients that each post one real
   CIFAR-10 test JPEG per request (multipart, field `file`), back to back over keep-alive
   connections, for --duration seconds after --warmup seconds; then one client alone, for the
   single-request latency.

It prints images/s, p50/p99 latency and the ratios against the backend's own best bare batch-32
throughput and against its bare model on one worker with all cores as a markdown table, then
each backend against the first one (the old path) served the same way. The load generator
shares the machine's cores with the server, as wrk does when run on the same host: `--client
raw` (the default) is a minimal asyncio HTTP/1.1 client that leaves the server most of the CPU,
like wrk; `--client httpx` uses httpx.AsyncClient, several times heavier per request, which
lowers every server figure on a small machine. On a busy machine every figure reads low. All
loops are bounded by time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import launch  # noqa: E402  (the standard library only)

# torch and the rest of app.* are imported where they are used: bench/soak.py borrows the
# server helpers below and should not pay for importing torch in the load generator.

BOUNDARY = "cifar10-bench-boundary"
MULTIPART_HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def add_smoke_flag(p: argparse.ArgumentParser, smoke: dict) -> None:
    """--smoke: the script end to end in seconds, with `smoke`'s settings over any given."""
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a check that the script works, in seconds: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in smoke.items())
        + " (over any given); its figures mean nothing",
    )


def weights_or_random(weights: str, folder: str | Path) -> Path:
    """`weights`, or where it is missing a randomly initialised FinalModel written into `folder`
    (the speed is the same; the labels mean nothing)."""
    path = Path(weights)
    if path.is_file():
        return path
    import torch

    from app.checkpoint import save_checkpoint
    from app.model import FinalModel

    path = Path(folder) / "random.pt"
    torch.manual_seed(0)
    save_checkpoint(path, FinalModel())
    print(f"{weights} not found: a randomly initialised FinalModel (same speed, labels mean nothing)")
    return path


def add_data_flags(p: argparse.ArgumentParser, what: str = "serve") -> None:
    """--data and --weights, as every serving benchmark takes them."""
    p.add_argument(
        "--data", required=True, help="CIFAR-10 JPEG archive (.tar.gz) or folder; test/ images are used"
    )
    p.add_argument(
        "--weights",
        default="weights/final_model.pt",
        help=f"checkpoint to {what}; if missing, a randomly initialised one (speed does not depend on it)",
    )


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The settings every benchmark gives the server it starts (`start_server`)."""
    p.add_argument("--max-batch-size", type=int, default=32, help="CIFAR10_MAX_BATCH_SIZE for the server")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="CIFAR10_MAX_WAIT_MS for the server")
    p.add_argument("--workers", type=int, default=0, help="CIFAR10_WORKERS (0: one per core)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /health/ready")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/serve_load.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_flags(p)
    p.add_argument("--images", type=int, default=1000, help="how many test JPEGs to cycle through")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, one image per request")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per load phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--single-duration", type=float, default=4.0, help="seconds of the one-client phase")
    p.add_argument("--bare-duration", type=float, default=3.0, help="seconds per bare-model measurement")
    add_server_flags(p)
    p.add_argument(
        "--modes",
        default="on,off,route",
        help="server modes to run, comma-separated: on (batching), off (no batching), route (batching, "
        "with every request through the FastAPI route: CIFAR10_FAST_PATH=false)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="CIFAR10_DEVICE for the server and the bare model's device (cuda: one inference worker)",
    )
    p.add_argument(
        "--backends",
        default="pytorch-nchw,onnxruntime",
        help="inference backends to measure, comma-separated, the baseline first: "
        + ", ".join(f"{name} ({what})" for name, (what, _) in BACKENDS.items()),
    )
    p.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw asyncio HTTP/1.1 (light, like wrk) or httpx.AsyncClient",
    )
    add_smoke_flag(p, SMOKE)
    return p


# --smoke: every phase runs, briefly, for the default mode (batching on, fast path on).
SMOKE = {
    "modes": "on",  # each further mode costs a server start (seconds of imports on a busy CPU)
    "backends": "auto",  # and so does each further backend
    "images": 20,
    "clients": 4,
    "duration": 0.5,
    "warmup": 0.3,
    "single_duration": 0.3,
    "bare_duration": 0.2,
}


# -- data ------------------------------------------------------------------------------------


def read_test_jpegs(source: Path, count: int) -> list[bytes]:
    """`count` test-split JPEGs, spread evenly over the split (so over all ten classes)."""
    found: list[tuple[str, bytes]] = []
    if source.is_dir():
        root = next((p for p in [source / "test", *source.glob("*/test")] if p.is_dir()), source)
        for path in sorted(root.rglob("*")):
            if path.suffix.lower() in (".jpg", ".jpeg"):
                found.append((str(path), path.read_bytes()))
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            for member in tar:
                name = member.name
                if member.isfile() and "test/" in name and name.lower().endswith((".jpg", ".jpeg")):
                    file = tar.extractfile(member)
                    assert file is not None  # a regular file
                    found.append((name, file.read()))
    else:
        raise SystemExit(f"error: {source} is neither a folder nor a tar archive")
    if not found:
        raise SystemExit(f"error: no test JPEGs under {source}")
    found.sort()
    step = max(1, len(found) // count)
    return [data for _, data in found[::step][:count]]


def multipart_body(jpeg: bytes, name: str) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()


# -- the bare model --------------------------------------------------------------------------


def bare_throughput(
    model, images: torch.Tensor, batch: int, workers: int, threads: int, seconds: float
) -> float:
    """Images/s of `workers` threads each running batch-`batch` forward passes back to back."""
    import torch

    torch.set_num_threads(threads)
    x = images[:batch].contiguous()
    for _ in range(3):
        model.probabilities(x)
    counts = [0] * workers
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            model.probabilities(x)
            counts[i] += batch

    threads_ = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    started = time.perf_counter()
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def bare_latency_ms(model, images: torch.Tensor, seconds: float) -> float:
    import torch

    torch.set_num_threads(1)
    times = []
    stop = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < stop:
        x = images[i % len(images)].unsqueeze(0)
        t = time.perf_counter()
        model.probabilities(x)
        times.append(time.perf_counter() - t)
        i += 1
    return 1000 * statistics.median(times)


# -- the server ------------------------------------------------------------------------------


# name -> (what it is, the service settings that select it)
BACKENDS = {
    "pytorch-nchw": (
        "PyTorch fp32 NCHW, the service's old path",
        {"backend": "pytorch", "precision": "fp32", "layout": "nchw"},
    ),
    "pytorch": (
        "PyTorch fp32 channels_last",
        {"backend": "pytorch", "precision": "fp32", "layout": "channels_last"},
    ),
    "bf16": (
        "PyTorch bf16 autocast channels_last",
        {"backend": "pytorch", "precision": "bf16", "layout": "channels_last"},
    ),
    "onnxruntime": ("ONNX Runtime fp32", {"backend": "onnxruntime", "precision": "fp32", "layout": "auto"}),
    "auto": ("the service's default here", {"backend": "auto", "precision": "auto", "layout": "auto"}),
}

MODES = {  # mode -> (batching, fast path)
    "on": (True, True),
    "off": (False, True),
    "route": (True, False),
}


@contextmanager
def start_server(
    args,
    weights: Path,
    mode: str,
    backend: str = "auto",
    env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> Iterator[launch.Server]:
    """`uvicorn app.main:app` in `mode` (MODES) with `backend` (BACKENDS), ready for the `with`
    block (up to --startup-timeout seconds), then stopped; `env` (CIFAR10_*, UVICORN_*) goes over
    the settings chosen here; `root`: the tree whose `app` it runs (another commit's, checked out
    beside this one, for a before-and-after run). Its output goes to this script's."""
    batching, fast_path = MODES[mode]
    settings = {
        **{f"CIFAR10_{key.upper()}": value for key, value in BACKENDS[backend][1].items()},
        "CIFAR10_WEIGHTS": str(weights),
        "CIFAR10_DEVICE": getattr(args, "device", "cpu"),
        "CIFAR10_BATCHING": "true" if batching else "false",
        "CIFAR10_FAST_PATH": "true" if fast_path else "false",
        "CIFAR10_MAX_BATCH_SIZE": str(args.max_batch_size),
        "CIFAR10_MAX_WAIT_MS": str(args.max_wait_ms),
        "CIFAR10_WORKERS": str(args.workers),
        "CIFAR10_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    quiet = ["--log-level", "warning", "--no-access-log"]
    try:
        with launch.running(
            settings, quiet, capture=False, cwd=root, timeout=args.startup_timeout, stop_timeout=15
        ) as server:
            yield server
    except launch.NotReady as exc:
        raise SystemExit(f"error: {exc}") from None


@contextmanager
def worktree(ref: str):
    """A detached checkout of `ref` beside this repository, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="cifar10-baseline-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
                       check=True, capture_output=True)  # fmt: skip
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def batch_stats(base: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = re.search(r"^cifar10_batch_size_sum (\S+)$", text, re.M)
    count = re.search(r"^cifar10_batch_size_count (\S+)$", text, re.M)
    if total is None or count is None:
        raise RuntimeError(f"{base}/metrics has no cifar10_batch_size histogram")
    return float(total.group(1)), float(count.group(1))


@dataclass
class LoadResult:
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float


class RawConnection:
    """One keep-alive HTTP/1.1 connection posting prepared requests: a client as light as asyncio
    allows, so that the server and not the client is what gets measured."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> int:
        """The response's status code, or 0 when the connection failed."""
        try:
            if self.reader is None or self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            reader, writer = self.reader, self.writer
            writer.write(request)
            status = int((await reader.readline()).split(b" ", 2)[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            await reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            self.close()
            return 0
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def raw_request(body: bytes, host: str, port: int, target: str = "/predict") -> bytes:
    head = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def warm_up(url: str, targets: Iterable[str], body: bytes) -> None:
    """One request to each target, waited for however long it takes, before anything is timed."""
    for target in targets:
        first = httpx.post(f"{url}{target}", content=body, headers=MULTIPART_HEADERS, timeout=120.0)
        if first.status_code != 200:
            raise SystemExit(f"error: {target} answered {first.status_code}: {first.text[:200]}")


async def drive(
    base: str,
    bodies: list[bytes],
    clients: int,
    warmup: float,
    duration: float,
    kind: str,
    target: str = "/predict",
) -> LoadResult:
    """`clients` back-to-back posters to `target` (path and query); only requests started after
    the warm-up are counted."""
    latencies: list[float] = []
    errors = 0
    url = httpx.URL(base)
    assert url.port is not None  # the servers here listen on an explicit port
    port: int = url.port
    raw_requests = [raw_request(b, url.host, port, target) for b in bodies]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    measure_from, stop_at = t0 + warmup, t0 + warmup + duration
    batch_before: tuple[float, float] | None = None

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as client:

        async def post(i: int, raw: RawConnection) -> int:
            if kind == "raw":
                return await asyncio.wait_for(raw.post(raw_requests[i]), 30.0)
            try:
                return (await client.post(target, content=bodies[i], headers=MULTIPART_HEADERS)).status_code
            except httpx.HTTPError:
                return 0

        async def poster(k: int) -> None:
            nonlocal errors
            raw = RawConnection(url.host, port)
            i = k
            while (start := loop.time()) < stop_at:
                status = await post(i % len(bodies), raw)
                i += clients
                if start >= measure_from and loop.time() <= stop_at:
                    if status == 200:
                        latencies.append(loop.time() - start)
                    else:
                        errors += 1
            raw.close()

        async def snapshot() -> None:
            nonlocal batch_before
            await asyncio.sleep(warmup)
            batch_before = await asyncio.to_thread(batch_stats, base)

        await asyncio.gather(snapshot(), *(poster(k) for k in range(clients)))
    total_after, count_after = await asyncio.to_thread(batch_stats, base)
    total_before, count_before = batch_before or (0.0, 0.0)
    mean_batch = (total_after - total_before) / max(1.0, count_after - count_before)
    latencies.sort()
    if not latencies:
        return LoadResult(0.0, float("nan"), float("nan"), errors, mean_batch)
    return LoadResult(
        images_per_s=len(latencies) / duration,
        p50_ms=1000 * latencies[len(latencies) // 2],
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        errors=errors,
        mean_batch=mean_batch,
    )


# -- main ------------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN -> "-"


def main(argv: list[str] | None = None) -> int:
    import torch

    from app.preprocess import load_image
    from app.settings import available_cpus

    args = build_parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        print("smoke run: a check that the script works; its figures mean nothing")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"error: unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    backends = [m.strip() for m in args.backends.split(",") if m.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise SystemExit(f"error: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    cores = available_cpus()
    b = args.max_batch_size
    jpegs = read_test_jpegs(Path(args.data), args.images)
    bodies = [multipart_body(j, f"{i}.jpg") for i, j in enumerate(jpegs)]
    images = torch.stack([load_image(io.BytesIO(j)) for j in jpegs])
    print(
        f"{len(jpegs)} CIFAR-10 test JPEGs from {args.data}; {cores} CPU core(s); torch {torch.__version__}; "
        f"device {args.device}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        weights = weights_or_random(args.weights, tmp)
        results = [measure_backend(args, name, weights, images, bodies) for name in backends]

    print(f"\n{args.client} client; ratios against each backend's own best bare batch-{b} throughput\n")
    print(
        f"| configuration | clients | images/s | p50 ms | p99 ms | / bare batch-{b} | "
        f"/ bare 1 x {cores} threads | mean batch | backend |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        for name, clients, ips, p50, p99, batch in r.rows:
            print(
                f"| {name} | {clients} | {ips:,.0f} | {_ms(p50)} | {_ms(p99)} | {ips / r.best_bare:.2f} | "
                f"{ips / r.bare_1:.2f} | {batch} | {r.name} |"
            )
    print()
    base = results[0]
    for r in results:
        print(f"{r.name} ({r.describe}):")
        loaded, single = r.loaded, r.single
        if "on" in loaded:
            ratio = loaded["on"].images_per_s / r.best_bare
            print(f"  batching on, {args.clients} clients / best bare batch-{b}: {ratio:.2f} (aim >= 0.75)")
            ratio = loaded["on"].images_per_s / r.bare_1
            print(f"  batching on, {args.clients} clients / bare batch-{b}, 1 x {cores} threads: {ratio:.2f}")
        if "on" in loaded and "route" in loaded and loaded["route"].images_per_s:
            ratio = loaded["on"].images_per_s / loaded["route"].images_per_s
            print(f"  fast path / FastAPI route, batching on, {args.clients} clients: {ratio:.2f}x")
        if "on" in loaded and "off" in loaded and loaded["off"].images_per_s:
            ratio = loaded["on"].images_per_s / loaded["off"].images_per_s
            print(f"  batching on / off, {args.clients} clients: {ratio:.2f}x")
        if "on" in single:
            extra = single["on"].p50_ms - r.bare_lat
            print(
                f"  one client: p50 {single['on'].p50_ms:.2f} ms, bare batch-1 forward {r.bare_lat:.2f} ms: "
                f"{extra:+.2f} ms (aim <= 1 ms)"
            )
        if r is not base and "on" in loaded and "on" in base.loaded and base.loaded["on"].images_per_s:
            ratio = loaded["on"].images_per_s / base.loaded["on"].images_per_s
            print(f"  served, {args.clients} clients, batching on / {base.name}: {ratio:.2f}x (aim >= 1.8x)")
            if "on" in single and "on" in base.single and base.single["on"].images_per_s:
                ratio = single["on"].images_per_s / base.single["on"].images_per_s
                p50s = f"p50 {single['on'].p50_ms:.2f} ms against {base.single['on'].p50_ms:.2f} ms"
                print(f"  served, 1 client / {base.name}: {ratio:.2f}x ({p50s})")
    return 0


@dataclass
class BackendResult:
    name: str
    describe: str
    best_bare: float
    bare_1: float
    bare_lat: float
    rows: list
    loaded: dict
    single: dict


def measure_backend(args, name: str, weights: Path, images, bodies: list[bytes]) -> BackendResult:
    """The bare predictor, then the server in every mode, for one backend of BACKENDS."""
    import torch

    from app.predictor import build_predictor
    from app.service import load_model
    from app.settings import available_cpus

    cores = available_cpus()
    device = torch.device(args.device)
    workers = args.workers or (cores if device.type == "cpu" else 1)  # the server's default
    b = args.max_batch_size
    config = BACKENDS[name][1]

    def loaded_with(threads: int):
        def make(model, device):
            return build_predictor(model, device, threads=threads, **config)

        return load_model(weights, device, make)

    # The same thread layouts as the server: N workers x 1 thread, and 1 worker x N threads.
    single_threaded = loaded_with(1)
    describe = single_threaded.predictor.info.describe()
    bare_n = bare_throughput(single_threaded, images, b, workers, 1, args.bare_duration)
    bare_1 = bare_throughput(loaded_with(cores), images, b, 1, cores, args.bare_duration)
    bare_lat = bare_latency_ms(single_threaded, images, args.bare_duration)
    nan = float("nan")
    rows = [
        (f"bare model, batch {b}, {workers} worker(s) x 1 thread", "-", bare_n, nan, nan, ""),
        (f"bare model, batch {b}, 1 worker x {cores} thread(s)", "-", bare_1, nan, nan, ""),
        ("bare model, batch 1 forward, 1 thread", "1", 1000 / bare_lat, bare_lat, nan, ""),
    ]
    loaded: dict[str, LoadResult] = {}
    single: dict[str, LoadResult] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        with start_server(args, weights, mode, backend=name) as server:
            loaded[mode] = asyncio.run(
                drive(server.url, bodies, args.clients, args.warmup, args.duration, args.client)
            )
            single[mode] = asyncio.run(drive(server.url, bodies, 1, 0.5, args.single_duration, args.client))
        for r, clients in ((loaded[mode], args.clients), (single[mode], 1)):
            note = f"{r.mean_batch:.1f}" + (f" ({r.errors} errors)" if r.errors else "")
            label = "server, batching on, FastAPI route" if mode == "route" else f"server, batching {mode}"
            rows.append((label, str(clients), r.images_per_s, r.p50_ms, r.p99_ms, note))
    return BackendResult(name, describe, max(bare_n, bare_1), bare_1, bare_lat, rows, loaded, single)


if __name__ == "__main__":
    sys.exit(main())
