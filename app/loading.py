"""Loading a model to serve: a checkpoint read, checked, put on its device, probed and warmed up.

`load_model` turns a weights file into an immutable `LoadedModel` (the network, its `Predictor`,
its calibration and what the summary reports) or refuses it with a `CheckpointError`. A
`ModelSlot` holds one served model by the name clients use (`final`, FinalModel, the default;
`lite`, LiteModel, and `best`, AirbenchNet, when their weights are configured), with its own
queue; `configured_slots` decides from the settings which are served.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from app.batching import DynamicBatcher
from app.calibration import Calibration
from app.checkpoint import CheckpointError, build_model, load_checkpoint
from app.imaging import read_upload
from app.model import (
    CLASSES,
    INPUT_SHAPE,
    MODEL_KEYS,
    LayerRow,
    StagedNet,
    count_parameters,
    layer_table,
    multiply_accumulates,
)
from app.predictor import Answers, Predictor, TorchPredictor, answer, check_output
from app.settings import Settings

# The model a request gets when it names none.
DEFAULT_MODEL = "final"
# Each model's name -> the setting naming its weights file; all but the default are optional.
WEIGHTS_SETTINGS = {DEFAULT_MODEL: "weights", "lite": "lite_weights", "best": "best_weights"}

# Builds the predictor for a model already on its device; tests hand the service a fake one.
PredictorFactory = Callable[[StagedNet, torch.device], Predictor]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to serve, with everything the summary and the answers report about it."""

    predictor: Predictor
    model: StagedNet  # the network the predictor runs (its head's weights draw the heatmaps)
    calibration: Calibration  # temperature and unsure detector, from the checkpoint
    device: torch.device
    name: str  # what clients call it: "final", "lite", "best"
    architecture: str  # the network: "FinalModel", "LiteModel", "AirbenchNet"
    sha256: str
    weights_file: str
    meta: dict[str, Any]
    layers: list[LayerRow]
    macs: int  # multiply-accumulates per image
    total_params: int
    trainable_params: int
    loaded_at: str

    @property
    def test_accuracy(self) -> float | None:
        value = self.meta.get("metrics", {}).get("test_acc")
        return float(value) if isinstance(value, (int, float)) else None

    def answer(self, images: torch.Tensor, explain: bool = False) -> Answers:
        """uint8 (N, 3, 32, 32) -> calibrated probabilities, unsure flags, heatmaps if asked for."""
        return answer(self.predictor, self.model, self.calibration, images, explain)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> float32 calibrated class probabilities (N, 10) on the CPU."""
        return self.answer(images).probabilities


def _reference_predictor(model: StagedNet, device: torch.device) -> Predictor:
    return TorchPredictor(model, device)  # PyTorch fp32 NCHW: what evaluation reports by default


def load_model(
    weights: str | Path,
    device: torch.device,
    make_predictor: PredictorFactory | None = None,
    name: str = DEFAULT_MODEL,
) -> LoadedModel:
    """Read and check a checkpoint of model `name` ("final", "lite", "best"), put its network on `device`
    and build its predictor.

    Raises CheckpointError for a file that fails a check: besides those of `load_checkpoint` and
    `build_model` (format, architecture, classes, finite weights; a LiteModel is refused where a
    FinalModel is due and the other way round), one forward pass through the predictor on a fixed
    image must give finite logits of shape (1, 10), and its calibration record must fit the
    network. Raises PredictorError when the predictor cannot be built here.
    """
    architecture = MODEL_KEYS[name]
    ckpt = load_checkpoint(weights)
    model = build_model(ckpt, architecture)
    try:
        calibration = Calibration.from_meta(ckpt.meta)
    except ValueError as exc:
        raise CheckpointError(f"weights file {weights}: {exc}") from None
    layers = layer_table(model)  # measured on the CPU, before the move
    macs = multiply_accumulates(model)
    total, trainable = count_parameters(model)
    model.to(device)
    predictor = (_reference_predictor if make_predictor is None else make_predictor)(model, device)
    probe = torch.full((1, *INPUT_SHAPE), 128, dtype=torch.uint8)
    out = predictor.forward(probe, stats=True)
    problem = check_output(out.logits, 1)
    if problem is not None:
        raise CheckpointError(
            f"weights file {weights} fails the test forward pass: logits of {problem}, "
            f"not finite ones of shape (1, {len(CLASSES)})"
        )
    detector = calibration.detector
    if detector is not None and out.stats is not None and sum(detector.sizes) != out.stats.shape[1]:
        raise CheckpointError(
            f"weights file {weights}: its unsure detector expects {sum(detector.sizes)} stage statistics, "
            f"the network gives {out.stats.shape[1]}"
        )
    return LoadedModel(
        predictor=predictor,
        model=model,
        calibration=calibration,
        device=device,
        name=name,
        architecture=architecture,
        sha256=ckpt.sha256,
        weights_file=Path(ckpt.path).name,
        meta=ckpt.meta,
        layers=layers,
        macs=macs,
        total_params=total,
        trainable_params=trainable,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def warm_up(loaded: LoadedModel, settings: Settings) -> None:
    """One pass at each batch size the service will mostly see, and one decode."""
    image = read_upload(io.BytesIO(_warmup_image()), settings.max_pixels)
    for size in sorted({1, settings.max_batch_size}):
        loaded.probabilities(image.expand(size, *INPUT_SHAPE).contiguous())


def _warmup_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


def dtype_name(precision: str) -> str:
    """The compute dtype as torch names it: fp32 -> float32, bf16 -> bfloat16."""
    return {"fp32": "float32", "bf16": "bfloat16"}.get(precision, precision)


@dataclass(eq=False)
class ModelSlot:
    """One served model: the name clients use, its weights file, its own queue and the loaded model."""

    name: str  # "final", "lite", "best"
    weights: Path  # the configured file: startup, SIGHUP and a reload without a path read it
    loaded: LoadedModel | None = None  # None until the first load
    batcher: DynamicBatcher | None = None
    reload_lock: threading.Lock = field(default_factory=threading.Lock)  # one reload at a time

    @property
    def architecture(self) -> str:
        return MODEL_KEYS[self.name]


def configured_slots(settings: Settings) -> dict[str, ModelSlot]:
    """The models to serve, default first: decided before loading, so that the routes for every
    model can be declared up front. An optional model is served when its file is there, or when
    the setting names it on purpose (then it must load)."""
    slots = {DEFAULT_MODEL: ModelSlot(DEFAULT_MODEL, settings.weights)}
    for name, setting in WEIGHTS_SETTINGS.items():
        path = getattr(settings, setting)
        named = setting in settings.model_fields_set
        if name != DEFAULT_MODEL and path is not None and (path.exists() or named):
            slots[name] = ModelSlot(name, path)
    return slots
