"""Soak test: the real server under sustained load from valid and hostile uploads.

    python bench/soak.py --data cifar10-jpeg.tar.gz [--duration 180] [--concurrency 64]
    python bench/soak.py --smoke            # a check that it works, in seconds (what CI runs)

Starts `uvicorn app.main:app` as a subprocess on 127.0.0.1 and a free port (the helpers of
`bench/serve_load.py`), then --concurrency clients post back to back over keep-alive
connections until --duration seconds or --max-requests requests have gone by. About
--invalid-fraction of the requests are bad on purpose, one kind after another:

    empty file, truncated JPEG, text file, PNG header declaring 100,000 x 100,000 pixels
    (a decompression bomb), max_files + 1 files, the wrong form field, a JSON body.

The rest post one real CIFAR-10 test JPEG each (from --data; generated images without it).
Every kind has one expected status and error code; the script prints the answers by kind and
code, latency percentiles per --window seconds, and the server's resident memory (VmRSS from
/proc) at the start, per window and at the end. It exits with 1 if any answer was a 5xx, any
connection was dropped, or any answer differed from what its kind expects. Only loopback is
used, and every loop is bounded by time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import add_smoke_flag, read_test_jpegs, start_server, weights_or_random  # noqa: E402

BOUNDARY = "cifar10-soak-boundary"
BOMB_SIDE = 100_000  # pixels per side declared by the bomb's PNG header: 10 gigapixels
REQUEST_TIMEOUT_S = 60.0
TEXT = b"just some notes, not a picture\n" * 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", help="CIFAR-10 JPEG archive (.tar.gz) or folder; without it, generated images")
    p.add_argument(
        "--weights",
        default="weights/final_model.pt",
        help="checkpoint to serve; if missing, a randomly initialised one (labels do not matter here)",
    )
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many requests")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients (keep-alive connections)")
    p.add_argument("--invalid-fraction", type=float, default=0.2, help="share of requests that are bad")
    p.add_argument("--window", type=float, default=30.0, help="seconds per latency and memory report")
    p.add_argument("--images", type=int, default=1000, help="how many test JPEGs to cycle through")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--max-batch-size", type=int, default=32, help="CIFAR10_MAX_BATCH_SIZE for the server")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="CIFAR10_MAX_WAIT_MS for the server")
    p.add_argument("--workers", type=int, default=0, help="CIFAR10_WORKERS (0: one per core)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /health/ready")
    add_smoke_flag(p, SMOKE)
    return p


# --smoke: every part runs (server, all request kinds, windows, memory, report), briefly.
SMOKE = {"duration": 3.0, "concurrency": 8, "window": 1.0, "images": 50}


# -- requests --------------------------------------------------------------------------------


def part(name: str, filename: str | None, content_type: str, data: bytes) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
    return head.encode() + data + b"\r\n"


def multipart(*parts: bytes) -> tuple[bytes, str]:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), f"multipart/form-data; boundary={BOUNDARY}"


def http_request(body: bytes, content_type: str) -> bytes:
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def png_header_only(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header declares width x height pixels (decoding it would need them all)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def generated_jpegs(count: int) -> list[bytes]:
    """Smooth random 32x32 JPEGs, when no CIFAR-10 archive is given."""
    rng = random.Random(0)
    out = []
    for _ in range(count):
        low = Image.frombytes("RGB", (4, 4), rng.randbytes(48))
        buffer = io.BytesIO()
        low.resize((32, 32), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


@dataclass(frozen=True)
class Kind:
    """One kind of request: its prepared HTTP requests and the answer it must get."""

    name: str
    requests: list[bytes]
    status: int
    code: str | None  # the error body's code; None for 200


def request_kinds(jpegs: list[bytes], max_files: int) -> tuple[Kind, list[Kind]]:
    """(the valid kind, the invalid kinds)."""
    valid = [http_request(*multipart(part("file", f"{i}.jpg", "image/jpeg", j))) for i, j in enumerate(jpegs)]
    one = jpegs[0]
    bomb = png_header_only(BOMB_SIDE, BOMB_SIDE)
    many = b"".join(part("file", f"{i}.jpg", "image/jpeg", one) for i in range(max_files + 1))
    bad = [
        ("empty", part("file", "empty.jpg", "image/jpeg", b""), 400, "empty_file"),
        ("truncated", part("file", "cut.jpg", "image/jpeg", one[: len(one) // 2]), 400, "corrupt_image"),
        ("text", part("file", "notes.txt", "text/plain", TEXT), 415, "unsupported_media_type"),
        ("bomb", part("file", "bomb.png", "image/png", bomb), 413, "too_many_pixels"),
        ("too_many_files", many, 413, "too_many_files"),
        ("wrong_field", part("image", "a.jpg", "image/jpeg", one), 422, "invalid_request"),
    ]
    invalid = [Kind(name, [http_request(*multipart(p))], status, code) for name, p, status, code in bad]
    not_multipart = http_request(b'{"image": "aGVsbG8="}', "application/json")
    invalid.append(Kind("json_body", [not_multipart], 415, "unsupported_media_type"))
    return Kind("valid", valid, 200, None), invalid


# -- the client ------------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; `post` returns (status, body), status 0 when it failed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, request: bytes) -> tuple[int, bytes]:
        try:
            if self.reader is None or self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
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
            body = await reader.readexactly(length)
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            self.close()
            return 0, b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class Tally:
    started: float
    answers: Counter = field(default_factory=Counter)  # (kind, status, code) -> count
    samples: list[tuple[float, float, bool]] = field(default_factory=list)  # (start s, latency s, valid)
    sent: int = 0


def outcome(kind: Kind, status: int, body: bytes) -> str | None:
    """The error code of a non-200 answer ('-' when the body is not ours), or None for a good 200."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return "-"
    if status == 200:
        good = isinstance(parsed, dict) and len(parsed.get("predictions", ())) == 1
        return None if good else "bad_200_body"
    return parsed.get("code", "-") if isinstance(parsed, dict) else "-"


async def client(port: int, kinds: list[Kind], weights: list[float], k: int, tally: Tally, args) -> None:
    """Client k: its first request is of kind k (mod the kinds), so with at least as many clients
    as kinds every kind is sent even in the shortest run; the rest are drawn by weight."""
    rng = random.Random(args.seed + k)
    first = True
    conn = Connection(port)
    loop = asyncio.get_running_loop()
    stop_at = tally.started + args.duration
    while (start := loop.time()) < stop_at and tally.sent < args.max_requests:
        tally.sent += 1
        kind = kinds[k % len(kinds)] if first else rng.choices(kinds, weights)[0]
        first = False
        try:
            status, body = await asyncio.wait_for(conn.post(rng.choice(kind.requests)), REQUEST_TIMEOUT_S)
        except TimeoutError:
            conn.close()
            status, body = 0, b""
        latency = loop.time() - start
        code = "connection_error" if status == 0 else outcome(kind, status, body)
        tally.answers[(kind.name, status, code)] += 1
        tally.samples.append((start - tally.started, latency, kind.name == "valid"))
    conn.close()


# -- memory and reports ----------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ms(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN (no requests) -> "-"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def watch_memory(pid: int, tally: Tally, args, rss: list[tuple[float, float]]) -> None:
    """VmRSS at the end of every window, printed as it is taken."""
    loop = asyncio.get_running_loop()
    end = min(tally.started + args.duration, loop.time() + args.duration)
    n = 1
    while (wake := tally.started + n * args.window) < end:
        await asyncio.sleep(max(0.0, wake - loop.time()))
        rss.append((loop.time() - tally.started, rss_mb(pid)))
        print(f"  {rss[-1][0]:5.0f} s: {tally.sent:,} requests, server RSS {rss[-1][1]:.1f} MB", flush=True)
        n += 1


def report(tally: Tally, kinds: list[Kind], args, elapsed: float, rss: list[tuple[float, float]]) -> bool:
    """Print the figures; True when every answer was the expected one."""
    expected = {k.name: (k.status, k.code) for k in kinds}
    total = sum(tally.answers.values())
    print(
        f"\n{total:,} requests in {elapsed:.1f} s ({total / elapsed:,.0f} requests/s), "
        f"{args.concurrency} clients"
    )

    print("\n| kind | status | code | count | expected |")
    print("|---|---:|---|---:|---|")
    server_errors = dropped = unexpected = 0
    for (name, status, code), count in sorted(tally.answers.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        ok = (status, code) == expected[name]
        print(f"| {name} | {status} | {code or '-'} | {count:,} | {'yes' if ok else 'NO'} |")
        server_errors += count if status >= 500 else 0
        dropped += count if status == 0 else 0
        unexpected += 0 if ok else count
    print(f"\n5xx: {server_errors}; dropped connections: {dropped}; other unexpected answers: "
          f"{unexpected - server_errors - dropped}")  # fmt: skip

    print("\n| window | requests | valid/s | valid p50 ms | valid p99 ms | all p99 ms | server RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    windows = max(1, math.ceil(min(elapsed, args.duration) / args.window - 1e-6))
    for w in range(windows):
        lo, hi = w * args.window, (w + 1) * args.window if w < windows - 1 else elapsed
        inside = [(lat, valid) for t, lat, valid in tally.samples if lo <= t < hi]
        valid = [1000 * lat for lat, ok in inside if ok]
        every = [1000 * lat for lat, _ in inside]
        memory = [mb for t, mb in rss if t <= hi + 0.5][-1]  # taken as the window ended
        p50, p99, all_p99 = percentile(valid, 0.5), percentile(valid, 0.99), percentile(every, 0.99)
        print(
            f"| {lo:.0f}-{hi:.0f} s | {len(inside):,} | {len(valid) / max(hi - lo, 1e-9):,.0f} | "
            f"{_ms(p50)} | {_ms(p99)} | {_ms(all_p99)} | {memory:.1f} |"
        )
    start, after_first, end = rss[0][1], rss[1][1] if len(rss) > 2 else rss[0][1], rss[-1][1]
    print(
        f"\nserver RSS: {start:.1f} MB when ready, {end:.1f} MB at the end: growth {end - start:+.1f} MB "
        f"({end - after_first:+.1f} MB after the first window)"
    )
    return unexpected == 0


async def soak(port: int, pid: int, kinds: list[Kind], weights: list[float], args) -> bool:
    loop = asyncio.get_running_loop()
    tally = Tally(started=loop.time())
    rss = [(0.0, rss_mb(pid))]
    memory = asyncio.create_task(watch_memory(pid, tally, args, rss))
    await asyncio.gather(*(client(port, kinds, weights, k, tally, args) for k in range(args.concurrency)))
    elapsed = loop.time() - tally.started
    memory.cancel()
    rss.append((elapsed, rss_mb(pid)))
    return report(tally, kinds, args, elapsed, rss)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        print("smoke run: a check that the script works; its figures mean nothing")
    if args.data:
        jpegs = read_test_jpegs(Path(args.data), args.images)
        source = f"{len(jpegs)} CIFAR-10 test JPEGs from {args.data}"
    else:
        jpegs = generated_jpegs(min(args.images, 200))
        source = f"{len(jpegs)} generated 32x32 JPEGs (no --data)"
    print(source)

    with tempfile.TemporaryDirectory() as tmp:
        weights_file = weights_or_random(args.weights, tmp)
        with start_server(args, weights_file, "on") as server:  # batching on, fast path on: the defaults
            base, port, proc = server.url, server.port, server.proc
            max_files = httpx.get(f"{base}/model/summary", timeout=10).json()["serving"]["max_files"]
            valid, invalid = request_kinds(jpegs, max_files)
            kinds = [valid, *invalid]
            weights = [1 - args.invalid_fraction] + [args.invalid_fraction / len(invalid)] * len(invalid)
            names = ", ".join(k.name for k in invalid)
            print(f"invalid kinds: {names} ({args.invalid_fraction:.0%} of the requests in all)")
            print(f"server pid {proc.pid} on 127.0.0.1:{port}; {args.duration:.0f} s of load", flush=True)
            ok = asyncio.run(soak(port, proc.pid, kinds, weights, args))
    print("PASS" if ok else "FAIL: see the rows marked NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
