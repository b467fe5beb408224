"""Accuracy of any checkpoint on the CIFAR-10 test split, with the pictures.

    python -m training.evaluate --weights weights/final_model.pt --data cifar10-jpeg.tar.gz [--tta]
    python -m training.evaluate ... --check-service   # and the served labels must agree with it
    python -m training.evaluate ... --backend onnxruntime --check-service   # the same, for that backend

The forward pass is the service's own (`app.predictor`), for any backend and precision the
service offers; a backend other than PyTorch fp32 NCHW also reports how many labels differ from
PyTorch fp32's, and --check-service then starts the service on that same backend.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import cast

import torch

from app import launch
from app.calibration import Calibration
from app.checkpoint import Checkpoint, CheckpointError, build_model, load_checkpoint
from app.client import ClientError
from app.device import DEVICE_CHOICES, autocast_dtype, resolve_device
from app.model import CLASSES, MODEL_KEYS, StagedNet
from app.predictor import (
    BACKENDS,
    LAYOUTS,
    PRECISIONS,
    Forward,
    Predictor,
    PredictorError,
    TorchPredictor,
    build_predictor,
    forward_all,
)
from training.data import Cifar10, DataError, Split, limit_index, load_cifar10, test_split_files
from training.served import local_service, served_labels
from training.trust import calibration_report, deletion_check, plot_reliability

log = logging.getLogger(__name__)


def predict_logits(
    predictor: Predictor, images: torch.Tensor, batch_size: int = 100, tta: bool = False
) -> torch.Tensor:
    """Logits (N, 10) on the CPU for uint8 images (N, 3, 32, 32) through `predictor`, the service's
    forward pass; `tta` averages with the mirror image."""
    logits = forward_all(predictor, images, batch_size).logits
    if tta:
        logits = (logits + forward_all(predictor, images.flip(3), batch_size).logits) / 2
    return logits


def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    device: torch.device,
    batch_size: int = 100,
    tta: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """Logits (N, 10) on the CPU for uint8 images (N, 3, 32, 32) from `model` on `device` (PyTorch,
    NCHW, the model left as it is but for eval()); `amp`: bf16 autocast where it pays."""
    precision = "bf16" if amp and autocast_dtype(device) is not None else "fp32"
    net = cast(StagedNet, model)  # every network here is one (training hands in its weight average too)
    return predict_logits(TorchPredictor(net, device, precision=precision), images, batch_size, tta)


def summarize(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Overall and per-class accuracy, the confusion matrix, and the mean cross-entropy."""
    pred = logits.argmax(1)
    confusion = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1)
    return {
        "accuracy": (pred == labels).float().mean().item() if len(labels) else 0.0,
        "loss": torch.nn.functional.cross_entropy(logits, labels).item() if len(labels) else 0.0,
        "per_class_accuracy": {c: round(a, 6) for c, a in zip(CLASSES, per_class.tolist(), strict=False)},
        "confusion": confusion.tolist(),
        "count": len(labels),
    }


def write_report(test: Split, logits: torch.Tensor, out_dir: Path, prefix: str = "") -> None:
    """confusion_matrix.png and misclassified.png for a test evaluation."""
    from training.plots import plot_confusion, plot_misclassified

    out_dir.mkdir(parents=True, exist_ok=True)
    pred = logits.argmax(1)
    confusion = torch.tensor(summarize(logits, test.labels)["confusion"])
    plot_confusion(confusion, out_dir / f"{prefix}confusion_matrix.png")
    plot_misclassified(test.images, test.labels, pred, out_dir / f"{prefix}misclassified.png")


def format_per_class(metrics: dict) -> str:
    lines = [f"{'class':<12}{'accuracy':>10}"]
    lines += [f"{c:<12}{100 * a:>9.2f}%" for c, a in metrics["per_class_accuracy"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--weights",
        default="weights/final_model.pt",
        help="checkpoint to evaluate (ours or a bare FinalModel state_dict)",
    )
    p.add_argument(
        "--data",
        default="cifar10",
        help="'cifar10' (torchvision download) or an ImageFolder directory / .tar.gz",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where decoded data is cached (default: $XDG_CACHE_HOME/cifar10-cnn, else ~/.cache/cifar10-cnn)",
    )
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto: cuda, mps, cpu")
    p.add_argument("--tta", action="store_true", help="also report horizontal-flip test-time augmentation")
    p.add_argument(
        "--backend",
        default="pytorch",
        choices=BACKENDS,
        help="what runs the forward pass (a service backend); --check-service serves the same",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="bf16: autocast, pytorch only (changes a few labels; recorded figures are fp32)",
    )
    p.add_argument(
        "--layout", default="nchw", choices=LAYOUTS, help="activation layout of the pytorch backend"
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="--precision bf16 where the device has native bf16 (CUDA, some CPUs), else fp32",
    )
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass")
    p.add_argument("--limit", type=int, default=0, help="evaluate only this many test images (0: all)")
    p.add_argument(
        "--out", default=None, help="folder for evaluation.json and the pictures (default: none written)"
    )
    add_checks(p)
    return p


def add_checks(p: argparse.ArgumentParser) -> None:
    """The flags that make the evaluation a check: each can end it with exit code 1."""
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="exit 1 when test accuracy (fraction, e.g. 0.857) is below this",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="exit 1 when test accuracy is more than this many points (e.g. 0.3) below the "
        "test_acc recorded in the checkpoint",
    )
    p.add_argument(
        "--check-service",
        action="store_true",
        help="also post every test image file to POST /predict of a service on these weights "
        "(started on loopback, or --service-url) and compare its labels with this evaluation",
    )
    p.add_argument(
        "--service-url",
        default=None,
        help="a running service to check instead of starting one, e.g. http://127.0.0.1:8000",
    )
    p.add_argument(
        "--max-ece",
        type=float,
        default=None,
        help="exit 1 when the calibrated expected calibration error (fraction, 15 bins) is above this",
    )
    p.add_argument(
        "--explain-check",
        type=int,
        default=0,
        metavar="N",
        help="delete the quarter of pixels each heatmap ranks highest, and lowest, on N test images; "
        "exit 1 unless the first costs the label at least twice the probability, and 0.05 more, on average",
    )
    p.add_argument(
        "--max-disagree",
        type=int,
        default=0,
        help="with --check-service: exit 1 when more images than this get another label served",
    )


# --explain-check passes when deleting the heatmaps' top quarter costs the label at least this many
# times, and this much more, probability than deleting their bottom quarter. A ratio, because the
# deletion (mean colour) is what cutout trains a network to shrug off: airbench96's shape, trained
# with cutout 12, loses 0.131 against 0.037, where FinalModel (no cutout as large) loses 0.195 against 0.
DELETION_RATIO, DELETION_MARGIN = 2.0, 0.05


def report_trust(
    args, predictor: Predictor, model: StagedNet, calibration: Calibration, test: Split, out: Forward
) -> dict:
    """Calibration error and unsure share on the test split (reliability.png with --out), and
    with --explain-check the heatmap deletion check; prints them."""
    logits = out.logits
    report = calibration_report(calibration, test.labels, logits, out.stats)
    unsure = (
        f"; unsure: {100 * report['unsure_share']:.2f}% of test images" if "unsure_share" in report else ""
    )
    print(
        f"calibration (T = {calibration.temperature:.3f}): ECE {100 * report['ece_before']:.2f}% -> "
        f"{100 * report['ece_after']:.2f}% (15 bins), mean confidence {report['confidence_before']:.3f} -> "
        f"{report['confidence_after']:.3f} at accuracy {report['accuracy']:.3f}{unsure}"
    )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        plot_reliability(test.labels, torch.softmax(logits, 1), calibration.probabilities(logits),
                         Path(args.out) / "reliability.png")  # fmt: skip
    if args.explain_check:
        check = deletion_check(predictor, model, calibration, test.images[: args.explain_check])
        report["deletion"] = check
        print(
            f"heatmaps ({check['method']}) on {check['images']} test images: deleting the top quarter of "
            f"pixels costs the label {check['drop_top']:.3f} probability, the bottom quarter "
            f"{check['drop_bottom']:.3f}"
        )
    return report


def trust_failure(args, report: dict) -> str | None:
    """Why --max-ece or --explain-check fails, or None."""
    if args.max_ece is not None and report["ece_after"] > args.max_ece:
        return f"calibrated ECE {100 * report['ece_after']:.2f}% is above {100 * args.max_ece:.2f}%"
    deletion = report.get("deletion")
    if deletion is not None:
        top, bottom = deletion["drop_top"], deletion["drop_bottom"]
        if top - bottom < DELETION_MARGIN or top < DELETION_RATIO * bottom:
            return (
                f"the heatmaps' top quarter of pixels costs the label {top:.3f} probability, their bottom "
                f"quarter {bottom:.3f}: not {DELETION_RATIO:g} times as much and {DELETION_MARGIN:g} more"
            )
    return None


def check_failure(args, result: dict, recorded: float | None) -> str | None:
    """Why the first of the checks that fails does (--max-ece, --explain-check, --max-disagree,
    --max-drop, --min-accuracy), or None."""
    failure = trust_failure(args, result["calibration"])
    if failure is not None:
        return failure
    service, acc = result.get("service"), result["test"]["accuracy"]
    if service is not None and service["disagree"] > args.max_disagree:
        return (
            f"{service['disagree']} served labels differ from this evaluation "
            f"(at most {args.max_disagree} allowed)"
        )
    if args.max_drop is not None:
        if recorded is None:
            return "--max-drop needs a checkpoint with a recorded test_acc"
        if 100 * (recorded - acc) > args.max_drop:
            return (
                f"accuracy {100 * acc:.2f}% is more than {args.max_drop} points below the recorded "
                f"{100 * recorded:.2f}%"
            )
    if args.min_accuracy is not None and acc < args.min_accuracy:
        return f"accuracy {100 * acc:.2f}% is below the required {100 * args.min_accuracy:.2f}%"
    return None


def check_service(
    args, device: torch.device, files: list, logits: torch.Tensor, labels: torch.Tensor, model_key: str
) -> dict:
    """Served labels of model `model_key` ("final", "lite", "best") against `logits`' argmax for the same
    files; prints a summary and disagreements."""
    started = time.perf_counter()
    service: AbstractContextManager[str]
    if args.service_url:
        service = nullcontext(args.service_url)
    else:
        service = local_service(
            args.weights,
            device.type,
            backend=args.backend,
            precision=args.precision,
            layout=args.layout,
            model=model_key,
        )
    with service as url:
        served = torch.tensor(served_labels(url, [path for path, _ in files], model=model_key))
    evaluated = logits.argmax(1)
    differ = (served != evaluated).nonzero().flatten().tolist()
    served_acc = (served == labels).float().mean().item()
    print(
        f"served labels: {len(files) - len(differ):,} of {len(files):,} agree with this evaluation; "
        f"served accuracy {100 * served_acc:.2f}% ({time.perf_counter() - started:.1f}s)"
    )
    for i in differ[:10]:
        print(
            f"  {files[i][0].name} ({CLASSES[labels[i]]}): served {CLASSES[served[i]]}, "
            f"evaluated {CLASSES[evaluated[i]]}"
        )
    return {"images": len(files), "disagree": len(differ), "served_accuracy": served_acc}


def load(args) -> tuple[Checkpoint, StagedNet, Cifar10, list | None]:
    """(the checkpoint, its model, the data, and with --check-service the test image files)."""
    ckpt = load_checkpoint(args.weights)
    model = build_model(ckpt)
    files = None
    if args.check_service or args.service_url:
        try:
            files = test_split_files(args.data, args.cache_dir)
        except DataError as exc:
            raise DataError(f"--check-service: {exc}") from None
    return ckpt, model, load_cifar10(args.data, args.cache_dir), files


def measure(
    args,
    predictor: Predictor,
    model: StagedNet,
    ckpt: Checkpoint,
    data: Cifar10,
    test: Split,
    device: torch.device,
) -> tuple[dict, Forward, Calibration]:
    """Accuracy on `test` (with --tta, flip TTA too) through `predictor`, with the unsure
    statistics in the same pass; a predictor other than PyTorch fp32 NCHW is compared with it.
    Prints the figures; (the result so far, the forward pass, the calibration)."""
    started = time.perf_counter()
    calibration = Calibration.from_meta(ckpt.meta)
    # one pass for the logits and, when there is a detector, the statistics of its unsure flag
    out = forward_all(predictor, test.images, args.batch_size, stats=calibration.detector is not None)
    logits = out.logits
    info = predictor.info
    result = {
        "weights": args.weights,
        "sha256": ckpt.sha256,
        "data": args.data,
        "data_fingerprint": data.fingerprint,
        "device": str(device),
        "inference": {
            "backend": info.backend,
            "precision": info.precision,
            "layout": info.layout,
            "threads": info.threads,
        },
        "test": summarize(logits, test.labels),
    }
    if args.tta:
        tta_logits = predict_logits(predictor, test.images, args.batch_size, tta=True)
        result["test_tta"] = summarize(tta_logits, test.labels)
    seconds = time.perf_counter() - started

    acc = result["test"]["accuracy"]
    print(
        f"test accuracy: {100 * acc:.2f}% on {len(test):,} images ({args.data}), "
        f"{seconds:.1f}s on {info.describe()}"
    )
    if (args.backend, args.precision, args.layout) != ("pytorch", "fp32", "nchw"):
        fp32 = predict(model, test.images, device, args.batch_size)  # PyTorch fp32 NCHW
        differ = int((fp32.argmax(1) != logits.argmax(1)).sum())
        fp32_acc = summarize(fp32, test.labels)["accuracy"]
        result["pytorch_fp32"] = {"accuracy": fp32_acc, "labels_differ": differ}
        print(
            f"labels that differ from PyTorch fp32 NCHW: {differ:,} of {len(test):,} "
            f"(its accuracy {100 * fp32_acc:.2f}%)"
        )
    if args.tta:
        print(f"test accuracy with flip TTA: {100 * result['test_tta']['accuracy']:.2f}%")
    print(format_per_class(result["test"]))
    return result, out, calibration


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else a line per served request
    args = build_parser().parse_args(argv)
    try:
        ckpt, model, data, files = load(args)
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    model.to(device)
    if args.amp and autocast_dtype(device) is not None:
        args.precision = "bf16"
    try:
        predictor = build_predictor(
            model, device, args.backend, args.precision, args.layout, threads=torch.get_num_threads()
        )
    except PredictorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    index = limit_index(len(data.test), args.limit or len(data.test), seed=0)
    test = data.test.subset(index)
    if files is not None:
        if [label for _, label in files] != data.test.labels.tolist():
            print(
                "error: --check-service: the test files do not match the decoded test split", file=sys.stderr
            )
            return 2
        files = [files[i] for i in index.tolist()]
    result, out, calibration = measure(args, predictor, model, ckpt, data, test, device)
    recorded = ckpt.meta.get("metrics", {}).get("test_acc")
    if recorded is not None:
        print(f"recorded in the checkpoint: {100 * recorded:.2f}%")
    result["calibration"] = report_trust(args, predictor, model, calibration, test, out)
    if args.out:
        write_report(test, out.logits, Path(args.out))
    if files is not None:
        try:
            model_key = next(key for key, name in MODEL_KEYS.items() if name == type(model).__name__)
            result["service"] = check_service(args, device, files, out.logits, test.labels, model_key)
        except (ClientError, launch.NotReady) as exc:
            print(f"error: --check-service: {exc}", file=sys.stderr)
            return 1
    if args.out:  # after the service check, so that the file holds its result too
        (Path(args.out) / "evaluation.json").write_text(json.dumps(result, indent=2))
        pictures = "confusion_matrix.png, misclassified.png, reliability.png"
        print(f"wrote {Path(args.out) / 'evaluation.json'}, {pictures}")
    failure = check_failure(args, result, recorded)
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
