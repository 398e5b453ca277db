"""`kill -9` of every process of a running platform in the middle of concurrent
ingestion, then a restart on the same index folder: no acknowledged document is missing.

It runs a second, small platform (embedder, index, `rag_ingest`) in its own process
tree, tagged by an environment variable that every process of that tree inherits, so
the kill reaches all of them (GCS, raylet, HAProxy and Serve's proxies, replicas) and
nothing else.

That platform answers HTTP with HAProxy (`ingress="haproxy"`): its files lie in a private
directory (mode 0700), it checks keys behind HAProxy too, and a clean stop (SIGTERM) takes
HAProxy and the directory with it. A `kill -9` leaves the directory behind (nothing of
the platform runs to remove it): the test removes it. On the restarted platform the
pipelines ingress's replica is then killed mid-request: no caller gets a bare 500, and
what HAProxy answers for its own errors is the platform's 502 with Retry-After
(`servegraph.serving.haproxy_answers`), not Serve's bare 500."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from benchmarks.traffic import TAG, callers, kill_all, kill_under_load, one_document, tagged
from servegraph.deploy.local_ray import LocalCluster, free_port
from servegraph.security.client import client_headers
from servegraph.serving import haproxy_answers

pytestmark = pytest.mark.reliability


def start(index: Path, tag: str) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        TAG: tag,
        "SERVEGRAPH_INDEX_PATH": str(index),
        "OTEL_TRACES_EXPORTER": "none",
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.ingest_platform", str(free_port())],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    assert child.stdout is not None
    for line in child.stdout:  # bounded: the child raises after 600 s itself
        if line.startswith("READY "):
            return child, line.split()[1]
        if time.monotonic() > deadline:
            break
    child.kill()
    raise RuntimeError(f"the ingest platform did not start (exit {child.poll()})")


def haproxy_folder(base_url: str, since: float) -> Path:
    """The private directory of the HAProxy that listens on `base_url`'s port, made
    after `since` (a folder an earlier run left may name the same port)."""
    port = base_url.rsplit(":", 1)[1]
    (folder,) = [
        config.parent.parent
        for config in Path("/tmp").glob("sgh-*/*/haproxy.cfg")
        if config.parent.parent.stat().st_mtime >= since - 1
        and f"bind 127.0.0.1:{port}\n" in config.read_text()
    ]
    return folder


def error_files(folder: Path) -> set[str]:
    """What HAProxy sends for its own errors: the files its configuration's `errorfile`
    lines name (Serve's one file for 502, 503 and 504)."""
    named = {
        line.split()[2]
        for config in folder.glob("*/haproxy.cfg")
        for line in config.read_text().splitlines()
        if line.strip().startswith("errorfile ")
    }
    assert named, "HAProxy's configuration names no error file"
    return {Path(path).read_bytes().decode() for path in named}


def ingress_replicas(tag: str) -> list[int]:
    """The PIDs of the tagged platform's pipelines ingress replicas (it has no dashboard
    to ask Ray's state API)."""
    return [
        p.pid
        for p in tagged(tag)
        if "ServeReplica:pipelines:PipelineIngress" in " ".join(p.cmdline())
    ]


def test_kill_9_of_the_whole_cluster_mid_ingest_loses_no_acknowledged_document(
    pipelines: LocalCluster, tmp_path: Path
) -> None:
    # `pipelines` only orders this after the shared cluster's own setup; the platform
    # under test is a separate one.
    tag, run = uuid.uuid4().hex, uuid.uuid4().hex[:8]
    index = tmp_path / "index"
    started = time.time()
    child, base_url = start(index, tag)
    folders: list[Path] = []
    answers: list = []
    try:
        folders.append(haproxy_folder(base_url, started))

        async def ingest_then_kill() -> int:
            stop = asyncio.Event()
            load = asyncio.ensure_future(
                callers(
                    base_url,
                    "/pipelines/rag_ingest",
                    one_document(run, "refunds take 5 days."),
                    n=8,
                    stop=stop,
                    max_requests=2_000,
                    max_seconds=180,
                    answers=answers,
                )
            )
            deadline = time.monotonic() + 180
            while sum(a.status == 200 for a in answers) < 60 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            killed = await asyncio.to_thread(kill_all, tag)  # mid-flight: 8 in progress
            stop.set()
            await load
            return killed

        killed = asyncio.run(ingest_then_kill())
    finally:
        kill_all(tag)
        child.wait(timeout=60)
        for folder in folders:  # left by the kill
            shutil.rmtree(folder, ignore_errors=True)
    acknowledged = [a.body["documents"][0]["id"] for a in answers if a.status == 200]
    assert killed > 3 and len(acknowledged) >= 60, (killed, len(acknowledged))

    started = time.time()
    child, base_url = start(index, tag)
    folders, code, ingress_kill, haproxys_errors = [], None, [], set()
    try:
        folders.append(haproxy_folder(base_url, started))
        assert stat.S_IMODE(folders[0].stat().st_mode) == 0o700
        keyless = httpx.post(f"{base_url}/pipelines/rag_ingest", json={}, timeout=30)
        assert keyless.status_code == 401, keyless.text
        with httpx.Client(headers=client_headers(), base_url=base_url, timeout=60) as client:
            missing = [
                doc_id
                for doc_id in acknowledged
                if client.post("/index/count", json={"filter": {"doc_id": doc_id}}).json()["count"]
                != 1
            ]
        haproxys_errors = error_files(folders[0])
        # 8 callers ingest; once 20 are acknowledged, the ingress's replica is killed
        # (mid-request: HAProxy loses what it had sent it), and the load goes on until a
        # new replica has acknowledged 20 more
        ingress_kill = kill_under_load(
            base_url,
            "/pipelines/rag_ingest",
            one_document(f"{run}-ingress", "parcels ship on weekdays."),
            replicas=lambda: ingress_replicas(tag),
            n=8,
            before=20,
            after=20,
            max_requests=2_000,
            max_seconds=240,
        ).answers
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=120)
        finally:
            kill_all(tag)
            left = [folder for folder in folders if folder.exists()]
            for folder in left:
                shutil.rmtree(folder, ignore_errors=True)
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged documents lost"
    # What the callers got while the ingress replica was killed: answers, or JSON errors
    # with Retry-After, never a bare 500. (0: no answer, a connection closed as HAProxy
    # reloaded, which is not this test's subject.) HAProxy retried what it had sent the
    # dead replica (on the fallback proxy) in the runs seen, so its own errors did not
    # show; what it would answer is the platform's 502, read above from the file its
    # configuration names.
    failed = [a for a in ingress_kill if a.status not in (0, 200)]
    assert all(
        a.status in (502, 503) and isinstance(a.body, dict) and a.headers.get("retry-after")
        for a in failed
        if a.headers is not None
    ), [(a.status, a.body) for a in failed][:3]
    assert sum(a.status == 200 for a in ingress_kill) >= 40
    assert haproxys_errors == {haproxy_answers.error_file()}, haproxys_errors
    assert code == 0 and not left, (code, left)  # a clean stop takes HAProxy's files
    with pytest.raises(httpx.ConnectError):  # and HAProxy with it
        httpx.get(f"{base_url}/-/healthz", timeout=5)
