"""Overload: goodput, latency of admitted requests and refusals when far more clients come than fit.

    python bench/overload.py --data cifar10-jpeg.tar.gz [--duration 10]
    python bench/overload.py --data cifar10-jpeg.tar.gz --smoke   # a check that it works, in seconds

Starts `uvicorn app.main:app` once (the helpers of `bench/serve_load.py`, with the service's
HTTP protocol: `--http app.connections:GuardedHTTPProtocol` unless --set UVICORN_HTTP=...
says otherwise), then measures, in one run against that one server, one phase per line of
--phases (connections x clients):

1. capacity: --capacity-connections (32) keep-alive connections posting one CIFAR-10 test JPEG
   per request back to back (multipart, field `file`); its rate of 200 answers is the capacity;
2. overload, 8x and 32x (256 and 1024 connections), with clients that ignore Retry-After (a
   refused client sends again at once, as wrk does) and clients that honour it (they wait the
   seconds it names before sending again).

Per phase it prints goodput (200 answers per second) and goodput / capacity, the p50, p99 and
max latency of the admitted requests (those answered 200), the refusals by reason (the error
code of the answer, or `connection` for a connection refused, reset or closed unanswered),
timeouts (requests that waited --timeout seconds, 10 s by default, with no answer), the
server's resident memory at the end of the phase, and the CPU time the server and this load
generator spent per second of the phase (the generator must not be what limits the figures).

The load generator is a lean asyncio client (asyncio.Protocol, uvloop when installed) in this
process, apart from the server; on a small machine it shares the cores with the server, as wrk
does on the same host. Every loop is bounded by time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import (  # noqa: E402
    add_data_flags,
    add_smoke_flag,
    batch_stats,
    multipart_body,
    raw_request,
    read_test_jpegs,
    start_server,
    weights_or_random,
)
from soak import rss_mb  # noqa: E402

PROTOCOL = "app.connections:GuardedHTTPProtocol"
DEFAULT_PHASES = "32:ignore,256:ignore,256:honour,1024:ignore,1024:honour"
CODE = re.compile(rb'"code"\s*:\s*"([^"]+)"')
RETRY_AFTER = re.compile(rb"\r\nretry-after:\s*(\d+)", re.I)
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
CLOSE = re.compile(rb"\r\nconnection:\s*close", re.I)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/overload.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_flags(p)
    p.add_argument("--images", type=int, default=500, help="how many test JPEGs to cycle through")
    p.add_argument(
        "--phases",
        default=DEFAULT_PHASES,
        help="comma-separated CONNECTIONS:CLIENTS, CLIENTS ignore (resend at once) or honour (wait "
        "Retry-After); the first is the capacity phase (default: %(default)s)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring, per phase")
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds after which a request counts as timed out"
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="CIFAR10_MAX_BATCH_SIZE for the server")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="CIFAR10_MAX_WAIT_MS for the server")
    p.add_argument("--workers", type=int, default=0, help="CIFAR10_WORKERS (0: one per core)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the server (CIFAR10_* settings, UVICORN_* options), repeatable",
    )
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /health/ready")
    add_smoke_flag(p, SMOKE)
    return p


SMOKE = {"images": 20, "phases": "4:ignore,16:ignore,16:honour", "duration": 1.0, "warmup": 0.3}


# -- the client ------------------------------------------------------------------------------


@dataclass
class Phase:
    connections: int
    honour: bool
    measure_from: float = 0.0
    stop_at: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, requests answered 200
    refusals: Counter = field(default_factory=Counter)  # reason -> count
    timeouts: int = 0
    good_in_window: int = 0  # 200 answers received inside the measured window

    @property
    def name(self) -> str:
        return f"{self.connections}:{'honour' if self.honour else 'ignore'}"


class Exchange(asyncio.Protocol):
    """One connection; `ask(request)` resolves to (status, retry_after, reason) or raises ConnectionError."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def ask(self, request: bytes) -> asyncio.Future:
        assert self.transport is not None  # asked only once connected
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[: end + 2])
        length = CONTENT_LENGTH.search(head)
        size = end + 4 + (int(length[1]) if length else 0)
        if len(self.buffer) < size:
            return
        body = bytes(self.buffer[end + 4 : size])
        del self.buffer[:size]
        status = int(head[9:12])
        retry = RETRY_AFTER.search(head)
        code = CODE.search(body) if status != 200 else None
        reason = code[1].decode() if code else str(status)
        if CLOSE.search(head) and self.transport is not None:
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, int(retry[1]) if retry else 0, reason))

    def connection_lost(self, exc) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed before the answer"))
        if not self.closed.done():
            self.closed.set_result(None)


async def client(k: int, port: int, requests: list[bytes], phase: Phase, timeout: float) -> None:
    """Back-to-back requests over one connection (a new one when it closes) until the phase ends."""
    loop = asyncio.get_running_loop()
    conn: Exchange | None = None
    i = k
    while (start := loop.time()) < phase.stop_at:
        counted = start >= phase.measure_from
        try:
            if conn is None or conn.transport is None or conn.transport.is_closing():
                _, conn = await loop.create_connection(Exchange, "127.0.0.1", port)
            status, retry_after, reason = await asyncio.wait_for(
                conn.ask(requests[i % len(requests)]), timeout
            )
        except TimeoutError:
            if counted:
                phase.timeouts += 1
            if conn is not None and conn.transport is not None:
                conn.transport.close()
            conn = None
            continue
        except (ConnectionError, OSError):
            if counted:
                phase.refusals["connection"] += 1
            conn = None
            await asyncio.sleep(0.01)  # a refused connect, not a busy loop
            continue
        i += phase.connections
        end = loop.time()
        if counted:
            if status == 200:
                phase.latencies.append(end - start)
                phase.good_in_window += end <= phase.stop_at
            else:
                phase.refusals[reason] += 1
        if status != 200 and phase.honour and retry_after:
            await asyncio.sleep(min(retry_after, max(0.0, phase.stop_at - loop.time())))
    if conn is not None and conn.transport is not None:
        conn.transport.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batches(port: int) -> tuple[float, float]:
    """(images, batches) the server has run so far; NaNs when /metrics does not answer in time."""
    try:
        return batch_stats(f"http://127.0.0.1:{port}")
    except httpx.HTTPError:
        return float("nan"), float("nan")


@dataclass
class PhaseResult:
    phase: Phase
    duration: float
    rss_mb: float
    server_cpu: float  # cores, over the measured window
    client_cpu: float
    mean_batch: float

    @property
    def goodput(self) -> float:
        return self.phase.good_in_window / self.duration


async def run_phase(phase: Phase, port: int, pid: int, requests: list[bytes], args) -> PhaseResult:
    loop = asyncio.get_running_loop()
    phase.measure_from = loop.time() + args.warmup
    phase.stop_at = phase.measure_from + args.duration
    tasks = [
        asyncio.create_task(client(k, port, requests, phase, args.timeout)) for k in range(phase.connections)
    ]
    await asyncio.sleep(max(0.0, phase.measure_from - loop.time()))
    server0, client0 = cpu_seconds(pid), time.process_time()
    batches0 = await asyncio.to_thread(batches, port)
    await asyncio.sleep(max(0.0, phase.stop_at - loop.time()))
    server_cpu = (cpu_seconds(pid) - server0) / args.duration
    client_cpu = (time.process_time() - client0) / args.duration
    batches1 = await asyncio.to_thread(batches, port)
    mean_batch = (batches1[0] - batches0[0]) / max(1.0, batches1[1] - batches0[1])
    rss = rss_mb(pid)
    await asyncio.wait(tasks, timeout=args.timeout + 5)  # requests in flight finish or time out
    for task in tasks:
        task.cancel()
    await asyncio.sleep(0.5)  # let the server see the connections close before the next phase
    return PhaseResult(phase, args.duration, rss, server_cpu, client_cpu, mean_batch)


def parse_phases(text: str) -> list[Phase]:
    phases = []
    for item in text.split(","):
        connections, _, kind = item.strip().partition(":")
        if not connections.isdigit() or kind not in ("ignore", "honour"):
            raise SystemExit(f"error: bad phase {item!r}: write CONNECTIONS:ignore or CONNECTIONS:honour")
        phases.append(Phase(int(connections), kind == "honour"))
    return phases


# -- the report ------------------------------------------------------------------------------


def _ms(values: list[float], q: float | None) -> str:
    if not values:
        return "-"
    value = values[-1] if q is None else values[min(len(values) - 1, int(q * len(values)))]
    return f"{1000 * value:,.0f}"


def report(results: list[PhaseResult]) -> None:
    capacity = results[0].goodput
    print(
        "\n| connections | Retry-After | goodput /s | / capacity | p50 ms | p99 ms | max ms | refusals /s "
        "by reason | timeouts | mean batch | server RSS MB | server CPU | client CPU |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        p = r.phase
        lat = sorted(p.latencies)
        refusals = (
            ", ".join(f"{reason} {n / r.duration:,.0f}" for reason, n in p.refusals.most_common()) or "-"
        )
        ratio = r.goodput / capacity if capacity else float("nan")
        print(
            f"| {p.connections:,} | {'honour' if p.honour else 'ignore'} | {r.goodput:,.0f} | {ratio:.2f} | "
            f"{_ms(lat, 0.5)} | {_ms(lat, 0.99)} | {_ms(lat, None)} | {refusals} | {p.timeouts} | "
            f"{r.mean_batch:.1f} | {r.rss_mb:,.0f} | {r.server_cpu:.2f} | {r.client_cpu:.2f} |"
        )
    print(f"\ncapacity ({results[0].phase.name}): {capacity:,.0f} answers/s")
    for r in results[1:]:
        p = r.phase
        worst = max(p.latencies, default=0.0)
        print(
            f"  {p.name}: goodput / capacity {r.goodput / capacity if capacity else float('nan'):.2f}; "
            f"timeouts {p.timeouts}; slowest admitted {worst:.2f} s"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        print("smoke run: a check that the script works; its figures mean nothing")
    phases = parse_phases(args.phases)
    server_env = {"UVICORN_HTTP": PROTOCOL, "UVICORN_BACKLOG": "4096"}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: write NAME=VALUE")
        server_env[name] = value
    jpegs = read_test_jpegs(Path(args.data), args.images)
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    print(
        f"{len(jpegs)} CIFAR-10 test JPEGs from {args.data}; {os.cpu_count()} CPU(s); client loop {loop_name}"
    )
    print("server environment: " + " ".join(f"{k}={v}" for k, v in server_env.items()))

    with tempfile.TemporaryDirectory() as tmp:
        weights = weights_or_random(args.weights, tmp)
        # batching on, fast path on: the defaults; --set goes over them
        with start_server(args, weights, "on", env=server_env) as server:
            port, proc = server.port, server.proc
            requests = [
                raw_request(multipart_body(j, f"{i}.jpg"), "127.0.0.1", port) for i, j in enumerate(jpegs)
            ]
            print(
                f"server pid {proc.pid} on 127.0.0.1:{port}; RSS {rss_mb(proc.pid):.0f} MB when ready",
                flush=True,
            )

            async def run_all() -> list[PhaseResult]:
                results = []
                for phase in phases:
                    results.append(await run_phase(phase, port, proc.pid, requests, args))
                    r = results[-1]
                    print(
                        f"  {phase.name}: {r.goodput:,.0f} answers/s, {phase.timeouts} timeouts", flush=True
                    )
                return results

            results = asyncio.run(run_all())
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    report(results)
    cut = re.findall(r"^cifar10_slow_clients_total\{phase=\"(\w+)\"\} (\S+)$", metrics, re.M)
    refused = re.search(r"^cifar10_connections_refused_total (\S+)$", metrics, re.M)
    if cut or refused:
        print(
            "server: slow clients cut off "
            + (", ".join(f"{phase} {float(n):.0f}" for phase, n in cut) or "-")
            + f"; connections refused over the cap {float(refused[1]) if refused else 0:.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
