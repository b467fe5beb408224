"""Service settings, read from environment variables with the prefix ``CIFAR10_``.

    CIFAR10_WEIGHTS=weights/final_model.pt CIFAR10_MAX_BATCH_SIZE=32 uvicorn app.main:app

Every field below is one variable (``max_batch_size`` -> ``CIFAR10_MAX_BATCH_SIZE``); tests build
`Settings(...)` directly and hand it to `create_app`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.device import DEVICE_CHOICES

ENV_PREFIX = "CIFAR10_"
MAX_TOP_K = 10  # the model has ten classes
# The shipped weights, found beside the package (a clone, an editable install, the Docker image)
# wherever the service is started from; the CIFAR10_*WEIGHTS settings name other files.
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    weights: Path = Field(
        default_factory=lambda: SHIPPED_WEIGHTS / "final_model.pt",
        description="Checkpoint to serve: ours (training's output) or a bare FinalModel state_dict "
        "(default: the shipped weights/final_model.pt beside the package, whatever the current folder).",
    )
    lite_weights: Path | None = Field(
        default_factory=lambda: SHIPPED_WEIGHTS / "lite_model.pt",
        description="LiteModel checkpoint served beside FinalModel as model 'lite' (/predict?model=lite, "
        "/v2/models/lite). Skipped when the default file is absent; a file set on purpose must load; "
        "empty: no lite model.",
    )
    best_weights: Path | None = Field(
        default_factory=lambda: SHIPPED_WEIGHTS / "best_model.pt",
        description="AirbenchNet checkpoint (python -m training.teacher) served beside FinalModel as "
        "model 'best', the most accurate (/predict?model=best, /v2/models/best). Skipped when the "
        "default file is absent; a file set on purpose must load; empty: no best model.",
    )
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")

    backend: Literal["auto", "pytorch", "onnxruntime"] = Field(
        "auto",
        description="What runs the forward pass. auto: the fastest backend whose labels equal PyTorch "
        "fp32's on the whole test split, measured (docs/serving.md): onnxruntime on cpu, pytorch elsewhere.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto is fp32. bf16 (pytorch only: autocast) is faster on GPUs and CPUs with native "
        "bf16, and changes a few labels (docs/serving.md: its evaluated accuracy).",
    )
    layout: Literal["auto", "nchw", "channels_last"] = Field(
        "auto",
        description="Activation memory layout of the pytorch backend; auto: channels_last on cpu and "
        "cuda, nchw on mps.",
    )

    batching: bool = Field(True, description="Gather concurrent requests into shared forward passes.")
    max_batch_size: Annotated[int, Field(ge=1, le=1024)] = Field(
        32, description="Most images in one forward pass."
    )
    max_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = Field(
        5.0,
        description="Longest time a batch waits for more images, counted from its first image's arrival; "
        "the wait ends early once the batch is full or no other request is on its way.",
    )
    max_queue_size: Annotated[int, Field(ge=1)] = Field(
        256,
        description="Images admitted but not yet in a forward pass (being decoded or queued); "
        "a request that would go over gets 503 with Retry-After.",
    )
    fast_path: bool = Field(
        True,
        description="Answer /predict in a lean ASGI handler before FastAPI's routing; the same code, "
        "answers and refusals as the route, less CPU per request. A query the route refuses goes to it.",
    )
    retry_after_s: Annotated[int, Field(ge=1)] = Field(
        1, description="Seconds a 503 answer tells the client to wait (the Retry-After header)."
    )

    workers: Annotated[int, Field(ge=0, le=64)] = Field(
        0,
        description="Inference threads, each running whole batches; 0: one per CPU core on cpu, else one.",
    )
    torch_threads: Annotated[int, Field(ge=0, le=256)] = Field(
        0,
        description="Intra-op threads of a forward pass (PyTorch's are process-wide, ONNX Runtime's per "
        "session); 0: CPU cores divided by workers, at least 1.",
    )
    decode_threads: Annotated[int, Field(ge=0, le=256)] = Field(
        0,
        description="Threads that decode uploads, in parallel with inference (small requests are decoded "
        "on the event loop); 0: one per CPU core.",
    )

    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        16 * 1024 * 1024, description="Largest request body; a larger one gets 413 before it is read."
    )
    max_files: Annotated[int, Field(ge=1, le=1000)] = Field(
        32, description="Most images in one /predict request; more gets 413."
    )
    max_pixels: Annotated[int, Field(ge=1024)] = Field(
        40_000_000,
        description="Most pixels one upload may decode to (width x height after JPEG's reduced-scale "
        "decoding); a larger image gets 413 before it is decoded.",
    )
    top_k: Annotated[int, Field(ge=1, le=MAX_TOP_K)] = Field(
        3, description="Classes listed per image when the request does not say (query top_k)."
    )
    warmup: bool = Field(True, description="Run warm-up batches before reporting ready.")
    drain_timeout_s: Annotated[float, Field(ge=0, le=3600)] = Field(
        10.0,
        description="On SIGTERM, longest wait for admitted /predict requests to finish before the server "
        "stops; meanwhile readiness answers 503 and new requests get 503 with Retry-After.",
    )

    api_key: SecretStr | None = Field(
        None,
        description="When set, /predict requires it in the X-API-Key header or as "
        "'Authorization: Bearer <key>'; unset (the default): /predict is open.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token for POST /admin/reload; unset (the default): reloading over HTTP is "
        "disabled (SIGHUP still reloads).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        [],
        description="Origins allowed to call the API from a browser (comma-separated or a JSON list, "
        "'*' for any); empty (the default): no CORS headers.",
    )
    log_level: str = Field("INFO", description="Level of the service's own log lines.")

    # Connections, slow clients and admission under overload: enforced per connection, before the
    # ASGI app, by app.connections.GuardedHTTPProtocol (uvicorn --http; `cifar10-cnn serve` uses it).
    header_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        5.0,
        description="Longest time a request's headers may take, from its first byte (or the connection "
        "opening); a slower client gets 408 and the connection is closed.",
    )
    body_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        30.0,
        description="Longest time a request's body may take once its headers are in; a slower client gets "
        "408 and the connection is closed.",
    )
    max_connections: Annotated[int, Field(ge=1)] = Field(
        2048,
        description="Open connections per process; past it a new connection gets 503 and is closed before "
        "anything is read.",
    )
    max_active_requests: Annotated[int, Field(ge=1)] = Field(
        64,
        description="POST requests running in the app at once; more wait, in arrival order, for a "
        "running one to finish, for at most admission_wait_s.",
    )
    admission_wait_s: Annotated[float, Field(ge=0, le=60)] = Field(
        1.0,
        description="Longest wait for a place among max_active_requests; then 503 queue_full with "
        "Retry-After, written without running the app.",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in DEVICE_CHOICES and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError(f"must be one of {', '.join(DEVICE_CHOICES)} or cuda:N, not {value!r}")
        return value

    @field_validator("lite_weights", "best_weights", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_key", "admin_token")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value().strip() else None

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.strip().upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.backend == "onnxruntime" and self.precision == "bf16":
            raise ValueError("precision bf16 needs backend pytorch (or auto); onnxruntime runs fp32")
        if self.max_files > self.max_queue_size:
            raise ValueError(
                f"max_files ({self.max_files}) must not exceed max_queue_size ({self.max_queue_size}), "
                "or a full-size request could never be admitted"
            )
        return self

    def resolved_workers(self, device_type: str) -> int:
        if self.workers:
            return self.workers
        return available_cpus() if device_type == "cpu" else 1

    def resolved_torch_threads(self, device_type: str) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, available_cpus() // self.resolved_workers(device_type))

    def resolved_decode_threads(self) -> int:
        return self.decode_threads or available_cpus()


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return f"{ENV_PREFIX}{field.upper()}"
