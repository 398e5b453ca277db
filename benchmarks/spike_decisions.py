"""How soon graph-aware scaling can decide after a step, and what it decides at rest: the
spike benchmark's seeded arrivals replayed through the demand board's own arithmetic
(`servegraph.deploy.scaling`), without Ray, in simulated time.

    .venv/bin/python -m benchmarks.spike_decisions [--seeds 1 2 3 4 5] [--hours 4]

The first scale-up after a step cannot come before the arrivals show the step. At the
spike benchmark's base rate (0.23 requests/s on CPU-sized LLM replicas) a tenfold step
brings 2.3 requests a second, and a few requests close together happen by chance at
the base rate too: a rule that decides on fewer arrivals decides sooner and scales up
for nothing more often. This measures both sides for each rule, on the same arrivals:

- step to the LLM's first scale-up (seconds), per seed: the arrivals reach the board as
  the ingress reports them (every `FLUSH_S`) and the policy reads the board on Serve's
  control-loop ticks (`CONTROL_LOOP_S`), so the figure includes that transport but not
  an actor call's milliseconds;
- scale-ups at the base rate alone, per hour of simulated arrivals (each followed by
  the 30 s downscale delay), and how many of them the short window made.

Rules, each believing a short (2 s) window above the long window's rate only once it
holds `k` arrivals: `pipeline-k`, each pipeline's window on its own (the platform's
rule, `Arrivals.load`, at k = `SHORT_MIN_ARRIVALS` = 4), and `pooled-k`, the arrivals of
every pipeline that calls the server together. `pooled-5` decides sooner on these
arrivals with no scale-up for nothing, but it is not the platform's rule: a count that
pools pipelines is fooled by a busy pipeline that calls the server rarely (its arrivals
fill the count, so a slow pipeline's chance pair is believed), which these two
pipelines cannot show. A Poisson test of the short window's count against the long
window's rate (pooled, windows of 0.5, 1 and 2 s, at 1e-4 to 1e-6) was tried too and did
no better than `pipeline-4` on both figures at once: at this rate the long window's own
estimate is too uncertain to test against.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from benchmarks import report
from benchmarks.report import Figure
from benchmarks.spike import BASE_RATES, CURVES, Sent, arrivals, service_times
from servegraph.deploy.scaling.board import FLUSH_S
from servegraph.deploy.scaling.demand import (
    SHORT_MIN_ARRIVALS,
    Arrivals,
    Load,
    prior_calls,
    replicas_wanted,
    server_loads,
)
from servegraph.deploy.scaling.settings import Bounds, GraphScaling
from servegraph.deploy.simulated import Curves

SERVER = "llm"
CONTROL_LOOP_S = 0.25  # Serve's controller loop here (`local_ray.RAY_AT_REST_ENV`)
# the graph-aware policy's defaults
SHORT_S = GraphScaling.model_fields["short_window_s"].default
LONG_S = GraphScaling.model_fields["long_window_s"].default
UTILISATION = GraphScaling.model_fields["target_utilisation"].default
DOWNSCALE_DELAY_S = Bounds.model_fields["downscale_delay_s"].default

Rule = Callable[[Mapping[str, Arrivals], Mapping[str, Mapping[str, float]], float], Load]


def per_pipeline(k: int) -> Rule:
    """Each pipeline's short window believed at `k` arrivals (`Arrivals.load`)."""

    def rule(
        arr: Mapping[str, Arrivals], mixes: Mapping[str, Mapping[str, float]], now: float
    ) -> Load:
        rates = {p: a.load(SHORT_S, LONG_S, now, min_arrivals=k) for p, a in arr.items()}
        return server_loads(rates, mixes).get(SERVER, Load())

    return rule


def pooled(k: int) -> Rule:
    """The short windows of every pipeline that calls the server believed together, at
    `k` arrivals between them."""

    def rule(
        arr: Mapping[str, Arrivals], mixes: Mapping[str, Mapping[str, float]], now: float
    ) -> Load:
        callers = {p: mixes[p].get(SERVER, 0.0) for p in arr if mixes[p].get(SERVER, 0.0)}
        short = sum(arr[p].rate(SHORT_S, now) * c for p, c in callers.items())
        long = sum(arr[p].rate(LONG_S, now) * c for p, c in callers.items())
        if sum(arr[p].count(SHORT_S, now) for p in callers) < k:
            short = min(short, long)
        return Load(short, long)

    return rule


RULES: dict[str, Rule] = {
    **{f"pipeline-{k}": per_pipeline(k) for k in (5, 4, 3, 2)},
    **{f"pooled-{k}": pooled(k) for k in (5, 4, 3)},
}


def replay(
    schedule: list[Sent],
    rule: Rule,
    mixes: Mapping[str, Mapping[str, float]],
    service_time_s: float,
    *,
    start: float,
    end: float,
    replicas: int = 1,
    first_only: bool = True,
) -> list[tuple[float, bool]]:
    """The control-loop ticks from `start` at which the LLM would be asked for more than
    `replicas`, each with whether the short window made it (the long window alone would
    not have). With `first_only`, the first one; else all, each followed by the
    downscale delay."""
    arr = {pipeline: Arrivals() for pipeline in BASE_RATES}
    i, flush, tick = 0, 0.0, start
    ups: list[tuple[float, bool]] = []

    def wanted(load: Load) -> int:
        n = replicas_wanted(load, service_time_s=service_time_s, target_utilisation=UTILISATION)
        return math.ceil(n - 1e-9)  # as Serve rounds it

    while tick < end:
        while flush <= tick:  # the ingress reports what arrived since its last report
            while i < len(schedule) and schedule[i].at <= flush:
                arr[schedule[i].pipeline].add(1, flush)
                i += 1
            flush += FLUSH_S
        load = rule(arr, mixes, tick)
        if wanted(load) > replicas:
            by_short = wanted(Load(long=load.long)) <= replicas
            ups.append((tick, by_short))
            if first_only:
                break
            tick += DOWNSCALE_DELAY_S
        tick += CONTROL_LOOP_S
    return ups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--step", type=float, default=10.0)
    parser.add_argument("--step-at", type=float, default=60.0)
    parser.add_argument("--hours", type=float, default=4.0, help="of base-rate arrivals")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from servegraph.lang.discovery import discover

    graphs = discover("pipelines")
    mixes = {name: prior_calls(graphs[name]) for name in BASE_RATES}
    service_time_s = service_times(Curves.model_validate_json(CURVES.read_text()))[SERVER]
    rest = arrivals(99, 1.0, args.hours * 3600, 0.0, 0.0)
    out: dict[str, dict[str, object]] = {}
    decided: dict[str, list[float | None]] = {}
    by_short: dict[str, float] = {}
    for name, rule in RULES.items():
        firsts: list[float | None] = []
        for seed in args.seeds:
            schedule = arrivals(seed, args.step, args.step_at, 180.0, 60.0)
            start, end = args.step_at - 30, args.step_at + 60
            ups = replay(schedule, rule, mixes, service_time_s, start=start, end=end)
            firsts.append(round(ups[0][0] - args.step_at, 2) if ups else None)
        end = args.hours * 3600
        idle = replay(rest, rule, mixes, service_time_s, start=LONG_S, end=end, first_only=False)
        decided[name] = firsts
        by_short[name] = round(sum(s for _, s in idle) / args.hours, 2)
        out[name] = {
            "first_decision_s": dict(zip(args.seeds, firsts, strict=True)),
            "scale_ups_per_hour_at_rest": round(len(idle) / args.hours, 2),
            "of_them_by_the_short_window": by_short[name],
        }
        mark = " (the platform's)" if name == f"pipeline-{SHORT_MIN_ARRIVALS}" else ""
        print(
            f"{name}{mark}: step -> LLM's first scale-up, seeds {args.seeds}: {firsts} s; "
            f"at the base rate alone {out[name]['scale_ups_per_hour_at_rest']} scale-ups "
            f"an hour, {out[name]['of_them_by_the_short_window']} of them by the short window",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    ours = f"pipeline-{SHORT_MIN_ARRIVALS}"
    report.save(
        "spike_decisions",
        [
            Figure(
                "LLM: step to first scale-up decision, replayed, slowest seed",
                max((v for v in decided[ours] if v is not None), default=math.nan),
                None,
                "s",
                "<= 1",
                higher_is_better=False,
            ),
            Figure(
                "LLM: scale-ups an hour at the base rate alone, made by the short window",
                by_short[ours],
                None,
                "/h",
                "",
                higher_is_better=False,
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
