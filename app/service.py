"""The model behind the API: loading, warm-up, decoding uploads, batched inference, top-k.

`ModelService` owns the model, the decode thread pool and the `DynamicBatcher`. The model sits
in one attribute that holds an immutable `LoadedModel`; every batch reads it once, so `swap()`
can replace it atomically while requests keep flowing. `reload()` (POST /admin/reload, SIGHUP)
loads, checks and warms a new checkpoint off to the side and only then swaps it in; a file
that fails any check is refused and the old weights keep serving.

Lifecycle: starting -> ready -> draining (SIGTERM: readiness and new requests get 503 while the
admitted ones finish, see `drain()`) -> stopping.

Threading, for a small CPU model: `workers` inference threads each run whole batches with
PyTorch's intra-op threads set to `torch_threads` (process-wide; by default cores / workers, so
one each on a CPU). Two single-threaded forward passes side by side beat one two-threaded pass
for this model, since its layers are too small to split well across cores.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image

from app.batching import Arrival, BatcherClosed, DynamicBatcher, ItemResult, QueueFull
from app.checkpoint import CheckpointError, build_model, load_checkpoint
from app.device import resolve_device
from app.errors import ApiError, FileProblem
from app.imaging import UploadError, read_upload
from app.metrics import Metrics
from app.model import (
    CLASSES,
    INPUT_SHAPE,
    MEAN,
    MODEL_NAME,
    STD,
    LayerRow,
    count_parameters,
    format_layer_table,
    layer_table,
)
from app.preprocess import normalize
from app.schemas import (
    ClassProbability,
    LayerInfo,
    ModelRef,
    ModelSummary,
    Normalization,
    Prediction,
    PredictResponse,
    ServingInfo,
    Timing,
)
from app.settings import Settings, env_name

log = logging.getLogger(__name__)

# Requests up to this size are decoded on the event loop instead of in the decode threads.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 256 * 256


class StartupError(Exception):
    """The service cannot start; the message is one sentence for the log."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to serve, with everything the summary and the answers report about it."""

    model: torch.nn.Module
    device: torch.device
    sha256: str
    weights_file: str
    meta: dict[str, Any]
    layers: list[LayerRow]
    total_params: int
    trainable_params: int
    loaded_at: str
    dtype: torch.dtype = torch.float32

    @property
    def test_accuracy(self) -> float | None:
        value = self.meta.get("metrics", {}).get("test_acc")
        return float(value) if isinstance(value, (int, float)) else None

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> float32 class probabilities (N, 10) on the CPU.

        float32 on every device, exactly as `python -m training.evaluate` computes, so served
        labels agree with the evaluated ones.
        """
        with torch.inference_mode():
            x = normalize(images.to(self.device, non_blocking=True))
            logits = self.model(x)
            return torch.softmax(logits.float(), dim=1).cpu()


def load_model(weights: str | Path, device: torch.device) -> LoadedModel:
    """Read and check a checkpoint and put its model on `device`; raises CheckpointError.

    Besides the checks of `load_checkpoint` and `build_model` (format, architecture, classes,
    finite weights), one forward pass on a fixed image must give finite logits of shape (1, 10).
    """
    ckpt = load_checkpoint(weights)
    model = build_model(ckpt)
    layers = layer_table(model)  # measured on the CPU, before the move
    total, trainable = count_parameters(model)
    model.to(device)
    with torch.inference_mode():
        probe = torch.full((1, *INPUT_SHAPE), 128, dtype=torch.uint8, device=device)
        logits = model(normalize(probe))
    finite = bool(torch.isfinite(logits).all())
    if tuple(logits.shape) != (1, len(CLASSES)) or not finite:
        got = f"shape {tuple(logits.shape)}" + ("" if finite else " with NaN or infinite values")
        raise CheckpointError(
            f"weights file {weights} fails the test forward pass: logits of {got}, "
            f"not finite ones of shape (1, {len(CLASSES)})"
        )
    return LoadedModel(
        model=model,
        device=device,
        sha256=ckpt.sha256,
        weights_file=Path(ckpt.path).name,
        meta=ckpt.meta,
        layers=layers,
        total_params=total,
        trainable_params=trainable,
        loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


@dataclass
class Upload:
    filename: str | None
    file: BinaryIO
    size: int | None = None  # bytes, when known


def _warmup_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


class ModelService:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = "starting"  # starting -> ready -> draining -> stopping
        self._model: LoadedModel | None = None
        self._reload_lock = threading.Lock()  # one reload at a time
        self.in_flight = 0  # /predict requests admitted and not yet answered (event-loop thread only)
        self._batcher: DynamicBatcher | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.device: torch.device | None = None
        self.workers = 0
        self.torch_threads = 0

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def model(self) -> LoadedModel:
        if self._model is None:
            raise ApiError(503, "not_ready", "the model is not loaded yet")
        return self._model

    @property
    def batcher(self) -> DynamicBatcher | None:
        return self._batcher

    def start(self) -> None:
        """Blocking: resolve the device, load, warm up, start the threads. Raises StartupError."""
        s = self.settings
        try:
            self.device = resolve_device(s.device)
        except ValueError as exc:
            raise StartupError(f"{exc} (set {env_name('device')})") from None
        try:
            loaded = load_model(s.weights, self.device)
        except CheckpointError as exc:
            raise StartupError(f"{exc} (set {env_name('weights')} to a FinalModel checkpoint)") from None
        self.workers = s.resolved_workers(self.device.type)
        self.torch_threads = s.resolved_torch_threads(self.device.type)
        torch.set_num_threads(self.torch_threads)  # process-wide, shared by every worker

        started = time.perf_counter()
        if s.warmup:
            self._warm_up(loaded)
        self.swap(loaded)
        self._decode_pool = ThreadPoolExecutor(s.resolved_decode_threads(), thread_name_prefix="decode")
        self._batcher = DynamicBatcher(
            self._run_batch,
            max_batch_size=s.max_batch_size,
            max_wait_s=s.max_wait_ms / 1000,
            max_queue_size=s.max_queue_size,
            workers=self.workers,
            batching=s.batching,
            on_batch=self.metrics.observe_batch,
        )
        self._batcher.start()
        self.metrics.queue_images.set_function(lambda: self._batcher.pending if self._batcher else 0)
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self.state = "ready"
        self.metrics.ready.set(1)
        accuracy = "not recorded" if loaded.test_accuracy is None else f"{100 * loaded.test_accuracy:.2f}%"
        log.info(
            "serving %s from %s (sha256 %s..., test accuracy %s) on device %s, %s; %d inference worker(s) "
            "x %d torch thread(s); batching %s (up to %d images, %.1f ms); %s",
            MODEL_NAME,
            s.weights,
            loaded.sha256[:12],
            accuracy,
            self.device,
            str(loaded.dtype).removeprefix("torch."),
            self.workers,
            self.torch_threads,
            "on" if s.batching else "off",
            s.max_batch_size,
            s.max_wait_ms,
            f"warm-up took {time.perf_counter() - started:.2f} s" if s.warmup else "no warm-up",
        )

    def _warm_up(self, loaded: LoadedModel) -> None:
        """One pass at each batch size the service will mostly see, and one decode."""
        image = read_upload(io.BytesIO(_warmup_image()), self.settings.max_pixels)
        for size in sorted({1, self.settings.max_batch_size}):
            loaded.probabilities(image.expand(size, *INPUT_SHAPE).contiguous())

    def swap(self, loaded: LoadedModel) -> None:
        """Serve `loaded` from the next batch on (one reference assignment, atomic)."""
        self._model = loaded
        self.metrics.model_info.info(
            {
                "name": MODEL_NAME,
                "sha256": loaded.sha256,
                "weights_file": loaded.weights_file,
                "trained_at": str(loaded.meta.get("created_at", "")),
                "loaded_at": loaded.loaded_at,
                "device": str(loaded.device),
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "parameters": str(loaded.total_params),
                "test_accuracy": "" if loaded.test_accuracy is None else f"{loaded.test_accuracy:.4f}",
            }
        )
        self.metrics.model_parameters.set(loaded.total_params)
        self.metrics.model_test_accuracy.set(
            float("nan") if loaded.test_accuracy is None else loaded.test_accuracy
        )

    def reload(self, weights: str | Path | None = None) -> tuple[LoadedModel, LoadedModel]:
        """Blocking: load, check and warm up `weights` (default: the configured file), then swap it in.

        Returns (previous, new). Raises CheckpointError for a file that fails any check (the old
        weights keep serving) and ApiError 503 unless the service is ready. Concurrent reloads
        run one after the other.
        """
        path = Path(weights) if weights is not None else self.settings.weights
        with self._reload_lock:
            if not self.ready or self.device is None:
                raise self.not_ready_error()
            try:
                loaded = load_model(path, self.device)
            except CheckpointError:
                self.metrics.reloads.labels("refused").inc()
                raise
            if self.settings.warmup:
                self._warm_up(loaded)
            previous = self.model
            self.swap(loaded)
            self.metrics.reloads.labels("swapped").inc()
        log.info(
            "reloaded weights from %s: now serving sha256 %s... (trained at %s), before %s...",
            path,
            loaded.sha256[:12],
            loaded.meta.get("created_at", "unknown"),
            previous.sha256[:12],
        )
        return previous, loaded

    def begin_drain(self) -> None:
        """Readiness turns false and new /predict requests get 503; admitted ones carry on."""
        if self.state == "ready":
            self.state = "draining"
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
        if self.state in ("ready", "draining"):
            self.state = "stopping"
            self.metrics.ready.set(0)

    def stop(self) -> None:
        """Blocking: finish queued work, then stop the threads."""
        self.begin_shutdown()
        if self._batcher is not None:
            self._batcher.close(timeout=max(1.0, self.settings.drain_timeout_s))
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True, cancel_futures=True)

    # -- inference --------------------------------------------------------------------------

    def _run_batch(self, images: torch.Tensor) -> list[tuple[list[float], LoadedModel]]:
        loaded = self._model  # read once: a swap takes effect from the next batch
        assert loaded is not None
        probs = loaded.probabilities(images)
        return [(row, loaded) for row in probs.tolist()]

    def _decode_all(self, uploads: list[Upload], max_pixels: int) -> torch.Tensor:
        """All of a request's uploads -> uint8 (k, 3, 32, 32); every bad file named in one ApiError."""
        tensors, problems = [], []
        for index, upload in enumerate(uploads):
            try:
                tensors.append(read_upload(upload.file, max_pixels))
            except UploadError as exc:
                problems.append(
                    FileProblem(
                        index=index,
                        filename=upload.filename,
                        status=exc.status,
                        code=exc.code,
                        detail=exc.message,
                    )
                )
        if problems:
            first = problems[0]
            name = f" ({first.filename!r})" if first.filename else ""
            more = ""
            if len(problems) > 1:
                more = f"; {len(problems) - 1} more of the {len(uploads)} files are bad too (see 'files')"
            elif len(uploads) > 1:
                more = f"; no predictions were made for the other {len(uploads) - 1} file(s)"
            raise ApiError(
                first.status,
                first.code,
                f"file {first.index + 1}{name}: {first.detail}{more}",
                files=problems,
            )
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
        except ApiError as exc:
            if any(problem.code == "too_many_pixels" for problem in exc.files or ()):
                return None  # the threads decide it, with the real limit
            raise

    def admit(self) -> Arrival:
        """Called as a /predict request starts to arrive, before its body is read; raises ApiError.

        An admitted request counts as in flight until `request_done()` (the middleware calls it
        once the answer is sent); draining waits for that count to reach zero.
        """
        batcher = self._batcher
        if not self.ready or batcher is None:
            raise self.not_ready_error()
        if batcher.full():
            raise self.queue_full_error(f"{batcher.pending} images waiting")
        arrival = batcher.announce()
        self.in_flight += 1
        return arrival

    def request_done(self) -> None:
        self.in_flight -= 1

    async def predict(
        self, uploads: list[Upload], top_k: int, arrival: Arrival | None = None
    ) -> PredictResponse:
        """Decode, queue, wait for the batch, and return per-image results in upload order."""
        started = time.perf_counter()
        batcher, pool = self._batcher, self._decode_pool
        # While draining, requests admitted before it began are still served.
        if self.state not in ("ready", "draining") or batcher is None or pool is None:
            raise self.not_ready_error()
        if not uploads:
            raise ApiError(422, "invalid_request", "no images: send one or more files in the field 'file'")
        if len(uploads) > self.settings.max_files:
            raise ApiError(
                413,
                "too_many_files",
                f"{len(uploads)} files in one request; at most {self.settings.max_files} "
                f"(set {env_name('max_files')})",
            )
        try:
            ticket = batcher.reserve(len(uploads))
        except QueueFull as exc:
            raise self.queue_full_error(str(exc)) from None
        except BatcherClosed:
            raise self.not_ready_error() from None

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
            job = batcher.submit(ticket, images, deliver, arrival)
        except BatcherClosed:
            raise self.not_ready_error() from None
        try:
            results = await done
        except asyncio.CancelledError:
            job.cancel()
            raise
        if len({id(r.output[1]) for r in results}) > 1:
            # A reload landed between this request's batches: answer from the new weights alone.
            loaded = self.model
            probs = await asyncio.to_thread(loaded.probabilities, images)
            results = [
                ItemResult((row, loaded), r.queue_s, r.run_s, r.batch_size)
                for row, r in zip(probs.tolist(), results, strict=True)
            ]
        return self._answer(uploads, results, top_k, decode_s, started)

    def _answer(
        self, uploads: list[Upload], results: list[ItemResult], top_k: int, decode_s: float, started: float
    ) -> PredictResponse:
        predictions, best = [], []
        for upload, result in zip(uploads, results, strict=True):
            probs: list[float] = result.output[0]
            order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)[:top_k]
            best.append(order[0])
            predictions.append(
                Prediction(
                    filename=upload.filename,
                    label=CLASSES[order[0]],
                    index=order[0],
                    confidence=probs[order[0]],
                    top_k=[ClassProbability(label=CLASSES[i], probability=probs[i]) for i in order],
                )
            )
        self.metrics.count_labels(best)
        loaded: LoadedModel = results[0].output[1]
        return PredictResponse(
            predictions=predictions,
            model=ModelRef(name=MODEL_NAME, sha256=loaded.sha256, device=str(loaded.device)),
            timing=Timing(
                total_ms=1000 * (time.perf_counter() - started),
                decode_ms=1000 * decode_s,
                queue_ms=1000 * max(r.queue_s for r in results),
                inference_ms=1000 * max(r.run_s for r in results),
                batch_size=max(r.batch_size for r in results),
            ),
        )

    def summary(self) -> ModelSummary:
        loaded, s = self.model, self.settings
        return ModelSummary(
            model=MODEL_NAME,
            total_params=loaded.total_params,
            trainable_params=loaded.trainable_params,
            non_trainable_params=loaded.total_params - loaded.trainable_params,
            input_shape=list(INPUT_SHAPE),
            layers=[
                LayerInfo(name=r.name, type=r.type, output_shape=list(r.output_shape), params=r.params)
                for r in loaded.layers
            ],
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            classes=list(CLASSES),
            normalization=Normalization(mean=list(MEAN), std=list(STD)),
            sha256=loaded.sha256,
            weights_file=loaded.weights_file,
            loaded_at=loaded.loaded_at,
            checkpoint=loaded.meta,
            serving=ServingInfo(
                batching=s.batching,
                max_batch_size=s.max_batch_size,
                max_wait_ms=s.max_wait_ms,
                max_queue_size=s.max_queue_size,
                workers=self.workers,
                torch_threads=self.torch_threads,
                max_files=s.max_files,
                max_body_bytes=s.max_body_bytes,
                max_pixels=s.max_pixels,
            ),
        )

    def summary_text(self) -> str:
        loaded = self.model
        return format_layer_table(loaded.layers, loaded.total_params, loaded.trainable_params)

    def not_ready_error(self) -> ApiError:
        what = "is still loading the model" if self.state == "starting" else "is shutting down"
        return ApiError(
            503,
            "not_ready",
            f"the service {what}; retry shortly",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    def queue_full_error(self, why: str) -> ApiError:
        return ApiError(
            503,
            "queue_full",
            f"the service is at capacity ({why}); retry shortly",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )


def _settle_future(future: asyncio.Future, result: Any) -> None:
    if future.done():  # cancelled meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
