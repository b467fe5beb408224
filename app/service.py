"""The models behind the API, as a domain: lifecycle, loading and swapping, admission, batching, `classify`.

`ModelService` speaks in domain results (`Classification`) and domain errors (`ServiceError`
and its kinds); it knows nothing of HTTP. The HTTP edge (`app.edge`) turns both into answers:
statuses, error bodies, Retry-After, response models.

Up to three models are served side by side, by name (`ModelSlot`): `final` (FinalModel, the
default), and, when their weights are configured, `lite` (LiteModel) and `best` (AirbenchNet). Each
slot has its own queue and batcher, since a batch runs one network, and one attribute that holds an
immutable `LoadedModel`, whose `Predictor` (`app.predictor`: PyTorch or ONNX Runtime) runs the
forward pass; every batch reads it once, so `swap()` replaces model and predictor atomically while
requests keep flowing. `reload()` (POST /admin/reload, SIGHUP) loads, checks, builds the predictor
for and warms a new checkpoint off to the side and only then swaps it in; a file that fails any
check is refused and the old weights keep serving.

Lifecycle (`State`): starting -> ready -> draining (SIGTERM: readiness and new requests are
refused while the admitted ones finish, see `drain()`) -> stopping.

Threading, for a small CPU model: `workers` inference threads each run whole batches with
`torch_threads` intra-op threads (by default cores / workers, so one each on a CPU). Two
single-threaded forward passes side by side beat one two-threaded pass for this model, since its
layers are too small to split well across cores.
"""

from __future__ import annotations

import asyncio
import enum
import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image

from app.batching import Arrival, BatcherClosed, DynamicBatcher, ItemResult, QueueFull
from app.calibration import Calibration
from app.checkpoint import CheckpointError, build_model, load_checkpoint
from app.device import resolve_device
from app.imaging import UploadError, read_upload
from app.metrics import RELOAD_OUTCOMES, Metrics
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
from app.predictor import (
    Answers,
    Predictor,
    PredictorError,
    TorchPredictor,
    answer,
    build_predictor,
    check_output,
)
from app.settings import Settings, env_name

log = logging.getLogger(__name__)

# Requests up to this size are decoded on the event loop instead of in the decode threads.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 256 * 256

# The model a request gets when it names none.
DEFAULT_MODEL = "final"
# The batcher tag of a request that asked for heatmaps.
EXPLAIN_TAG = "cam"
# Each model's name -> the setting naming its weights file; all but the default are optional.
WEIGHTS_SETTINGS = {DEFAULT_MODEL: "weights", "lite": "lite_weights", "best": "best_weights"}

# Builds the predictor for a model already on its device; tests hand the service a fake one.
PredictorFactory = Callable[[StagedNet, torch.device], Predictor]


class StartupError(Exception):
    """The service cannot start; the message is one sentence for the log."""


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"


# -- domain errors: what went wrong, in words; app.edge gives each its HTTP status ---------------


class ServiceError(Exception):
    """A request the service will not or cannot carry out; `message` is one sentence for the client."""

    code = "service_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotReady(ServiceError):
    """Starting or shutting down: try again shortly."""

    code = "not_ready"


class AtCapacity(ServiceError):
    """The queue is full: try again shortly."""

    code = "queue_full"


class NoImages(ServiceError):
    code = "invalid_request"


class TooManyFiles(ServiceError):
    code = "too_many_files"


class UnknownModel(ServiceError):
    """A model name the service does not serve."""

    code = "model_not_found"


@dataclass(frozen=True)
class UploadProblem:
    index: int  # position in the request, from 0
    filename: str | None
    error: UploadError


class BadUploads(ServiceError):
    """One or more uploads cannot be used; `problems` names every one, in upload order."""

    def __init__(self, message: str, problems: list[UploadProblem]) -> None:
        super().__init__(message)
        self.problems = problems
        self.code = problems[0].error.code


# -- the loaded model ------------------------------------------------------------------------------


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


@dataclass
class Upload:
    filename: str | None
    file: BinaryIO
    size: int | None = None  # bytes, when known


@dataclass(frozen=True)
class ImageAnswer:
    """One image's answer."""

    probabilities: list[float]  # 10, calibrated
    ood_score: float | None  # None: the model has no unsure detector
    unsure: bool | None
    heatmap: list[list[float]] | None = None  # 32 x 32, with explain


def image_answers(answers: Answers, explain: list[bool]) -> list[ImageAnswer]:
    probabilities = answers.probabilities.tolist()
    scores = answers.ood_score.tolist() if answers.ood_score is not None else [None] * len(probabilities)
    unsure = answers.unsure.tolist() if answers.unsure is not None else [None] * len(probabilities)
    maps = answers.heatmaps.round(decimals=3).tolist() if answers.heatmaps is not None else None
    return [
        ImageAnswer(p, s, u, maps[i] if maps is not None and explain[i] else None)
        for i, (p, s, u) in enumerate(zip(probabilities, scores, unsure, strict=True))
    ]


@dataclass(frozen=True)
class Classification:
    """The result of `classify`: per-image answers in upload order, and where they came from."""

    filenames: list[str | None]
    answers: list[ImageAnswer]
    top_k: int
    model: LoadedModel  # the weights that made every one of these predictions
    decode_s: float
    queue_s: float  # longest wait of an image for its batch
    run_s: float  # model time of the longest batch
    batch_size: int  # images in the largest forward pass
    total_s: float


def _warmup_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


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


class ModelService:
    def __init__(
        self, settings: Settings, metrics: Metrics, make_predictor: PredictorFactory | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.STARTING
        self._make_predictor = self._configured_predictor if make_predictor is None else make_predictor
        # Decided here, before loading, so that the routes for every model can be declared up front.
        self._slots = {DEFAULT_MODEL: ModelSlot(DEFAULT_MODEL, settings.weights)}
        for name, setting in WEIGHTS_SETTINGS.items():
            path = getattr(settings, setting)
            named = setting in settings.model_fields_set  # a file named on purpose must load
            if name != DEFAULT_MODEL and path is not None and (path.exists() or named):
                self._slots[name] = ModelSlot(name, path)
        for name in self._slots:  # every served model's reload counters exist from the start, at 0
            for outcome in RELOAD_OUTCOMES:
                metrics.reloads.labels(name, outcome)
        self.in_flight = 0  # inference requests admitted and not yet answered (event-loop thread only)
        self._told_max_files = False  # the operator was told once in the log about CIFAR10_MAX_FILES
        self._decode_pool: ThreadPoolExecutor | None = None
        self.device: torch.device | None = None
        self.workers = 0
        self.torch_threads = 0

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def model_names(self) -> list[str]:
        """The models served, by the names clients use; the default first."""
        return list(self._slots)

    def slot(self, name: str | None = None) -> ModelSlot:
        """The slot of model `name` (default: the default model). Raises UnknownModel."""
        slot = self._slots.get(DEFAULT_MODEL if name is None else name)
        if slot is None:
            served = ", ".join(repr(n) for n in self._slots)
            raise UnknownModel(f"there is no model {name!r} here; the models served are {served}")
        return slot

    @property
    def loaded_model(self) -> LoadedModel | None:
        """The default model being served, or None before the first load."""
        return self._slots[DEFAULT_MODEL].loaded

    @property
    def model(self) -> LoadedModel:
        return self.loaded(DEFAULT_MODEL)

    def loaded(self, name: str | None = None) -> LoadedModel:
        """Model `name` as served now. Raises UnknownModel, or NotReady before its first load."""
        loaded = self.slot(name).loaded
        if loaded is None:
            raise self.not_ready()
        return loaded

    @property
    def batcher(self) -> DynamicBatcher | None:
        return self._slots[DEFAULT_MODEL].batcher

    def _configured_predictor(self, model: StagedNet, device: torch.device) -> Predictor:
        s = self.settings
        return build_predictor(model, device, s.backend, s.precision, s.layout, threads=self.torch_threads)

    def start(self) -> None:
        """Blocking: resolve the device, load and warm up every model, start the threads. Raises
        StartupError."""
        s = self.settings
        try:
            self.device = resolve_device(s.device)
        except ValueError as exc:
            raise StartupError(f"{exc} (set {env_name('device')})") from None
        self.workers = s.resolved_workers(self.device.type)
        self.torch_threads = s.resolved_torch_threads(self.device.type)
        torch.set_num_threads(self.torch_threads)  # process-wide, shared by every worker
        warm_up_s: dict[str, float] = {}
        for slot in self._slots.values():
            started = time.perf_counter()
            setting = env_name(WEIGHTS_SETTINGS[slot.name])
            try:
                loaded = load_model(slot.weights, self.device, self._make_predictor, slot.name)
            except CheckpointError as exc:
                raise StartupError(f"{exc} (set {setting} to a {slot.architecture} checkpoint)") from None
            except PredictorError as exc:
                raise StartupError(f"{exc} (set {env_name('backend')} and {env_name('precision')})") from None
            if s.warmup:
                self._warm_up(loaded)
            self.swap(loaded)
            warm_up_s[slot.name] = time.perf_counter() - started

        self._decode_pool = ThreadPoolExecutor(s.resolved_decode_threads(), thread_name_prefix="decode")
        for slot in self._slots.values():
            slot.batcher = DynamicBatcher(
                partial(self._run_batch, slot),
                max_batch_size=s.max_batch_size,
                max_wait_s=s.max_wait_ms / 1000,
                max_queue_size=s.max_queue_size,
                workers=self.workers,
                batching=s.batching,
                on_batch=self.metrics.observe_batch,
            )
            slot.batcher.start()
        self.metrics.queue_images.set_function(
            lambda: sum(slot.batcher.pending for slot in self._slots.values() if slot.batcher)
        )
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.state = State.READY
        self.metrics.ready.set(1)
        for slot in self._slots.values():
            loaded = self.loaded(slot.name)
            accuracy = (
                "not recorded" if loaded.test_accuracy is None else f"{100 * loaded.test_accuracy:.2f}%"
            )
            log.info(
                "serving %s as %r from %s (sha256 %s..., test accuracy %s) on %s; %d inference "
                "worker(s); batching %s (up to %d images, %.1f ms); %s",
                slot.architecture,
                slot.name,
                slot.weights,
                loaded.sha256[:12],
                accuracy,
                loaded.predictor.info.describe(),
                self.workers,
                "on" if s.batching else "off",
                s.max_batch_size,
                s.max_wait_ms,
                f"loading and warm-up took {warm_up_s[slot.name]:.2f} s" if s.warmup else "no warm-up",
            )

    def _warm_up(self, loaded: LoadedModel) -> None:
        """One pass at each batch size the service will mostly see, and one decode."""
        image = read_upload(io.BytesIO(_warmup_image()), self.settings.max_pixels)
        for size in sorted({1, self.settings.max_batch_size}):
            loaded.probabilities(image.expand(size, *INPUT_SHAPE).contiguous())

    def swap(self, loaded: LoadedModel) -> None:
        """Serve `loaded` as model `loaded.name` from the next batch on (one reference assignment)."""
        self.slot(loaded.name).loaded = loaded
        info = loaded.predictor.info
        self.metrics.model_info.labels(loaded.name).info(
            {
                "name": loaded.architecture,
                "sha256": loaded.sha256,
                "weights_file": loaded.weights_file,
                "trained_at": str(loaded.meta.get("created_at", "")),
                "loaded_at": loaded.loaded_at,
                "device": str(loaded.device),
                "dtype": dtype_name(info.precision),
                "backend": info.backend,
                "precision": info.precision,
                "layout": info.layout,
                "threads": str(info.threads),
                "parameters": str(loaded.total_params),
                "test_accuracy": "" if loaded.test_accuracy is None else f"{loaded.test_accuracy:.4f}",
            }
        )
        self.metrics.model_parameters.labels(loaded.name).set(loaded.total_params)
        self.metrics.model_test_accuracy.labels(loaded.name).set(
            float("nan") if loaded.test_accuracy is None else loaded.test_accuracy
        )

    def reload(
        self, weights: str | Path | None = None, model: str | None = None
    ) -> tuple[LoadedModel, LoadedModel]:
        """Blocking: load, check and warm up `weights` (default: the configured file) for model
        `model` (default: the default model), then swap it in.

        Returns (previous, new). Raises CheckpointError for a file that fails any check (the old
        weights keep serving), UnknownModel, and NotReady unless the service is ready. Concurrent
        reloads of one model run one after the other.
        """
        slot = self.slot(model)
        path = Path(weights) if weights is not None else slot.weights
        with slot.reload_lock:
            if not self.ready or self.device is None:
                raise self.not_ready()
            try:
                loaded = load_model(path, self.device, self._make_predictor, slot.name)
            except PredictorError as exc:
                self.metrics.reloads.labels(slot.name, "refused").inc()
                raise CheckpointError(f"weights file {path} cannot be served here: {exc}") from None
            except CheckpointError:
                self.metrics.reloads.labels(slot.name, "refused").inc()
                raise
            if self.settings.warmup:
                self._warm_up(loaded)
            previous = self.loaded(slot.name)
            self.swap(loaded)
            self.metrics.reloads.labels(slot.name, "swapped").inc()
        log.info(
            "reloaded weights from %s as %r: now serving sha256 %s... (trained at %s), before %s...",
            path,
            slot.name,
            loaded.sha256[:12],
            loaded.meta.get("created_at", "unknown"),
            previous.sha256[:12],
        )
        return previous, loaded

    def begin_drain(self) -> None:
        """Readiness turns false and new requests are refused; admitted ones carry on."""
        if self.state is State.READY:
            self.state = State.DRAINING
            self.metrics.ready.set(0)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Begin draining and wait until no admitted request is left, or `timeout_s` (default: the
        setting) has passed. True when it emptied in time."""
        self.begin_drain()
        timeout_s = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.in_flight == 0

    def begin_shutdown(self) -> None:
        if self.state in (State.READY, State.DRAINING):
            self.state = State.STOPPING
            self.metrics.ready.set(0)

    def stop(self) -> None:
        """Blocking: finish queued work, then stop the threads."""
        self.begin_shutdown()
        for slot in self._slots.values():
            if slot.batcher is not None:
                slot.batcher.close(timeout=max(1.0, self.settings.drain_timeout_s))
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True, cancel_futures=True)

    def not_ready(self) -> NotReady:
        what = "is still loading the model" if self.state is State.STARTING else "is shutting down"
        return NotReady(f"the service {what}; retry shortly")

    # -- inference --------------------------------------------------------------------------

    def _run_batch(
        self, slot: ModelSlot, images: torch.Tensor, tags: list[Any]
    ) -> list[tuple[ImageAnswer, LoadedModel]]:
        loaded = slot.loaded  # read once: a swap takes effect from the next batch
        assert loaded is not None
        explain = [tag == EXPLAIN_TAG for tag in tags]
        answers = loaded.answer(images, explain=any(explain))
        return [(one, loaded) for one in image_answers(answers, explain)]

    def _decode_all(self, uploads: list[Upload], max_pixels: int) -> torch.Tensor:
        """All of a request's uploads -> uint8 (k, 3, 32, 32); every bad file named in one BadUploads."""
        tensors, problems = [], []
        for index, upload in enumerate(uploads):
            try:
                tensors.append(read_upload(upload.file, max_pixels))
            except UploadError as exc:
                problems.append(UploadProblem(index=index, filename=upload.filename, error=exc))
        if problems:
            first = problems[0]
            name = f" ({first.filename!r})" if first.filename else ""
            more = ""
            if len(problems) > 1:
                more = f"; {len(problems) - 1} more of the {len(uploads)} files are bad too (see 'files')"
            elif len(uploads) > 1:
                more = f"; no predictions were made for the other {len(uploads) - 1} file(s)"
            raise BadUploads(f"the file at index {first.index}{name}: {first.error.message}{more}", problems)
        return torch.stack(tensors)

    def _decode_small(self, uploads: list[Upload]) -> torch.Tensor | None:
        """Decode a small request right here, or return None to send it to the decode threads.

        A few kilobytes decode in well under a millisecond, less than the hop to a thread and
        back costs; the pixel cap keeps a small file that unpacks big (a bomb) off the event loop.
        """
        sizes = [u.size for u in uploads]
        if None in sizes or sum(size or 0 for size in sizes) > INLINE_DECODE_BYTES:
            return None
        try:
            return self._decode_all(uploads, min(INLINE_DECODE_PIXELS, self.settings.max_pixels))
        except BadUploads as exc:
            if any(problem.error.code == "too_many_pixels" for problem in exc.problems):
                return None  # the threads decide it, with the real limit
            raise

    def admit(self, model: str | None = None) -> Arrival:
        """Called as an inference request for `model` (default: the default model) starts to
        arrive, before its body is read.

        Raises UnknownModel, NotReady or AtCapacity. An admitted request counts as in flight until
        `request_done()` (the middleware calls it once the answer is sent); draining waits for
        that count to reach zero.
        """
        batcher = self.slot(model).batcher
        if not self.ready or batcher is None:
            raise self.not_ready()
        if batcher.full():
            raise AtCapacity(f"the service is at capacity ({batcher.pending} images waiting); retry shortly")
        arrival = batcher.announce()
        self.in_flight += 1
        return arrival

    def request_done(self) -> None:
        self.in_flight -= 1

    def _check_count(self, uploads: list[Upload]) -> None:
        """NoImages for none, TooManyFiles for more than CIFAR10_MAX_FILES (which the log names
        once, for the operator; the client is told what it can do)."""
        if not uploads:
            raise NoImages("no images: send one or more files in the field 'file'")
        if len(uploads) > self.settings.max_files:
            if not self._told_max_files:  # the setting is the operator's business, not the client's
                self._told_max_files = True
                log.warning(
                    "a request of %d files went over %s (%d); later ones are counted in "
                    'cifar10_rejected_total{reason="too_many_files"}',
                    len(uploads),
                    env_name("max_files"),
                    self.settings.max_files,
                )
            raise TooManyFiles(
                f"{len(uploads)} files in one request; this service takes at most "
                f"{self.settings.max_files} a request: split them over several requests"
            )

    async def classify(
        self,
        uploads: list[Upload],
        top_k: int,
        arrival: Arrival | None = None,
        model: str | None = None,
        explain: bool = False,
    ) -> Classification:
        """Decode, queue, wait for the batch of `model` (default: the default model); per-image
        answers in upload order, with heatmaps if `explain`.

        Raises UnknownModel, NotReady, AtCapacity, NoImages, TooManyFiles or BadUploads.
        """
        started = time.perf_counter()
        slot = self.slot(model)
        batcher, pool = slot.batcher, self._decode_pool
        # While draining, requests admitted before it began are still served.
        if self.state not in (State.READY, State.DRAINING) or batcher is None or pool is None:
            raise self.not_ready()
        self._check_count(uploads)
        try:
            ticket = batcher.reserve(len(uploads))
        except QueueFull as exc:
            raise AtCapacity(f"the service is at capacity ({exc}); retry shortly") from None
        except BatcherClosed:
            raise self.not_ready() from None

        loop = asyncio.get_running_loop()
        decode_started = time.perf_counter()
        try:
            images = self._decode_small(uploads)
            if images is None:
                images = await loop.run_in_executor(pool, self._decode_all, uploads, self.settings.max_pixels)
        except BaseException:
            batcher.release(ticket)
            raise
        finally:
            decode_s = time.perf_counter() - decode_started
            self.metrics.decode_seconds.observe(decode_s)  # refused uploads too: checking them is work

        done: asyncio.Future[list[ItemResult]] = loop.create_future()

        def deliver(result: list[ItemResult] | BaseException) -> None:  # from a worker thread
            loop.call_soon_threadsafe(_settle_future, done, result)

        try:
            job = batcher.submit(ticket, images, deliver, arrival, EXPLAIN_TAG if explain else None)
        except BatcherClosed:
            raise self.not_ready() from None
        try:
            results = await done
        except asyncio.CancelledError:
            job.cancel()
            raise
        loaded: LoadedModel = results[0].output[1]
        answers: list[ImageAnswer] = [r.output[0] for r in results]
        if any(r.output[1] is not loaded for r in results):
            # A reload landed between this request's batches: answer from the new weights alone.
            loaded = self.loaded(slot.name)
            fresh = await asyncio.to_thread(loaded.answer, images, explain)
            answers = image_answers(fresh, [explain] * len(images))
        self.metrics.count_answers(answers, slot.name)
        return Classification(
            filenames=[u.filename for u in uploads],
            answers=answers,
            top_k=top_k,
            model=loaded,
            decode_s=decode_s,
            queue_s=max(r.queue_s for r in results),
            run_s=max(r.run_s for r in results),
            batch_size=max(r.batch_size for r in results),
            total_s=time.perf_counter() - started,
        )


def dtype_name(precision: str) -> str:
    """The compute dtype as torch names it: fp32 -> float32, bf16 -> bfloat16."""
    return {"fp32": "float32", "bf16": "bfloat16"}.get(precision, precision)


def _settle_future(future: asyncio.Future, result: Any) -> None:
    if future.done():  # cancelled meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
