"""The service's hooks into its metrics: which models are served, their reloads, queue and in-flight gauges.

The series themselves are declared in `app.metrics`; the batchers count batches
(`Metrics.observe_batch`) and the service counts answers (`Metrics.count_answers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from app.loading import LoadedModel, ModelSlot, dtype_name
from app.metrics import RELOAD_OUTCOMES, Metrics


def zero_reloads(metrics: Metrics, names: Iterable[str]) -> None:
    """Every served model's reload counters exist from the start, at 0."""
    for name in names:
        for outcome in RELOAD_OUTCOMES:
            metrics.reloads.labels(name, outcome)


def record_served(metrics: Metrics, loaded: LoadedModel) -> None:
    """What the model served as `loaded.name` is, from now on."""
    info = loaded.predictor.info
    metrics.model_info.labels(loaded.name).info(
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
    metrics.model_parameters.labels(loaded.name).set(loaded.total_params)
    metrics.model_test_accuracy.labels(loaded.name).set(
        float("nan") if loaded.test_accuracy is None else loaded.test_accuracy
    )


def watch_queues(metrics: Metrics, slots: Iterable[ModelSlot], in_flight: Callable[[], int]) -> None:
    """Gauges read at scrape time: images queued over every model, requests in flight."""
    slots = list(slots)
    metrics.queue_images.set_function(lambda: sum(slot.batcher.pending for slot in slots if slot.batcher))
    metrics.in_flight.set_function(in_flight)
