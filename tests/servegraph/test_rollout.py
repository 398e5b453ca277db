"""A rollout's logic (`servegraph.serving.rollout`): gates and their bad forms, steps held
and promoted, the first failed gate rolling back with its figures, too few requests,
a restarted driver resuming where the last one died, a split moved by someone else, a
second driver refused, a platform that does not take the split at once. The figures
and the split are in memory here; a rollback on a real platform with a real Prometheus
is tests/integration/test_ingress_replicas.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from servegraph.serving.rollout import (
    Busy,
    Check,
    Driver,
    Gate,
    Refused,
    RolloutError,
    Rollouts,
    RolloutState,
    Step,
    current_version,
    parse_duration,
    parse_steps,
)
from servegraph.telemetry.versions import VersionFigures

SIGNALS = {"generated", "citations"}


def row(version: str, requests: float = 100, **figures: object) -> VersionFigures:
    values: dict = {
        "p50_ms": 100.0,
        "p99_ms": 400.0,
        "error_share": 0.0,
        "deadline_miss_share": 0.0,
        "refused_share": 0.0,
        "usd_per_request": 1e-4,
        "signals": {"generated": 0.8, "citations": 1.5},
    }
    values.update(figures)
    return VersionFigures(version=version, role="primary", requests=requests, **values)


def test_gates_read_as_ratios_differences_or_values() -> None:
    current = row("v1", p99_ms=400.0, error_share=0.01)
    assert Gate.parse("p99<=1.2x", SIGNALS).check(current, row("v2", p99_ms=470.0)).passed
    slow = Gate.parse("p99 <= 1.2x", SIGNALS).check(current, row("v2", p99_ms=490.0))
    assert slow.passed is False and slow.limit == pytest.approx(480.0)
    assert slow.says("v1", "v2") == "p99<=1.2x: v2 490 against v1 400 (limit 480)"
    errors = Gate.parse("errors<=+0.01", SIGNALS)
    assert errors.check(current, row("v2", error_share=0.015)).passed
    assert errors.check(current, row("v2", error_share=0.03)).passed is False
    assert Gate.parse("p99<=450", SIGNALS).check(None, row("v2", p99_ms=440.0)).passed
    # An answer signal, higher is better; one never recorded stayed at 0.
    worse = row("v2", signals={"citations": 1.4})
    generated = Gate.parse("generated>=0.9x", SIGNALS).check(current, worse)
    assert generated.passed is False and generated.candidate == 0.0
    # No figure yet (a p99 of too few samples, no answer read): no verdict either way.
    assert Gate.parse("p99<=1.2x", SIGNALS).check(current, row("v2", p99_ms=None)).passed is None
    unanswered = row("v2", error_share=1.0, signals={})
    assert Gate.parse("generated>=0.9x", SIGNALS).check(current, unanswered).passed is None
    # Answers read, but no signal counter ever added to: every signal was 0, judged so.
    zeros = Gate.parse("generated>=0.9x", SIGNALS).check(current, row("v2", signals={}))
    assert zeros.passed is False and zeros.candidate == 0.0
    # No priced call in the pipeline: no cost series, a cost of 0 on both sides.
    free = Gate.parse("cost<=1.25x", SIGNALS)
    assert free.check(row("v1", usd_per_request=None), row("v2", usd_per_request=None)).passed


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("p99<1.2x", "is not a gate"),
        ("p99<=fast", "is not a gate"),
        ("helpfulness>=0.9x", "'helpfulness' is neither a figure nor an answer signal"),
    ],
)
def test_a_wrong_gate_is_an_error_naming_the_option_and_the_fix(text: str, said: str) -> None:
    with pytest.raises(RolloutError) as wrong:
        Gate.parse(text, SIGNALS)
    assert wrong.value.field == "--gate" and said in wrong.value.error
    assert "citations" in str(wrong.value) or "e.g." in wrong.value.fix


def test_steps_durations_and_the_current_version_are_checked() -> None:
    assert parse_steps("1,5,25,50,100") == [1, 5, 25, 50, 100]
    for wrong in ("5,1,100", "1,5,50", "0,100", "a,100", "100"):
        with pytest.raises(RolloutError) as refused:
            parse_steps(wrong)
        assert refused.value.field == "--steps"
    assert parse_duration("10m", "--hold") == 600 and parse_duration("90", "--hold") == 90
    with pytest.raises(RolloutError, match="--hold"):
        parse_duration("soon", "--hold")
    assert current_version({"v1": 90, "v2": 10}, ["v1", "v2", "v3"], "v3") == "v1"
    with pytest.raises(RolloutError, match="already has most"):
        current_version({"v1": 10, "v2": 90}, ["v1", "v2"], "v2")


class Split:
    """The platform's split, in memory: what the driver set, in order."""

    def __init__(self, failures: int = 0) -> None:
        self.now: dict[str, int] = {"v1": 100}
        self.sets: list[dict[str, int]] = []
        self.failures = failures

    def weights(self) -> dict[str, int]:
        return dict(self.now)

    def set(self, weights: Mapping[str, int], sticky: bool) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the ingress is restarting")
        self.now = dict(weights)
        self.sets.append(dict(weights))


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def state(**options: object) -> RolloutState:
    values: dict = {
        "pipeline": "rag",
        "current": "v1",
        "candidate": "v2",
        "steps": [1, 5, 25, 100],
        "hold_s": 60,
        "max_hold_s": 180,
        "gates": ["p99<=1.25x", "errors<=+0.01", "generated>=0.9x"],
        "min_requests": 20,
    }
    return RolloutState(**(values | options))


def driver(
    tmp_path: Path,
    figures: Callable[[str, int], list[VersionFigures]],
    split: Split | None = None,
    rollout: RolloutState | None = None,
) -> tuple[Driver, Split, Clock, list]:
    split, clock, said = split or Split(), Clock(), []
    made = Driver(
        rollout or state(),
        Rollouts(tmp_path),
        split,
        figures,
        SIGNALS,
        interval_s=10,
        say=said.append,
        clock=clock,
        sleep=clock.sleep,
    )
    return made, split, clock, said


def test_a_rollout_holds_each_step_and_promotes_when_every_gate_passes(tmp_path: Path) -> None:
    windows: list[int] = []

    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        windows.append(window_s)
        return [row("v1"), row("v2", p99_ms=420.0, signals={"generated": 0.79})]

    rollout, split, _clock, said = driver(tmp_path, figures)
    final = rollout.run()
    assert final.status == "promoted" and split.now == {"v2": 100}
    assert split.sets == [
        {"v1": 99, "v2": 1},
        {"v1": 95, "v2": 5},
        {"v1": 75, "v2": 25},
        {"v2": 100},  # the versions with traffic only: v1 may be taken away next
    ]
    assert [s.outcome for s in final.history] == ["passed"] * 4
    # Each step held its 60 s, checked every 10 s over the step (plus the metrics' lag).
    assert all(s.ended is not None and s.ended - s.started >= 60 for s in final.history[:3])
    assert min(windows) == 20 and max(windows) == 80
    checks = [c for c in said if isinstance(c, Check)]
    assert len(checks) == 3 * 7 and checks[-1].verdicts[0].passed
    assert Rollouts(tmp_path).load("rag") == final  # saved as it ended


def test_the_first_failed_gate_rolls_back_at_once_naming_it_with_both_figures(
    tmp_path: Path,
) -> None:
    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        return [row("v1", error_share=0.0), row("v2", requests=40, error_share=0.2)]

    rollout, split, _clock, _said = driver(tmp_path, figures)
    final = rollout.run()
    assert final.status == "rolled_back" and split.now == {"v1": 100}
    assert split.sets == [{"v1": 99, "v2": 1}, {"v1": 100}]
    assert final.reason == "gate errors<=+0.01: v2 0.2 against v1 0 (limit 0.01) at 1 %"
    assert [s.outcome for s in final.history] == ["failed"]
    assert final.ended == final.history[0].started  # at the first check, not after the hold


def test_a_step_without_enough_requests_waits_then_rolls_back_saying_so(tmp_path: Path) -> None:
    served = iter(range(1, 1_000))

    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        # The candidate fails every gate, but on too few requests to judge.
        return [row("v1"), row("v2", requests=min(next(served), 19), error_share=1.0)]

    rollout, split, _, said = driver(tmp_path, figures)
    final = rollout.run()
    assert final.status == "rolled_back" and split.now == {"v1": 100}
    assert final.reason is not None and "fewer than 20" in final.reason
    assert "v2 19" in final.reason and "in 180 s at 1 %" in final.reason
    assert not any(c.enough for c in said if isinstance(c, Check))


def test_a_restarted_driver_resumes_at_its_step_with_the_hold_it_served(tmp_path: Path) -> None:
    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        return [row("v1"), row("v2")]

    class Died(Exception):
        pass

    first, split, clock, _ = driver(tmp_path, figures)
    looks = 0

    def dies_after_a_while(seconds: float) -> None:
        nonlocal looks
        looks += 1
        if looks == 10:  # in step 2 (5 %), 30 s into its hold
            raise Died
        clock.sleep(seconds)

    first.sleep = dies_after_a_while
    with pytest.raises(Died):
        first.run()
    saved = Rollouts(tmp_path).load("rag")
    assert saved is not None and saved.step == 1 and saved.history[-1].outcome == "holding"
    held_before = clock.t - saved.history[-1].started

    second = Driver(
        saved, Rollouts(tmp_path), split, figures, SIGNALS, clock=clock, sleep=clock.sleep
    )
    final = second.run()
    assert final.status == "promoted"
    assert [s.percent for s in final.history] == [1, 5, 25, 100]  # no step twice
    assert final.history[1].ended - final.history[1].started == pytest.approx(60, abs=30)
    assert held_before > 0


def test_a_driver_dead_between_recording_a_step_and_moving_the_split_moves_it_when_resumed(
    tmp_path: Path,
) -> None:
    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        return [row("v1"), row("v2")]

    rollout = state(
        step=1,
        history=[
            Step(percent=1, started=0, ended=60, outcome="passed"),
            Step(percent=5, started=999_990),  # recorded; then the driver died
        ],
    )
    split = Split()
    split.now = {"v1": 99, "v2": 1}  # still the step before's
    made, split, _, _ = driver(tmp_path, figures, split, rollout)
    assert made.run().status == "promoted"
    assert split.sets[0] == {"v1": 95, "v2": 5}


def test_a_split_moved_by_someone_else_stops_the_rollout_and_is_left_as_it_is(
    tmp_path: Path,
) -> None:
    split = Split()

    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        if len(split.sets) == 1:
            split.now = {"v1": 100}  # an operator (or `servegraph rollout abort`)
        return [row("v1"), row("v2")]

    rollout, split, _, _ = driver(tmp_path, figures, split)
    final = rollout.run()
    assert final.status == "aborted" and split.now == {"v1": 100}
    assert final.reason is not None and "changed to {'v1': 100} by someone else" in final.reason
    assert split.sets == [{"v1": 99, "v2": 1}]


def test_a_split_the_platform_does_not_take_at_once_is_retried(tmp_path: Path) -> None:
    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        return [row("v1"), row("v2", requests=40, error_share=0.5)]

    rollout, split, _, _ = driver(tmp_path, figures, Split(failures=3))
    final = rollout.run()
    assert final.status == "rolled_back" and split.now == {"v1": 100}


def test_prometheus_down_means_no_verdict_never_a_wrong_one(tmp_path: Path) -> None:
    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        raise ConnectionError("connection refused")

    rollout, _split, _, said = driver(tmp_path, figures)
    final = rollout.run()
    assert final.status == "rolled_back" and "fewer than 20" in (final.reason or "")
    assert all(c.note and "connection refused" in c.note for c in said if isinstance(c, Check))


def test_one_driver_per_pipeline(tmp_path: Path) -> None:
    store = Rollouts(tmp_path)
    with store.driving("rag"):
        with pytest.raises(Busy), store.driving("rag"):
            pass
        with store.driving("triage"):
            pass
    with store.driving("rag"):
        pass


def test_a_split_the_platform_refuses_is_not_asked_again(tmp_path: Path) -> None:
    class Forbidden(Split):
        def set(self, weights: Mapping[str, int], sticky: bool) -> None:
            self.sets.append(dict(weights))
            raise Refused("403: this key lacks the admin scope")

    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        return [row("v1"), row("v2")]

    rollout, split, _, _ = driver(tmp_path, figures, Forbidden())
    with pytest.raises(Refused):
        rollout.run()
    assert len(split.sets) == 1
    saved = Rollouts(tmp_path).load("rag")  # recorded, so a driver with a key resumes
    assert saved is not None and saved.history[0].percent == 1


def test_the_cli_shows_a_rollout_and_says_what_is_wrong_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    from servegraph.cli import main

    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["rollout", "status", "rag"]) == 1
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["rollout", "rag", "--to", "v2", "--url", closed]) == 2
    said = capsys.readouterr().out
    assert "no rollout of rag recorded" in said and f"the platform at {closed}" in said

    rolled_back = state(
        status="rolled_back",
        step=1,
        reason="gate errors<=+0.01: v2 0.2 against v1 0 (limit 0.01) at 5 %",
        history=[
            Step(percent=1, started=0, ended=60, outcome="passed", requests={"v1": 90, "v2": 30}),
            Step(percent=5, started=60, ended=75, outcome="failed", requests={"v1": 80, "v2": 25}),
        ],
    )
    Rollouts(tmp_path / "rollouts").save(rolled_back)
    assert main(["rollout", "status", "rag"]) == 0
    shown = capsys.readouterr().out
    assert "v1 -> v2, rolled back (gate errors<=+0.01" in shown
    assert "5 %" in shown and "failed" in shown and "to come" in shown and "v2 25" in shown

    # A rollout under way keeps its options; one pipeline per command.
    Rollouts(tmp_path / "rollouts").save(state(history=[Step(percent=1, started=0)]))
    assert main(["rollout", "rag", "--hold", "1h", "--url", closed]) == 2
    assert main(["rollout", "status"]) == 2
    said = capsys.readouterr().out
    assert "--hold" in said and "keeps the options it started with" in said
    assert "one pipeline" in said


def test_a_resumed_driver_does_not_undo_a_rollback_made_while_it_was_down(tmp_path: Path) -> None:
    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        return [row("v1"), row("v2")]

    died = state(history=[Step(percent=1, started=999_990, applied=True)])
    split = Split()  # {"v1": 100}: an operator took the traffic back meanwhile
    made, split, _, _ = driver(tmp_path, figures, split, died)
    final = made.run()
    assert final.status == "aborted" and split.sets == [] and split.now == {"v1": 100}


def test_a_split_moved_during_a_check_is_not_undone_by_the_next_step(tmp_path: Path) -> None:
    split = Split()

    def figures(pipeline: str, window_s: int) -> list[VersionFigures]:
        if window_s >= 80:  # the step's last check: an abort lands while it reads
            split.now = {"v1": 100}
        return [row("v1"), row("v2")]

    made, split, _, _ = driver(tmp_path, figures, split)
    final = made.run()
    assert final.status == "aborted" and split.now == {"v1": 100}
    assert split.sets == [{"v1": 99, "v2": 1}]  # never moved on to 5 %
