"""Lint, format and types (`make lint`), in the fast tier so CI's `make test` runs them:
ruff over the repository, mypy over the framework, the model servers and the pipelines
(`[tool.mypy]` in pyproject.toml); and mypy catching a misspelt field of a typed
pipeline call (`servegraph.lang.calls`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_static_check_passes(command: list[str]) -> None:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


TYPED_CALL = """
from pydantic import BaseModel

from deployments.embedder import embedder
from servegraph import Pipeline


class Question(BaseModel):
    question: str


p = Pipeline("typo", input=Question, output=Question)
query = p.call("embed", embedder.embed_one({field}=p.input.question))
vector = query.{attribute}
"""


def test_mypy_rejects_a_misspelt_field_of_a_typed_call(tmp_path: Path) -> None:
    """The request's field and the response's attribute, each misspelt once; the same
    program spelt right passes (mypy's cache from the whole-project run above keeps
    this to seconds)."""
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # the program imports `deployments`

    def mypy(source: str) -> subprocess.CompletedProcess[str]:
        program = tmp_path / "typed_call.py"
        program.write_text(source)
        command = [str(BIN / "mypy"), "--no-error-summary", str(program)]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)

    right = mypy(TYPED_CALL.format(field="text", attribute="vector"))
    assert right.returncode == 0, right.stdout + right.stderr
    wrong = mypy(TYPED_CALL.format(field="txt", attribute="vectr"))
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert 'Unexpected keyword argument "txt"' in wrong.stdout, wrong.stdout
    assert '"Embedding" has no attribute "vectr"' in wrong.stdout, wrong.stdout
