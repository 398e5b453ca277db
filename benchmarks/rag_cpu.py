"""What a `rag` request costs in CPU, process by process, on the platform and in the
monolith (`benchmarks/monolith.py`: the same pipeline in one process with vLLM's engine),
side by side in one run: where the platform's CPU goes on a pipeline request, and how
much of the machine is left to the LLM.

    .venv/bin/python -m benchmarks.rag_cpu [--callers 4] [--seconds 60] [--pinned] [--json PATH]

Each contender gets `--callers` closed-loop callers asking `benchmarks.pipelines`'
questions (the platform's answer cache bypassed, `benchmarks.load.UNCACHED`), a warm-up,
then a steady window in which every process's CPU time is read (psutil). Reported per
answered request, in CPU-ms, by role: the client (this process), each of the platform's
Serve replicas, its proxy, controller and Ray's daemons, and the LLM's engine split into
vLLM's engine core (scheduling; it also busy-polls its queues while it waits, so its
CPU grows with what is free) and its worker (the forward pass). Beside them: answers/s,
the mean answer's length (the same questions, so a longer answer means more tokens),
and the machine's idle CPU. The window runs until the last caller's last answer, so a
little past `--seconds`; requests that failed are reported, and their CPU is in the
figures per answered request. On the platform's side the client is also Ray's driver.

On a CPU machine the LLM's worker is the work: the ratio of answers/s is about the ratio
of the worker's CPU per second, and everything else on the platform's side (at rest
included: each replica's metric pushes and health checks) is CPU the worker did not get.

`--partitions` runs the platform once per CPU partition named (`LLMSettings.cpu_partition`,
`deployments.llm.partition`: `off`, `shared`, `exclusive`); by default the shipped one
(`off`), then the others. vLLM binds its worker to all cores but one and leaves the rest to "other
processes"; the monolith's few other processes fit there, the platform's do not unless
the partition moves them, and at nice 19 the worker yields its core to them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import psutil

from benchmarks import cpu, report, traffic
from benchmarks.load import UNCACHED
from benchmarks.pipelines import QUESTIONS
from benchmarks.report import Figure
from benchmarks.speed import running_monolith
from deployments.llm.partition import ENV as PARTITION_ENV
from deployments.llm.partition import Mode
from deployments.llm.settings import LLMSettings
from servegraph.security.client import client_headers

DEADLINE_S = 120  # the work, not a deadline: `callers`' client waits this long too


@dataclass
class Run:
    contender: str
    callers: int
    seconds: float
    answered: int
    failed: dict[str, int]
    answer_chars: float  # the mean answer's length
    cpu_s: dict[str, float] = field(default_factory=dict)
    busiest: dict[str, float] = field(default_factory=dict)
    idle_cores: float = 0.0

    @property
    def per_s(self) -> float:
        return self.answered / self.seconds

    def ms_per_request(self, role: str) -> float:
        return 1000 * self.cpu_s.get(role, 0.0) / max(self.answered, 1)


def llm_role(cmdline: str) -> str | None:
    """vLLM's processes, split: the engine core and the worker (the forward pass)."""
    if "VLLM::Worker" in cmdline:
        return "llm worker (forward pass)"
    if "EngineCore" in cmdline:
        return "llm engine core"
    return None


def platform_role(_pid: int, cmdline: str) -> str | None:
    return llm_role(cmdline) or cpu.platform_role(cmdline)


def monolith_role(root: int) -> Callable[[int, str], str | None]:
    family = {root} | {p.pid for p in psutil.Process(root).children(recursive=True)}

    def role(pid: int, cmdline: str) -> str | None:
        if pid not in family:
            return None
        return llm_role(cmdline) or (
            "monolith (HTTP, embedder, index)" if pid == root else "monolith, other"
        )

    return role


def drive(
    base_url: str, path: str, headers: dict[str, str], n: int, seconds: float
) -> tuple[int, dict[str, int], list[int]]:
    """`n` closed-loop callers (`benchmarks.traffic.callers`) for `seconds`: (answered,
    failures by status, 0 for none, the answers' lengths)."""
    answers = asyncio.run(
        traffic.callers(
            base_url,
            path,
            lambda c, i: {"question": QUESTIONS[(c + i * n) % len(QUESTIONS)]},
            n=n,
            stop=asyncio.Event(),  # never set: `seconds` ends the run
            max_requests=10_000,
            max_seconds=seconds,
            headers=headers,
        )
    )
    lengths = [len(a.body["answer"]) for a in answers if a.status == 200]
    failed = Counter(str(a.status) for a in answers if a.status != 200)
    return len(lengths), dict(failed), lengths


def measure(
    contender: str,
    base_url: str,
    path: str,
    headers: dict[str, str],
    role: Callable[[int, str], str | None],
    callers: int,
    seconds: float,
    warmup: float,
) -> Run:
    drive(base_url, path, headers, callers, warmup)
    client = os.getpid()

    def classify(pid: int, cmdline: str) -> str | None:
        return "client" if pid == client else role(pid, cmdline)

    started = time.perf_counter()
    with cpu.measured(classify) as out:
        answered, failed, lengths = drive(base_url, path, headers, callers, seconds)
    # the window ends when the last caller's last request is answered
    window = out[0]
    run = Run(
        contender,
        callers,
        time.perf_counter() - started,
        answered,
        failed,
        statistics.mean(lengths) if lengths else 0.0,
        dict(window.cpu_s),
        dict(window.busiest),
        window.idle_cores,
    )
    print(describe(run), flush=True)
    return run


def on_platform(callers: int, seconds: float, warmup: float, partition: str) -> Run:
    from benchmarks.platform_up import serving_everything

    os.environ[PARTITION_ENV] = partition  # the LLM's app is built in this process
    with serving_everything(dashboard=False) as cluster:
        headers = client_headers() | UNCACHED | {"X-Request-Timeout": str(DEADLINE_S)}
        return measure(
            f"platform, partition {partition}",
            cluster.base_url,
            "/pipelines/rag",
            headers,
            platform_role,
            callers,
            seconds,
            warmup,
        )


def on_monolith(callers: int, seconds: float, warmup: float) -> Run:
    with running_monolith() as (base_url, root):
        return measure(
            "monolith", base_url, "/rag", {}, monolith_role(root), callers, seconds, warmup
        )


def describe(run: Run) -> str:
    lines = [
        f"{run.contender}: {run.answered} answers in {run.seconds:.1f} s = {run.per_s:.3f}/s "
        f"({run.callers} callers; failed {run.failed or 'none'}), mean answer "
        f"{run.answer_chars:.0f} chars, machine idle {run.idle_cores * 100:.0f} % of a core"
    ]
    for role, spent in sorted(run.cpu_s.items(), key=lambda kv: -kv[1]):
        lines.append(
            f"  {role:38s} {run.ms_per_request(role):8.1f} CPU-ms/request "
            f"({spent / run.seconds * 100:5.1f} % of a core; busiest process "
            f"{run.busiest.get(role, 0.0) * 100:.0f} %)"
        )
    return "\n".join(lines)


def table(runs: list[Run]) -> str:
    """Markdown: one row per role, CPU-ms per request for each contender."""
    roles = sorted(
        {r for run in runs for r in run.cpu_s},
        key=lambda r: -max(run.ms_per_request(r) for run in runs),
    )
    head = "| role | " + " | ".join(f"{run.contender}, CPU-ms / request" for run in runs) + " |"
    rows = [head, "| --- |" + " --- |" * len(runs)]
    rows.append("| answers/s | " + " | ".join(f"{run.per_s:.3f}" for run in runs) + " |")
    for role in roles:
        cells = [f"{run.ms_per_request(role):.0f}" if role in run.cpu_s else "-" for run in runs]
        rows.append(f"| {role} | " + " | ".join(cells) + " |")
    totals = [sum(run.cpu_s.values()) / max(run.answered, 1) * 1000 for run in runs]
    rows.append("| all | " + " | ".join(f"{t:.0f}" for t in totals) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="each steady window")
    parser.add_argument("--warmup", type=float, default=15.0)
    parser.add_argument(
        "--partitions",
        default=",".join(dict.fromkeys([LLMSettings().cpu_partition, *get_args(Mode)])),
        help="the platform once per CPU partition named, comma-separated (off, shared, "
        "exclusive; default: the shipped one, then the others); the first is the "
        "headline figure's",
    )
    parser.add_argument("--json", type=Path, help="write the runs here too")
    args = parser.parse_args(argv)
    if args.callers < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--callers must be at least 1, --seconds above 0, --warmup at least 0")
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    if not partitions or set(partitions) - set(get_args(Mode)):
        parser.error(f"--partitions: comma-separated, of {', '.join(get_args(Mode))}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    monolith = on_monolith(args.callers, args.seconds, args.warmup)
    runs = [on_platform(args.callers, args.seconds, args.warmup, p) for p in partitions]
    platform = runs[0]
    runs.append(monolith)
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps([asdict(run) for run in runs], indent=2))
    worker = "llm worker (forward pass)"
    report.save(
        "rag_cpu",
        [
            Figure(
                f"rag answers/s, {args.callers} closed-loop callers, platform "
                f"(partition {partitions[0]}) / monolith",
                platform.per_s,
                monolith.per_s,
                "answers/s",
                ">= 1",
            ),
            Figure(
                "the LLM worker's share of the machine while rag runs, platform / monolith",
                platform.cpu_s.get(worker, 0.0) / platform.seconds,
                monolith.cpu_s.get(worker, 0.0) / monolith.seconds,
                "cores",
                ">= 1",
            ),
        ],
    )


if __name__ == "__main__":
    main()
