"""Bare inference throughput of the CPU runtimes tried for FinalModel, one thread, and the labels
each one changes.

    python bench/backends.py --data cifar10-jpeg.tar.gz [--weights weights/final_model.pt] [--labels]
    python bench/backends.py --data cifar10-jpeg.tar.gz --smoke   # a check that it works, in seconds

Candidates (--backends, the baseline first; the default is all but the last two):
- onnxruntime: ONNX Runtime fp32, the service's CPU default (`app.predictor.OnnxPredictor`);
- pytorch: PyTorch eager fp32, channels_last (`app.predictor.TorchPredictor`);
- openvino: OpenVINO on the CPU, compiled from the same in-memory ONNX export as ONNX Runtime's
  (`OpenVinoPredictor` below: 1 inference thread, 1 stream, latency hint, f32 inference precision);
- torch-compile: `torch.compile` (inductor, default mode and shapes) of PyTorch fp32
  channels_last, normalisation included (`CompiledTorchPredictor` below);
- pytorch-nchw (the service's old path) and bf16 (autocast, channels_last), for reference.

Each is built the way the service builds a predictor (`app.service.load_model`, which runs a
test forward pass), then called once at batch 1, 8 and 32: that time ("build s") is what a
service start or reload would pay before answering. Throughput is images/s of back-to-back
forward passes at batch 1, 8 and 32 on one thread, measured --rounds times interleaved (each
round visits every backend in turn, starting one further along each round), so that a load
that comes and goes touches every backend alike; the table shows the median images/s and the
median of each round's ratio against the baseline of that round. --labels also runs the whole
test split (decoded, JPEG q75 as shipped) through each backend and counts the labels that
differ from PyTorch fp32 NCHW's.

A backend whose package is missing (openvino is not a dependency of the project) is reported
and left out. On a busy machine every figure reads low; the ratios hold better.

Measured on the 2-core development machine (AMD EPYC, AVX2, no native bf16) on 2026-11-29,
loaded by a training job and other test runs (load average about 10, so every img/s reads about
ten times below an idle machine's), torch 2.14.1, ONNX Runtime 1.32.0, OpenVINO 2026.4.1, shipped
weights, `python bench/backends.py --data ../shared/data/cifar10-jpeg.tar.gz --labels`:

| backend | batch 1 img/s | / ORT | batch 8 | / ORT | batch 32 | / ORT | build s | labels differ |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| onnxruntime | 90 | 1.00 | 102 | 1.00 | 101 | 1.00 | 2.3 | 0 |
| pytorch (eager, channels_last) | 33 | 0.36 | 53 | 0.50 | 55 | 0.52 | 1.1 | 0 |
| openvino | 61 | 0.67 | 94 | 0.93 | 90 | 0.85 | 2.3 | 0 |
| torch-compile | 35 | 0.37 | 63 | 0.61 | 74 | 0.71 | 46.9 | 0 |

(labels: of the 10,000 CIFAR-10 test images, JPEG q75, against PyTorch fp32 NCHW.) Neither
OpenVINO nor torch.compile beats ONNX Runtime here, so the service does not ship them. Other
OpenVINO settings measured the same way (7 interleaved rounds) did not change that: CPU pinning
off 0.82 / 0.90 / 0.97 of ONNX Runtime at batch 1 / 8 / 32, the throughput hint 0.77 / 0.95 /
1.06. Nor did the torch.compile variants tried, each in a single 2 s measurement beside ONNX
Runtime: inductor freezing 0.41 / 0.75 / 0.78, freezing with `dynamic=False` 0.38 / 0.67 / 0.65. The
46.9 s of torch.compile is with inductor's compiled-code cache already filled by earlier runs;
the first compile on this machine took about 3 minutes, which every start and reload would pay.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import (  # noqa: E402
    add_data_flags,
    add_smoke_flag,
    bare_throughput,
    read_test_jpegs,
    weights_or_random,
)

from app.model import StagedNet  # noqa: E402
from app.predictor import (  # noqa: E402
    Forward,
    Predictor,
    PredictorError,
    PredictorInfo,
    _Normalized,
    build_predictor,
    export_onnx,
)

BATCHES = (1, 8, 32)

SMOKE = {
    "backends": "onnxruntime,pytorch,openvino",  # torch-compile takes minutes to compile
    "images": 32,
    "rounds": 2,
    "seconds": 0.1,
    "limit": 20,
}


class OpenVinoPredictor(Predictor):
    """OpenVINO on the CPU, compiled from the ONNX export ONNX Runtime runs (no file written).

    Thread-safe: each calling thread gets its own infer request.
    """

    def __init__(self, model: StagedNet, threads: int = 1) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise PredictorError("the openvino backend needs the openvino package") from None
        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",  # measured faster here than THROUGHPUT at batch 1-32
            # A CPU with native bf16 would otherwise run bf16 and change labels.
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self._compiled = core.compile_model(core.read_model(export_onnx(model)), "CPU", config)
        self._local = threading.local()
        self.info = PredictorInfo(backend="openvino", precision="fp32", device="cpu", threads=threads)

    def forward(self, images: torch.Tensor, stats: bool = True, fmap: bool = False) -> Forward:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        out = request.infer({0: images.cpu().contiguous().numpy()})
        # copies: the request reuses its output buffers
        logits, statistics, last = (torch.from_numpy(out[i].copy()) for i in range(3))
        return Forward(logits, statistics if stats else None, last if fmap else None)


class CompiledTorchPredictor(Predictor):
    """`torch.compile` (inductor) of normalize() + FinalModel in channels_last, fp32, CPU."""

    def __init__(self, model: StagedNet, threads: int = 1) -> None:
        torch.set_num_threads(threads)  # inductor's C++ kernels take the thread count when compiled
        wrapper = _Normalized(model.eval().to(memory_format=torch.channels_last)).eval()
        self._compiled = torch.compile(wrapper)
        self.info = PredictorInfo(
            backend="torch-compile", precision="fp32", device="cpu", threads=threads, layout="channels_last"
        )

    def forward(self, images: torch.Tensor, stats: bool = True, fmap: bool = False) -> Forward:
        with torch.no_grad():
            logits, statistics, last = self._compiled(images.contiguous(memory_format=torch.channels_last))
        return Forward(logits, statistics if stats else None, last if fmap else None)


def _app(**config):
    def make(model, device):
        return build_predictor(model, device, threads=1, **config)

    return make


# name -> (what it is, predictor factory (model, device) -> Predictor)
CANDIDATES = {
    "onnxruntime": ("ONNX Runtime fp32, the CPU default", _app(backend="onnxruntime")),
    "pytorch": ("PyTorch eager fp32 channels_last", _app(backend="pytorch", layout="channels_last")),
    "openvino": ("OpenVINO CPU fp32 from the ONNX export", lambda model, device: OpenVinoPredictor(model)),
    "torch-compile": (
        "torch.compile inductor fp32 channels_last",
        lambda model, device: CompiledTorchPredictor(model),
    ),
    "pytorch-nchw": ("PyTorch eager fp32 NCHW, the old path", _app(backend="pytorch", layout="nchw")),
    "bf16": (
        "PyTorch bf16 autocast channels_last",
        _app(backend="pytorch", precision="bf16", layout="channels_last"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/backends.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_flags(p, "run")
    p.add_argument(
        "--backends",
        default="onnxruntime,pytorch,openvino,torch-compile",
        help="backends to measure, comma-separated, the baseline first: "
        + ", ".join(f"{name} ({what})" for name, (what, _) in CANDIDATES.items()),
    )
    p.add_argument("--images", type=int, default=256, help="test JPEGs the timed batches are cut from")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the table shows medians")
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per backend, batch size and round")
    p.add_argument(
        "--labels",
        action="store_true",
        help="also count, on the test split, the labels each backend changes against PyTorch fp32 NCHW",
    )
    p.add_argument("--limit", type=int, default=0, help="with --labels: only this many test images (0: all)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="with --labels: where decoded data is cached "
        "(default: $XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn)",
    )
    add_smoke_flag(p, SMOKE)
    return p


def label_differences(built: dict, reference: Predictor, args) -> tuple[int, dict[str, int]]:
    """(images, {backend: labels that differ from `reference`}) on the test split."""
    from training.data import limit_index, load_cifar10
    from training.evaluate import predict_logits

    test = load_cifar10(args.data, args.cache_dir).test
    if args.limit:
        test = test.subset(limit_index(len(test), args.limit, seed=0))
    expected = predict_logits(reference, test.images).argmax(1)
    return len(test), {
        name: int((predict_logits(loaded.predictor, test.images).argmax(1) != expected).sum())
        for name, loaded in built.items()
    }


def main(argv: list[str] | None = None) -> int:
    from app.preprocess import load_image
    from app.service import load_model

    args = build_parser().parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if args.smoke:
        vars(args).update(SMOKE, cache_dir=str(Path(tmp.name) / "cache"))
        print("smoke run: a check that the script works; its figures mean nothing")
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown or not names:
        raise SystemExit(
            f"error: unknown backend(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}"
        )
    torch.set_num_threads(1)
    weights = weights_or_random(args.weights, tmp.name)
    jpegs = read_test_jpegs(Path(args.data), args.images)
    images = torch.stack([load_image(io.BytesIO(j)) for j in jpegs])
    images = images.repeat((max(BATCHES) + len(images) - 1) // len(images), 1, 1, 1)  # at least one batch
    cpu = torch.device("cpu")
    print(f"{len(jpegs)} CIFAR-10 test JPEGs from {args.data}; torch {torch.__version__}; 1 thread")

    built, build_s = {}, {}
    for name in names:
        started = time.perf_counter()
        try:
            loaded = load_model(weights, cpu, CANDIDATES[name][1])
        except PredictorError as exc:
            print(f"{name}: left out ({exc})")
            continue
        for b in BATCHES:  # the first call at each size (torch.compile compiles here)
            loaded.probabilities(images[:b])
        build_s[name] = time.perf_counter() - started
        built[name] = loaded
        print(f"{name}: {loaded.predictor.info.describe()}; built and first calls in {build_s[name]:.1f} s")
    if not built:
        raise SystemExit("error: no backend could be built")
    order = list(built)
    baseline = order[0]

    # rates[name][batch]: images/s per round
    rates: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in order}
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            for b in BATCHES:
                rate = bare_throughput(built[name], images, b, 1, 1, args.seconds)
                rates[name][b].append(rate)
        torch.set_num_threads(1)

    counted: dict[str, int] = {}
    if args.labels:
        from app.predictor import TorchPredictor

        reference = load_model(
            weights, cpu, lambda model, device: TorchPredictor(model, device, threads=1)
        ).predictor
        count, counted = label_differences(built, reference, args)
        print(f"labels compared on {count:,} test images (CIFAR-10 test, decoded as shipped)")

    print(
        f"\nmedians of {args.rounds} interleaved round(s), 1 thread; / {baseline}: the median of each "
        f"round's ratio against {baseline}\n"
    )
    head = " | ".join(f"batch {b} img/s | / {baseline}" for b in BATCHES)
    print(f"| backend | {head} | build s | labels differ |")
    print("|---|" + "---:|" * (2 * len(BATCHES) + 2))
    for name in order:
        cells = []
        for b in BATCHES:
            ratio = statistics.median(x / y for x, y in zip(rates[name][b], rates[baseline][b], strict=True))
            cells.append(f"{statistics.median(rates[name][b]):,.0f} | {ratio:.2f}")
        labels = f"{counted[name]:,}" if name in counted else "-"
        print(f"| {name} ({CANDIDATES[name][0]}) | {' | '.join(cells)} | {build_s[name]:.1f} | {labels} |")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
