"""Training throughput of FinalModel: the full training step against the bare model step.

    python bench/train_throughput.py [--data cifar10-jpeg.tar.gz] [--steps 8] [--compile | --distill]
    python bench/train_throughput.py --smoke    # a check that it works, in seconds (what CI runs)

"full" is `training.train.train_one_epoch` itself: batch gather from the in-memory uint8 data
set, normalisation, batch augmentation (flip, translate, cutout), forward, label-smoothed loss,
backward, SGD step and OneCycle step. "bare" is forward + loss + backward + SGD step on one fixed,
already normalised batch of the same size and settings. full / bare is the data pipeline's cost
(1.0 = free). Every figure comes from this run; the machine is shared, so read ratios, not times.

Rows vary what the issue asked about: memory format, bf16 autocast, batch size, dropout and
threads, and finally two single-thread processes under DDP (gloo) against one two-thread process.
With --compile it times the full step under torch.compile against eager instead; with --distill,
the distilled full step (python -m training --teacher: the teacher's forward pass on the same
augmented batch, and the KL term) against the plain one.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.model import AirbenchNet, FinalModel  # noqa: E402
from app.preprocess import normalize  # noqa: E402
from training.data import Split, load_cifar10  # noqa: E402
from training.runtime import Runtime  # noqa: E402
from training.teacher import load_teacher, parse_widths  # noqa: E402
from training.train import TeacherPass, TrainConfig, train_one_epoch  # noqa: E402


def make_runtime(amp: bool, channels_last: bool, rank: int = 0, world: int = 1) -> Runtime:
    return Runtime(torch.device("cpu"), rank, world, torch.bfloat16 if amp else None, channels_last)


def make_model(dropout: float, channels_last: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = FinalModel(dropout=dropout)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)


def bare_rate(data: Split, batch: int, steps: int, amp: bool, channels_last: bool, dropout: float) -> float:
    model, opt = make_model(dropout, channels_last)
    x = normalize(data.images[:batch])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = data.labels[:batch]
    rt = make_runtime(amp, channels_last)

    def step():
        with rt.autocast():
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def full_rate(
    data: Split,
    batch: int,
    steps: int,
    amp: bool,
    channels_last: bool,
    dropout: float,
    rank: int = 0,
    world: int = 1,
    compile: bool = False,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """images/s of train_one_epoch over `steps` batches (after a 2-batch warm-up, which is also
    when torch.compile compiles), all ranks together; with `teacher`, the distilled step."""
    model, opt = make_model(dropout, channels_last)
    net: Any = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if compile:
        net = torch.compile(net)
    cfg = TrainConfig(batch_size=batch, epochs=1, dropout=dropout)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps + 3)
    rt = make_runtime(amp, channels_last, rank, world)
    for n in (2, steps):  # the warm-up, then the timed batches
        r = train_one_epoch(
            net, opt, sched, data.subset(torch.arange(n * batch)), cfg, 0, rt, teacher=teacher, progress=False
        )
    return r["images"] / r["seconds"]


def _ddp_worker(rank: int, world: int, port: int, args, data: Split, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rate = full_rate(data, args.batch_size, args.steps, args.amp, True, args.dropout, rank, world)
    if rank == 0:
        results.put(rate)
    dist.destroy_process_group()


def ddp_rate(args, data: Split) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_ddp_worker, args=(2, port, args, data, results), nprocs=2, join=True)
    return results.get()


Rate = Callable[[], float]


def against_baseline(baseline: Rate, variant: Rate) -> tuple[float, float, float, float]:
    """The baseline, the variant, the baseline again (so drift in a noisy machine shows):
    (baseline, baseline again, variant, variant / the baselines' mean)."""
    first, measured, again = baseline(), variant(), baseline()
    return first, again, measured, measured / ((first + again) / 2)


def compare_compile(data: Split, batch: int, dropout: float, steps: int, cores: int) -> None:
    """Eager, compiled, eager again, for 1 and `cores` threads."""
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        eager, again, compiled, ratio = against_baseline(
            lambda: full_rate(data, batch, steps, True, True, dropout),
            lambda: full_rate(data, batch, steps, True, True, dropout, compile=True),
        )
        print(
            f"1 proc x {threads} thr, batch {batch}, bf16 + channels_last, full step: eager "
            f"{eager:.1f} then {again:.1f} img/s, compiled {compiled:.1f} img/s; "
            f"compiled / eager {ratio:.2f}",
            flush=True,
        )


def compare_distill(data: Split, batch: int, dropout: float, steps: int, amp: bool, args) -> None:
    """Plain, distilled, plain again, in one process with the CPU defaults (channels_last; bf16
    only where the CPU has it) and --threads threads. The teacher's pass is training's own
    (`TeacherPass`: inference mode, bf16 where it keeps the labels); a teacher without --teacher
    has random weights, whose forward pass costs what a trained one's does."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.teacher:
        teacher = load_teacher(args.teacher)[0]
    else:
        teacher = AirbenchNet(parse_widths(args.teacher_widths), args.teacher_depth)
    teacher_pass = TeacherPass(teacher, make_runtime(amp, True), data.images[-500:])
    params = sum(p.numel() for p in teacher.parameters())
    plain, again, distilled, ratio = against_baseline(
        lambda: full_rate(data, batch, steps, amp, True, dropout),
        lambda: full_rate(data, batch, steps, amp, True, dropout, teacher=teacher_pass),
    )
    print(
        f"1 proc x {args.threads} thr, batch {batch}, {'bf16' if amp else 'fp32'} + channels_last, "
        f"dropout {dropout}, full step: plain {plain:.1f} then {again:.1f} img/s, distilled from a "
        f"{params:,}-parameter teacher ({teacher_pass.describe()}) {distilled:.1f} img/s; "
        f"distilled / plain {ratio:.2f}",
        flush=True,
    )


# --smoke: two rows (plain fp32 NCHW, and bf16 + channels_last) and the DDP comparison, on
# small batches and one timed step each.
SMOKE = {"steps": 1, "batch_size": 8}
SMOKE_IMAGES = 256  # random images when --data is not given (4096 * 4 otherwise)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="CIFAR-10 source as in training (default: random images)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded data is cached (default: $XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn)",
    )
    p.add_argument("--steps", type=int, default=8, help="timed batches per measurement")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the headline rows")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout of the headline rows")
    p.add_argument(
        "--compile",
        action="store_true",
        help="instead of the rows above: the full step under torch.compile against the same "
        "step eager, in one process with 1 and with all threads",
    )
    p.add_argument(
        "--distill",
        action="store_true",
        help="instead of the rows above: the distilled full step against the plain one, in one "
        "single-thread process (a DDP rank) with the CPU's training defaults",
    )
    p.add_argument(
        "--teacher-widths",
        default="64,256,256",
        help="--distill's teacher: group widths as in python -m training.teacher",
    )
    p.add_argument(
        "--teacher-depth", type=int, default=2, help="--distill's teacher: convs per group (2 or 3)"
    )
    p.add_argument(
        "--teacher", default=None, help="--distill's teacher: a teacher.pt (instead of the shape above)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="--distill: torch threads (1: one DDP rank on a CPU)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a check that the script works, in seconds: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items())
        + f" (over any given), {SMOKE_IMAGES} random images without --data, 1 thread, "
        "two of the rows; its figures mean nothing",
    )
    return p


def training_images(args: argparse.Namespace) -> Split:
    """The training split of --data, or random images (SMOKE_IMAGES of them with --smoke)."""
    if args.data:
        return load_cifar10(args.data, args.cache_dir).train
    g = torch.Generator().manual_seed(0)
    n = SMOKE_IMAGES if args.smoke else 4096 * 4
    return Split(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
    )


def compare_rows(data: Split, args: argparse.Namespace, cores: int) -> None:
    """The headline rows (bare and full step for each setting), then DDP against one process."""
    rows = []
    b, d, amp = args.batch_size, args.dropout, args.amp
    configs = [
        (cores, b, False, False, d),  # plain PyTorch
        (cores, b, False, True, d),
        (cores, b, amp, False, d),
        (cores, b, amp, True, d),  # 1 process with the training defaults on CPU
        (cores, b, amp, True, 0.0),
        (cores, b // 2, amp, True, d),
        (cores, b * 2, amp, True, d),
        (1, b, amp, True, d),
    ]
    if args.smoke:
        configs = [configs[0], configs[3]]  # plain and the CPU default: every code path, 2 rows
    for threads, batch, row_amp, cl, drop in configs:
        torch.set_num_threads(threads)
        bare = bare_rate(data, batch, args.steps, row_amp, cl, drop)
        full = full_rate(data, batch, args.steps, row_amp, cl, drop)
        label = (
            f"1 proc x {threads} thr, batch {batch}, {'bf16' if row_amp else 'fp32'}, "
            f"{'channels_last' if cl else 'NCHW'}, dropout {drop}"
        )
        rows.append((label, bare, full))
        print(
            f"{label:<62} bare {bare:7.1f} img/s   full {full:7.1f} img/s   full/bare {full / bare:.2f}",
            flush=True,
        )

    torch.set_num_threads(cores)
    one = full_rate(data, b, args.steps, amp, True, d)
    two = ddp_rate(args, data)
    plain = rows[0][2]
    print(f"\nDDP (gloo) 2 procs x 1 thread, full step: {two:7.1f} img/s")
    print(f"1 proc x {cores} threads, full step:           {one:7.1f} img/s")
    print(f"DDP 2x1 / 1x{cores}: {two / one:.2f}")
    print(f"DDP 2x1 {'bf16' if amp else 'fp32'}+channels_last / plain fp32 NCHW 1x{cores}: {two / plain:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        print("smoke run: a check that the script works; its figures mean nothing")
    data = training_images(args)
    # --smoke: 1 thread, as on a busy machine several spinning threads per process can stall it
    cores = 1 if args.smoke else os.cpu_count() or 1
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # --smoke without native bf16: fp32 rows, as emulated bf16 takes minutes a step on a busy CPU
    args.amp = bf16 or not args.smoke  # the bf16 rows and the DDP row use autocast
    print(
        f"torch {torch.__version__}, {cores} cores, bf16 support: {bf16}, {args.steps} timed steps per row\n"
    )
    if args.compile:
        compare_compile(data, args.batch_size, args.dropout, args.steps, cores)
    elif args.distill:  # the CPU's defaults: bf16 only where the CPU has it natively
        compare_distill(data, args.batch_size, args.dropout, args.steps, bf16, args)
    else:
        compare_rows(data, args, cores)


if __name__ == "__main__":
    main()
