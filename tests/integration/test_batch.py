"""`servegraph batch` on the suite's cluster: a pipeline over a dataset on Ray Data, bad
rows reported by line with the field and the fix, and a re-run after an interruption
that processes no row twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.offline import batch

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

QUESTIONS = [
    "How long do refunds take?",
    "How do I reset my password?",
    "Which carriers ship my order?",
    "Can I return an opened item?",
    "How do I change my plan?",
    "Why is my device not connecting to wifi?",
    "How long does shipping take?",
    "How do I contact support?",
]


class Interrupted(Exception):
    pass


def test_a_batch_run_interrupted_then_rerun_writes_every_row_once(
    pipelines: LocalCluster, tmp_path: Path
) -> None:
    rows = [{"id": f"q{i}", "question": q, "max_tokens": 32} for i, q in enumerate(QUESTIONS)]
    lines = [json.dumps(r) for r in rows[:4]]
    lines += ['{"id": "empty", "question": ""}', "not json at all"]
    lines += [json.dumps(r) for r in rows[4:]]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    answers = tmp_path / "answers.jsonl"

    def stop_after_four(done: int, total: int) -> None:
        if done == 4:
            raise Interrupted

    with pytest.raises(Interrupted):
        batch("rag", questions, answers, concurrency=32, on_progress=stop_after_four)
    first = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(first) == 4

    report = batch("rag", questions, answers, concurrency=32)
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    ids = [row["id"] for row in written]
    assert len(ids) == len(set(ids)) == len(rows) + 2, ids  # every row once, errors too
    assert report.skipped == 4 and report.written == len(rows) + 2 - 4

    by_id = {row["id"]: row for row in written}
    empty = by_id["empty"]
    assert empty["line"] == 5 and empty["error"]["detail"][0]["field"] == "question"
    assert empty["error"]["detail"][0]["fix"]
    garbled = by_id["6"]  # no id on the line: its line number is its id
    assert garbled["line"] == 6 and garbled["error"]["detail"][0]["field"] == "(line)"
    for row in rows:
        done = by_id[row["id"]]
        assert "error" not in done, done
        assert done["output"]["answer"] and done["usage"]["llm_output_tokens"] > 0


def test_the_command_runs_the_readme_example_onto_a_running_cluster(
    pipelines: LocalCluster, tmp_path: Path
) -> None:
    """As an operator runs it from another shell: the address `servegraph run` printed,
    and none of this process's Ray settings (the Ray token it sends is found by the
    command itself, `servegraph.deploy.local_ray.attach`)."""
    import ray

    answers = tmp_path / "answers.jsonl"
    address = ray.get_runtime_context().gcs_address
    shell = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("servegraph")),
            "batch",
            "rag",
            str(ROOT / "examples" / "questions.jsonl"),
            str(answers),
            "--address",
            address,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=shell,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "rows/s" in done.stdout and "0 failed, 0 invalid" in done.stdout, done.stdout
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    expected = (ROOT / "examples" / "questions.jsonl").read_text().splitlines()
    assert sorted(r["id"] for r in rows) == sorted(json.loads(q)["id"] for q in expected)
    assert all(r["output"]["answer"] for r in rows)


def test_parquet_in_csv_out_resumes_from_the_journal(
    pipelines: LocalCluster, tmp_path: Path
) -> None:
    """A Parquet input and a CSV output on Ray, interrupted and run again: the journal
    resumes it. (That each format reads and writes the same rows as JSON lines is
    shown without Ray: tests/servegraph/test_batch_formats.py.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from servegraph.offline import _read_results

    rows = [{"id": f"q{i}", "question": q, "max_tokens": 24} for i, q in enumerate(QUESTIONS[:6])]
    questions = tmp_path / "questions.parquet"
    pq.write_table(pa.Table.from_pylist(rows), questions)
    answers = tmp_path / "answers.csv"
    journal = tmp_path / "answers.csv.partial.jsonl"

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        batch("rag", questions, answers, concurrency=32, on_progress=stop_after_two)
    assert not answers.exists() and len(journal.read_text().splitlines()) == 2

    report = batch("rag", questions, answers, concurrency=32)
    assert report.skipped == 2 and report.written == 4 and not journal.exists()
    written = _read_results(answers)
    assert sorted(r["id"] for r in written) == [r["id"] for r in rows]
    assert all(r["output"]["answer"] and r["usage"]["usd"] > 0 for r in written), written
    # Run again over a finished output: nothing to do, the file as it was.
    again = batch("rag", questions, answers, concurrency=32)
    assert again.skipped == len(rows) and again.written == 0
    assert _read_results(answers) == written


def test_a_maximum_cost_per_row_makes_rows_over_it_error_rows(
    pipelines: LocalCluster, tmp_path: Path
) -> None:
    """Every row's first call is over a maximum of 1e-12, but the first call of each
    method in each actor runs to learn what it costs: the rest are stopped by it."""
    rows = [{"id": f"q{i}", "question": q, "max_tokens": 24} for i, q in enumerate(QUESTIONS)]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = tmp_path / "answers.jsonl"
    batch("rag", questions, answers, concurrency=32, max_cost_usd=1e-12)
    written = [json.loads(line) for line in answers.read_text().splitlines()]
    stopped = [r for r in written if "error" in r]
    assert len(written) == len(rows) and len(stopped) >= len(rows) - 1, written
    for row in stopped:
        assert row["error"]["status"] == 402 and row["error"]["node"] == "embed", row
        assert row["error"]["budget"]["max_usd"] == 1e-12
