"""Helpers shared by the service's test modules: reading the metrics text, variants of a checkpoint."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

from app.checkpoint import build_model, load_checkpoint, save_checkpoint

from .conftest import CHECKPOINT_META


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the exposition text (parsed by prometheus_client)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    """One sample's value, 0 when absent."""
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def metric(text: str, sample: str) -> float:
    """The value of the sample written exactly as `sample`, labels included: 'name{a="b"}'."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    assert match is not None, f"no sample {sample} in the metrics"
    return float(match.group(1))


def variant(weights: Path, path: Path, edit, **meta) -> Path:
    """A copy of the checkpoint in `weights` with `edit(model)` applied (cheap: no calibration pass)."""
    model = build_model(load_checkpoint(weights))
    with torch.no_grad():
        edit(model)
    save_checkpoint(path, model, **{**CHECKPOINT_META, **meta})
    return path


def json_body(images: list[bytes], **header) -> dict:
    """An Open Inference Protocol request with the input `image` as base64 JSON tensor data."""
    data = [base64.b64encode(image).decode() for image in images]
    return {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": data}],
        **header,
    }
