"""The Open Inference Protocol's tensors for the image classifier: parsing requests, encoding answers.

Pure functions of bytes and answers, no HTTP (the routes are `app.v2`). In a JSON body a BYTES
element is a string holding the file in base64 (JSON strings cannot carry arbitrary bytes); with
the binary tensor data extension it is a 4-byte little-endian length followed by the file's bytes,
after the JSON header of `Inference-Header-Content-Length` bytes. An output is returned as binary
when its `parameters.binary_data` (or the request's `parameters.binary_data_output`) is true.

    input `image` (BYTES, [N]): N encoded image files
    outputs `probabilities` (FP32, [N, 10]), `label` (BYTES, [N]); on request `ood_score` (FP32, [N]),
    `unsure` (BOOL, [N]), `heatmap` (FP32, [N, 32, 32])
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.domain import ImageAnswer
from app.model import CLASSES, IMAGE_SIZE

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
INPUT = "image"
OUTPUTS = {"probabilities": ("FP32", [-1, len(CLASSES)]), "label": ("BYTES", [-1])}  # by default
# Returned only when the request names them in "outputs" (the first two need an unsure detector).
OPTIONAL_OUTPUTS = {
    "ood_score": ("FP32", [-1]),
    "unsure": ("BOOL", [-1]),
    "heatmap": ("FP32", [-1, IMAGE_SIZE, IMAGE_SIZE]),
}


class TensorError(Exception):
    """The request's tensors cannot be used (400); the message is one sentence for the client."""


# -- the request -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: list[bytes]
    outputs: dict[str, bool]  # output name -> returned as binary, in the order to answer


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header (parsed) and the binary section after it."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise TensorError(
                f"{HEADER_LENGTH} is {header_length!r}; it must be the byte length of the JSON header, "
                f"from 1 to the body's {len(body)} bytes"
            )
        header, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        return json.loads(header), binary
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorError(f"the inference request is not valid JSON: {exc}") from None


def _split_bytes_elements(raw: bytes, what: str) -> list[bytes]:
    """BYTES tensor data: each element a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    at = 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise TensorError(f"{what}: {len(raw) - at} byte(s) left over where a 4-byte length was due")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise TensorError(
                f"{what}: element {len(elements)} says {size} bytes but only {len(raw) - at} follow"
            )
        elements.append(raw[at : at + size])
        at += size
    return elements


def _json_bytes_elements(data: Any, what: str) -> list[bytes]:
    if not isinstance(data, list) or not all(isinstance(e, str) for e in data):
        raise TensorError(f"{what}: 'data' must be a list of base64 strings, one per image")
    elements = []
    for index, element in enumerate(data):
        try:
            elements.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise TensorError(f"{what}: element {index} is not base64 (send each file encoded so)") from None
    return elements


def _parameters(node: dict[str, Any], what: str) -> dict[str, Any]:
    """`node`'s "parameters" (absent or null: none); raises TensorError when it is not an object."""
    parameters = node.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise TensorError(f"{what}: 'parameters' must be an object")
    return parameters


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    model: str,
    available: Mapping[str, tuple[str, list[int]]] = OUTPUTS,
) -> InferRequest:
    """The images and the wanted outputs (of `available`) of an inference request; raises TensorError."""
    header, binary = _split_body(body, header_length)
    if not isinstance(header, dict):
        raise TensorError("the inference request must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError("'id' must be a string")
    parameters = _parameters(header, "the request")

    inputs = header.get("inputs")
    expected = f"model '{model}' takes one input, '{INPUT}' (BYTES, shape [N])"
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise TensorError(f"'inputs' must be a list of one tensor: {expected}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise TensorError(f"unknown input {tensor.get('name')!r}: {expected}")
    if tensor.get("datatype") != "BYTES":
        raise TensorError(f"input '{INPUT}' has datatype {tensor.get('datatype')!r}, not BYTES")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 1):
        raise TensorError(f"input '{INPUT}' has shape {shape!r}, not [N] with N >= 1 images")
    what = f"input '{INPUT}'"
    size = _parameters(tensor, what).get("binary_data_size")
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary):
            raise TensorError(
                f"{what}: binary_data_size {size!r} does not fit the {len(binary)} bytes after the header"
            )
        if size != len(binary):
            raise TensorError(
                f"{len(binary) - size} byte(s) after the JSON header belong to no input "
                f"(binary_data_size is {size}, {len(binary)} bytes follow the header)"
            )
        images = _split_bytes_elements(binary[:size], what)
    else:
        if binary:
            raise TensorError(f"{len(binary)} byte(s) after the JSON header belong to no input")
        images = _json_bytes_elements(tensor.get("data"), what)
    if len(images) != shape[0]:
        raise TensorError(f"{what}: shape [{shape[0]}] but {len(images)} element(s) in its data")

    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise TensorError("parameters.binary_data_output must be true or false")
    wanted = header.get("outputs")
    if wanted is None:
        return InferRequest(request_id, images, {name: default_binary for name in OUTPUTS})
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise TensorError("'outputs' must be a list of objects with a 'name'")
    outputs: dict[str, bool] = {}
    for output in wanted:
        name = output.get("name")
        if name not in available:
            names = ", ".join(map(repr, available))
            raise TensorError(f"unknown output {name!r}; model '{model}' has {names}")
        binary_data = _parameters(output, f"output {name!r}").get("binary_data", default_binary)
        if not isinstance(binary_data, bool):
            raise TensorError(f"output {name!r}: parameters.binary_data must be true or false")
        outputs[name] = binary_data
    return InferRequest(request_id, images, outputs)


# -- the response ------------------------------------------------------------------------------


def _values(name: str, answers: list[ImageAnswer]) -> list[Any]:
    """An output's elements, flattened in row-major order."""
    if name == "probabilities":
        return [p for a in answers for p in a.probabilities]
    if name == "label":
        return [CLASSES[max(range(len(a.probabilities)), key=a.probabilities.__getitem__)] for a in answers]
    if name == "heatmap":
        return [v for a in answers for row in a.heatmap or [] for v in row]
    return [getattr(a, name) for a in answers]  # ood_score, unsure


def _output(name: str, answers: list[ImageAnswer], binary: bool) -> tuple[dict[str, Any], bytes]:
    """An output tensor's JSON part and its binary data (empty when it is sent in the JSON)."""
    datatype, shape = {**OUTPUTS, **OPTIONAL_OUTPUTS}[name]
    shape = [len(answers), *shape[1:]]
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    data = _values(name, answers)
    raw = b""
    if binary and datatype == "FP32":
        raw = struct.pack(f"<{len(data)}f", *data)
    elif binary and datatype == "BOOL":
        raw = bytes(bool(v) for v in data)
    elif binary:
        encoded = [label.encode() for label in data]
        raw = b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    if binary:
        tensor["parameters"] = {"binary_data_size": len(raw)}
    else:
        tensor["data"] = data
    return tensor, raw


def encode_response(
    model: str, request: InferRequest, answers: list[ImageAnswer]
) -> tuple[dict[str, Any], bytes | None]:
    """The inference response's JSON header, and the binary data that follows it (None: all in JSON)."""
    outputs, chunks = [], []
    for name, binary in request.outputs.items():
        tensor, raw = _output(name, answers, binary)
        outputs.append(tensor)
        chunks.append(raw)
    header: dict[str, Any] = {"model_name": model}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = outputs
    if not any(binary for binary in request.outputs.values()):
        return header, None
    return header, b"".join(chunks)
