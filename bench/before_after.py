"""/predict under load, this tree against another commit's code, in one run.

    python bench/before_after.py --data cifar10-jpeg.tar.gz --ref 48ff918 [--clients 32] [--rounds 3]
    python bench/before_after.py --data cifar10-jpeg.tar.gz --ref HEAD --smoke   # a check that it works

Two servers (`bench/serve_load.py`'s, on the CPU defaults) on the same weights: one runs this
tree's code, the other the code of --ref, checked out in a temporary worktree. For each mode of
--modes (`on`: batching and the fast path, the default service; `route`: the fast path off, so
every request goes through the FastAPI route) and each of --rounds rounds, --clients clients
post real CIFAR-10 test JPEGs to one server, then the other, the order alternating between
rounds so that drift on a shared machine falls on both. Only one server is loaded at a time.
It prints each phase's images/s and p50, then per mode the median images/s of each and their
ratio (this tree / --ref): a refactor that should not change serving reads about 1.00.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402

SMOKE = {"images": 8, "clients": 2, "duration": 1.0, "warmup": 0.5, "rounds": 1, "modes": "on"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_load.add_data_flags(p)
    p.add_argument("--ref", required=True, help="the git commit whose code is the baseline")
    p.add_argument("--images", type=int, default=200, help="test JPEGs to cycle through")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients")
    p.add_argument("--duration", type=float, default=10.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of requests before measuring a phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (this tree, --ref), order alternating")
    p.add_argument("--modes", default="on,route", help=f"comma-separated, of {', '.join(serve_load.MODES)}")
    serve_load.add_server_flags(p)
    serve_load.add_smoke_flag(p, SMOKE)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        print("smoke run: a check that the script works; its figures mean nothing")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(serve_load.MODES):
        raise SystemExit(f"error: --modes {args.modes!r}: choose from {', '.join(serve_load.MODES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        weights = serve_load.weights_or_random(args.weights, tmp)
        jpegs = serve_load.read_test_jpegs(Path(args.data), args.images)
        bodies = [serve_load.multipart_body(j, f"{i}.jpg") for i, j in enumerate(jpegs)]
        tree = stack.enter_context(serve_load.worktree(args.ref))
        for mode in modes:
            with (
                serve_load.start_server(args, weights, mode) as here,
                serve_load.start_server(args, weights, mode, root=tree) as base,
            ):
                rates: dict[str, list[float]] = {"this tree": [], args.ref: []}
                for r in range(args.rounds):
                    order = [("this tree", here), (args.ref, base)]
                    for name, server in order if r % 2 == 0 else order[::-1]:
                        result = asyncio.run(
                            serve_load.drive(
                                server.url, bodies, args.clients, args.warmup, args.duration, "raw"
                            )
                        )
                        if result.errors:
                            raise SystemExit(f"error: {result.errors} requests to {name} failed")
                        rates[name].append(result.images_per_s)
                        print(f"{mode} round {r + 1} {name}: {result.images_per_s:,.0f} images/s, "
                              f"p50 {result.p50_ms:.1f} ms", flush=True)  # fmt: skip
                now, before = statistics.median(rates["this tree"]), statistics.median(rates[args.ref])
                rows.append((mode, now, before))
    print(f"\n| mode | clients | this tree images/s | {args.ref} images/s | this tree / {args.ref} |")
    print("|---|---:|---:|---:|---:|")
    for mode, now, before in rows:
        print(f"| {mode} | {args.clients} | {now:,.0f} | {before:,.0f} | {now / before:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
