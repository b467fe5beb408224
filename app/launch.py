"""Start the service in a process of its own on a free loopback port, wait until it is ready, stop it.

The one way the tests, the benchmarks under bench/, `training.served` and
scripts/check_doc_commands.py start a real server:

    with launch.running({"CIFAR10_WEIGHTS": "weights/final_model.pt"}) as server:
        urllib.request.urlopen(f"{server.url}/model/summary")

`uvicorn app.main:app` by default (or `python -m app serve` with `cli=True`), with the caller's
environment over this process's; ready once GET /health/ready answers 200; stopped with SIGINT,
then killed if it has not exited within `stop_timeout` seconds. Output goes to a temporary file
(read it with `Server.output()`), not a pipe that a chatty server could fill and block on, or
to this process's own stdout and stderr with `capture=False`. Only the standard library is used:
`training.served` runs with nothing beyond the training extra.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0  # importing torch on a busy two-core machine can take a while
STOP_TIMEOUT_S = 30.0
# The folder holding the `app` package, put on the server's PYTHONPATH so that it imports this
# code whatever the working directory.
SOURCE_ROOT = Path(__file__).resolve().parents[1]


class NotReady(RuntimeError):
    """The server exited during startup (`returncode` is set) or was not ready in time (None)."""

    def __init__(self, message: str, returncode: int | None, output: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.output = output


def free_port() -> int:
    """A loopback TCP port that nothing listens on now (the OS's choice)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = STARTUP_TIMEOUT_S) -> bool:
    """True once GET `url`/health/ready answers 200; False when `proc` exits first or `timeout`
    seconds pass."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with direct.open(f"{url}/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):  # not listening yet, or 503 while starting
            pass
        time.sleep(0.2)
    return False


@dataclass
class Server:
    """A started server: its base URL, port and process."""

    url: str
    port: int
    proc: subprocess.Popen
    log: IO[str] | None = field(default=None, repr=False)

    def output(self) -> str:
        """Everything the server has written so far (stdout and stderr); "" with capture=False."""
        if self.log is None:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int | None = signal.SIGINT, timeout: float = STOP_TIMEOUT_S) -> int:
        """Send `sig` (None: none, just wait) if the process still runs, wait up to `timeout`
        seconds for it to exit, kill it if it has not; its exit status."""
        if self.proc.poll() is None and sig is not None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def command(port: int, args: Sequence[str] = (), cli: bool = False) -> list[str]:
    """`uvicorn app.main:app` (or `python -m app serve`, the cifar10-cnn command, with `cli`) on
    the loopback `port`, then `args`."""
    if cli:
        return [sys.executable, "-m", "app", "serve", "--host", HOST, "--port", str(port), *args]
    return [sys.executable, "-m", "uvicorn", "app.main:app", "--host", HOST, "--port", str(port), *args]


def start(
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    *,
    cli: bool = False,
    capture: bool = True,
    cwd: str | Path | None = None,
) -> Server:
    """Start the server on a free port and return at once (see `running` for the arguments)."""
    port = free_port()
    python_path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    environment = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
    # Closed by running(); a caller of start() closes server.log itself.
    log = tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") if capture else None  # noqa: SIM115
    proc = subprocess.Popen(
        command(port, args, cli),
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if capture else None,
        text=True,
    )
    return Server(f"http://{HOST}:{port}", port, proc, log)


@contextmanager
def running(
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    *,
    cli: bool = False,
    capture: bool = True,
    cwd: str | Path | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
    stop_timeout: float = STOP_TIMEOUT_S,
) -> Iterator[Server]:
    """A ready server for the `with` block, stopped after it (SIGINT, then a kill).

    env: variables over this process's environment (CIFAR10_* settings, UVICORN_* options).
    args: extra command-line arguments for uvicorn (or for `python -m app serve` with `cli`).
    capture: the output to a temporary file (`Server.output()`), else to this process's own.
    Raises NotReady, with the end of the output when captured, if the server exits during
    startup or is not ready within `timeout` seconds.
    """
    server = start(env, args, cli=cli, capture=capture, cwd=cwd)
    try:
        if not wait_ready(server.url, server.proc, timeout):
            returncode = server.proc.poll()
            if returncode is None:
                server.stop(signal.SIGKILL, stop_timeout)
                what = f"the server was not ready after {timeout:.0f} s"
            else:
                what = f"the server exited with code {returncode} during startup"
            output = server.output()
            raise NotReady(what + (f":\n{output[-3000:]}" if output else ""), returncode, output)
        yield server
    finally:
        server.stop(signal.SIGINT, stop_timeout)
        if server.log is not None:
            server.log.close()
