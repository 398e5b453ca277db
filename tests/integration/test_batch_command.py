"""The issue's "done when": `servegraph batch rag questions.jsonl answers...` on a machine
with nothing running starts its own local platform, shows its progress (rows/s), writes
every row (here as CSV: the output's suffix picks the format) and shuts Ray down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from servegraph.offline import _read_results

pytestmark = pytest.mark.own_cluster
ROOT = Path(__file__).resolve().parents[2]


def test_batch_without_an_address_runs_on_its_own_local_platform(tmp_path: Path) -> None:
    questions = ROOT / "examples" / "questions.jsonl"
    answers = tmp_path / "answers.csv"
    env = {
        **os.environ,
        "SERVEGRAPH_INDEX_PATH": tempfile.mkdtemp(prefix="servegraph-batch-"),
        "COLUMNS": "200",  # rich wraps at 80 columns without a terminal
    }
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("servegraph")),
            "batch",
            "rag",
            str(questions),
            str(answers),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    assert "all applications RUNNING" in printed and "rows/s" in printed, printed[-3000:]
    rows = _read_results(answers)
    expected = [json.loads(line)["id"] for line in questions.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert all(r["output"]["answer"] and r["usage"]["usd"] > 0 for r in rows), rows
    assert not (tmp_path / "answers.csv.partial.jsonl").exists()
