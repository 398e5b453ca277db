"""`rag`'s answer cache on the shared platform, with a key of the one tenant the suite
caches for (`tests/conftest.py`): a repeated question is a hit without the LLM, a
re-ingest of a document it was built from makes the next one a miss, the answers
survive `kill -9` of every ingress replica, and writers racing readers never get an
answer older than a write that had returned (`benchmarks.cache.race`, small)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from benchmarks.cache import ingest_knowledge_base, race
from benchmarks.traffic import replica_pids
from servegraph.deploy.local_ray import LocalCluster, wait_until_running
from servegraph.security.keys import AuthSettings, KeyStore
from servegraph.serving.ingress import INGRESS_APP

pytestmark = pytest.mark.reliability

# Room for the whole answer: a truncated one is never kept (`pipelines.rag.qa.cacheable`),
# and the test would wait for a hit that cannot come.
QUESTION = {"question": "How long is the password reset link valid?", "max_tokens": 128}


def test_a_cached_answer_is_forgotten_by_a_write_and_outlives_the_ingress(
    pipelines: LocalCluster,
) -> None:
    scopes = ["invoke:rag", "write:rag_ingest"]
    key = KeyStore(AuthSettings().store_path).create("it-cached", scopes, tenant="cached")
    ingest_knowledge_base(pipelines.base_url, key)
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=pipelines.base_url, headers=headers, timeout=180) as client:

        def ask(question: dict = QUESTION) -> httpx.Response:
            answer = client.post("/pipelines/rag", json=question)
            assert answer.status_code == 200, answer.text
            return answer

        def kept_then_hit(question: dict = QUESTION) -> httpx.Response:
            """The answer is kept just after the reply: ask until it is a hit."""
            deadline = time.monotonic() + 30
            while (answer := ask(question)).headers["x-servegraph-cache"] != "hit":
                assert time.monotonic() < deadline, answer.headers
                time.sleep(0.2)
            return answer

        first = ask()
        assert first.headers["x-servegraph-cache"] == "miss"
        hit = kept_then_hit(QUESTION | {"question": QUESTION["question"].lower()})
        assert hit.json() == first.json()
        assert '"llm_output_tokens":0' in hit.headers["x-servegraph-usage"]

        (cited, *_) = first.json()["passages"]
        # Another text than the knowledge base's (so the write changes the chunk), the
        # same in every run (the LLM's answer, and whether it is kept, must not vary).
        text = "# Password reset\n\nThe reset link is valid for 30 minutes after it is sent."
        again = client.post(
            "/pipelines/rag_ingest", json={"documents": [{"id": cited["doc_id"], "text": text}]}
        )
        assert again.status_code == 200, again.text
        assert ask().headers["x-servegraph-cache"] == "miss"
        kept_then_hit()

        # Every ingress replica killed: the answers were the index's, not the ingress's.
        dashboard = str(pipelines.dashboard_url)
        before = replica_pids(dashboard, INGRESS_APP, "PipelineIngress")
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while set(replica_pids(dashboard, INGRESS_APP, "PipelineIngress")) & set(before) or len(
            replica_pids(dashboard, INGRESS_APP, "PipelineIngress")
        ) < len(before):
            assert time.monotonic() < deadline, "the ingress did not come back"
            time.sleep(0.5)
        wait_until_running([INGRESS_APP])
        deadline = time.monotonic() + 60
        while True:  # the proxy may route to the new replica a moment after it runs
            try:
                answer = client.post("/pipelines/rag", json=QUESTION)
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 200:
                break
            assert time.monotonic() < deadline, answer.text if answer else "no answer"
            time.sleep(0.5)
        assert answer.headers["x-servegraph-cache"] == "hit"

    raced = race(pipelines.base_url, key, seconds=15, writers=2, readers=4, pause_s=(3, 6))
    assert raced["stale"] == 0, raced["examples"]
    assert raced["writes"] > 0 and raced["hit"] + raced["miss"] > 0, raced
