"""The dynamic batcher: shared batches under concurrency, its limits, and its failure paths.

The unit tests drive `DynamicBatcher` with a stand-in model that records every batch and can be
held at a gate, so what ends up in which batch is decided by the test, not by timing. That a
forming batch is held is observed, not slept on: the batcher's condition is watched, and a worker
that waits on it with a deadline is holding a batch for a request on its way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.batching import DynamicBatcher, QueueFull

from .conftest import HookedPredictors
from .helpers import metric
from .images import png_bytes

WAIT = 10.0  # seconds a test waits for something that should happen at once
FAST_503_S = 0.5  # a loose bound on refusing a request when the queue is full


class FakeModel:
    """run(images, tags) -> the first pixel of each image, so every caller can check it got its own
    rows; the tags of each batch are kept."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.barrier = barrier
        self.fail_next = False
        self.tags: list[list] = []

    def __call__(self, images: torch.Tensor, tags: list) -> list[int]:
        self.tags.append(tags)
        self.entered.set()
        assert self.gate.wait(WAIT)
        if self.barrier is not None:
            self.barrier.wait(WAIT)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("model exploded")
        values = images[:, 0, 0, 0].tolist()
        self.batches.append(values)
        return values


class Result:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value = None

    def __call__(self, value) -> None:
        self.value = value
        self.done.set()

    def outputs(self) -> list[int]:
        assert self.done.wait(WAIT)
        assert not isinstance(self.value, BaseException), self.value
        return [r.output for r in self.value]


class WatchedCondition(threading.Condition):
    """The batcher's condition, with `gathering` set whenever a worker waits on it with a deadline:
    the only such wait is a forming batch held for an announced request (an idle worker waiting
    for work has no deadline)."""

    def __init__(self) -> None:
        super().__init__()
        self.gathering = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.gathering.set()  # under the lock, before it is released: the batch is still queued
        return super().wait(timeout)


def images(*values: int) -> torch.Tensor:
    x = torch.zeros(len(values), 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor(values, dtype=torch.uint8)
    return x


def submit(batcher: DynamicBatcher, *values: int, arrival=None, tag=None) -> Result:
    result = Result()
    ticket = batcher.reserve(len(values))
    batcher.submit(ticket, images(*values), result, arrival, tag)
    return result


@pytest.fixture
def make_batcher():
    made: list[DynamicBatcher] = []

    def make(model, **kwargs) -> DynamicBatcher:
        options = dict(max_batch_size=8, max_wait_s=0.005, max_queue_size=64, workers=1)
        options.update(kwargs)
        batcher = DynamicBatcher(model, **options)
        batcher._cond = WatchedCondition()  # before the workers start: they wait on it
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close()


def wait_until(condition: Callable[[], bool]) -> bool:
    """Whether `condition()` came true within WAIT seconds (polled: it is another thread's state)."""
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def hold_first_batch(batcher: DynamicBatcher, model: FakeModel) -> Result:
    """Start a batch of one image (value 0) and keep it running until model.gate is set."""
    model.gate.clear()
    first = submit(batcher, 0)
    assert model.entered.wait(WAIT)
    return first


def test_requests_queued_while_the_model_is_busy_share_the_next_batch(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model)
    first = hold_first_batch(batcher, model)
    later = [submit(batcher, v) for v in (1, 2, 3, 4, 5)]
    model.gate.set()
    assert first.outputs() == [0]
    assert [r.outputs() for r in later] == [[1], [2], [3], [4], [5]]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]


def test_each_image_reaches_the_model_with_its_requests_tag(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model)
    first = hold_first_batch(batcher, model)
    plain, tagged = submit(batcher, 1, 2), submit(batcher, 3, tag="explain")
    model.gate.set()
    assert first.outputs() == [0] and plain.outputs() == [1, 2] and tagged.outputs() == [3]
    assert model.batches[1] == [1, 2, 3] and model.tags[1] == [None, None, "explain"]


def test_batches_never_exceed_max_batch_size(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4)
    first = hold_first_batch(batcher, model)
    later = [submit(batcher, v) for v in range(1, 11)]
    model.gate.set()
    first.outputs()
    assert [r.outputs() for r in later] == [[v] for v in range(1, 11)]
    assert model.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_a_request_larger_than_a_batch_is_split_and_reassembled_in_order(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=3)
    assert submit(batcher, *range(1, 8)).outputs() == list(range(1, 8))
    assert [len(b) for b in model.batches] == [3, 3, 1]


def test_a_lone_request_is_not_held_for_max_wait(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, max_wait_s=60.0)
    assert submit(batcher, 7).outputs() == [7]
    assert not batcher._cond.gathering.is_set()  # nothing else is on its way: never held


def test_a_forming_batch_waits_for_an_announced_request(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, max_wait_s=60.0)
    coming = batcher.announce()  # a request the server has started to receive
    first = submit(batcher, 1)
    assert batcher._cond.gathering.wait(WAIT)  # held: another request is on its way
    assert model.batches == [] and batcher.queued == 1
    second = submit(batcher, 2, arrival=coming)
    assert first.outputs() == [1] and second.outputs() == [2]
    assert model.batches == [[1, 2]]


def test_max_wait_bounds_the_wait_for_a_request_that_never_comes(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, max_wait_s=0.05)
    never = batcher.announce()
    result = submit(batcher, 1)
    assert result.outputs() == [1]
    assert result.value[0].queue_s >= 0.05 - 1e-3  # it waited for the announced request, up to max_wait
    never.settle()


def test_an_announcement_given_up_releases_the_wait(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, max_wait_s=60.0)
    coming = batcher.announce()
    result = submit(batcher, 1)
    assert batcher._cond.gathering.wait(WAIT)  # held for `coming`...
    coming.settle()  # ...until it is given up (e.g. the request turned out to be invalid)
    assert result.outputs() == [1]


def test_with_batching_off_requests_never_share_a_batch(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, batching=False)
    first = hold_first_batch(batcher, model)
    later = [submit(batcher, 1), submit(batcher, 2, 3, 4), submit(batcher, 5)]
    model.gate.set()
    first.outputs()
    assert [r.outputs() for r in later] == [[1], [2, 3, 4], [5]]
    assert model.batches == [[0], [1], [2, 3, 4], [5]]


def test_queue_full_is_refused_and_capacity_comes_back(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, max_queue_size=3)
    first = hold_first_batch(batcher, model)  # running, no longer on the queue
    queued = submit(batcher, 1, 2)
    ticket = batcher.reserve(1)
    assert batcher.full()
    with pytest.raises(QueueFull):
        batcher.reserve(1)
    batcher.release(ticket)
    assert not batcher.full()
    model.gate.set()
    assert first.outputs() == [0] and queued.outputs() == [1, 2]
    assert batcher.pending == 0
    submit(batcher, 1, 2, 3).outputs()


def test_a_cancelled_request_is_skipped(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model)
    first = hold_first_batch(batcher, model)
    ticket = batcher.reserve(1)
    gone = Result()
    batcher.submit(ticket, images(9), gone).cancel()
    kept = submit(batcher, 1)
    model.gate.set()
    first.outputs()
    assert kept.outputs() == [1]
    assert model.batches == [[0], [1]]
    assert not gone.done.is_set()


def test_a_failing_batch_fails_its_requests_and_the_next_one_is_served(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model)
    model.fail_next = True
    failed = submit(batcher, 1)
    assert failed.done.wait(WAIT) and isinstance(failed.value, RuntimeError)
    assert submit(batcher, 2).outputs() == [2]


def test_with_a_worker_free_a_forming_batch_does_not_wait(make_batcher):
    """Work-conserving: waiting for an announced request while a worker idles would waste a core."""
    model = FakeModel()
    batcher = make_batcher(model, workers=2, max_wait_s=60.0)
    coming = batcher.announce()
    assert submit(batcher, 1).outputs() == [1]
    assert not batcher._cond.gathering.is_set() and coming.open  # not held for `coming`
    coming.settle()


def test_while_the_other_worker_runs_a_forming_batch_waits_then_starts_when_it_is_free(make_batcher):
    model = FakeModel()
    batcher = make_batcher(model, workers=2, max_wait_s=60.0)
    first = hold_first_batch(batcher, model)  # one worker busy
    coming = batcher.announce()
    gathering = batcher._cond.gathering
    second = submit(batcher, 1)
    assert gathering.wait(WAIT) and batcher.queued == 1  # gathering: the wait costs no idle core
    gathering.clear()
    third = submit(batcher, 2)  # wakes the gatherer, which takes it in and waits again
    assert gathering.wait(WAIT) and batcher.queued == 2  # still gathering: `coming` has not arrived
    model.gate.set()  # the busy worker finishes: the gathered batch starts without waiting 60 s
    assert first.outputs() == [0] and second.outputs() == [1] and third.outputs() == [2]
    assert model.batches[1:] == [[1, 2]] and coming.open
    coming.settle()


def test_two_workers_run_batches_at_the_same_time(make_batcher):
    # Each batch waits at a two-party barrier: with one worker the barrier would time out.
    model = FakeModel(barrier=threading.Barrier(2))
    batcher = make_batcher(model, workers=2, max_batch_size=1, max_wait_s=0.0)
    a, b = submit(batcher, 1), submit(batcher, 2)
    assert sorted(a.outputs() + b.outputs()) == [1, 2]


# -- through HTTP ------------------------------------------------------------------------------


def concurrent_posts(client, count: int) -> list:
    def one(i: int):
        return client.post("/predict", files=[("file", (f"{i}.png", png_bytes(i)))])

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_requests_are_served_in_shared_batches(serve):
    """16 clients at once, one forward worker: the batch-size histogram shows batches of more than
    one image, i.e. fewer forward passes than requests."""
    with serve(workers=1, max_batch_size=16, max_wait_ms=200) as client:
        for _ in range(3):  # the batching is near certain in one round; three make it certain
            answers = concurrent_posts(client, 16)
            assert all(r.status_code == 200 for r in answers)
            text = client.get("/metrics").text
            if metric(text, "cifar10_batch_size_count") < metric(text, "cifar10_batch_size_sum"):
                break
        assert metric(text, "cifar10_batch_size_count") < metric(text, "cifar10_batch_size_sum")
        assert metric(text, 'cifar10_batch_size_bucket{le="1.0"}') < metric(text, "cifar10_batch_size_count")
        assert max(r.json()["timing"]["batch_size"] for r in answers) > 1


def test_with_batching_off_every_request_is_its_own_forward_pass(serve):
    with serve(workers=1, batching=False, max_wait_ms=200) as client:
        answers = concurrent_posts(client, 12)
        assert all(r.status_code == 200 for r in answers)
        assert all(r.json()["timing"]["batch_size"] == 1 for r in answers)
        text = client.get("/metrics").text
        assert metric(text, "cifar10_batch_size_count") == metric(text, "cifar10_batch_size_sum") == 12


def test_a_full_queue_answers_503_with_retry_after(serve):
    """One worker held inside a forward pass, a queue of two images filled: the next requests are
    refused at once (well under FAST_503_S, the model being stuck), before their bodies are read;
    the held ones then finish normally, and the very next request is served."""
    predictors = HookedPredictors()
    with serve(predictors, workers=1, max_queue_size=2, max_files=2, retry_after_s=3) as client:
        service = client.app.state.service
        [held] = predictors
        gate, entered = threading.Event(), threading.Event()

        def hold() -> None:  # a stand-in for a slow model: the forward pass waits for the gate
            entered.set()
            assert gate.wait(WAIT)

        held.on_forward = hold
        try:
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(client.post, "/predict", files=[("file", ("a.png", png_bytes(1)))])
                assert entered.wait(WAIT)
                two = [("file", (f"{i}.png", png_bytes(i))) for i in (2, 3)]
                queued = pool.submit(client.post, "/predict", files=two)
                assert wait_until(lambda: service.slot().batcher.queued == 2)
                for _ in range(3):
                    started = time.perf_counter()
                    r = client.post("/predict", files=[("file", ("c.png", png_bytes(4)))])
                    assert time.perf_counter() - started < FAST_503_S
                    assert r.status_code == 503
                    assert r.headers["retry-after"] == "3"
                    assert r.json()["code"] == "queue_full"
                gate.set()
                assert running.result(WAIT).status_code == 200
                assert queued.result(WAIT).status_code == 200
        finally:
            gate.set()
            held.on_forward = None
        assert client.post("/predict", files=[("file", ("d.png", png_bytes(5)))]).status_code == 200
        assert (
            metric(client.get("/metrics").text, 'cifar10_rejected_requests_total{reason="queue_full"}') == 3
        )
