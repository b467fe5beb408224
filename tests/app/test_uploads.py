"""The one /predict body parser judges a body as FastAPI judges a required `list[UploadFile]` field.

Two small apps with the service's error handlers: one lets FastAPI read the field (as the /predict
route did before app/uploads.py), the other reads it with `read_uploads`. Each body is posted to
both, and the answers (the files found, or the refusal) must be equal, so a FastAPI or Starlette
upgrade that changes the rules shows here.
"""

from __future__ import annotations

from typing import Annotated

import pytest
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.testclient import TestClient

from app.errors import install_error_handlers
from app.uploads import read_uploads

from .forms import raw_body
from .images import png_bytes


def reference_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/predict")
    async def predict(files: Annotated[list[UploadFile], File(alias="file", min_length=1)]) -> list:
        return [[f.filename or None, len(await f.read())] for f in files]

    return app


def our_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/predict")
    async def predict(request: Request) -> list:
        async with read_uploads(request) as uploads:
            return [[u.filename, len(u.file.read())] for u in uploads]

    return app


IMAGE = png_bytes(4)
FILE = b'Content-Disposition: form-data; name="file"; filename="x.png"'
MULTIPART = "multipart/form-data; boundary=xyz"


CASES = {
    "one": (MULTIPART, raw_body([(FILE, IMAGE)])),
    "two-and-a-text-field": (
        MULTIPART,
        raw_body([(FILE, IMAGE), (b'Content-Disposition: form-data; name="n"', b"hi"), (FILE, b"ab")]),
    ),
    "misnamed": (MULTIPART, raw_body([(FILE.replace(b'"file"', b'"image"'), IMAGE)])),
    "plain-value": (
        MULTIPART,
        raw_body([(FILE, IMAGE), (b'Content-Disposition: form-data; name="file"', b"cat")]),
    ),
    "empty-filename": (
        MULTIPART,
        raw_body([(b'Content-Disposition: form-data; name="file"; filename=""', IMAGE)]),
    ),
    "browser-empty-input": (
        MULTIPART,
        raw_body([(b'Content-Disposition: form-data; name="file"; filename=""', b"")]),
    ),
    "empty-file": (MULTIPART, raw_body([(FILE, b"")])),
    "utf8-filename": (
        MULTIPART,
        raw_body([('Content-Disposition: form-data; name="file"; filename="é.png"'.encode(), IMAGE)]),
    ),
    "lf-only": (MULTIPART, raw_body([(FILE, IMAGE)], newline=b"\n")),
    "preamble": (MULTIPART, raw_body([(FILE, IMAGE)], preamble=b"junk\r\n")),
    "unterminated": (MULTIPART, raw_body([(FILE, IMAGE)])[:-4]),
    "no-name": (MULTIPART, raw_body([(b'Content-Disposition: form-data; filename="x.png"', IMAGE)])),
    "no-boundary": ("multipart/form-data", raw_body([(FILE, IMAGE)])),
    "field-over-1-MiB": (
        MULTIPART,
        raw_body([(FILE, IMAGE), (b'Content-Disposition: form-data; name="n"', bytes(1024 * 1024 + 1))]),
    ),
    "file-over-1-MiB": (MULTIPART, raw_body([(FILE, bytes(3 * 1024 * 1024))])),
    "1001-files": (MULTIPART, raw_body([(FILE, b"a")] * 1001)),
    "urlencoded": ("application/x-www-form-urlencoded", b"file=cat.jpg&other=1"),
    "urlencoded-other": ("application/x-www-form-urlencoded", b"other=1"),
    "json": ("application/json", b'{"file": "x"}'),
    "no-content-type": (None, raw_body([(FILE, IMAGE)])),
}


@pytest.fixture(scope="module")
def clients():
    with TestClient(reference_app()) as reference, TestClient(our_app()) as ours:
        yield reference, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_body_is_judged_as_fastapi_judges_it(clients, case):
    content_type, content = CASES[case]
    headers = {"content-type": content_type} if content_type else {}
    reference, ours = (client.post("/predict", content=content, headers=headers) for client in clients)
    assert (ours.status_code, ours.json()) == (reference.status_code, reference.json())


def test_the_cases_cover_answers_and_each_kind_of_refusal(clients):
    statuses = set()
    for content_type, content in CASES.values():
        headers = {"content-type": content_type} if content_type else {}
        statuses.add(clients[1].post("/predict", content=content, headers=headers).status_code)
    assert statuses == {200, 400, 413, 415, 422}
