"""Train several recipes side by side on one device inside a time budget; pick by validation.

    python -m training.sweep --out runs/sweep --budget 480 \\
        --recipe "" --recipe label_smoothing=0 --recipe cutout=4 -- --data cifar10-jpeg.tar.gz

Made for a lent GPU, where one small model leaves the card mostly idle: each recipe is its own
`python -m training` process. A short probe (every recipe for --probe-epochs, concurrently) times
an epoch; the sweep then gives every recipe the most epochs that fit in what is left of the budget
(at most --max-epochs), dropping recipes from the end of the list when fewer than --min-epochs
would fit. A run still going at the deadline gets SIGTERM, which makes it save a resumable
`last.pt` (finish it anywhere with `python -m training --resume --out <its folder>`).

Each run writes its usual files into <out>/<name>/; `<out>/summary.json` lists the runs by
validation accuracy, the figure the choice is made on (the test figures ride along, unused).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from app.checkpoint import load_checkpoint
from app.settings import available_cpus

log = logging.getLogger("training.sweep")


def recipe_flags(recipe: str) -> list[str]:
    """ "dropout=0,cutout=0" -> ["--dropout", "0", "--cutout", "0"]."""
    flags = []
    for pair in filter(None, recipe.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"recipe item {pair!r} is not key=value")
        flags += ["--" + key.strip().replace("_", "-"), value.strip()]
    return flags


def recipe_name(recipe: str) -> str:
    """ "cutout=4,lr=0.3" -> "cutout4_lr0p3"; a path value counts by its file's stem
    ("teacher=runs/t/teacher.pt,ema=0.999" -> "teacher-teacher_ema0p999")."""
    parts = []
    for pair in filter(None, recipe.split(",")):
        key, _, value = pair.partition("=")
        if "/" in value or value.endswith(".pt"):
            parts.append(f"{key.strip()}-{Path(value.strip()).stem}")
        else:
            parts.append((key + value).replace(".", "p").strip())
    return "_".join(parts) or "defaults"


def launch(
    recipes: list[str],
    common: list[str],
    out: Path,
    epochs: int,
    threads: int,
    deadline: float,
    prefix: str = "",
) -> dict[str, int]:
    """Run each recipe as its own training process; SIGTERM whatever runs past `deadline`."""
    procs = {}
    for recipe in recipes:
        name = prefix + recipe_name(recipe)
        (out / name).mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "training",
            *common,
            *recipe_flags(recipe),
            "--epochs",
            str(epochs),
            "--threads",
            str(threads),
            "--out",
            str(out / name),
        ]
        log.info("start %s: %s", name, " ".join(cmd[1:]))
        with open(out / name / "train.log", "w") as log_file:  # the child keeps its own copy
            procs[name] = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(1)
    for name, p in procs.items():
        if p.poll() is None:
            log.warning("%s is past the deadline: SIGTERM (it saves a resumable last.pt)", name)
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
    return {name: p.returncode for name, p in procs.items()}


def plan(
    seconds_per_epoch: float, probed: int, left: float, min_epochs: int, max_epochs: int
) -> tuple[int, int]:
    """(runs, epochs) for the time left, given an epoch's time with `probed` runs sharing the
    device. Fewer runs are assumed to speed up in proportion (the worst case, a full card)."""
    runs = probed
    while True:
        epochs = int(left / (seconds_per_epoch * runs / probed))
        if epochs >= min_epochs or runs == 1:
            return runs, max(0, min(epochs, max_epochs))
        runs -= 1


def summarize(out: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        path = out / name / "final_model.pt"
        if not path.is_file():
            rows.append({"name": name, "finished": False})
            continue
        meta = load_checkpoint(path).meta
        m = meta.get("metrics", {})
        cfg = meta.get("config", {})
        rows.append(
            {
                "name": name,
                "finished": bool(meta.get("complete")) and "test_acc" in m,
                "teacher_sha256": meta.get("teacher", {}).get("sha256"),
                **{k: cfg.get(k) for k in ("kd_weight", "kd_temperature", "ema", "mixup")},
                "epochs": meta.get("epoch"),
                "best_epoch": m.get("best_epoch"),
                "train_acc": m.get("train_acc"),
                "val_acc": m.get("val_acc"),
                "test_acc": m.get("test_acc"),
                "test_acc_tta": m.get("test_acc_tta"),
                "duration_s": meta.get("duration_s"),
                "device": meta.get("device"),
            }
        )
    return sorted(rows, key=lambda r: -(r.get("val_acc") or 0.0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--budget", type=float, required=True, help="seconds for the whole sweep")
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        help="key=value,... training flags of one run, in order of preference",
    )
    parser.add_argument("--probe-epochs", type=int, default=2)
    parser.add_argument("--min-epochs", type=int, default=60)
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument(
        "--margin",
        type=float,
        default=45.0,
        help="seconds kept back for start-up, the test evaluation and the pictures",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    own, common = argv[:split], argv[split + 1 :]  # the sweep's flags -- every run's flags
    parser = build_parser()
    args = parser.parse_args(own)
    started = time.time()
    deadline = started + args.budget
    for recipe in args.recipe:
        try:
            recipe_flags(recipe)  # refuse a malformed recipe before anything runs
        except ValueError as exc:
            parser.error(str(exc))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Decode the data once, so that the concurrent runs all find it in the cache.
    subprocess.run(
        [sys.executable, "-m", "training", *common, "--dry-run", "--out", str(out / "warmup")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    cores = available_cpus()  # the cores this process may run on (its CPU affinity)
    recipes = args.recipe
    threads = max(1, cores // len(recipes))
    probe_start = time.time()
    codes = launch(recipes, common, out, args.probe_epochs, threads, deadline, prefix="probe-")
    if any(codes.values()):
        log.error("a probe run failed (%s); see its train.log", codes)
        return 1
    # The last probe epoch's wall time: warmed up, with validation and checkpoint writes.
    per_epoch = max(
        json.loads((out / f"probe-{recipe_name(r)}" / "history.json").read_text())[-1]["wall_s"]
        for r in recipes
    )
    probe_wall = time.time() - probe_start
    overhead = max(0.0, probe_wall - per_epoch * args.probe_epochs)  # start-up, evaluation, pictures
    per_epoch *= 1.1  # runs sharing a device do not keep an even pace
    left = deadline - time.time() - max(args.margin, overhead)
    n, epochs = plan(per_epoch, len(recipes), left, args.min_epochs, args.max_epochs)
    log.info(
        "probe: %.2f s/epoch with %d runs sharing the device, %.0f s of start-up and finish; "
        "%.0f s left: %d run(s) of %d epochs",
        per_epoch,
        len(recipes),
        overhead,
        left,
        n,
        epochs,
    )
    if epochs < 1:
        log.error("no full epoch fits in the budget left; give the sweep a larger --budget")
        return 1
    recipes = recipes[:n]
    codes = launch(recipes, common, out, epochs, max(1, cores // n), deadline)
    rows = summarize(out, [recipe_name(r) for r in recipes])
    summary = {
        "epochs": epochs,
        "seconds_per_epoch_probed": per_epoch,
        "return_codes": codes,
        "wall_s": round(time.time() - started, 1),
        "runs": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for r in rows:
        log.info("%s", json.dumps(r))
    return 0 if rows and rows[0].get("finished") else 1


if __name__ == "__main__":
    sys.exit(main())
