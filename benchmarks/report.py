"""Figures the benchmarks measure, side by side with their reference (the raw model, the
monolith), and the one table of ratios `make bench` prints at the end.

Each benchmark process saves its figures to `<SERVEGRAPH_HOME>/bench/<name>.json`;
`benchmarks.run_all` reads them back, so every row comes from the same run.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from deployments.settings import ModelSettings


@dataclass
class Figure:
    name: str
    platform: float
    reference: float | None  # None: an absolute figure, judged against `target` alone
    unit: str
    target: str  # as written in the issue, e.g. ">= 0.8" (a ratio) or "< 100" (the unit)
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.reference:
            return None
        return self.platform / self.reference

    def met(self) -> bool | None:
        op, _, bound = self.target.partition(" ")
        try:
            limit = float(bound)
        except ValueError:
            return None
        value = self.ratio if self.ratio is not None else self.platform
        if value is None or math.isnan(value):
            return None
        return {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[
            op
        ]


def bench_dir() -> Path:
    return ModelSettings().home / "bench"


def save(benchmark: str, figures: list[Figure]) -> Path:
    path = bench_dir() / f"{benchmark}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(f) for f in figures], indent=2))
    print(table(figures))
    return path


def load(benchmark: str) -> list[Figure]:
    path = bench_dir() / f"{benchmark}.json"
    if not path.exists():
        return []
    return [Figure(**f) for f in json.loads(path.read_text())]


def clear(benchmark: str) -> None:
    (bench_dir() / f"{benchmark}.json").unlink(missing_ok=True)


def table(figures: list[Figure]) -> str:
    lines = [
        f"{'figure':58s} {'platform':>10s} {'reference':>10s} {'ratio':>7s} "
        f"{'target':>8s} {'met':>4s}  unit"
    ]
    for f in figures:
        reference = f"{f.reference:10.1f}" if f.reference is not None else f"{'-':>10s}"
        ratio = f"{f.ratio:7.2f}" if f.ratio is not None else f"{'-':>7s}"
        met = {True: "yes", False: "no", None: "?"}[f.met()]
        lines.append(
            f"{f.name:58s} {f.platform:10.1f} {reference} {ratio} {f.target:>8s} {met:>4s}  "
            f"{f.unit}"
        )
    return "\n".join(lines)
