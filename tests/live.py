"""A real service process for end-to-end tests: `python -m app serve` on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app import launch
from app.launch import free_port

__all__ = ["REPO", "SHIPPED", "free_port", "live_service"]

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "final_model.pt"


@contextmanager
def live_service(**env: str) -> Iterator[str]:
    """Yields the base URL of a ready service (shipped weights on the CPU unless `env` says
    otherwise); stops it with SIGINT afterwards."""
    settings = {"CIFAR10_WEIGHTS": str(SHIPPED), "CIFAR10_DEVICE": "cpu", **env}
    with launch.running(settings, cli=True, cwd=REPO) as server:
        yield server.url
