"""Admission: whether a request may start, the limits it must fit in, and counting it until answered.

A request is admitted as it starts to arrive, before its body is read (`AdmissionMiddleware`
calls `ModelService.admit`): refused while the model's queue is full, else announced to that
model's batcher and counted in flight until its answer is sent. Draining waits for that count to
reach zero. Once its uploads are read, their number must be from 1 to CIFAR10_MAX_FILES.
"""

from __future__ import annotations

import asyncio
import logging
import time

from app.batching import Arrival, DynamicBatcher
from app.domain import AtCapacity, NoImages, TooManyFiles, Upload
from app.settings import env_name

log = logging.getLogger(__name__)


class Admission:
    """Inference requests in flight (event-loop thread only) and the per-request file limit."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.in_flight = 0  # admitted and not yet answered
        self._told_max_files = False  # the operator was told once in the log about CIFAR10_MAX_FILES

    def admit(self, batcher: DynamicBatcher) -> Arrival:
        """The request's arrival at `batcher`, counted in flight until `done()`. Raises AtCapacity."""
        if batcher.full():
            raise AtCapacity(f"the service is at capacity ({batcher.pending} images waiting); retry shortly")
        arrival = batcher.announce()
        self.in_flight += 1
        return arrival

    def done(self) -> None:
        self.in_flight -= 1

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left, or `timeout_s` has passed; True when it emptied."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.in_flight == 0

    def check_count(self, uploads: list[Upload]) -> None:
        """NoImages for none, TooManyFiles for more than CIFAR10_MAX_FILES (which the log names
        once, for the operator; the client is told what it can do)."""
        if not uploads:
            raise NoImages("no images: send one or more files in the field 'file'")
        if len(uploads) > self.max_files:
            if not self._told_max_files:  # the setting is the operator's business, not the client's
                self._told_max_files = True
                log.warning(
                    "a request of %d files went over %s (%d); later ones are counted in "
                    'cifar10_rejected_total{reason="too_many_files"}',
                    len(uploads),
                    env_name("max_files"),
                    self.max_files,
                )
            raise TooManyFiles(
                f"{len(uploads)} files in one request; this service takes at most "
                f"{self.max_files} a request: split them over several requests"
            )
