"""The images of a POST /predict request: the one parser of its body, for the fast path and the route.

The body is read by Starlette's form parser (`Request.form`, python-multipart underneath): streamed
as it arrives, each file spooled to a temporary file past 1 MiB, with FastAPI's limits (1,000 files,
1,000 fields, 1 MiB per plain field). What it finds is judged as FastAPI judges a required
`list[UploadFile]` field named `file`, and refused the same way, so the answer does not depend on
who reads the body:

- no `file` field (or only the empty part a browser sends when no file is chosen): 422, which the
  error handler turns into 415 when the body is not multipart/form-data at all;
- a plain value in the field `file` (a part without a filename): 422;
- a body the parser cannot read, or over its limits: 400, or 413 for too many files; a client that
  leaves before its body has arrived, 400 (no one reads it, but the metrics count it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import UploadFile  # the schema's type (FastAPI's subclass); the parser makes FormFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as FormFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from app.domain import Upload

FIELD = "file"
SCHEMA_NAME = "Body_predict_predict_post"  # the name FastAPI gave the body when it parsed it itself


# The body of POST /predict as the schema shows it, under SCHEMA_NAME (generated clients use it).
# No docstring: it would become the schema's description.
class PredictForm(BaseModel):
    model_config = ConfigDict(title=SCHEMA_NAME, arbitrary_types_allowed=True)

    file: list[UploadFile] = Field(min_length=1, description="One or more image files; repeat the field.")


REQUEST_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{SCHEMA_NAME}"}}},
}


def _is_empty_file_input(value: Any) -> bool:
    """What a browser sends for a file input left empty: no filename, no bytes (FastAPI skips it)."""
    return isinstance(value, FormFile) and value.filename == "" and value.size == 0


def _uploads(form: FormData) -> list[Upload]:
    values = [value for value in form.getlist(FIELD) if not _is_empty_file_input(value)]
    if not values:
        missing = {"type": "missing", "loc": ("body", FIELD), "msg": "Field required", "input": None}
        raise RequestValidationError([missing], body=form)
    files = [value for value in values if isinstance(value, FormFile)]
    if len(files) < len(values):
        plain = [
            {
                "type": "value_error",
                "loc": ("body", FIELD, index),
                "msg": f"Value error, Expected UploadFile, received: {type(value)}",
                "input": value,
            }
            for index, value in enumerate(values)
            if not isinstance(value, FormFile)
        ]
        raise RequestValidationError(plain, body=form)
    return [Upload(file.filename or None, file.file, file.size) for file in files]


@asynccontextmanager
async def read_uploads(request: Request) -> AsyncIterator[list[Upload]]:
    """The uploaded files, open until the block ends; raises what the app's error handlers render
    (`HTTPException` for a body that does not parse, `RequestValidationError` for one without images)."""
    try:
        form = await request.form()  # FastAPI's limits are Starlette's defaults
    except ClientDisconnect:
        raise HTTPException(400, "the client closed the connection before the whole body arrived") from None
    try:
        yield _uploads(form)
    finally:
        await form.close()
