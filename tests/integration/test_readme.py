"""The README's curl examples and the Python client example, run against the cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from servegraph.deploy.local_ray import LocalCluster
from tests.sse import sse_events

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def readme_curl_lines() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.strip().startswith("curl ")
    ]


def test_readme_curl_examples_return_real_answers(pipelines: LocalCluster) -> None:
    lines = readme_curl_lines()
    assert len(lines) >= 3
    outputs = {}
    for line in lines:
        line = line.replace("localhost:8000", pipelines.base_url.removeprefix("http://"))
        # The README reads the key `make run` stored; the suite's is in its own folder.
        assert "var/auth/local-admin.key" in line, "every README call sends the API key"
        local_key = Path(os.environ["SERVEGRAPH_AUTH_KEYS"]).parent / "local-admin.key"
        line = line.replace("var/auth/local-admin.key", str(local_key))
        done = subprocess.run(
            ["bash", "-c", line], capture_output=True, text=True, timeout=300, check=True
        )
        route = re.search(r"/(pipelines/[\w/]+|v1/[\w/]+|records/[\w/]+)", line).group(1)
        if "x-servegraph-max-cost-usd" in line:
            route = "budgeted " + route
        outputs[route] = (
            sse_events(done.stdout) if route.endswith("/stream") else json.loads(done.stdout)
        )
    assert outputs["pipelines/rag"]["answer"] and outputs["pipelines/rag"]["passages"]
    streamed = outputs["pipelines/rag/stream"]
    assert [name for name, _ in streamed][-2:] == ["usage", "result"]
    assert any(name == "chunk" for name, _ in streamed) and streamed[-1][1]["answer"]
    assert outputs["pipelines/triage"]["team"] == "shipping"
    # The maximum-cost example: an answer within it, or 402 naming the node it stopped at.
    budgeted = outputs["budgeted pipelines/rag"]
    assert budgeted.get("answer") or budgeted["error"] == "BudgetExceededError", budgeted
    assert "Paris" in outputs["v1/chat/completions"]["choices"][0]["message"]["content"]
    # Once per key: done, or this key's first outcome again (the suite's database
    # keeps what an earlier run on this machine did).
    refund = outputs["records/refund_order"]
    assert refund["outcome"] == "done" or refund["replayed"] or "already" in refund["message"]


def test_python_client_example_runs(pipelines: LocalCluster) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "client.py"), pipelines.base_url],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert "RAG answer:" in done.stdout and "Triage: team=shipping" in done.stdout
    assert "LLM:" in done.stdout and "Paris" in done.stdout


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
