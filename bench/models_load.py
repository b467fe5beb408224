"""The served models side by side: images/s and latency of each under the same load, in one run.

    python bench/models_load.py --data cifar10-jpeg.tar.gz [--clients 32]
    python bench/models_load.py --data cifar10-jpeg.tar.gz --smoke   # a check that it works

One server (`bench/serve_load.py`'s, on the CPU defaults) serves the shipped final, lite and best
weights; --clients concurrent clients post one real CIFAR-10 test JPEG per request to
`/predict?model=NAME` for each model in turn, FinalModel first and again last (so drift on a
shared machine shows), then one client alone. It prints a table and each model's images/s as a
ratio of FinalModel's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import (  # noqa: E402
    ROOT,
    add_server_flags,
    add_smoke_flag,
    drive,
    multipart_body,
    read_test_jpegs,
    start_server,
)

SMOKE = {"images": 8, "clients": 4, "duration": 1.0, "warmup": 0.5, "single_duration": 1.0}
WEIGHTS = {"final": "final_model.pt", "lite": "lite_model.pt", "best": "best_model.pt"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", required=True, help="CIFAR-10 JPEG archive (.tar.gz) or folder; test/ images are used"
    )
    p.add_argument(
        "--weights", default=str(ROOT / "weights"), help="the folder holding the three checkpoints"
    )
    p.add_argument("--images", type=int, default=500, help="test JPEGs to cycle through")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients, one image per request")
    p.add_argument("--duration", type=float, default=8.0, help="seconds measured per model")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--single-duration", type=float, default=4.0, help="seconds of the one-client phase")
    add_server_flags(p)
    add_smoke_flag(p, SMOKE)
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        print("smoke run: a check that the script works; its figures mean nothing")
    folder = Path(args.weights)
    models = [m for m in WEIGHTS if (folder / WEIGHTS[m]).is_file()]
    if "final" not in models:
        raise SystemExit(f"error: {folder / WEIGHTS['final']} is missing")
    env = {f"CIFAR10_{m.upper()}_WEIGHTS": str(folder / WEIGHTS[m]) for m in models if m != "final"}
    bodies = [
        multipart_body(j, f"{i}.jpg") for i, j in enumerate(read_test_jpegs(Path(args.data), args.images))
    ]
    rows = []
    with start_server(args, folder / WEIGHTS["final"], "on", env=env) as server:
        for model in [*models, "final"]:
            target = f"/predict?model={model}"
            loaded = asyncio.run(
                drive(server.url, bodies, args.clients, args.warmup, args.duration, "raw", target)
            )
            single = asyncio.run(drive(server.url, bodies, 1, 0.5, args.single_duration, "raw", target))
            if loaded.errors or single.errors:
                raise SystemExit(f"error: {loaded.errors + single.errors} requests to {target} failed")
            rows.append((model, loaded, single))
            print(f"{model}: {loaded.images_per_s:,.0f} images/s at {args.clients} clients", flush=True)
    final = statistics.mean(r.images_per_s for m, r, _ in rows if m == "final")
    print(
        f"\n| model | images/s, {args.clients} clients | p50 ms | p99 ms | / FinalModel | one client p50 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for model, loaded, single in rows:
        print(
            f"| {model} | {loaded.images_per_s:,.0f} | {loaded.p50_ms:.1f} | {loaded.p99_ms:.1f} | "
            f"{loaded.images_per_s / final:.2f} | {single.p50_ms:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
