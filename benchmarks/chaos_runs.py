"""The chaos run of issue 27: `triage` runs that propose an action (a refund or a
cancellation of the customer's order), decided by a person, while the platform's
processes are killed with SIGKILL at chosen points:

1. the runs are started, `--concurrency` at a time; a third of the way in, the ingress
   replica is killed (runs it was executing are adopted from their checkpoints);
2. every waiting run is approved, `--concurrency` at a time; a third of the way in,
   the records server's replica is killed (the action is repeated under its key), and
   two thirds of the way in, every process of the platform (then it is started again
   on the same files: runs, checkpoints, records);
3. decisions the kills cut off (the run still waits) are sent again, as a client would.

Then, from the run store and the records database themselves: how many actions were
applied twice (keys or orders), how many approved actions were lost (an approved run
without its action's key recorded, or not finished), and the runs' states.

It runs its own platform (`servegraph run`) in a fresh home (the prepared models linked
in), in its own process tree, tagged so that the kills reach it and nothing else.

    .venv/bin/python -m benchmarks.chaos_runs [--runs 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks import cpu
from benchmarks.report import Figure, save
from benchmarks.traffic import TAG, kill_all, tagged

# (order, its customer, what the ticket asks): the seed's orders (deployments/records).
ASKS = [
    ("12345", "ana@example.com", "Please refund order {n}, it never came."),
    ("14550", "ana@example.com", "I want my money back for order {n}, it is late."),
    ("10234", "sam@example.com", "Please refund order {n}, the desk arrived broken."),
    ("11872", "lee@example.com", "Please cancel my order {n}, I ordered it twice."),
    ("13007", "kim@example.com", "Refund order {n} please, it was returned to you."),
]


class Platform:
    """`servegraph run` in its own process tree, on `home`."""

    def __init__(self, home: Path, tag: str) -> None:
        from servegraph.deploy.local_ray import free_port

        self.home, self.tag = home, tag
        self.port, self.dashboard = free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.child: subprocess.Popen[str] | None = None

    def start(self) -> float:
        """Start it; seconds until every pipeline serves."""
        started = time.monotonic()
        env = {**os.environ, TAG: self.tag, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        command = [str(Path(sys.executable).with_name("servegraph")), "run"]
        self.child = subprocess.Popen(
            [*command, "--port", str(self.port), "--dashboard-port", str(self.dashboard)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        serving = threading.Event()
        lines: list[str] = []

        def read() -> None:
            assert self.child is not None and self.child.stdout is not None
            for line in self.child.stdout:
                lines.append(line)
                if "serving; Ctrl-C to stop" in line:
                    serving.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 900
        while not serving.wait(1):
            if self.child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the platform did not start:\n" + "".join(lines[-30:]))
        return time.monotonic() - started

    def kill_replica(self, title: str) -> int:
        """SIGKILL the replica whose process title holds `title`; its pid."""
        for proc in tagged(self.tag):
            try:
                if title in " ".join(proc.cmdline()):
                    proc.send_signal(signal.SIGKILL)
                    return int(proc.pid)
            except psutil.NoSuchProcess:
                continue
        raise RuntimeError(f"no live replica {title}")

    def kill_all(self) -> int:
        return kill_all(self.tag)

    def stop(self) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.child.wait(timeout=120)
        self.kill_all()


async def each(items: list[Any], concurrency: int, work: Any, at: dict[int, Any]) -> list[Any]:
    """`work(item)` for every item, `concurrency` at a time; `at[k]()` runs (in a
    thread) once the k-th item has been answered."""
    results: list[Any] = [None] * len(items)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(len(items)):
        queue.put_nowait(n)
    answered = 0
    fired: set[int] = set()

    async def worker() -> None:
        nonlocal answered
        while not queue.empty():
            n = queue.get_nowait()
            results[n] = await work(items[n])
            answered += 1
            for k, event in sorted(at.items()):
                if answered >= k and k not in fired:
                    fired.add(k)
                    await asyncio.to_thread(event)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def store_rows(path: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    with closing(sqlite3.connect(path, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        return db.execute(sql, params).fetchall()


def settled(runs_db: Path) -> list[str]:
    """Once no run is `running` (adopted ones resumed; bounded at 300 s), the ids of
    the runs waiting for a decision."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and store_rows(
        runs_db, "SELECT 1 FROM runs WHERE status = 'running'"
    ):
        time.sleep(1)
    rows = store_rows(runs_db, "SELECT run_id FROM runs WHERE status = 'waiting'")
    return [r["run_id"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    from deployments.settings import ModelSettings

    models = ModelSettings().home / "models"
    home = Path(tempfile.mkdtemp(prefix="servegraph-chaos-"))
    (home / "models").symlink_to(models)  # the prepared models; everything else fresh
    os.environ["SERVEGRAPH_HOME"] = str(home)
    os.environ.pop("SERVEGRAPH_API_KEY", None)  # the fresh platform's own admin key
    os.environ.pop("SERVEGRAPH_RUNS", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from servegraph.security.client import client_headers

    platform = Platform(home, uuid.uuid4().hex)
    events: list[str] = []
    try:
        up_s = platform.start()
        events.append(f"platform up in {up_s:.0f}s")
        headers = client_headers() | {"X-Request-Timeout": "300"}
        tickets = [
            {"text": text.format(n=order), "email": email}
            for order, email, text in (ASKS[i % len(ASKS)] for i in range(args.runs))
        ]

        async def start_all() -> tuple[list[Any], float]:
            async with httpx.AsyncClient(
                base_url=platform.base_url, headers=headers, timeout=600
            ) as client:

                async def one(ticket: dict) -> Any:
                    for _ in range(5):  # a client retries what the kill cut off
                        try:
                            answer = await client.post("/pipelines/triage", json=ticket)
                        except httpx.HTTPError as exc:
                            events.append(f"start: {type(exc).__name__}")
                            await asyncio.sleep(2)
                            continue
                        if answer.status_code in (502, 503):
                            events.append(f"start: {answer.status_code}")
                            await asyncio.sleep(float(answer.headers.get("retry-after", 2)))
                            continue
                        return answer.status_code, answer.json()
                    return None, None

                def kill_ingress() -> None:
                    pid = platform.kill_replica("ServeReplica:pipelines:PipelineIngress")
                    events.append(f"killed the ingress replica (pid {pid}) while starting")

                started = time.monotonic()
                answers = await each(tickets, args.concurrency, one, {args.runs // 3: kill_ingress})
                return answers, time.monotonic() - started

        with cpu.measured() as used:
            started_answers, start_s = asyncio.run(start_all())
        runs_db = home / "runs" / "runs.sqlite3"
        # Runs the ingress kill cut off (their callers got an error and retried) are
        # adopted by the restarted replica.
        waiting = settled(runs_db)
        statuses_after_start = Counter(
            r["status"] for r in store_rows(runs_db, "SELECT status FROM runs")
        )

        async def decide_all(run_ids: list[str], chaos: bool) -> list[Any]:
            async with httpx.AsyncClient(
                base_url=platform.base_url, headers=headers, timeout=600
            ) as client:

                async def one(run_id: str) -> Any:
                    try:
                        answer = await client.post(
                            f"/pipelines/triage/runs/{run_id}/decision",
                            json={"decision": "approve"},
                        )
                    except httpx.HTTPError as exc:
                        return type(exc).__name__
                    return answer.status_code

                def kill_records() -> None:
                    pid = platform.kill_replica("ServeReplica:records:SupportRecords")
                    events.append(f"killed the records replica (pid {pid}) while deciding")

                def kill_everything() -> None:
                    killed = platform.kill_all()
                    events.append(f"killed all {killed} processes of the platform")
                    if platform.child is not None:
                        platform.child.wait(timeout=60)
                    again = platform.start()
                    events.append(f"platform up again in {again:.0f}s")

                at = {len(run_ids) // 3: kill_records, 2 * len(run_ids) // 3: kill_everything}
                return await each(run_ids, args.concurrency, one, at if chaos else {})

        decided = Counter(asyncio.run(decide_all(waiting, chaos=True)))
        rounds = 0
        while rounds < 5:  # decisions the kills cut off: the run still waits
            left = settled(runs_db)
            if not left:
                break
            rounds += 1
            events.append(f"decided again: {len(left)} runs still waiting (round {rounds})")
            decided.update(asyncio.run(decide_all(left, chaos=False)))

        runs = store_rows(runs_db, "SELECT * FROM runs")
        records_db = home / "records" / "support.sqlite3"
        keys = Counter(r["key"] for r in store_rows(records_db, "SELECT key FROM applied_actions"))
        refunds = store_rows(records_db, "SELECT order_id FROM refunds")
        approved = [
            r for r in runs if any(d["decision"] == "approve" for d in json.loads(r["decisions"]))
        ]
        lost = []
        for run in approved:
            output = json.loads(run["output"]) if run["output"] else None
            key_found = any(k.startswith(f"{run['run_id']}/") for k in keys)
            acted = (output or {}).get("action") or {}
            if (
                run["status"] != "finished"
                or not key_found
                or acted.get("outcome")
                not in (
                    "done",
                    "refused",
                )
            ):
                lost.append((run["run_id"], run["status"], key_found, acted))
        twice = sum(n > 1 for n in keys.values()) + (len(refunds) - len({r[0] for r in refunds}))
        states = Counter(r["status"] for r in runs)
        defined = {"finished", "rejected", "expired", "failed", "waiting"}
        undefined = sum(n for s, n in states.items() if s not in defined)
        outcomes = Counter(
            ((json.loads(r["output"]) or {}).get("action") or {}).get("outcome")
            for r in runs
            if r["output"]
        )
        print(
            json.dumps(
                {
                    "runs_started": len(runs),
                    "start_answers": dict(Counter(a[0] for a in started_answers if a is not None)),
                    "start_s": round(start_s, 1),
                    "statuses_after_start": dict(statuses_after_start),
                    "decision_answers": dict(decided),
                    "states": dict(states),
                    "outcomes": dict(outcomes),
                    "adopted_runs": sum(1 for r in runs if r["adopted"]),
                    "applied_keys": len(keys),
                    "refunds": len(refunds),
                    "applied_twice": twice,
                    "approved_actions_lost": len(lost),
                    "lost": lost[:5],
                    "events": events,
                    "cpu_by_process_start_phase": used[0].rows()[:8],
                },
                indent=1,
                default=str,
            )
        )
        save(
            "chaos_runs",
            [
                Figure("chaos: actions applied twice", twice, None, "actions", "<= 0", False),
                Figure("chaos: approved actions lost", len(lost), None, "actions", "<= 0", False),
                Figure(
                    "chaos: runs not in a defined state", undefined, None, "runs", "<= 0", False
                ),
                Figure(
                    "chaos: runs started (triage, proposing an action)",
                    len(runs),
                    None,
                    "runs",
                    ">= 200",
                ),
            ],
        )
    finally:
        platform.stop()
        shutil.rmtree(home, ignore_errors=True)  # the models link goes, not the models


if __name__ == "__main__":
    main()
