"""`make bench`: every benchmark, one after another, each in its own process (each
starts and stops its own local Ray cluster), with what each printed, then one table of
every figure against its reference and target (`benchmarks.report`).

    .venv/bin/python -m benchmarks.run_all [name ...]
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks import report

BENCHMARKS = [
    "model_servers",
    "path_cpu",
    "speed",
    "rag_cpu",
    "graph_overhead",
    "pipelines",
    "tracing_overhead",
    "reliability",
    "eval_pipelines",
    "batch",
    "cost",
    "cold_start",
    "spike_decisions",
    "runs",
    "versions",
    "tenants",
    "tenant_fuzz",
    "cache",
    "console",
    "chaos_runs",  # its own platform, killed three times: about 20 minutes
]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        started = time.perf_counter()
        report.clear(name)  # a benchmark that fails leaves no figures from an older run
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        print(f"=== benchmarks.{name}: exit {code} in {time.perf_counter() - started:.0f}s ===")
        if code:
            failed.append(name)
    figures = [f for name in names for f in report.load(name)]
    if figures:
        print("\n=== figures (platform against its reference, this run) ===")
        print(report.table(figures))
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
