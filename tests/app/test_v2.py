"""The Open Inference Protocol (KServe v2 REST): NVIDIA's own client against a live server, and the
error envelopes, API key and readiness in process.

The live half starts one `python -m app serve` for the module, on the shipped FinalModel weights
and a LiteModel checkpoint made here, and checks that /v2/models/{final,lite}/infer answers what
/predict (?model=) answers for the same sample images, with JSON tensors and with the binary
tensor data extension.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from app.model import CLASSES

from ..live import REPO, live_service
from .helpers import json_body
from .images import png_bytes

SAMPLES = sorted((REPO / "samples").glob("*.jpg"))
INFER = "/v2/models/final/infer"


def image_input(images: list[bytes], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    else:  # JSON strings carry text only: each file goes base64-encoded
        encoded = [base64.b64encode(image) for image in images]
        tensor.set_data_from_numpy(np.array(encoded, dtype=np.object_), binary_data=False)
    return tensor


def labels_of(result: triton.InferResult) -> list[str]:
    """The label output as strings (bytes when it came as binary data, str from JSON)."""
    return [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]


def binary_body(images: list[bytes], **header) -> tuple[bytes, dict[str, str]]:
    """An inference request with the image tensor as binary data, built by hand."""
    raw = b"".join(struct.pack("<I", len(image)) + image for image in images)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(images)]}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [tensor], **header}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


# -- a live server and tritonclient ------------------------------------------------------------


@pytest.fixture(scope="module")
def live(lite_weights) -> Iterator[str]:
    with live_service(CIFAR10_LITE_WEIGHTS=str(lite_weights)) as url:
        yield url


@pytest.fixture(scope="module")
def triton_client(live) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(live.removeprefix("http://"))
    yield client
    client.close()


def predict(live: str, model: str) -> dict[str, tuple[str, list[float]]]:
    """What /predict answers for every sample: label and the ten probabilities in class order."""
    files = [("file", (path.name, path.read_bytes())) for path in SAMPLES]
    r = httpx.post(f"{live}/predict", files=files, params={"top_k": 10, "model": model}, timeout=60)
    assert r.status_code == 200, r.text
    out = {}
    for prediction in r.json()["predictions"]:
        probs = {entry["label"]: entry["probability"] for entry in prediction["top_k"]}
        out[prediction["filename"]] = (prediction["label"], [probs[c] for c in CLASSES])
    return out


@pytest.fixture(scope="module")
def predicted(live) -> dict[str, tuple[str, list[float]]]:
    return predict(live, "final")


@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model", ["final", "lite"])
def test_infer_answers_what_predict_answers_for_the_samples(live, triton_client, model, binary):
    assert len(SAMPLES) >= 5
    expected = predict(live, model)
    images = [path.read_bytes() for path in SAMPLES]
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
    result = triton_client.infer(model, [image_input(images, binary)], outputs=outputs, request_id="r-42")
    labels = labels_of(result)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(SAMPLES), len(CLASSES))
    assert labels == [expected[path.name][0] for path in SAMPLES]
    for row, path in zip(probabilities, SAMPLES, strict=True):
        assert row.tolist() == pytest.approx(expected[path.name][1], abs=1e-4)
    assert result.get_response()["id"] == "r-42"
    sent_as_binary = "binary_data_size" in result.get_output("label").get("parameters", {})
    assert sent_as_binary == binary


@pytest.mark.slow
def test_default_outputs_are_both_in_binary(triton_client, predicted):
    """With no outputs named, tritonclient asks for all of them as binary (binary_data_output)."""
    [path] = SAMPLES[:1]
    result = triton_client.infer("final", [image_input([path.read_bytes()], binary=True)])
    assert labels_of(result) == [predicted[path.name][0]]
    assert result.as_numpy("probabilities").shape == (1, len(CLASSES))


@pytest.mark.slow
def test_only_the_requested_outputs_are_answered(triton_client, predicted):
    path = SAMPLES[0]
    outputs = [triton.InferRequestedOutput("label", binary_data=False)]
    result = triton_client.infer("final", [image_input([path.read_bytes()], binary=True)], outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert result.get_output("label")["data"] == [predicted[path.name][0]]
    assert result.as_numpy("probabilities") is None


@pytest.mark.slow
def test_health_and_metadata_through_tritonclient(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("final") and triton_client.is_model_ready("lite")
    assert not triton_client.is_model_ready("nope")
    server = triton_client.get_server_metadata()
    assert server["name"] == "cifar10-cnn" and "binary_tensor_data" in server["extensions"]
    model = triton_client.get_model_metadata("final")
    assert model["name"] == "final"
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [  # the default two, then the optional ones (a calibrated checkpoint)
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
        {"name": "unsure", "datatype": "BOOL", "shape": [-1]},
        {"name": "heatmap", "datatype": "FP32", "shape": [-1, 32, 32]},
    ]


def _bad_tensor(kind: str) -> triton.InferInput:
    image = SAMPLES[0].read_bytes()
    if kind == "datatype":
        tensor = triton.InferInput("image", [1, 4], "UINT8")
        return tensor.set_data_from_numpy(np.zeros((1, 4), np.uint8))
    if kind == "shape":
        tensor = triton.InferInput("image", [1, 1], "BYTES")
        return tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
    if kind == "name":
        tensor = triton.InferInput("picture", [1], "BYTES")
        return tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
    assert kind == "not_an_image"
    return image_input([image, b"just some text, not an image"], binary=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["datatype", "shape", "name", "not_an_image"])
def test_a_bad_tensor_is_a_400_with_an_error_sentence(triton_client, kind):
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer("final", [_bad_tensor(kind)])
    # tritonclient reads the message from the body's "error"; without one it says it could not.
    assert caught.value.status() == "400"
    message = caught.value.message()
    assert message and "exception occurred in the client" not in message
    expected = {"datatype": "UINT8", "shape": "shape", "name": "picture", "not_an_image": "index 1"}[kind]
    assert expected in message


@pytest.mark.slow
def test_an_unknown_model_is_a_404(triton_client, live):
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer("huge", [image_input([SAMPLES[0].read_bytes()], binary=True)])
    assert caught.value.status() == "404" and "huge" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        triton_client.get_model_metadata("huge")
    assert caught.value.status() == "404"


# -- in process: framing, error envelopes, API key, readiness ---------------------------------


def test_binary_request_and_binary_answer_framing(client):
    images = [png_bytes(1), png_bytes(2)]
    body, headers = binary_body(images, id="abc", parameters={"binary_data_output": True})
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    length = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:length])
    assert header["id"] == "abc" and header["model_name"] == "final"
    probs_out, label_out = header["outputs"]
    sizes = [probs_out["parameters"]["binary_data_size"], label_out["parameters"]["binary_data_size"]]
    assert sizes[0] == 2 * 10 * 4 and length + sum(sizes) == len(r.content)
    probs = struct.unpack("<20f", r.content[length : length + sizes[0]])
    assert sum(probs[:10]) == pytest.approx(1, abs=1e-5) and sum(probs[10:]) == pytest.approx(1, abs=1e-5)
    labels, at = [], length + sizes[0]
    while at < len(r.content):
        (n,) = struct.unpack_from("<I", r.content, at)
        labels.append(r.content[at + 4 : at + 4 + n].decode())
        at += 4 + n
    assert labels == [CLASSES[max(range(10), key=probs[i * 10 :].__getitem__)] for i in range(2)]
    # The same images as JSON tensors: the same answer.
    r = client.post(INFER, json=json_body(images))
    as_json = {o["name"]: o["data"] for o in r.json()["outputs"]}
    assert as_json["label"] == labels
    assert as_json["probabilities"] == pytest.approx(list(probs), abs=1e-6)


@pytest.mark.parametrize(
    "content, headers, needle",
    [
        (b"{not json", {}, "not valid JSON"),
        (b"[]", {}, "JSON object"),
        (json.dumps(json_body([b"x"]) | {"outputs": [{"name": "logits"}]}).encode(), {}, "logits"),
        (json.dumps(json_body([png_bytes(0)]) | {"id": 7}).encode(), {}, "'id'"),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%"]}]}
            ).encode(),
            {},
            "base64",
        ),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length"),
        (b"{}", {"Inference-Header-Content-Length": "two"}, "Inference-Header-Content-Length"),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": ["x"]}]}
            ).encode(),
            {},
            "input 'image': 'parameters' must be an object",
        ),
        (
            json.dumps(
                json_body([png_bytes(0)]) | {"outputs": [{"name": "label", "parameters": "x"}]}
            ).encode(),
            {},
            "output 'label': 'parameters' must be an object",
        ),
        (
            json.dumps(json_body([png_bytes(0)]) | {"parameters": [1]}).encode(),
            {},
            "'parameters' must be an object",
        ),
    ],
    ids=[
        "malformed",
        "not_object",
        "unknown_output",
        "id_not_string",
        "not_base64",
        "header_too_long",
        "header_not_number",
        "input_parameters_not_object",
        "output_parameters_not_object",
        "request_parameters_not_object",
    ],
)
def test_malformed_requests_are_400_with_an_error(client, content, headers, needle):
    r = client.post(INFER, content=content, headers=headers)
    assert r.status_code == 400
    assert list(r.json()) == ["error"] and needle in r.json()["error"]


def test_bad_binary_framing_is_400(client):
    image = png_bytes(0)
    good, headers = binary_body([image])
    length = int(headers["Inference-Header-Content-Length"])
    head = json.loads(good[:length])
    for name, body in {
        "element_overruns": good[:-1],  # the declared size no longer fits the bytes after the header
        "extra_bytes": good + b"\0",
        "shape_vs_elements": json.dumps({**head, "inputs": [{**head["inputs"][0], "shape": [2]}]}).encode()
        + good[length:],
    }.items():
        header_length = length if name != "shape_vs_elements" else len(body) - (len(good) - length)
        r = client.post(INFER, content=body, headers={"Inference-Header-Content-Length": str(header_length)})
        assert r.status_code == 400, name
        assert "error" in r.json(), name
    lying = struct.pack("<I", 10_000) + image  # an element that says it is longer than it is
    head_bytes = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": len(lying)},
                }
            ]
        }
    ).encode()
    r = client.post(
        INFER, content=head_bytes + lying, headers={"Inference-Header-Content-Length": str(len(head_bytes))}
    )
    assert r.status_code == 400 and "10000 bytes" in r.json()["error"]


def test_errors_on_v2_paths_use_the_protocol_envelope_and_predict_keeps_its_own(client):
    r = client.get("/v2/no/such/thing")
    assert r.status_code == 404 and list(r.json()) == ["error"]
    r = client.get("/v2/models/lite")
    assert r.status_code == 404 and "lite" in r.json()["error"]
    r = client.post("/predict")
    assert r.status_code == 422 and set(r.json()) >= {"detail", "code"}


def test_too_many_images_and_too_large_bodies_are_413(serve):
    with serve(max_files=2, max_body_bytes=16384) as client:
        r = client.post(INFER, json=json_body([png_bytes(i) for i in range(3)]))
        assert r.status_code == 413 and "at most 2" in r.json()["error"]
        r = client.post(INFER, json=json_body([bytes(20_000)]))
        assert r.status_code == 413 and list(r.json()) == ["error"] and "limit" in r.json()["error"]
        chunks = (b"x" * 1000 for _ in range(20))  # no Content-Length: counted as it arrives
        r = client.post(INFER, content=chunks)
        assert r.status_code == 413 and list(r.json()) == ["error"]


def test_api_key_guards_infer_but_not_health_or_metadata(serve):
    with serve(api_key="sesame") as client:
        body = json_body([png_bytes(0)])
        r = client.post(INFER, json=body)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert client.post(INFER, json=body, headers={"X-API-Key": "sesame"}).status_code == 200
        assert client.post(INFER, json=body, headers={"Authorization": "Bearer sesame"}).status_code == 200
        for path in (
            "/v2",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/final",
            "/v2/models/final/ready",
        ):
            assert client.get(path).status_code == 200, path
        r = client.post("/predict", files=[("file", ("a.png", png_bytes(0)))])
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"  # /predict's envelope, unchanged


def test_not_ready_is_503_with_retry_after(make_settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    client = TestClient(create_app(make_settings(retry_after_s=7)))  # no lifespan: still loading
    assert client.get("/v2/health/live").status_code == 200
    for response in (
        client.get("/v2/health/ready"),
        client.get("/v2/models/final/ready"),
        client.post(INFER, json=json_body([png_bytes(0)])),
    ):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "7"
        assert "loading" in response.json()["error"]


def test_draining_refuses_new_inference_with_503(serve):
    with serve() as client:
        assert client.post(INFER, json=json_body([png_bytes(0)])).status_code == 200
        client.app.state.service.begin_drain()
        r = client.post(INFER, json=json_body([png_bytes(0)]))
        assert r.status_code == 503 and "Retry-After" in r.headers and "shutting down" in r.json()["error"]
        assert client.get("/v2/health/ready").status_code == 503


def test_infer_requests_are_counted_like_predict(client):
    client.post(INFER, json=json_body([png_bytes(3)]))
    client.post(INFER, content=b"{not json")
    metrics = client.get("/metrics").text
    assert f'route="{INFER}"' in metrics
    assert 'reason="bad_tensor"' in metrics
