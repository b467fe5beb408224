"""Dynamic batching: concurrent requests share forward passes, as Triton's dynamic batcher does.

Requests put their images on one bounded queue; `workers` threads each take a batch off it and
run it. A batch closes when it holds `max_batch_size` images, when `max_wait_s` has passed since
its first image was queued, or as soon as no other request is on its way: a request is on its
way from `announce()` (the server has started receiving it) until it is submitted or given up.
Waiting when nothing is on its way could only add latency, so a lone client never pays the wait.

Only one worker gathers at a time, so while one runs a forward pass the next batch forms behind
it; with N single-threaded workers on N cores the passes run side by side (PyTorch releases the
GIL inside its kernels). Gathering is work-conserving: a batch waits for more images only while
every other worker is running one, since then a wait keeps no core idle; once another worker is
free, the forming batch starts with what it has and that worker gathers the next one.

Admission is all or nothing per request: a request whose images would push the queue past
`max_queue_size` is refused with `QueueFull` before it is decoded, which bounds both latency
and memory.

With `batching=False` each request still goes through the same queue and workers, but a batch
never mixes requests: the per-request baseline the benchmark compares against.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# run(images, tags) -> one output per image; images is uint8 (N, 3, 32, 32), tags[i] the tag its
# request was submitted with (what it asks beyond the forward pass, such as a heatmap).
RunFn = Callable[[torch.Tensor, list[Any]], Sequence[Any]]
# on_batch(batch_size, run_seconds, queue_wait_seconds_per_image): a hook for metrics.
BatchHook = Callable[[int, float, list[float]], None]


class QueueFull(Exception):
    """The queue cannot take this request's images now; the client should retry later."""


class BatcherClosed(Exception):
    """The batcher is shutting down and takes no more work."""


@dataclass(frozen=True, slots=True)
class ItemResult:
    output: Any  # what `run` returned for this image
    queue_s: float  # from being queued to its batch starting
    run_s: float  # the batch's run time
    batch_size: int


@dataclass(eq=False)
class Job:
    """One request's images on their way through the queue."""

    images: torch.Tensor  # uint8 (k, 3, 32, 32)
    on_done: Callable[[list[ItemResult] | BaseException], None]  # called once, from a worker
    tag: Any = None  # handed to `run` beside each of these images
    results: list[ItemResult | None] = field(default_factory=list)
    remaining: int = 0
    done: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: images of this job not yet in a batch are skipped."""
        self.cancelled = True


@dataclass(slots=True)
class _Item:
    job: Job
    index: int
    queued_at: float


@dataclass(eq=False)
class Ticket:
    """Room reserved on the queue for one request's images (see `DynamicBatcher.reserve`)."""

    images: int
    open: bool = True


class Arrival:
    """A request on its way to the queue (see `DynamicBatcher.announce`); `settle` is idempotent."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher = batcher
        self.open = True

    def settle(self) -> None:
        if self.open:
            self._batcher._settle_arrival(self)


class DynamicBatcher:
    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue_size: int,
        workers: int = 1,
        batching: bool = True,
        on_batch: BatchHook | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size, max_queue_size and workers must be >= 1, max_wait_s >= 0")
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.batching = batching
        self.on_batch = on_batch
        self._items: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._gather = threading.Lock()  # one worker forms a batch at a time
        self._done_lock = threading.Lock()
        self._arriving = 0  # announced requests not yet submitted or given up
        self._running = 0  # workers inside a forward pass
        self._reserved_images = 0  # images of tickets reserved, not yet submitted or released
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"inference-{i}", daemon=True) for i in range(workers)
        ]
        self._started = False

    # -- the request side (any thread; the event loop in the service) -------------------------

    @property
    def queued(self) -> int:
        """Images waiting on the queue (not yet in a batch)."""
        return len(self._items)

    @property
    def pending(self) -> int:
        """Images admitted and not yet in a batch: queued, or reserved and being decoded."""
        return len(self._items) + self._reserved_images

    def announce(self) -> Arrival:
        """A request has started to arrive: while any is on its way, a forming batch waits for it."""
        with self._cond:
            self._arriving += 1
        return Arrival(self)

    def _settle_arrival(self, arrival: Arrival) -> None:
        with self._cond:
            if arrival.open:
                arrival.open = False
                self._arriving -= 1
                self._cond.notify_all()  # a gatherer waiting for this request stops waiting

    def full(self) -> bool:
        return self.pending >= self.max_queue_size

    def reserve(self, images: int) -> Ticket:
        """Admit a request of `images` images, or raise `QueueFull` (or `BatcherClosed`)."""
        with self._cond:
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            if len(self._items) + self._reserved_images + images > self.max_queue_size:
                raise QueueFull(
                    f"the queue holds {self.pending} of at most {self.max_queue_size} images; "
                    f"{images} more do not fit"
                )
            self._reserved_images += images
            return Ticket(images)

    def release(self, ticket: Ticket) -> None:
        """Give back a reservation that will not be submitted (its request failed)."""
        with self._cond:
            if ticket.open:
                ticket.open = False
                self._reserved_images -= ticket.images

    def submit(
        self,
        ticket: Ticket,
        images: torch.Tensor,
        on_done: Callable[[list[ItemResult] | BaseException], None],
        arrival: Arrival | None = None,
        tag: Any = None,
    ) -> Job:
        """Queue a reserved request's images (uint8 (k, 3, 32, 32)); `on_done` gets the results.

        `arrival`, the request's announcement if it made one, is settled in the same step; `tag`
        reaches `run` beside each of the images.
        """
        if not ticket.open or len(images) != ticket.images:
            raise ValueError("submit needs an open ticket reserved for exactly these images")
        job = Job(images, on_done, tag, [None] * len(images), len(images))
        now = time.perf_counter()
        with self._cond:
            ticket.open = False
            self._reserved_images -= ticket.images
            if arrival is not None and arrival.open:
                arrival.open = False
                self._arriving -= 1
            if self._closed:
                raise BatcherClosed("the service is shutting down")
            self._items.extend(_Item(job, i, now) for i in range(len(images)))
            self._cond.notify_all()
        return job

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            for t in self._threads:
                t.start()

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))

    # -- the worker side -------------------------------------------------------------------

    def _next_batch(self) -> list[_Item] | None:
        with self._gather, self._cond:
            while not self._items:
                if self._closed:
                    return None
                self._cond.wait()
            if self.batching:
                deadline = self._items[0].queued_at + self.max_wait_s
                others = len(self._threads) - 1
                while (
                    len(self._items) < self.max_batch_size
                    and self._arriving
                    and not self._closed
                    and self._running >= others
                ):
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            batch: list[_Item] = []
            head_job = self._items[0].job
            while self._items and len(batch) < self.max_batch_size:
                if not self.batching and self._items[0].job is not head_job:
                    break
                item = self._items.popleft()
                if not item.job.cancelled:
                    batch.append(item)
            if batch:
                self._running += 1  # under the lock: the next gatherer sees this worker busy at once
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:  # _next_batch counted this worker as running
                self._run_batch(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()  # a gatherer that was waiting may now start its batch

    def _run_batch(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            images = torch.stack([item.job.images[item.index] for item in batch])
            outputs = self.run(images, [item.job.tag for item in batch])
            if len(outputs) != len(batch):
                raise RuntimeError(f"run returned {len(outputs)} outputs for {len(batch)} images")
        except Exception as exc:
            log.exception("a batch of %d images failed", len(batch))
            for job in {id(item.job): item.job for item in batch}.values():
                self._finish(job, exc)
            return
        run_s = time.perf_counter() - started
        waits = [started - item.queued_at for item in batch]
        if self.on_batch is not None:  # before any answer goes out, so a client sees it counted
            self.on_batch(len(batch), run_s, waits)
        for item, output, wait in zip(batch, outputs, waits, strict=True):
            job = item.job
            job.results[item.index] = ItemResult(output, wait, run_s, len(batch))
            with self._done_lock:
                job.remaining -= 1
                complete = job.remaining == 0
            if complete:
                self._finish(job, None)

    def _finish(self, job: Job, error: BaseException | None) -> None:
        with self._done_lock:
            if job.done:
                return
            job.done = True
        try:
            job.on_done(error if error is not None else job.results)  # type: ignore[arg-type]
        except Exception:
            log.exception("delivering a result failed")
