"""The benchmarks' own tools: the table of ratios `make bench` prints, and open-loop
arrivals that do not wait for earlier requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.load import poisson
from benchmarks.report import Figure


def test_a_ratio_is_judged_against_its_target() -> None:
    assert Figure("items/s", 90, 100, "items/s", ">= 0.8").met() is True
    assert Figure("items/s", 70, 100, "items/s", ">= 0.8").met() is False
    p99 = Figure("p99", 120, 100, "ms", "<= 1", higher_is_better=False)
    assert p99.ratio == pytest.approx(1.2) and p99.met() is False


def test_an_absolute_figure_is_judged_in_its_unit() -> None:
    assert Figure("classifier p99", 80, None, "ms", "< 100", False).met() is True
    assert Figure("classifier p99", 80, None, "ms", "< 100", False).ratio is None
    assert Figure("no answers", float("nan"), None, "ms", "< 100", False).met() is None


def test_figures_saved_by_one_benchmark_are_read_back_for_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    figures = [Figure("embedder items/s, platform / raw", 81, 100, "items/s", ">= 0.8")]
    report.save("model_servers", figures)
    assert report.load("model_servers") == figures
    assert "0.81" in report.table(report.load("model_servers"))
    report.clear("model_servers")
    assert report.load("model_servers") == []


def test_open_loop_arrivals_do_not_wait_for_earlier_requests() -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def one(i: int) -> None:
        started.append(i)
        await release.wait()  # no request finishes until every one has been sent

    async def ten_started() -> None:
        while len(started) < 10:
            await asyncio.sleep(0)

    async def run() -> int:
        # seed 0 gives about 100 arrivals; a sender that waited would stall at one
        sending = asyncio.create_task(poisson(one, rate_rps=2000, seconds=0.05))
        await asyncio.wait_for(ten_started(), timeout=30)
        release.set()
        return await sending

    sent = asyncio.run(run())
    assert sent == len(started) and started == list(range(sent))
