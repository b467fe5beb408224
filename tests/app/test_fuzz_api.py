"""API fuzzing: schemathesis sends generated requests, valid and invalid, to every operation of the
app's own OpenAPI schema, in process (ASGI, with the lifespan running and a test checkpoint).

Every answer must be one the schema promises: no 5xx, a documented status code, the documented
content type, a body that matches the documented model, and the documented headers. The number
of examples is bounded and the generation derandomized, so the test is deterministic and quick.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app

from .images import blobs, encode, jpeg_bytes, png_bytes

MAX_EXAMPLES = 50  # per operation and generation mode (valid and invalid data)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]


# Generated uploads are arbitrary bytes (or a few sample files), so alone they would almost never
# make a request that succeeds: each is swapped for one of these real images most of the time, so
# that the 200 body is checked too.
IMAGES = [
    png_bytes(1),
    jpeg_bytes(2, size=(48, 40)),
    encode(blobs(3, (20, 33), "P"), "GIF"),
    encode(blobs(4, (32, 32), "RGBA"), "WEBP"),
    encode(blobs(5, (7, 90), "L"), "BMP"),
]


def _some_real_images(context, body):
    """A strategy for `body` with each generated upload kept or swapped for a real image."""
    files = body.get("file") if isinstance(body, dict) else None
    if not isinstance(files, list) or not files:
        return st.just(body)
    picks = st.lists(st.sampled_from([None, *IMAGES]), min_size=len(files), max_size=len(files))
    return picks.map(
        lambda p: {**body, "file": [f if i is None else i for i, f in zip(p, files, strict=True)]}
    )


@pytest.fixture
def api_schema(make_settings):
    """The app's own schema, served by an app with small limits, so that generated bodies reach them.

    schemathesis runs the lifespan: it starts with the first request and ends after the test.
    """
    app = create_app(make_settings(warmup=False, max_files=4, max_queue_size=16, max_body_bytes=64 * 1024))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.hook("flatmap_body")(_some_real_images)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_one_the_schema_documents(case):
    case.call_and_validate(checks=CHECKS)


def test_the_schema_asks_for_at_least_one_file(make_settings):
    """The schema must not call a request valid that the service refuses: with no file at all the
    answer is 422 ("no images"), so the field `file` needs minItems 1 (found by the fuzzing above,
    which sent `file: []` as valid data)."""
    spec = create_app(make_settings(warmup=False)).openapi()
    ref = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert "file" in body["required"]
    assert body["properties"]["file"].get("minItems") == 1
