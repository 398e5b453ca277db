"""`kill -9` of the ingress replica while runs of `refund` are being started: every run
it was executing is adopted by the restarted replica once its lease lapses
(`servegraph.serving.runs.Keeper`) and goes on from its checkpoints to the approval;
every run the platform acknowledged (202) is there, waiting; none is left `running`."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
import time
from collections import Counter
from contextlib import closing

import httpx
import pytest

from benchmarks.traffic import replica_pids, until
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from servegraph.security.keys import AuthSettings, KeyStore
from servegraph.serving.ingress import INGRESS_APP
from servegraph.settings import AppSettings

pytestmark = pytest.mark.reliability
TICKET = {"text": "Please refund order 14550, it never came.", "email": "ana@example.com"}
CALLERS = 16


def runs_of(starter: str) -> dict[str, dict]:
    """This test's runs, read from the run store itself (what any replica reads)."""
    with closing(sqlite3.connect(AppSettings().runs_path, timeout=30)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM runs WHERE started_by = ?", (starter,)).fetchall()
    return {row["run_id"]: dict(row) for row in rows}


def test_runs_whose_ingress_is_killed_are_adopted_and_reach_their_approval(
    pipelines: LocalCluster,
) -> None:
    starter = f"it-recovery-{secrets.token_hex(4)}"
    key = KeyStore(AuthSettings().store_path).create(starter, ["invoke:refund"])
    dashboard = str(pipelines.dashboard_url)
    answers: list[httpx.Response | str] = []
    stop = asyncio.Event()

    async def caller(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                answer = await client.post("/pipelines/refund", json=TICKET)
            except httpx.HTTPError as exc:  # the connection the kill cut
                answers.append(type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            answers.append(answer)
            if answer.status_code != 202:  # as a client should: after its Retry-After
                await asyncio.sleep(float(answer.headers.get("retry-after", 0.5)))

    def pids() -> list[int]:
        return replica_pids(dashboard, INGRESS_APP, "PipelineIngress")

    def accepted() -> int:
        return sum(isinstance(a, httpx.Response) and a.status_code == 202 for a in answers)

    async def load() -> set[str]:
        headers = {"Authorization": f"Bearer {key}", "X-Request-Timeout": "60"}
        async with httpx.AsyncClient(
            base_url=pipelines.base_url, headers=headers, timeout=90
        ) as client:
            callers = [asyncio.create_task(caller(client)) for _ in range(CALLERS)]
            try:
                await until(lambda: accepted() >= CALLERS, 120, "no run started before the kill")
                victim = pids()[0]
                killed = time.time()
                os.kill(victim, signal.SIGKILL)
                # What it was executing when it died (started before the kill, still
                # running): nothing changes them until they are adopted.
                await until(lambda: victim not in pids(), 60, "the replica did not die")
                cut = {
                    i
                    for i, r in runs_of(starter).items()
                    if r["status"] == "running" and r["created"] < killed
                }
                await until(
                    lambda: bool(set(pids()) - {victim}),
                    180,
                    "no new ingress replica",
                )
                base = accepted()
                await until(lambda: accepted() >= base + CALLERS, 180, "no runs after the restart")
                return cut
            finally:
                stop.set()
                await asyncio.gather(*callers)

    cut = asyncio.run(load())

    # Every run ends up waiting at the approval, those cut off adopted; none stays running.
    async def settled() -> None:
        await until(
            lambda: all(r["status"] != "running" for r in runs_of(starter).values()),
            120,
            "runs left running",
        )

    asyncio.run(settled())
    runs = runs_of(starter)
    statuses = Counter(r["status"] for r in runs.values())
    assert statuses == {"waiting": len(runs)}, statuses
    # A run cut off by the kill is adopted (a second ingress replica, where there is
    # one, may have been executing some of them: those end without a takeover).
    assert not cut or any(runs[i]["adopted"] >= 1 for i in cut), [runs[i] for i in cut]
    replied = [a for a in answers if isinstance(a, httpx.Response)]
    acknowledged = [a.json()["run_id"] for a in replied if a.status_code == 202]
    assert set(acknowledged) <= set(runs)  # nothing acknowledged is lost
    # The calls the kill cut get an error (a 502 naming the lost replica, or the
    # connection's);
    # each of their runs is recorded and adopted like the rest.
    others = Counter(a.status_code for a in replied if a.status_code != 202)
    others.update(a for a in answers if isinstance(a, str))
    sample = [a.text[:200] for a in replied if a.status_code != 202][:2]
    assert 500 not in others, sample  # the proxy's answer names the lost replica: 502
    print(f"runs: {len(runs)}, cut by the kill and adopted: {len(cut)}, others: {others} {sample}")

    # An adopted run is decided like any other.
    with httpx.Client(base_url=pipelines.base_url, headers=client_headers(), timeout=60) as admin:
        for run_id in sorted(cut)[:1]:
            done = admin.post(
                f"/pipelines/refund/runs/{run_id}/decision", json={"decision": "reject"}
            )
            assert done.status_code == 200 and done.json()["status"] == "rejected", done.text
