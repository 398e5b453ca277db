"""A rollout: a pipeline's traffic moved to a candidate version step by step, promoted
or rolled back on what the two versions did over each step (issue 28,
`servegraph rollout`).

Each step gives the candidate a share (1, 5, 25, 50 %), holds it, and compares the
candidate with the current version over the step, as gates relative to the current
version: p99, the error and deadline-miss shares, the cost per request, the answer
signals (`Graph.signals`). The first gate that fails rolls the traffic back at once and
the rollout says which gate, with both versions' figures. When every step has passed,
the candidate gets all the traffic (promoted).

The figures are the rows of `servegraph versions` (`telemetry.versions.compare`, from
Prometheus), as Argo Rollouts' and Flagger's analyses query Prometheus; unlike theirs,
the gates also read what the answers say and what they cost. A gate is only judged once
both versions have `min_requests` in the window: a p99 of three requests is noise.

The rollout's state is a file rewritten whole at every change: a driver that dies and
is started again resumes at its step, with the hold it already served. One driver per
pipeline at a time (a lock beside the file). The driver owns the split while it runs:
when the split is not what it set (an operator moved it, or `servegraph rollout abort`),
it stops and leaves the split as it found it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from servegraph._files import write_atomically
from servegraph.telemetry.versions import VersionFigures

logger = logging.getLogger(__name__)

# A gate's figure -> (the `VersionFigures` attribute, how it is printed).
FIGURES: dict[str, tuple[str, str]] = {
    "p50": ("p50_ms", "ms"),
    "p99": ("p99_ms", "ms"),
    "errors": ("error_share", "share"),
    "deadline_misses": ("deadline_miss_share", "share"),
    "refused": ("refused_share", "share"),
    "cost": ("usd_per_request", "usd"),
}
# What a rollout checks when no gate is given: not slower, not failing more, not dearer.
DEFAULT_GATES = ("p99<=1.25x", "errors<=+0.01", "deadline_misses<=+0.01", "cost<=1.25x")
DEFAULT_STEPS = (1, 5, 25, 50, 100)
_GATE = re.compile(
    r"^(?P<figure>[a-z_][a-z0-9_]*)\s*(?P<op><=|>=)\s*"
    r"(?P<bound>[+-]?\d+(?:\.\d+)?)(?P<ratio>x)?$"
)


class RolloutError(ValueError):
    """Bad rollout options: `field` names the option, `fix` what to write instead."""

    def __init__(self, field: str, error: str, fix: str) -> None:
        super().__init__(f"{field}: {error}; {fix}")
        self.field, self.error, self.fix = field, error, fix


@dataclass(frozen=True)
class Gate:
    """`FIGURE OP BOUND`: `p99<=1.2x` (at most 1.2 times the current version's),
    `errors<=+0.01` (at most one point above it), `p99<=2000` (at most 2,000 ms),
    `generated>=0.9x` (an answer signal, at least 0.9 times the current version's)."""

    text: str
    figure: str
    op: Literal["<=", ">="]
    bound: float
    mode: Literal["ratio", "delta", "absolute"]

    @classmethod
    def parse(cls, text: str, signals: Collection[str]) -> Gate:
        text = "".join(text.split())
        found = _GATE.match(text)
        if found is None:
            raise RolloutError(
                "--gate",
                f"{text!r} is not a gate",
                "write FIGURE<=BOUND or FIGURE>=BOUND, the bound as a ratio to the current "
                "version (1.2x), a difference (+0.01) or a value (2000), "
                "e.g. p99<=1.2x, errors<=+0.01, generated>=0.9x",
            )
        figure = found["figure"]
        if figure not in FIGURES and figure not in signals:
            known = ", ".join([*FIGURES, *sorted(signals)])
            raise RolloutError(
                "--gate",
                f"{figure!r} is neither a figure nor an answer signal of this pipeline",
                f"name one of {known}",
            )
        bound = found["bound"]
        mode: Literal["ratio", "delta", "absolute"] = (
            "ratio" if found["ratio"] else "delta" if bound[0] in "+-" else "absolute"
        )
        op: Literal["<=", ">="] = "<=" if found["op"] == "<=" else ">="
        return cls(text, figure, op, float(bound), mode)

    def value(self, row: VersionFigures | None) -> float | None:
        if row is None:
            return None
        answered = row.requests * (
            1 - row.error_share - row.deadline_miss_share - row.refused_share
        )
        if self.figure in FIGURES:
            value: float | None = getattr(row, FIGURES[self.figure][0])
            if value is None and self.figure == "cost" and row.requests > 0:
                return 0.0  # nothing priced was called: no cost series at all
            return value
        if not row.signals and answered <= 0:  # no answer read yet
            return None
        return row.signals.get(self.figure, 0.0)  # a counter never added to stays unseen

    def check(self, current: VersionFigures | None, candidate: VersionFigures | None) -> Verdict:
        now, new = self.value(current), self.value(candidate)
        if new is None or (now is None and self.mode != "absolute"):
            return Verdict(gate=self.text, passed=None, current=now, candidate=new, limit=None)
        limit = (
            self.bound
            if self.mode == "absolute"
            else now * self.bound  # type: ignore[operator]  # checked above
            if self.mode == "ratio"
            else now + self.bound  # type: ignore[operator]
        )
        passed = new <= limit if self.op == "<=" else new >= limit
        return Verdict(gate=self.text, passed=passed, current=now, candidate=new, limit=limit)


class Verdict(BaseModel):
    """One gate's reading: passed (None: no figure yet), both versions' values and the
    limit the candidate's was held to."""

    gate: str
    passed: bool | None
    current: float | None
    candidate: float | None
    limit: float | None

    def says(self, current: str, candidate: str) -> str:
        """`errors<=+0.01: v2 0.2133 against v1 0 (limit 0.01)`."""
        return (
            f"{self.gate}: {candidate} {number(self.candidate)} against {current} "
            f"{number(self.current)} (limit {number(self.limit)})"
        )


def number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def parse_steps(text: str) -> list[int]:
    fix = "write whole percents rising to 100, e.g. 1,5,25,50,100"
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise RolloutError("--steps", f"{text!r} is not a list of percents", fix) from None
    if not steps or steps[-1] != 100:
        raise RolloutError("--steps", "the last step must be 100 (the promotion)", fix)
    if len(steps) < 2:
        raise RolloutError("--steps", "no step is gated before the promotion", fix)
    if any(s <= 0 for s in steps) or any(b <= a for a, b in itertools.pairwise(steps)):
        raise RolloutError("--steps", f"{text!r} does not rise from above 0", fix)
    return steps


def parse_duration(text: str, option: str) -> float:
    """`90`, `90s`, `10m`, `1h` -> seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if found is None or float(found[1]) <= 0:
        raise RolloutError(option, f"{text!r} is not a duration", "write e.g. 90s, 10m or 1h")
    return float(found[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[found[2]]


# --------------------------------------------------------------------------- state


class Step(BaseModel):
    percent: int
    started: float  # wall clock, so a resumed driver counts the hold already served
    ended: float | None = None
    outcome: Literal["holding", "passed", "failed"] = "holding"
    applied: bool = False  # the split was moved to this step's (recorded once it was)
    requests: dict[str, float] = Field(default_factory=dict)  # per version, last check
    verdicts: list[Verdict] = Field(default_factory=list)  # the last check's


class RolloutState(BaseModel):
    pipeline: str
    current: str
    candidate: str
    steps: list[int]
    hold_s: float
    max_hold_s: float
    gates: list[str]
    min_requests: int
    sticky: bool = True
    status: Literal["running", "rolling_back", "promoted", "rolled_back", "aborted"] = "running"
    step: int = 0  # index into steps
    history: list[Step] = Field(default_factory=list)
    reason: str | None = None
    started: float = Field(default_factory=time.time)
    ended: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("promoted", "rolled_back", "aborted")

    def weights(self, percent: int) -> dict[str, int]:
        """The split at `percent`, naming only the versions with traffic: a rollback
        still goes through when the candidate is no longer served."""
        split = {self.current: 100 - percent, self.candidate: percent}
        return {v: w for v, w in split.items() if w}


class Busy(RuntimeError):
    """Another process drives this pipeline's rollout."""


class Refused(RuntimeError):
    """The platform refused the split (a 4xx: a key without `admin`, a version no longer
    served): asking again would not help."""


class Rollouts:
    """Rollout state files, one per pipeline, in `directory` (`$SERVEGRAPH_HOME/rollouts`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, pipeline: str) -> Path:
        return self.directory / f"{pipeline}.json"

    def load(self, pipeline: str) -> RolloutState | None:
        path = self.path(pipeline)
        if not path.exists():
            return None
        return RolloutState.model_validate_json(path.read_text())

    def save(self, state: RolloutState) -> None:
        write_atomically(self.path(state.pipeline), state.model_dump_json(indent=1))

    @contextlib.contextmanager
    def driving(self, pipeline: str) -> Iterator[None]:
        """Held while a process drives `pipeline`'s rollout; Busy if another does."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / f"{pipeline}.lock").open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy(f"another process drives the rollout of {pipeline}") from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- driving


class Traffic(Protocol):
    """The pipeline's split on the platform (`/pipelines/<name>/traffic`)."""

    def weights(self) -> dict[str, int]: ...

    def set(self, weights: Mapping[str, int], sticky: bool) -> None: ...


# (pipeline, window in whole seconds) -> the versions' rows over that window.
Figures = Callable[[str, int], list[VersionFigures]]


@dataclass
class Check:
    """One look at the step, for the console: `Driver(say=...)` gets each."""

    state: RolloutState
    step: Step
    held_s: float
    current: VersionFigures | None
    candidate: VersionFigures | None
    verdicts: list[Verdict]
    enough: bool
    note: str | None = None


class Driver:
    """Runs a rollout to its end: `run()` returns the final state (promoted, rolled back,
    or aborted). Every change is saved before the next is made."""

    def __init__(
        self,
        state: RolloutState,
        store: Rollouts,
        traffic: Traffic,
        figures: Figures,
        signals: Collection[str] = (),
        *,
        interval_s: float = 30,
        lag_s: float = 20,
        say: Callable[[Check | RolloutState], None] = lambda _: None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        retry_s: float = 300,
    ) -> None:
        self.state, self.store, self.traffic, self.figures = state, store, traffic, figures
        self.gates = [Gate.parse(g, signals) for g in state.gates]
        self.interval_s, self.lag_s, self.retry_s = interval_s, lag_s, retry_s
        self.say, self.clock, self.sleep = say, clock, sleep

    def run(self) -> RolloutState:
        self._resume()
        while not self.state.finished:
            if self.state.status == "rolling_back":
                self._set(self.state.weights(0))
                self._end("rolled_back")
            elif self.state.steps[self.state.step] == 100:
                last = self.state.history[-1].percent
                if not self._still_ours(self.state.weights(last)):
                    break
                self._set(self.state.weights(100))
                now = self.clock()
                self.state.history.append(
                    Step(percent=100, started=now, ended=now, outcome="passed")
                )
                self._end("promoted", f"{self.state.candidate} has all the traffic")
            elif not self.check():
                self.sleep(self.interval_s)
        return self.state

    def _resume(self) -> None:
        """A driver started on a step already holding (the last one died): the split is
        this step's when it was applied; when the driver died between recording the step
        and moving the split, it is the step before's (the first step: any), moved now.
        Anything else was someone else's change: stop."""
        state = self.state
        if state.finished or state.status != "running" or not state.history:
            return
        step = state.history[-1]
        if step.outcome != "holding" or step.percent != state.steps[state.step]:
            return
        if step.applied:
            self._still_ours(state.weights(step.percent))
            return
        if state.step == 0 or self._still_ours(state.weights(state.steps[state.step - 1])):
            self._move(step)

    def check(self) -> bool:
        """One look at the current step; True when the step ended (passed or failed)."""
        state = self.state
        percent = state.steps[state.step]
        step = state.history[-1] if state.history else None
        if step is None or step.percent != percent or step.outcome != "holding":
            # Moving on: only from the split this rollout set (an abort, or an operator's
            # change, during the last check's figures is not undone).
            if step is not None and not self._still_ours(state.weights(step.percent)):
                return True
            step = Step(percent=percent, started=self.clock())
            state.history.append(step)
            self.store.save(state)  # the step is recorded before the split moves
            self._move(step)
        elif not self._still_ours(state.weights(percent)):
            return True
        held = self.clock() - step.started
        window = math.ceil(held + self.lag_s)
        note = None
        try:
            rows = self.figures(state.pipeline, window)
        except Exception as exc:  # Prometheus down: wait, never judge on no figures
            logger.warning("rollout of %s: no figures: %r", state.pipeline, exc)
            rows, note = [], f"no figures ({type(exc).__name__}: {exc})"
        current, candidate = (
            next((r for r in rows if r.version == v and r.role == "primary"), None)
            for v in (state.current, state.candidate)
        )
        step.requests = {
            state.current: current.requests if current else 0.0,
            state.candidate: candidate.requests if candidate else 0.0,
        }
        enough = min(step.requests.values()) >= state.min_requests
        step.verdicts = [g.check(current, candidate) for g in self.gates]
        self.say(Check(state, step, held, current, candidate, step.verdicts, enough, note))
        failed = [v for v in step.verdicts if v.passed is False] if enough else []
        if failed:
            step.outcome, step.ended = "failed", self.clock()
            self._roll_back(f"gate {failed[0].says(state.current, state.candidate)} at {percent} %")
            return True
        if held < state.hold_s:
            self.store.save(state)
            return False
        if enough and all(v.passed for v in step.verdicts):
            step.outcome, step.ended = "passed", self.clock()
            state.step += 1
            self.store.save(state)
            return True
        if held >= state.max_hold_s:
            step.outcome, step.ended = "failed", self.clock()
            short = ", ".join(f"{v} {n:.0f}" for v, n in step.requests.items())
            waiting = [v.gate for v in step.verdicts if v.passed is None]
            self._roll_back(
                f"no verdict in {state.max_hold_s:.0f} s at {percent} %: "
                + (
                    f"requests {short}, fewer than {state.min_requests}"
                    if not enough
                    else f"no figure for {', '.join(waiting)}"
                )
            )
            return True
        self.store.save(state)  # held long enough but waiting for figures: hold on
        return False

    def _still_ours(self, weights: Mapping[str, int]) -> bool:
        """Whether the split is still the one this rollout set; if not, stop here."""
        try:
            found = self.traffic.weights()
        except Exception as exc:  # cannot tell: carry on, the next check asks again
            logger.warning("rollout of %s: reading the split failed: %r", self.state.pipeline, exc)
            return True
        wanted = {v: w for v, w in weights.items() if w}
        if {v: w for v, w in found.items() if w} == wanted:
            return True
        self._end(
            "aborted",
            f"the split was changed to {found} by someone else (the rollout had set "
            f"{wanted}); left as it is",
        )
        return False

    def _move(self, step: Step) -> None:
        self._set(self.state.weights(step.percent))
        step.applied = True
        self.store.save(self.state)

    def _roll_back(self, reason: str) -> None:
        self.state.status, self.state.reason = "rolling_back", reason
        self.store.save(self.state)  # a driver that dies now rolls back when resumed
        self._set(self.state.weights(0))
        self._end("rolled_back")

    def _set(self, weights: Mapping[str, int]) -> None:
        """Set the split, retrying (bounded by `retry_s`) while the platform does not take
        it; past that the error is raised and the saved state lets a new driver resume."""
        deadline, pause = self.clock() + self.retry_s, 1.0
        while True:
            try:
                self.traffic.set(weights, self.state.sticky)
                return
            except Refused:
                raise
            except Exception as exc:
                if self.clock() + pause > deadline:
                    raise
                logger.warning(
                    "rollout: setting %s failed (%r); again in %.0f s", weights, exc, pause
                )
                self.sleep(pause)
                pause = min(pause * 2, 30)

    def _end(
        self, status: Literal["promoted", "rolled_back", "aborted"], reason: str | None = None
    ) -> None:
        self.state.status, self.state.ended = status, self.clock()
        if reason is not None:
            self.state.reason = reason
        self.store.save(self.state)
        self.say(self.state)


def current_version(weights: Mapping[str, int], served: list[str], candidate: str) -> str:
    """The version a rollout to `candidate` starts from: the one with the most traffic."""
    others = {v: weights.get(v, 0) for v in served if v != candidate}
    if not others:
        raise RolloutError("--to", f"{candidate!r} is the only version", "serve two versions")
    if weights.get(candidate, 0) > max(others.values()):
        raise RolloutError(
            "--to", f"{candidate!r} already has most of the traffic", "roll out another version"
        )
    return max(others, key=lambda v: others[v])


class HttpTraffic:
    """`Traffic` over the platform's HTTP (`/pipelines/<name>/traffic`, an admin key)."""

    def __init__(self, url: str, pipeline: str, headers: Mapping[str, str]) -> None:
        import httpx

        self.url = f"{url.rstrip('/')}/pipelines/{pipeline}/traffic"
        self.client = httpx.Client(headers=dict(headers), timeout=30)

    def shown(self) -> dict[str, Any]:
        answer = self.client.get(self.url)
        answer.raise_for_status()
        shown: dict[str, Any] = answer.json()
        return shown

    def weights(self) -> dict[str, int]:
        weights: dict[str, int] = self.shown()["split"]["weights"]
        return weights

    def set(self, weights: Mapping[str, int], sticky: bool) -> None:
        answer = self.client.put(self.url, json={"weights": dict(weights), "sticky": sticky})
        if 400 <= answer.status_code < 500:
            raise Refused(f"{answer.status_code} from {self.url}: {answer.text[:500]}")
        answer.raise_for_status()


def prometheus_figures(url: str) -> Figures:
    from servegraph.telemetry.observe import Prometheus
    from servegraph.telemetry.versions import compare

    prometheus = Prometheus(url)
    return lambda pipeline, window_s: compare(prometheus.query, pipeline, f"{window_s}s")
