"""`servegraph batch` without `--address`: the command runs the batch inside the same
local platform `servegraph run` starts (`cli._local_platform`, whose start-up, deploy and
shutdown the make-run test covers end to end), and runs nothing when the plan cannot be
placed. The batch itself runs on a real cluster in `tests/integration/test_batch.py`.
No Ray: the platform and the batch are stand-ins, since this test's subject is wiring."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from servegraph import cli
from servegraph.offline import BatchReport


@pytest.mark.parametrize("placeable", [True, False])
def test_batch_without_an_address_runs_inside_a_local_platform(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, placeable: bool
) -> None:
    events: list[str] = []

    @contextlib.contextmanager
    def local_platform(args: Any, **options: Any) -> Iterator[object | None]:
        assert options == {"dashboard": False} and args.pipeline == "rag"
        events.append("platform up")
        yield object() if placeable else None
        events.append("platform down")

    def batch(pipeline: str, input_path: str, output_path: str, **kwargs: Any) -> BatchReport:
        events.append(f"batch {pipeline} {Path(input_path).name} {Path(output_path).name}")
        kwargs["on_progress"](3, 3)
        return BatchReport(rows=3, skipped=0, written=3, invalid=0, failed=0, seconds=1.0)

    monkeypatch.setattr(cli, "_local_platform", local_platform)
    monkeypatch.setattr("servegraph.offline.batch", batch)
    code = cli.main(["batch", "rag", str(tmp_path / "q.jsonl"), str(tmp_path / "a.csv")])
    if placeable:
        assert code == 0
        assert events == ["platform up", "batch rag q.jsonl a.csv", "platform down"]
    else:
        assert code == 1 and events == ["platform up", "platform down"]
