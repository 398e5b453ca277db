"""`make run`'s command, `servegraph run`, end to end: it starts its own local Ray,
deploys every model server and pipeline, prints the endpoints and serves until told to
stop. A pipeline answers over HTTP meanwhile, and SIGTERM shuts everything down.

It runs with `--ingress haproxy`, the option the rest of the suite does not use (its
shared cluster answers HTTP with Serve's proxy, the default): HAProxy's files in a
private directory, removed at the end, and keys checked behind it too."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from servegraph.deploy.local_ray import free_port
from servegraph.security.client import client_headers

pytestmark = pytest.mark.own_cluster


def test_servegraph_run_serves_every_pipeline_until_stopped() -> None:
    port, dashboard = free_port(), free_port()
    env = {
        **os.environ,
        "SERVEGRAPH_INDEX_PATH": tempfile.mkdtemp(prefix="servegraph-run-"),
        "PYTHONUNBUFFERED": "1",  # its progress lines as they come, through the pipe
        "COLUMNS": "200",  # rich wraps at 80 columns without a terminal
    }
    command = [str(Path(sys.executable).with_name("servegraph")), "run"]
    child = subprocess.Popen(
        [*command, "--port", str(port), "--dashboard-port", str(dashboard), "--ingress", "haproxy"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            if "serving; Ctrl-C to stop" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 900
        while not serving.wait(1):
            assert child.poll() is None, "".join(lines[-40:])
            assert time.monotonic() < deadline, "".join(lines[-40:])
        printed = "".join(lines)
        assert (
            "all applications RUNNING" in printed and f"127.0.0.1:{port}/pipelines/rag" in printed
        )
        answer = httpx.post(
            f"http://127.0.0.1:{port}/pipelines/rag",
            json={"question": "How long do refunds take after a return?", "max_tokens": 48},
            headers=client_headers(),
            timeout=120,
        )
        assert answer.status_code == 200 and answer.json()["answer"], answer.text
        keyless = httpx.post(f"http://127.0.0.1:{port}/pipelines/rag", json={}, timeout=30)
        assert keyless.status_code == 401, keyless.text
        (private,) = [
            config.parent.parent
            for config in Path("/tmp").glob("sgh-*/*/haproxy.cfg")
            if f"bind 127.0.0.1:{port}\n" in config.read_text()
        ]
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=180)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
        reader.join(timeout=10)
    assert code == 0, "".join(lines[-40:])
    assert not private.exists()
    with pytest.raises(httpx.ConnectError):  # HAProxy went with the platform
        httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=5)
