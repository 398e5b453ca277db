"""`servegraph batch`'s files, without Ray: a CSV or Parquet input gives the rows a JSONL
one does (ids, line numbers, fields), and results written as CSV or Parquet read back
exactly as their JSON-lines journal holds them. (The batch itself, on Ray, with its
journal and resume, is `tests/integration/test_batch.py`.)"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from servegraph.offline import _read, _read_results, _write_results

ROWS = [
    {"id": "q0", "question": "How long do refunds take?", "max_tokens": "24"},
    {"id": "q1", "question": "Is there a fee, to return a desk?", "max_tokens": "24"},
]
RESULTS = [
    {
        "id": "q0",
        "line": 2,
        "output": {"answer": "5 days", "passages": []},
        "usage": {"usd": 1e-05},
    },
    {"id": "q1", "line": 3, "error": {"status": 422, "detail": [{"field": "question"}]}},
]


def written(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"questions{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".csv":
        path.write_text(
            "id,question,max_tokens\n"
            + "".join(f'{r["id"]},"{r["question"]}",{r["max_tokens"]}\n' for r in ROWS)
        )
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_in_give_the_rows_jsonl_does(tmp_path: Path, suffix: str) -> None:
    def rows(path: Path) -> list[tuple[str, dict]]:
        return [(row.id, row.body) for row in _read(path)]

    assert rows(written(tmp_path, suffix)) == rows(written(tmp_path, ".jsonl"))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_results_written_as_csv_or_parquet_read_back_as_written(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / f"answers{suffix}"
    _write_results(path, RESULTS)
    assert _read_results(path) == RESULTS
    assert not list(tmp_path.glob("*.writing"))  # written in place at once
