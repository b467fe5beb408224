"""What a heatmap costs one client: /predict?explain=cam against plain /predict, in one run.

    python bench/explain_latency.py --data cifar10-jpeg.tar.gz [--model final] [--baseline-ref REF]
    python bench/explain_latency.py --data cifar10-jpeg.tar.gz --smoke   # a check that it works

One client posts one real CIFAR-10 test JPEG per request, back to back over a keep-alive
connection, to one server (`bench/serve_load.py`'s, on the CPU defaults): plain, with the
heatmap, plain again, for --rounds rounds, so drift on a shared machine shows. It prints each
phase's median latency and the ratio of the heatmap requests' median to the plain ones'.

With --baseline-ref, a second server runs the code of that git commit (checked out in a
temporary worktree) on the same weights, alternating with this tree's in every round: plain
/predict before and after this tree's change, in the same run, to show what the change costs a
request that asks for no heatmap.
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

from serve_load import (  # noqa: E402
    add_data_flags,
    add_server_flags,
    add_smoke_flag,
    drive,
    multipart_body,
    read_test_jpegs,
    start_server,
    warm_up,
    weights_or_random,
    worktree,
)

SMOKE = {"images": 8, "duration": 1.0, "warmup": 0.5, "rounds": 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(p)
    p.add_argument("--model", default="final", help="the model to ask: final, lite or best")
    p.add_argument("--images", type=int, default=200, help="test JPEGs to cycle through")
    p.add_argument("--duration", type=float, default=6.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of requests before measuring a phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds of plain, heatmap, plain")
    p.add_argument("--baseline-ref", default=None, help="also serve this git commit's code (plain /predict)")
    add_server_flags(p)
    add_smoke_flag(p, SMOKE)
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        print("smoke run: a check that the script works; its figures mean nothing")
    with tempfile.TemporaryDirectory() as tmp:
        weights = weights_or_random(args.weights, tmp)
        bodies = [
            multipart_body(j, f"{i}.jpg") for i, j in enumerate(read_test_jpegs(Path(args.data), args.images))
        ]
        model = "" if args.model == "final" else f"model={args.model}&"
        env = {"CIFAR10_LITE_WEIGHTS": "", "CIFAR10_BEST_WEIGHTS": ""}
        if args.model != "final":
            env = {**env, f"CIFAR10_{args.model.upper()}_WEIGHTS": str(weights)}
        phases = {"plain": f"/predict?{model}top_k=3", "heatmap": f"/predict?{model}top_k=3&explain=cam"}
        medians: dict[str, list[float]] = {"plain": [], "heatmap": [], "baseline": []}
        with ExitStack() as stack:
            server = stack.enter_context(start_server(args, weights, "on", env=env))
            baseline = None
            if args.baseline_ref:
                tree = stack.enter_context(worktree(args.baseline_ref))
                baseline = stack.enter_context(start_server(args, weights, "on", env=env, root=tree))

            warm_up(server.url, phases.values(), bodies[0])  # one-time costs (first batch, first heatmap)
            if baseline:
                warm_up(baseline.url, [phases["plain"]], bodies[0])

            def phase(url: str, target: str) -> float:
                result = asyncio.run(drive(url, bodies, 1, args.warmup, args.duration, "raw", target))
                if result.errors:
                    raise SystemExit(f"error: {result.errors} requests to {target} failed")
                if result.p50_ms != result.p50_ms:  # NaN: none finished inside the window
                    raise SystemExit(f"error: no request to {target} finished in {args.duration} s")
                return result.p50_ms

            for r in range(args.rounds):
                order = ["plain", "heatmap", "plain"] + (["baseline"] if baseline else [])
                for name in order:
                    url = baseline.url if name == "baseline" and baseline else server.url
                    medians[name].append(phase(url, phases["plain" if name == "baseline" else name]))
                    print(f"round {r + 1} {name:<8} p50 {medians[name][-1]:.2f} ms", flush=True)
    plain, heat = statistics.median(medians["plain"]), statistics.median(medians["heatmap"])
    print(f"\none client, model {args.model}: plain p50 {plain:.2f} ms, with heatmap {heat:.2f} ms; "
          f"heatmap / plain {heat / plain:.3f}")  # fmt: skip
    if medians["baseline"]:
        before = statistics.median(medians["baseline"])
        ratio = plain / before
        print(f"plain /predict at {args.baseline_ref}: p50 {before:.2f} ms; this tree / baseline {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
