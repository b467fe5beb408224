"""API fuzzing: schemathesis sends generated requests, valid and invalid, to every operation of the
app's own OpenAPI schema, in process (ASGI, with the lifespan running and a test checkpoint), and
runs every check it has on each answer: no 5xx; the documented status, content type, body and
headers; valid data accepted and invalid data refused; a missing required header or an
undocumented method refused (405 with Allow); credentials enforced (ignored_auth, with an API key
and an admin token set); and an answer within max_response_time. Twice: once open with both
models served (so `?model=lite` is fuzzed), once with credentials. The Open Inference Protocol's
routes are in the schema too. Stateful testing does not
apply: the schema has no links (nothing a response creates is used by another operation).

The number of examples is bounded and the generation derandomized, so the test is deterministic:
about 75 s here (2 shared CPU cores, under load).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation

from app.main import create_app

from .images import blobs, encode, jpeg_bytes, png_bytes

pytestmark = pytest.mark.slow  # about 70 s of generated requests: .ci/run runs it (pytest -m slow)

MAX_EXAMPLES = 50  # per operation and generation mode (valid and invalid data)
MAX_FILES = 4  # the app's limit here, so that generated bodies reach it
API_KEY = "fuzz-key"
ADMIN_TOKEN = "fuzz-admin"
# Every check schemathesis has: `case.call_and_validate()` with no `checks=` runs all those the
# config enables (all, by default) and max_response_time, which is on only with a limit. Two
# answers are this API's own and documented, so the config names them:
# - data over a limit the schema states (more files than `maxItems`) gets 413, not 400 or 422;
# - /admin/reload answers 422 invalid_weights to a well-formed path that names no loadable
#   checkpoint, which no schema can tell apart from one that does.
NEGATIVE_STATUSES = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
CONFIG = schemathesis.Config.from_dict(
    {
        "checks": {
            "max_response_time": 10.0,  # seconds: a hang, not a slow CPU (this one is shared)
            "negative_data_rejection": {"expected-statuses": NEGATIVE_STATUSES},
        },
        "operations": [
            {
                "include-path": "/admin/reload",
                "checks": {
                    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "422"]}
                },
            },
            # /v2 inference: its body schema cannot say "base64 of an image file", "shape [N] for N
            # elements" or which optional outputs this model has, so schema-valid bodies are
            # mostly refused with 400; every other check runs (tests/app/test_v2.py covers the
            # accepted ones).
            {
                "include-path-regex": "^/v2/models/[a-z]+/infer$",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            },
        ],
    }
)


# Generated uploads are arbitrary bytes (or a few sample files), so alone they would almost never
# make a request that succeeds: where the body is meant to be valid, they are swapped for these.
IMAGES = [
    png_bytes(1),
    jpeg_bytes(2, size=(48, 40)),
    encode(blobs(3, (20, 33), "P"), "GIF"),
    encode(blobs(4, (32, 32), "RGBA"), "WEBP"),
    encode(blobs(5, (7, 90), "L"), "BMP"),
]


def _real_images_where_the_body_is_valid(case) -> None:
    """A valid request must succeed (positive_data_acceptance), but `format: binary` cannot say
    "an image Pillow decodes" (the description does). So where the body is valid as the schema
    reads it (1 to MAX_FILES uploads in `file`; other fields are allowed), its uploads become real
    images, whatever else in the request is invalid. An invalid body keeps what was generated,
    and its answer must be a documented 4xx (negative_data_rejection).

    schemathesis labels a body "negative" even when it could not make it invalid (binary parts
    have no invalid value); such a body is labelled for what it is, so that the check's own rules
    (an unknown query parameter or header alone need not be refused) apply to the rest."""
    files = case.body.get("file") if isinstance(case.body, dict) else None
    if case.meta is None or not isinstance(files, list):
        return
    # On the wire every part is bytes: text is a valid upload too.
    uploads = 1 <= len(files) <= MAX_FILES and all(isinstance(f, bytes | str) for f in files)
    if case.meta.is_negative_at(ParameterLocation.BODY) and not uploads:
        return
    case.body = {**case.body, "file": [IMAGES[(i + len(files)) % len(IMAGES)] for i in range(len(files))]}
    body = case.meta.components.get(ParameterLocation.BODY)
    if body is not None:
        body.mode = GenerationMode.POSITIVE


def _schema(make_settings, **overrides) -> schemathesis.schemas.BaseSchema:
    """The app's own schema, served by an app with small limits, so that generated bodies reach them.

    schemathesis runs the lifespan: it starts with the first request and ends after the test.
    """
    limits = dict(warmup=False, max_files=MAX_FILES, max_queue_size=16, max_body_bytes=64 * 1024)
    app = create_app(make_settings(**limits, **overrides))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    return schema


@pytest.fixture
def open_schema(make_settings, lite_weights):
    """No API key, no admin token (so /admin/reload answers 403), and both models served."""
    return _schema(make_settings, lite_weights=lite_weights)


@pytest.fixture
def keyed_schema(make_settings):
    """An API key on the inference routes and an admin token on /admin/reload, which the test
    sends: ignored_auth then checks that a request without them, or with wrong ones, is refused."""
    return _schema(make_settings, api_key=API_KEY, admin_token=ADMIN_TOKEN)


FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@schemathesis.pytest.from_fixture("open_schema").parametrize()
@FUZZ
def test_every_answer_is_one_the_schema_documents(case):
    _real_images_where_the_body_is_valid(case)
    case.call_and_validate()


@schemathesis.pytest.from_fixture("keyed_schema").parametrize()
@FUZZ
def test_every_answer_is_one_the_schema_documents_with_credentials(case):
    if case.path.startswith("/admin/"):
        credentials = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    else:
        credentials = {"X-API-Key": API_KEY}
    _real_images_where_the_body_is_valid(case)
    case.call_and_validate(headers=credentials)


def test_the_schema_asks_for_at_least_one_file(make_settings):
    """The schema must not call a request valid that the service refuses: with no file at all the
    answer is 422 ("no images"), so the field `file` needs minItems 1 (found by the fuzzing above,
    which sent `file: []` as valid data)."""
    spec = create_app(make_settings(warmup=False)).openapi()
    ref = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert "file" in body["required"]
    assert body["properties"]["file"].get("minItems") == 1


def test_the_schema_describes_this_deployment(make_settings, lite_weights):
    """What the fuzzing above found the schema promised wrongly: more files than CIFAR10_MAX_FILES
    were valid, any `model` name was, and /admin/reload was listed where no request can succeed."""
    plain = create_app(make_settings(warmup=False, max_files=3)).openapi()
    both = create_app(make_settings(warmup=False, lite_weights=lite_weights, admin_token="t")).openapi()
    body = plain["components"]["schemas"]["Body_predict_predict_post"]
    assert body["properties"]["file"]["maxItems"] == 3
    for spec, names in ((plain, ["final"]), (both, ["final", "lite"])):
        for path in ("/predict", "/model/summary"):
            operation = next(iter(spec["paths"][path].values()))
            model = next(p for p in operation["parameters"] if p["name"] == "model")
            assert model["schema"]["enum"] == names
    assert "/admin/reload" not in plain["paths"] and "/admin/reload" in both["paths"]


def test_a_weights_path_the_system_refuses_is_a_422(serve):
    """Found by the fuzzing above: a name longer than the file system allows raised OSError (500)."""
    with serve(warmup=False, admin_token="t") as client:
        r = client.post("/admin/reload", params={"path": "x" * 5000}, headers={"Authorization": "Bearer t"})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_weights"
