"""GET /metrics: Prometheus text that counts what the service did, one registry per app."""

from __future__ import annotations

import re

from app.model import CLASSES

from .helpers import value
from .images import TEXT, png_bytes


def test_metrics_count_requests_images_batches_and_labels(serve):
    with serve() as client:
        answers = [
            client.post("/predict", files=[("file", (f"{i}.png", png_bytes(i))) for i in range(k)])
            for k in (1, 2, 3)
        ]
        labels = [p["label"] for r in answers for p in r.json()["predictions"]]
        client.post("/predict", files=[("file", ("notes.txt", TEXT))])
        client.get("/predict")
        r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text

    assert value(text, "cifar10_http_requests_total", route="/predict", method="POST", status="200") == 3
    assert value(text, "cifar10_http_requests_total", route="/predict", method="POST", status="415") == 1
    assert value(text, "cifar10_http_requests_total", route="/predict", method="GET", status="405") == 1
    assert value(text, "cifar10_http_request_duration_seconds_count", route="/predict", method="POST") == 4
    assert value(text, "cifar10_images_processed_total") == 6
    assert value(text, "cifar10_batch_size_sum") == 6  # the warm-up passes are not counted
    for label in CLASSES:
        assert value(text, "cifar10_predictions_total", model="final", label=label) == labels.count(label)
    assert value(text, "cifar10_rejected_requests_total", reason="unsupported_media_type") == 1
    assert value(text, "cifar10_rejected_requests_total", reason="method_not_allowed") == 1
    assert value(text, "cifar10_queue_wait_seconds_count") == 6
    assert value(text, "cifar10_inference_duration_seconds_count") == value(text, "cifar10_batch_size_count")
    assert value(text, "cifar10_decode_duration_seconds_count") == 4  # the text file was decoded too


def test_metrics_describe_the_model_and_the_process(client):
    text = client.get("/metrics").text
    info = re.search(r"^cifar10_model_info\{(.*)\} 1\.0$", text, re.M).group(1)
    assert 'parameters="149584"' in info and 'device="cpu"' in info and 'test_accuracy="0.5000"' in info
    assert 'model="final"' in info and 'name="FinalModel"' in info
    assert value(text, "cifar10_model_parameters", model="final") == 149_584
    assert value(text, "cifar10_model_test_accuracy", model="final") == 0.5
    assert value(text, "cifar10_ready") == 1
    assert "process_resident_memory_bytes" in text
    assert "python_gc_objects_collected_total" in text
    assert "python_info" in text


def test_each_app_has_its_own_registry(serve):
    with serve() as first:
        first.post("/predict", files=[("file", ("a.png", png_bytes(0)))])
        with serve() as second:
            assert value(second.get("/metrics").text, "cifar10_images_processed_total") == 0
        assert value(first.get("/metrics").text, "cifar10_images_processed_total") == 1


def test_made_up_paths_share_one_label(client):
    for path in ("/a", "/b", "/c/d"):
        client.get(path)
    text = client.get("/metrics").text
    assert value(text, "cifar10_http_requests_total", route="unmatched", method="GET", status="404") >= 3
    assert 'route="/a"' not in text


def test_requests_refused_before_routing_are_labelled_with_their_route(serve):
    with serve(max_body_bytes=2048) as client:
        big = client.post("/predict", files=[("file", ("big.png", png_bytes(0, size=(64, 64)) * 20))])
        text = client.get("/metrics").text
    assert big.status_code == 413
    assert value(text, "cifar10_http_requests_total", route="/predict", method="POST", status="413") == 1
    assert value(text, "cifar10_http_requests_total", route="unmatched", method="POST", status="413") == 0
