"""What the model service speaks in: uploads in; answers and classifications out; errors in words.

`ModelService` (app.service) knows nothing of HTTP: it answers in `Classification`s and raises
`ServiceError`s. The HTTP edge (`app.edge`) gives each error its status, body and headers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from app.imaging import UploadError
from app.predictor import Answers

if TYPE_CHECKING:
    from app.loading import LoadedModel


class StartupError(Exception):
    """The service cannot start; the message is one sentence for the log."""


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"


# -- domain errors: what went wrong, in words; app.edge gives each its HTTP status ---------------


class ServiceError(Exception):
    """A request the service will not or cannot carry out; `message` is one sentence for the client."""

    code = "service_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotReady(ServiceError):
    """Starting or shutting down: try again shortly."""

    code = "not_ready"


class AtCapacity(ServiceError):
    """The queue is full: try again shortly."""

    code = "queue_full"


class NoImages(ServiceError):
    code = "invalid_request"


class TooManyFiles(ServiceError):
    code = "too_many_files"


class UnknownModel(ServiceError):
    """A model name the service does not serve."""

    code = "model_not_found"


@dataclass(frozen=True)
class UploadProblem:
    index: int  # position in the request, from 0
    filename: str | None
    error: UploadError


class BadUploads(ServiceError):
    """One or more uploads cannot be used; `problems` names every one, in upload order."""

    def __init__(self, message: str, problems: list[UploadProblem]) -> None:
        super().__init__(message)
        self.problems = problems
        self.code = problems[0].error.code


# -- requests and answers --------------------------------------------------------------------------


@dataclass
class Upload:
    filename: str | None
    file: BinaryIO
    size: int | None = None  # bytes, when known


@dataclass(frozen=True)
class ImageAnswer:
    """One image's answer."""

    probabilities: list[float]  # 10, calibrated
    ood_score: float | None  # None: the model has no unsure detector
    unsure: bool | None
    heatmap: list[list[float]] | None = None  # 32 x 32, with explain


def image_answers(answers: Answers, explain: list[bool]) -> list[ImageAnswer]:
    probabilities = answers.probabilities.tolist()
    scores = answers.ood_score.tolist() if answers.ood_score is not None else [None] * len(probabilities)
    unsure = answers.unsure.tolist() if answers.unsure is not None else [None] * len(probabilities)
    maps = answers.heatmaps.round(decimals=3).tolist() if answers.heatmaps is not None else None
    return [
        ImageAnswer(p, s, u, maps[i] if maps is not None and explain[i] else None)
        for i, (p, s, u) in enumerate(zip(probabilities, scores, unsure, strict=True))
    ]


@dataclass(frozen=True)
class Classification:
    """The result of `classify`: per-image answers in upload order, and where they came from."""

    filenames: list[str | None]
    answers: list[ImageAnswer]
    top_k: int
    model: LoadedModel  # the weights that made every one of these predictions
    decode_s: float
    queue_s: float  # longest wait of an image for its batch
    run_s: float  # model time of the longest batch
    batch_size: int  # images in the largest forward pass
    total_s: float
