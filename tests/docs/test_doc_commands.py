"""The commands README.md and docs/*.md show: each is marked, and the runnable ones run.

scripts/check_doc_commands.py is the checker (its docstring has the marker convention); these
tests check its parsing on small texts, then run it over the real documents as CI does.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a real server or subprocess: .ci/run runs these (pytest -m slow)

REPO = Path(__file__).resolve().parents[2]
THIS = "tests/docs/test_doc_commands.py"
_spec = importlib.util.spec_from_file_location("check_doc", REPO / "scripts" / "check_doc_commands.py")
checker = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = checker  # dataclasses look their module up there
_spec.loader.exec_module(checker)

SAMPLE = """# Title

```bash
pip install -e . && uvicorn app.main:app --port 8000   # the service [ci: server]
# a comment line is prose
python -m tool --long \\
    --flags "a # not a comment" # what it does [ci: --smoke]
docker build .   # [not run: needs Docker]
python -m tool --epochs 30   # [tested: tests/docs/test_doc_commands.py::test_extract_reads_markers]
ls
```

```python
print("not shell")   # [ci]
```

```console
$ curl http://127.0.0.1:8000/health/ready   # [ci: client]
{"status": "ready"}
```
"""


def test_extract_reads_markers():
    commands = checker.extract(SAMPLE, "SAMPLE.md")
    got = [(c.line, c.text, c.kind, c.arg) for c in commands]
    assert got == [
        (4, "pip install -e . && uvicorn app.main:app --port 8000", "ci", "server"),
        (6, 'python -m tool --long --flags "a # not a comment"', "ci", "--smoke"),
        (8, "docker build .", "not run", "needs Docker"),
        (9, "python -m tool --epochs 30", "tested", f"{THIS}::test_extract_reads_markers"),
        (10, "ls", None, ""),
        (18, "curl http://127.0.0.1:8000/health/ready", "ci", "client"),
    ]


def test_marker_problems_name_the_line():
    commands = {c.line: c for c in checker.extract(SAMPLE, "SAMPLE.md")}
    assert checker.marker_problems(commands[9], REPO) == []
    assert checker.marker_problems(commands[8], REPO) == []
    (problem,) = checker.marker_problems(commands[10], REPO)
    assert problem.startswith("SAMPLE.md:10: `ls` has no marker")
    bad = """```sh\nx   # [not run]\ny   # [tested: tests/nowhere.py::test_x]\nz   # [ci] [ci]\n```\n"""
    problems = [p for c in checker.extract(bad, "B.md") for p in checker.marker_problems(c, REPO)]
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4"], problems
    assert "needs a reason" in problems[0] and "no such test file" in problems[1]
    assert "more than one" in problems[2]


def test_placeholders_are_filled_in(tmp_path):
    runner = checker.Runner(tmp_path)
    filled = runner.fill('curl -F "file=@cat.jpg" http://127.0.0.1:8000/x --data path/to/cifar10-jpeg.tar.gz')
    assert f"file=@{tmp_path / 'cat.jpg'}" in filled and f"127.0.0.1:{runner.port}/x" in filled
    assert str(runner.data) in filled and runner.data.is_file()
    assert runner.fill("uvicorn app.main:app --port 8000") == f"uvicorn app.main:app --port {runner.port}"


def test_a_failing_command_is_reported(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("```bash\ntrue   # [ci]\nfalse   # [ci]\n```\n")
    problems = checker.check([doc], root=tmp_path)
    assert len(problems) == 1 and problems[0].startswith("doc.md:3: `false` exited with 1"), problems


def test_documented_commands():
    """Every command in README.md and docs/*.md is marked; the [ci] ones run and pass (this
    starts the quick-start server once and runs the README's curl commands against it, so
    curl must be installed: a missing curl fails here rather than skipping the whole check)."""
    assert shutil.which("curl"), "the README's client commands need curl"
    problems = checker.check()
    assert not problems, "\n\n".join(problems)


def test_clients_without_a_server_of_their_own_use_the_readmes():
    readme = "```bash\nuvicorn app.main:app --port 8000   # [ci: server]\ncurl a   # [ci: client]\n```\n"
    guide = "```bash\ncurl b   # [ci: client]\n```\n"
    own = "```bash\npython -m other --port 8000   # [ci: server]\ncurl c   # [ci: client]\n```\n"
    commands = [
        *checker.extract(readme, "README.md"),
        *checker.extract(guide, "docs/guide.md"),
        *checker.extract(own, "docs/own.md"),
    ]
    groups, problems = checker.server_groups(commands)
    assert problems == []
    got = [(server.doc, [c.text for c in clients]) for server, clients in groups]
    assert got == [("README.md", ["curl a", "curl b"]), ("docs/own.md", ["curl c"])]
    _, problems = checker.server_groups(checker.extract(guide, "docs/guide.md"))
    where = "here or in README.md"
    assert problems == [f"docs/guide.md: [ci: client] commands need a [ci: server] command {where}"]
