"""The inference seam: a uint8 batch (N, 3, 32, 32) in, float32 logits or probabilities (N, 10) out.

Serving (`app.service`) and evaluation (`training.evaluate`) both run a model through a
`Predictor`, whichever of the three served networks it is (`final`: FinalModel, `lite`: LiteModel,
`best`: AirbenchNet), so the pixels, the normalisation and the forward pass are the same code for both,
whatever the backend: "served labels equal evaluated labels" holds for each one.

Backends:
- `TorchPredictor`: PyTorch eager on cpu, cuda or mps; fp32 or bf16 (autocast); NCHW or
  channels_last. It never changes the module it is given beyond `eval()`, so training may hand
  it the model it is training.
- `OnnxPredictor`: ONNX Runtime on the CPU. The loaded network, with the normalisation in
  front of it, is exported to ONNX in memory when the predictor is built: the state_dict
  checkpoint stays the one artifact.

Measured on the 2-core development machine, one thread, shipped weights (docs/serving.md's table,
`python bench/serve_load.py`): ONNX Runtime is the fastest backend whose labels equal PyTorch
fp32's on the whole test split, so it is the CPU default; bf16 changes labels and is only used
when asked for. OpenVINO and `torch.compile` (inductor) were measured beside it and are slower
here at batch 1, 8 and 32, and torch.compile compiles for 1 to 3 minutes at each start
(`python bench/backends.py`), so they are not backends of the service.
"""

from __future__ import annotations

import io
import logging
import warnings
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from app.calibration import Calibration, stage_statistics
from app.explain import heatmaps
from app.model import CLASSES, INPUT_SHAPE, StagedNet
from app.preprocess import normalize

log = logging.getLogger(__name__)

BACKENDS = ("pytorch", "onnxruntime")
PRECISIONS = ("fp32", "bf16")
LAYOUTS = ("nchw", "channels_last")
# Exported with a dynamic batch dimension; this size only traces the graph.
_EXPORT_BATCH = 2


class PredictorError(Exception):
    """A backend that cannot run here (not installed, wrong device, unsupported precision)."""


@dataclass(frozen=True)
class PredictorInfo:
    """What runs the forward pass; the summary, the metrics and the startup log report it."""

    backend: str  # one of BACKENDS
    precision: str  # one of PRECISIONS
    device: str  # "cpu", "cuda:0", "mps"
    threads: int  # intra-op threads of one forward pass (PyTorch's are process-wide)
    layout: str = "nchw"  # memory layout of the activations (PyTorch); ONNX Runtime chooses its own

    def describe(self) -> str:
        """For log lines: device cpu, backend onnxruntime, precision fp32, 1 thread(s)."""
        layout = f", layout {self.layout}" if self.backend == "pytorch" else ""
        return (
            f"device {self.device}, backend {self.backend}, precision {self.precision}{layout}, "
            f"{self.threads} thread(s)"
        )


@dataclass(frozen=True)
class Forward:
    """One forward pass, in float32 on the CPU."""

    logits: torch.Tensor  # (N, 10)
    stats: torch.Tensor | None  # (N, D): app.calibration.stage_statistics, when asked for
    fmap: torch.Tensor | None  # (N, C, h, w): the last stage's map, when asked for (heatmaps)


class Predictor(ABC):
    """A served network ready to run: uint8 (N, 3, 32, 32) images on the CPU -> float32 results
    on the CPU.

    Thread-safe: several inference workers call one predictor at the same time.
    """

    info: PredictorInfo

    @abstractmethod
    def forward(self, images: torch.Tensor, stats: bool = True, fmap: bool = False) -> Forward:
        """uint8 (N, 3, 32, 32) -> the logits, and the stage statistics and last map if asked for."""

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> float32 logits (N, 10) on the CPU."""
        return self.forward(images, stats=False).logits


class TorchPredictor(Predictor):
    def __init__(
        self,
        model: StagedNet,
        device: torch.device,
        precision: str = "fp32",
        layout: str = "nchw",
        threads: int | None = None,
    ) -> None:
        if precision not in PRECISIONS or layout not in LAYOUTS:
            raise PredictorError(f"unknown precision {precision!r} or layout {layout!r}")
        if precision == "bf16" and device.type == "mps":
            raise PredictorError("bf16 autocast is not supported on mps; use fp32")
        self.model = model.eval()
        self.device = device
        self._channels_last = layout == "channels_last"
        self._autocast = precision == "bf16"
        if self._channels_last:
            # Moves the parameters (4-d weights) to channels_last; the values stay the same.
            model.to(memory_format=torch.channels_last)
        self.info = PredictorInfo(
            backend="pytorch",
            precision=precision,
            device=str(device),
            threads=torch.get_num_threads() if threads is None else threads,
            layout=layout,
        )

    def forward(self, images: torch.Tensor, stats: bool = True, fmap: bool = False) -> Forward:
        cast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self._autocast else nullcontext()
        with torch.inference_mode(), cast:
            x = normalize(images.to(self.device, non_blocking=True))
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if not (stats or fmap):
                return Forward(self.model(x).float().cpu(), None, None)
            maps, pooled, logits = self.model.forward_stages(x)
            return Forward(
                logits.float().cpu(),
                stage_statistics(maps, pooled).cpu() if stats else None,
                maps[-1].float().cpu() if fmap else None,
            )


OUTPUTS = ("logits", "stats", "fmap")  # the exported graph's outputs, in Forward's order


class _Normalized(torch.nn.Module):
    """normalize() and the network as one graph: uint8 images in; logits, stage statistics and
    the last map out (ONNX Runtime computes only the outputs a run asks for)."""

    def __init__(self, model: StagedNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps, pooled, logits = self.model.forward_stages(normalize(images))
        return logits, stage_statistics(maps, pooled), maps[-1]


def export_onnx(model: StagedNet) -> bytes:
    """The network with its normalisation -> an ONNX model (bytes) with a dynamic batch dimension.

    The TorchScript-based exporter: it takes under a second for this model, where the
    torch.export-based one took about 25 s on the development machine (measured), which every
    start and reload would pay.
    """
    wrapper = _Normalized(model).eval()
    example = torch.zeros(_EXPORT_BATCH, *INPUT_SHAPE, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,  # type: ignore[arg-type]  # a file object works too: the exporter writes to it
            dynamo=False,
            input_names=["images"],
            output_names=list(OUTPUTS),
            dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in OUTPUTS}},
        )
    return buffer.getvalue()


def onnxruntime_available() -> bool:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class OnnxPredictor(Predictor):
    def __init__(self, model: StagedNet, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise PredictorError("the onnxruntime backend needs the onnxruntime package") from None
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise PredictorError(f"the onnxruntime backend runs on the cpu, not on {device}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        try:
            proto = export_onnx(model)
        except Exception as exc:  # the exporter raises many kinds; one sentence for the log
            raise PredictorError(f"exporting the model to ONNX failed: {exc}") from None
        self._session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
        self.info = PredictorInfo(backend="onnxruntime", precision="fp32", device="cpu", threads=threads)

    def forward(self, images: torch.Tensor, stats: bool = True, fmap: bool = False) -> Forward:
        wanted = [name for name, want in zip(OUTPUTS, (True, stats, fmap), strict=True) if want]
        results = self._session.run(wanted, {"images": images.cpu().contiguous().numpy()})
        got = dict(zip(wanted, results, strict=True))
        out = {name: torch.from_numpy(got[name]) if name in got else None for name in OUTPUTS}
        return Forward(out["logits"], out["stats"], out["fmap"])  # type: ignore[arg-type]


def forward_all(
    predictor: Predictor, images: torch.Tensor, batch_size: int = 500, stats: bool = False
) -> Forward:
    """`predictor.forward` over uint8 images in batches of `batch_size`, concatenated (no map)."""
    parts = [
        predictor.forward(images[s : s + batch_size], stats=stats) for s in range(0, len(images), batch_size)
    ]
    if not parts:
        return Forward(torch.empty(0, len(CLASSES)), None, None)
    joined = torch.cat([p.stats for p in parts if p.stats is not None]) if stats else None
    return Forward(torch.cat([p.logits for p in parts]), joined, None)


@dataclass(frozen=True)
class Answers:
    """What the service answers for a batch: calibrated probabilities, the unsure flag, heatmaps."""

    probabilities: torch.Tensor  # (N, 10), softmax(logits / temperature)
    ood_score: torch.Tensor | None  # (N,); None without a detector
    unsure: torch.Tensor | None  # (N,) bool; None without a detector
    heatmaps: torch.Tensor | None  # (N, 32, 32) in [0, 1] for the predicted classes, when asked for


def answer(
    predictor: Predictor,
    model: StagedNet,
    calibration: Calibration,
    images: torch.Tensor,
    explain: bool = False,
) -> Answers:
    """One forward pass -> the answers; the seam serving and evaluation share. Without `explain`
    the last map is neither returned by the backend nor read."""
    out = predictor.forward(images, stats=calibration.detector is not None, fmap=explain)
    probabilities = calibration.probabilities(out.logits)
    score = unsure = maps = None
    if calibration.detector is not None and out.stats is not None:
        score = calibration.detector.score(out.stats)
        unsure = score > calibration.detector.threshold
    if out.fmap is not None:
        maps = heatmaps(model, out.fmap, probabilities.argmax(1))
    return Answers(probabilities, score, unsure, maps)


def default_backend(device: torch.device) -> str:
    """The fastest backend whose labels equal PyTorch fp32's on the whole test split (measured)."""
    if device.type == "cpu" and onnxruntime_available():
        return "onnxruntime"
    return "pytorch"


def default_layout(device: torch.device) -> str:
    """channels_last where it was measured faster (cpu, cuda); NCHW elsewhere."""
    return "channels_last" if device.type in ("cpu", "cuda") else "nchw"


def build_predictor(
    model: StagedNet,
    device: torch.device,
    backend: str = "auto",
    precision: str = "auto",
    layout: str = "auto",
    threads: int | None = None,
) -> Predictor:
    """A predictor for `model` (already on `device`); "auto" picks the measured default.

    bf16 is never picked by "auto": it changes labels. Raises PredictorError for a combination
    that cannot run here.
    """
    precision = "fp32" if precision == "auto" else precision
    if backend == "auto":
        backend = "pytorch" if precision == "bf16" else default_backend(device)
    if backend == "onnxruntime":
        if precision != "fp32":
            raise PredictorError("the onnxruntime backend runs fp32 only; use the pytorch backend for bf16")
        return OnnxPredictor(model, threads=threads or 1)
    if backend == "pytorch":
        layout = default_layout(device) if layout == "auto" else layout
        return TorchPredictor(model, device, precision=precision, layout=layout, threads=threads)
    raise PredictorError(f"unknown backend {backend!r}; one of {', '.join(BACKENDS)}")


def check_output(logits: torch.Tensor, batch: int) -> str | None:
    """None when `logits` are finite and of shape (batch, 10), else what is wrong."""
    finite = bool(torch.isfinite(logits).all())
    if tuple(logits.shape) == (batch, len(CLASSES)) and finite:
        return None
    return f"shape {tuple(logits.shape)}" + ("" if finite else " with NaN or infinite values")
