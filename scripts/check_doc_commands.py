"""Check the shell commands that README.md and docs/*.md show: each runs here or says why not.

    python scripts/check_doc_commands.py            # check every marker, run what is runnable
    python scripts/check_doc_commands.py --list     # list the commands and their markers only

Every command in a fenced ```bash, ```sh, ```shell or ```console block (in ```console only the
lines after a `$ ` prompt) carries exactly one marker in its trailing comment, after any words
of its own (`cmd --flag   # what it does [ci]`). Lines joined by a trailing backslash are one
command; lines that are only a comment are prose and skipped. The markers:

    [ci]                  run here as written (placeholders below filled in); it must exit 0.
    [ci: FLAGS]           too long as written: runs here with FLAGS appended (the documented short
                          variant; FLAGS is the whole difference), and must exit 0.
    [ci: server]          a server that runs until stopped: leading `pip install ...` steps are
                          dropped (CI installs the project with `pip install -e '.[dev]'` before
                          pytest), the rest starts, must answer 200 on /health/ready, serves the
                          [ci: client] commands, must survive them, and must stop cleanly on
                          SIGTERM (exit 0, or the SIGTERM it re-raises after shutting down).
    [ci: client]          runs while the [ci: server] command of the same file serves or, in a
                          file without one, README.md's (the quick start); curl gets
                          --fail-with-body, so an HTTP error answer fails the check. Each server
                          starts once and serves its clients in document order (README.md first,
                          then docs/ by path).
    [tested: PATH::TEST]  a test runs this command or its short variant (named in the test); the
                          checker checks that PATH defines TEST (several: comma-separated).
    [not run: REASON]     cannot run here: a download, a GPU, Docker, Kubernetes, hours of work,
                          the test run itself. REASON says so where the command is shown.

Placeholders, filled in when a command runs here:

    path/to/cifar10-jpeg.tar.gz  a tiny archive in the same layout (<top>/{train,test}/<class>/*.jpg,
                                 4 training and 2 test JPEGs per class), made by the checker
    127.0.0.1:8000, --port 8000  a free loopback port
    cat.jpg, ship.png            two small pictures made by the checker
    weights/new.pt               a copy of weights/final_model.pt in a temporary folder
    <server pid>                 the process id of the [ci: server] command
    $CIFAR10_ADMIN_TOKEN         set for the server and the clients to a token made per run

Commands run with bash (pipefail) in the repository root; `python` and the project's console
scripts (uvicorn, pytest, ruff) are those of the interpreter running this checker. Exit status
0 when every command is marked and every runnable one passed; 1 otherwise, with each problem
named by file and line.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app import launch  # noqa: E402  (free_port, wait_ready: the standard library only)

SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"\[(ci|tested|not run)(?::\s*([^\]]*?))?\s*\]")
DATA_PLACEHOLDER = "path/to/cifar10-jpeg.tar.gz"
DOC_PORT = "8000"
COMMAND_TIMEOUT_S = 180.0
SERVER_READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Command:
    doc: str  # path relative to the repository root
    line: int  # 1-based line of the command's first line
    text: str  # the command without its trailing comment, continuation lines joined
    comment: str  # the trailing comment, without '#'
    kind: str | None  # 'ci', 'tested', 'not run', or None when unmarked
    arg: str  # what follows the marker's colon ('' when none)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/**/*.md (docs/ may not exist)."""
    found = [root / "README.md"] if (root / "README.md").is_file() else []
    docs = root / "docs"
    return found + (sorted(docs.rglob("*.md")) if docs.is_dir() else [])


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment): the comment starts at a '#' outside quotes, at the start or after a space."""
    quote = None
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def extract(text: str, doc: str) -> list[Command]:
    """Every command of the fenced shell blocks of one markdown text."""
    commands: list[Command] = []
    fence: str | None = None  # the opening fence while inside a block
    language = ""
    pending: list[str] = []  # continuation lines of the command being read
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if fence is None:
            opening = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if opening:
                fence, language = opening.group(1), opening.group(2).lower()
            continue
        if stripped.startswith(fence) and not stripped[len(fence) :].strip():
            fence = None
            pending = []
            continue
        if language not in SHELL_LANGUAGES:
            continue
        line = stripped
        if language == "console" and not pending:
            if not line.startswith("$ "):
                continue  # output, not a command
            line = line[2:]
        if not pending:
            if not line or line.startswith("#"):
                continue
            start = number
        code, comment = split_comment(line)
        if code.endswith("\\") and not comment:
            pending.append(code[:-1].rstrip())
            continue
        joined = " ".join([*pending, code]).strip()
        pending = []
        marks = MARKER.findall(comment)
        kind, arg = (marks[0][0], marks[0][1].strip()) if len(marks) == 1 else (None, "")
        if len(marks) > 1:
            kind, arg = "several", ""
        commands.append(Command(doc, start, joined, comment, kind, arg))
    return commands


def marker_problems(command: Command, root: Path = ROOT) -> list[str]:
    """What is wrong with a command's marker, without running anything."""
    if command.kind is None:
        return [f"{command.where}: `{command.text}` has no marker ([ci], [tested: ...] or [not run: ...])"]
    if command.kind == "several":
        return [f"{command.where}: `{command.text}` has more than one marker"]
    if command.kind == "not run" and not command.arg:
        return [f"{command.where}: [not run] needs a reason: [not run: needs a GPU]"]
    if command.kind == "tested":
        problems = []
        for ref in filter(None, (r.strip() for r in command.arg.split(","))):
            path, _, name = ref.partition("::")
            file = root / path
            if not name or not file.is_file():
                problems.append(f"{command.where}: [tested: {ref}]: no such test file or no ::name")
            elif not re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", file.read_text(), re.M):
                problems.append(f"{command.where}: [tested: {ref}]: {path} defines no {name}")
        return problems or ([] if command.arg else [f"{command.where}: [tested] needs PATH::TEST"])
    return []


# -- running ---------------------------------------------------------------------------------


def tiny_archive(folder: Path) -> Path:
    """4 training and 2 test 32x32 JPEGs per class, as cifar10/{train,test}/<class>/NNNN.jpg."""
    from PIL import Image

    from app.model import CLASSES

    path = folder / "cifar10-tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 4), ("test", 2)):
            for label, name in enumerate(CLASSES):
                for i in range(count):
                    buffer = io.BytesIO()
                    colour = ((label * 25 + i * 7) % 256, (label * 70) % 256, (255 - label * 25) % 256)
                    Image.new("RGB", (32, 32), colour).save(buffer, "JPEG", quality=90)
                    info = tarfile.TarInfo(f"cifar10/{split}/{name}/{i:04d}.jpg")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))
    return path


class Runner:
    """Fills in placeholders and runs commands; collects problems."""

    def __init__(self, tmp: Path) -> None:
        from PIL import Image

        self.tmp = tmp
        self.port = str(launch.free_port())
        self.token = secrets.token_hex(16)
        self.server_pid: int | None = None
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        for name in ("python", "python3"):
            (bin_dir / name).symlink_to(sys.executable)
        path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "CIFAR10_ADMIN_TOKEN": self.token, "PYTHONUNBUFFERED": "1"}
        self.data = tiny_archive(tmp)
        Image.new("RGB", (48, 40), (200, 120, 40)).save(tmp / "cat.jpg", "JPEG")
        Image.new("RGB", (32, 32), (30, 60, 200)).save(tmp / "ship.png", "PNG")
        shutil.copy(ROOT / "weights" / "final_model.pt", tmp / "new.pt")

    def fill(self, text: str) -> str:
        text = text.replace(DATA_PLACEHOLDER, str(self.data))
        text = text.replace(f"127.0.0.1:{DOC_PORT}", f"127.0.0.1:{self.port}")
        text = re.sub(rf"--port(\s+|=){DOC_PORT}\b", rf"--port\g<1>{self.port}", text)
        text = re.sub(r"@(cat\.jpg|ship\.png)\b", lambda m: f"@{self.tmp / m.group(1)}", text)
        text = text.replace("weights/new.pt", str(self.tmp / "new.pt"))
        if self.server_pid is not None:
            text = text.replace("<server pid>", str(self.server_pid))
        return text

    def run(self, command: Command, text: str) -> str | None:
        """None when `text` exited 0, else the problem."""
        try:
            proc = subprocess.run(
                ["bash", "-o", "pipefail", "-c", text],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return f"{command.where}: `{text}` ran over {COMMAND_TIMEOUT_S:.0f} s"
        print(f"  exit {proc.returncode}: {text}", flush=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            return f"{command.where}: `{text}` exited with {proc.returncode}:\n{tail}"
        return None

    def serve(self, server: Command, clients: list[Command]) -> list[str]:
        """Start the server, wait for ready, run the clients, check it survived, stop it."""
        steps = [s.strip() for s in server.text.split("&&")]
        steps = [s for s in steps if not s.startswith("pip install")]
        text = "exec " + self.fill(" && ".join(steps))
        log = (self.tmp / "server.log").open("w+")
        proc = subprocess.Popen(
            ["bash", "-c", text], cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        self.server_pid = proc.pid
        problems: list[str] = []
        try:
            ready = self.wait_ready(proc)
            print(f"  {'ready' if ready else 'NOT ready'}: {text}", flush=True)
            if not ready:
                log.seek(0)
                return [
                    f"{server.where}: `{text}` never answered 200 on /health/ready:\n{log.read()[-3000:]}"
                ]
            for client in clients:
                filled = self.fill(client.text)
                filled = re.sub(r"(^|[|;&]\s*)curl\b", r"\1curl --fail-with-body", filled)
                if problem := self.run(client, filled):
                    problems.append(problem)
                if proc.poll() is not None:
                    problems.append(f"{client.where}: the server exited ({proc.returncode}) after `{filled}`")
                    break
                if "kill -HUP" in filled:
                    time.sleep(2.0)  # the reload it starts runs in the background
            if proc.poll() is None and not self.wait_ready(proc):
                problems.append(f"{server.where}: not ready after the client commands")
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    problems.append(f"{server.where}: `{text}` did not stop within 30 s of SIGTERM")
            self.server_pid = None
            log.seek(0)
            output = log.read()
            log.close()
        # 0, or killed by the SIGTERM it re-raises after a graceful shutdown (uvicorn >= 0.29 does)
        if proc.returncode not in (0, -signal.SIGTERM, None) and not problems:
            problems.append(
                f"{server.where}: `{text}` exited {proc.returncode} on SIGTERM:\n{output[-3000:]}"
            )
        return problems

    def wait_ready(self, proc: subprocess.Popen) -> bool:
        return launch.wait_ready(f"http://127.0.0.1:{self.port}", proc, SERVER_READY_TIMEOUT_S)


def server_groups(commands: list[Command]) -> tuple[list[tuple[Command, list[Command]]], list[str]]:
    """Each [ci: server] with the [ci: client] commands it serves, in document order, and problems.

    A file's clients go to its own server; in a file without one, to README.md's.
    """
    docs = list(dict.fromkeys(c.doc for c in commands))
    servers = {d: [c for c in commands if c.doc == d and c.kind == "ci" and c.arg == "server"] for d in docs}
    groups: dict[str, list[Command]] = {d: [] for d in docs if len(servers[d]) == 1}
    problems = [f"{d}: more than one [ci: server] command" for d in docs if len(servers[d]) > 1]
    for doc in docs:
        clients = [c for c in commands if c.doc == doc and c.kind == "ci" and c.arg == "client"]
        host = doc if servers[doc] else "README.md"
        if not clients or len(servers[doc]) > 1:
            continue
        if host not in groups:
            problems.append(f"{doc}: [ci: client] commands need a [ci: server] command here or in README.md")
        else:
            groups[host].extend(clients)
    return [(servers[d][0], clients) for d, clients in groups.items()], problems


def check(paths: list[Path] | None = None, run: bool = True, root: Path = ROOT) -> list[str]:
    """Every problem with the commands of `paths` (default: README.md and docs/**/*.md)."""
    problems: list[str] = []
    commands: list[Command] = []
    for path in documents(root) if paths is None else paths:
        rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        commands.extend(extract(path.read_text(), rel))
    for command in commands:
        problems.extend(marker_problems(command, root))
    groups, group_problems = server_groups(commands)
    problems.extend(group_problems)
    if not run or problems:
        return problems
    with tempfile.TemporaryDirectory(prefix="doc-commands-") as tmp:
        runner = Runner(Path(tmp))
        for command in commands:
            if command.kind != "ci" or command.arg in ("server", "client"):
                continue
            text = runner.fill(command.text + (f" {command.arg}" if command.arg else ""))
            if problem := runner.run(command, text):
                problems.append(problem)
        for server, clients in groups:
            problems.extend(runner.serve(server, clients))
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python scripts/check_doc_commands.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("docs", nargs="*", type=Path, help="markdown files (default: README.md and docs/**/*.md)")
    p.add_argument("--list", action="store_true", help="list the commands and their markers; run nothing")
    args = p.parse_args(argv)
    paths = [d.resolve() for d in args.docs] or None
    if args.list:
        for path in documents() if paths is None else paths:
            rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            for c in extract(path.read_text(), str(rel)):
                mark = f"[{c.kind}{': ' + c.arg if c.arg else ''}]" if c.kind else "UNMARKED"
                print(f"{c.where}: {mark}  {c.text}")
        return 0
    problems = check(paths)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print("PASS" if not problems else f"{len(problems)} problem(s)")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
