"""The models behind the API, as a domain: `ModelService` coordinates loading, admission, batching and
`classify`; it knows nothing of HTTP (`app.edge` turns its results and errors into answers).

Each part is in a module named for its job:
- `app.domain`: what the service speaks in: `Upload`, `ImageAnswer`, `Classification`, `ServiceError`
  and its kinds, `State`;
- `app.loading`: a checkpoint read, checked, probed and warmed up into a `LoadedModel`; the
  `ModelSlot` of each served model;
- `app.decoding`: the decode policy (on the event loop or in the decode threads);
- `app.admission`: admission, requests in flight (what a drain waits for), the file limit;
- `app.service_metrics`: what the service reports to its metrics;
- `app.reloading`: swapping weights in while requests flow (POST /admin/reload, SIGHUP).

Up to three models are served side by side, by name (`ModelSlot`): `final` (FinalModel, the
default), and, when their weights are configured, `lite` (LiteModel) and `best` (AirbenchNet). Each
slot has its own queue and batcher, since a batch runs one network, and one attribute that holds an
immutable `LoadedModel`, whose `Predictor` (`app.predictor`: PyTorch or ONNX Runtime) runs the
forward pass; every batch reads it once, so `swap()` replaces model and predictor atomically while
requests keep flowing.

Lifecycle (`State`): starting -> ready -> draining (SIGTERM: readiness and new requests are
refused while the admitted ones finish, see `drain()`) -> stopping.

Threading, for a small CPU model: `workers` inference threads each run whole batches with
`torch_threads` intra-op threads (by default cores / workers, so one each on a CPU). Two
single-threaded forward passes side by side beat one two-threaded pass for this model, since its
layers are too small to split well across cores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import Any

import torch

from app.admission import Admission
from app.batching import Arrival, BatcherClosed, DynamicBatcher, ItemResult, QueueFull, Ticket
from app.checkpoint import CheckpointError
from app.decoding import Decoder
from app.device import resolve_device
from app.domain import (
    AtCapacity,
    Classification,
    ImageAnswer,
    NotReady,
    StartupError,
    State,
    UnknownModel,
    Upload,
    image_answers,
)
from app.loading import (
    DEFAULT_MODEL,
    WEIGHTS_SETTINGS,
    LoadedModel,
    ModelSlot,
    PredictorFactory,
    configured_slots,
    load_model,
    warm_up,
)
from app.metrics import Metrics
from app.model import StagedNet
from app.predictor import Predictor, PredictorError, build_predictor
from app.service_metrics import record_served, watch_queues, zero_reloads
from app.settings import Settings, env_name

log = logging.getLogger(__name__)

# The batcher tag of a request that asked for heatmaps.
EXPLAIN_TAG = "cam"


class ModelService:
    def __init__(
        self, settings: Settings, metrics: Metrics, make_predictor: PredictorFactory | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = State.STARTING
        self.make_predictor = self._configured_predictor if make_predictor is None else make_predictor
        self._slots = configured_slots(settings)
        zero_reloads(metrics, self._slots)
        self.admission = Admission(settings.max_files)
        self._decoder: Decoder | None = None
        self.device: torch.device | None = None
        self.workers = 0
        self.torch_threads = 0

    # -- the models served ------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def in_flight(self) -> int:
        """Inference requests admitted and not yet answered."""
        return self.admission.in_flight

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

    def loaded(self, name: str | None = None) -> LoadedModel:
        """Model `name` (default: the default model) as served now. Raises UnknownModel, or NotReady
        before its first load."""
        loaded = self.slot(name).loaded
        if loaded is None:
            raise self.not_ready()
        return loaded

    def swap(self, loaded: LoadedModel) -> None:
        """Serve `loaded` as model `loaded.name` from the next batch on (one reference assignment)."""
        self.slot(loaded.name).loaded = loaded
        record_served(self.metrics, loaded)

    def _configured_predictor(self, model: StagedNet, device: torch.device) -> Predictor:
        s = self.settings
        return build_predictor(model, device, s.backend, s.precision, s.layout, threads=self.torch_threads)

    # -- lifecycle --------------------------------------------------------------------------

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
        warm_up_s = {slot.name: self._load(slot, self.device) for slot in self._slots.values()}
        self._decoder = Decoder(s.resolved_decode_threads(), s.max_pixels, self.metrics)
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
        watch_queues(self.metrics, self._slots.values(), lambda: self.in_flight)
        self.state = State.READY
        self.metrics.ready.set(1)
        for slot in self._slots.values():
            self._log_serving(slot, warm_up_s[slot.name])

    def _load(self, slot: ModelSlot, device: torch.device) -> float:
        """Load, warm up and swap in the configured weights of `slot`; the seconds it took."""
        started = time.perf_counter()
        setting = env_name(WEIGHTS_SETTINGS[slot.name])
        try:
            loaded = load_model(slot.weights, device, self.make_predictor, slot.name)
        except CheckpointError as exc:
            raise StartupError(f"{exc} (set {setting} to a {slot.architecture} checkpoint)") from None
        except PredictorError as exc:
            raise StartupError(f"{exc} (set {env_name('backend')} and {env_name('precision')})") from None
        if self.settings.warmup:
            warm_up(loaded, self.settings)
        self.swap(loaded)
        return time.perf_counter() - started

    def _log_serving(self, slot: ModelSlot, warm_up_s: float) -> None:
        s, loaded = self.settings, self.loaded(slot.name)
        accuracy = "not recorded" if loaded.test_accuracy is None else f"{100 * loaded.test_accuracy:.2f}%"
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
            f"loading and warm-up took {warm_up_s:.2f} s" if s.warmup else "no warm-up",
        )

    def begin_drain(self) -> None:
        """Readiness turns false and new requests are refused; admitted ones carry on."""
        if self.state is State.READY:
            self.state = State.DRAINING
            self.metrics.ready.set(0)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Begin draining and wait until no admitted request is left, or `timeout_s` (default: the
        setting) has passed. True when it emptied in time."""
        self.begin_drain()
        return await self.admission.wait_empty(
            self.settings.drain_timeout_s if timeout_s is None else timeout_s
        )

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
        if self._decoder is not None:
            self._decoder.close()

    def not_ready(self) -> NotReady:
        what = "is still loading the model" if self.state is State.STARTING else "is shutting down"
        return NotReady(f"the service {what}; retry shortly")

    # -- inference --------------------------------------------------------------------------

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
        return self.admission.admit(batcher)

    def request_done(self) -> None:
        self.admission.done()

    def _run_batch(
        self, slot: ModelSlot, images: torch.Tensor, tags: list[Any]
    ) -> list[tuple[ImageAnswer, LoadedModel]]:
        loaded = slot.loaded  # read once: a swap takes effect from the next batch
        assert loaded is not None
        explain = [tag == EXPLAIN_TAG for tag in tags]
        answers = loaded.answer(images, explain=any(explain))
        return [(one, loaded) for one in image_answers(answers, explain)]

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
        batcher, decoder = slot.batcher, self._decoder
        # While draining, requests admitted before it began are still served.
        if self.state not in (State.READY, State.DRAINING) or batcher is None or decoder is None:
            raise self.not_ready()
        self.admission.check_count(uploads)
        try:
            ticket = batcher.reserve(len(uploads))
        except QueueFull as exc:
            raise AtCapacity(f"the service is at capacity ({exc}); retry shortly") from None
        except BatcherClosed:
            raise self.not_ready() from None
        try:
            images, decode_s = await decoder.decode(uploads)
        except BaseException:
            batcher.release(ticket)
            raise
        results = await self._batched(batcher, ticket, images, arrival, explain)
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

    async def _batched(
        self,
        batcher: DynamicBatcher,
        ticket: Ticket,
        images: torch.Tensor,
        arrival: Arrival | None,
        explain: bool,
    ) -> list[ItemResult]:
        """Hand the decoded images to the batcher and wait for their batches; a request cancelled
        meanwhile takes its images out of the queue."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[ItemResult]] = loop.create_future()

        def deliver(result: list[ItemResult] | BaseException) -> None:  # from a worker thread
            loop.call_soon_threadsafe(_settle_future, done, result)

        try:
            job = batcher.submit(ticket, images, deliver, arrival, EXPLAIN_TAG if explain else None)
        except BatcherClosed:
            raise self.not_ready() from None
        try:
            return await done
        except asyncio.CancelledError:
            job.cancel()
            raise


def _settle_future(future: asyncio.Future, result: Any) -> None:
    if future.done():  # cancelled meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
