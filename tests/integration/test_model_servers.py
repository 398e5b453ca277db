"""The four model servers on a real local Ray Serve cluster, with the real models."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
from ray import serve

from deployments.classifier.contract import ClassifyRequest
from deployments.embedder.contract import EmbedOneRequest
from deployments.fields import MAX_BATCH
from deployments.llm.contract import ChatRequest, Message
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from tests.procs import thread_nice

pytestmark = pytest.mark.integration


# -- LLM --------------------------------------------------------------------------------


def test_llm_answers_paris_through_the_openai_client(model_servers: LocalCluster) -> None:
    client = openai.OpenAI(
        base_url=f"{model_servers.base_url}/v1", api_key=os.environ["SERVEGRAPH_API_KEY"]
    )
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        temperature=0,
        max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert "Paris" in reply.choices[0].message.content
    completion = client.completions.create(
        model="smollm2-135m-instruct",
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
    )
    assert completion.choices[0].text.strip()


def test_llm_streams_tokens(model_servers: LocalCluster) -> None:
    client = openai.OpenAI(
        base_url=f"{model_servers.base_url}/v1", api_key=os.environ["SERVEGRAPH_API_KEY"]
    )
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        temperature=0,
        max_tokens=20,
        stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3 and "Paris" in "".join(pieces)


def llm_replicas() -> list[psutil.Process]:
    """The LLM engine replicas' processes on this machine (at least one)."""
    replicas = [
        proc
        for proc in psutil.process_iter(["cmdline"])
        if "ServeReplica:llm:LLMServer" in " ".join(proc.info["cmdline"] or [])
    ]
    assert replicas, "no LLM replica process"
    return replicas


def test_the_llm_worker_runs_below_its_replicas_cpu_priority(model_servers: LocalCluster) -> None:
    """vLLM's model worker, every thread of it, runs `cpu_nice_offset` (4) below the
    replica, which answers requests at Ray's workers' priority (nice 15) like the
    encoders, so where they share cores an encoder's forward pass goes first. On the
    partitioned node (`deployments.llm.partition`, off by default) the other processes
    the replica started (the engine core, its forkserver) keep the replica's priority;
    without a partition they are lowered too."""
    from deployments.llm import partition
    from deployments.llm.settings import LLMSettings

    # (one core leaves nothing to partition: the replica then lowers every process)
    partitioned = LLMSettings().cpu_partition != "off" and len(partition.node_cpus()) > 1
    for replica in llm_replicas():
        replica_nice = thread_nice(replica.pid)[replica.pid]  # its main thread's
        engine = replica.children(recursive=True)
        assert any("EngineCore" in " ".join(p.cmdline()) for p in engine), engine
        lowered = min(replica_nice + LLMSettings().cpu_nice_offset, 19)
        assert lowered > replica_nice
        for process in engine:
            worker = "VLLM::Worker" in " ".join(process.cmdline())
            wanted = lowered if worker or not partitioned else replica_nice
            threads = thread_nice(process.pid)
            assert threads and set(threads.values()) == {wanted}, (process, threads)


def test_the_llm_engine_core_and_its_worker_are_forked_from_preloaded_servers(
    model_servers: LocalCluster,
) -> None:
    """On CPU the engine core is forked from the forkserver the replica started before
    its own imports (`deployments.llm.forkserver`), not spawned by the replica; so is
    its model worker, the server having started over with the worker's loader and
    OpenMP settings (`deployments.llm.worker_server`), not spawned by the core: the
    settings vLLM gave the worker were the ones the server computed."""
    replicas = llm_replicas()
    for replica in replicas:
        engine = replica.children(recursive=True)
        cores = [p for p in engine if "EngineCore" in " ".join(p.cmdline())]
        assert cores, engine
        for core in cores:
            server = core.parent()
            assert server is not None and server.pid != replica.pid
            assert "forkserver" in " ".join(server.cmdline()), server.cmdline()
            assert server.parent() == replica
            spawned = [w for w in core.children() if "VLLM::Worker" in " ".join(w.cmdline())]
            assert not spawned, [w.cmdline() for w in spawned]
            workers = [w for w in server.children() if "VLLM::Worker" in " ".join(w.cmdline())]
            assert len(workers) == 1, [p.cmdline() for p in server.children()]
            # The core runs on its replica's CPUs; the worker where vLLM's settings bind
            # it, with the OpenMP runtime vLLM preloads (the server's, as it was exec'd)
            # (the CPU partition moves both, one after the other: waited for)
            deadline = time.monotonic() + 10
            while core.cpu_affinity() != replica.cpu_affinity() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert core.cpu_affinity() == replica.cpu_affinity()
            worker = workers[0]
            started_with = worker.environ()
            assert "libgomp" in started_with["LD_PRELOAD"]
            mapped = {m.path for m in worker.memory_maps()}
            for library in started_with["LD_PRELOAD"].split(":"):
                assert os.path.realpath(library) in mapped, library
            if "GOMP_CPU_AFFINITY" in started_with:
                bound = {int(cpu) for cpu in started_with["GOMP_CPU_AFFINITY"].split()}
                assert set(worker.cpu_affinity()) == bound


def test_the_cpu_partition_places_the_sessions_processes_around_the_llm_worker(
    model_servers: LocalCluster,
) -> None:
    """The CPU partition (`deployments.llm.partition`, off by default) on the session's
    real platform, kept from this process for the LLM's replica (as the replica keeps
    it where `SERVEGRAPH_LLM_CPU_PARTITION` asks), busy as this test says: `open`, every
    process of the session on every core; `shared`, vLLM's worker keeps the cores it is
    bound to, Ray's daemons, Serve's proxy and controller, the gateways, the ingress and
    the LLM's own replica and engine core run on the others, the model servers'
    replicas on every core; `exclusive`, those too on the others. Every core again after."""
    from deployments.llm import partition
    from deployments.llm.settings import LLMSettings

    everything = partition.node_cpus()
    if len(everything) < 2:
        pytest.skip("one core: nothing to partition")
    if LLMSettings().cpu_partition != "off":
        pytest.skip("the replica keeps its own partition: this test's would race it")
    (replica,) = llm_replicas()
    workers = [
        p
        for p in replica.children(recursive=True)
        if partition.WORKER_TITLE in " ".join(p.cmdline())
    ]
    assert workers
    bound = [set(w.cpu_affinity()) for w in workers]
    rest = everything - set().union(*bound)
    assert rest
    raylet = partition.raylet_of(replica)
    assert raylet is not None
    titles = partition.server_titles()

    def misplaced(platform: set[int], servers: set[int]) -> list[str]:
        wrong, found = [], set()
        for process in partition.session_processes(raylet):
            try:
                cmdline = " ".join(process.cmdline())
                server = partition.is_server_replica(cmdline, titles)
                found.add(server)
                if process not in workers and set(process.cpu_affinity()) != (
                    servers if server else platform
                ):
                    wrong.append(cmdline[:80])
            except psutil.Error:
                continue  # ended meanwhile
        assert found == {True, False}  # both kinds seen
        return wrong

    busy = [False]
    try:
        for mode, servers in (("shared", everything), ("exclusive", rest)):
            busy[0] = False
            kept = partition.Partition(mode, lambda: busy[0], replica=replica)
            assert kept.step() is not None and kept.placement == "open"
            assert not misplaced(everything, everything)
            busy[0] = True
            assert kept.step() is not None and kept.placement == mode
            assert not misplaced(rest, servers)
            assert [set(w.cpu_affinity()) for w in workers] == bound  # never moved
    finally:
        partition.sweep("open", replica=replica)
    assert not misplaced(everything, everything)


def test_the_llm_engines_sockets_are_bound_in_its_replicas_own_folder(
    model_servers: LocalCluster,
) -> None:
    """vLLM's ZMQ sockets (engine client, engine core, model worker) are files in the
    replica's folder (`deployments.llm.sockets`), which goes with the replica, and none
    in the temp folder itself, where a killed engine's would stay."""
    from deployments.llm import sockets

    temp = Path(tempfile.gettempdir())
    for replica in llm_replicas():
        folders = list(temp.glob(f"{sockets.PREFIX}{replica.pid}-*"))
        assert len(folders) == 1, folders
        bound = {
            Path(conn.laddr)
            for process in [replica, *replica.children(recursive=True)]
            for conn in process.net_connections(kind="unix")
            if conn.laddr
        }
        assert {path for path in bound if path.parent == folders[0]}, bound
        assert not {path for path in bound if path.parent == temp}, bound


def test_llm_rejects_a_prompt_longer_than_the_context(http: httpx.Client) -> None:
    response = http.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2-135m-instruct",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "word " * 5000}],
        },
    )
    assert response.status_code == 400
    assert "context" in response.text.lower() or "maximum" in response.text.lower()


def test_llm_client_guided_json_and_usage(model_servers: LocalCluster) -> None:
    from deployments.llm.client import LLMClient
    from deployments.llm.server import deployment_name

    handle = serve.get_deployment_handle(deployment_name("smollm2-135m-instruct"), "llm")
    schema = {
        "type": "object",
        "properties": {
            "tool": {"enum": ["search", "lookup_order"]},
            "argument": {"type": "string"},
        },
        "required": ["tool", "argument"],
    }
    reply = asyncio.run(
        LLMClient(handle).chat(
            ChatRequest(
                messages=[Message(role="user", content="Where is my order 12345? Pick a tool.")],
                json_schema=schema,
                max_tokens=60,
            )
        )
    )
    call = json.loads(reply.text)
    assert call["tool"] in {"search", "lookup_order"} and isinstance(call["argument"], str)
    assert reply.usage.input_tokens > 5 and reply.usage.output_tokens > 0


# -- embedder ---------------------------------------------------------------------------


def test_embedder_ranks_a_paraphrase_above_an_unrelated_sentence(http: httpx.Client) -> None:
    texts = [
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "The parcel was delivered to the wrong house.",
    ]
    body = http.post("/embedder/embed", json={"texts": texts}).json()
    vectors = np.asarray(body["vectors"], dtype=np.float32)
    assert body["dim"] == 384 == vectors.shape[1]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert http.get("/embedder/info").json()["dim"] == 384


CALLERS = 64  # concurrent single-item callers, each sending request after request


def _closed_loop(
    base_url: str, call: Callable[[httpx.AsyncClient, int], Awaitable[object]], per_caller: int = 6
) -> None:
    """CALLERS callers at once, each making `per_caller` calls one after another."""

    async def run() -> None:
        async with httpx.AsyncClient(
            headers=client_headers(), base_url=base_url, timeout=120
        ) as client:

            async def caller(c: int) -> None:
                for n in range(per_caller):
                    await call(client, c * per_caller + n)

            await asyncio.gather(*(caller(c) for c in range(CALLERS)))

    asyncio.run(run())


def _least_median_batch(path: str) -> int:
    """The batch the median item must ride in, at CALLERS concurrent callers.

    By handle, the callers' requests reach the replica as fast as they are made, so a
    busy model's batch holds a quarter of them. Over HTTP they reach it at the rate
    the ingress (Serve's proxy, or HAProxy) and the gateway pass them on (each spends
    milliseconds of CPU per request), which on a loaded 2-core machine is near the
    model's own rate: how large the batches get there measures the path's speed
    (`benchmarks.path_cpu` reports it), and a test must not pass or fail by speed.
    What HTTP must show is that its callers are batched together at all: the median
    item rides with company."""
    return CALLERS // 4 if path == "handle" else 2


@pytest.mark.parametrize("path", ["http", "handle"])
def test_embedder_batches_its_concurrent_callers(model_servers: LocalCluster, path: str) -> None:
    handle = serve.get_deployment_handle("Embedder", "embedder")
    before = handle.batch_stats.remote().result()

    async def call(client: httpx.AsyncClient, i: int) -> None:
        text = f"ticket number {i} about a parcel"
        if path == "http":
            response = await client.post("/embedder/embed_one", json={"text": text})
            assert len(response.json()["vector"]) == 384
        else:
            embedding = await handle.embed_one.remote(EmbedOneRequest(text=text))
            assert embedding.vector.dtype == np.float32  # numpy on the handle path

    _closed_loop(model_servers.base_url, call)
    after = handle.batch_stats.remote().result()
    assert after.items - before.items == CALLERS * 6
    assert after.median_since(before)[1] >= _least_median_batch(path), after.histogram


# -- classifier -------------------------------------------------------------------------


def test_classifier_meets_held_out_accuracy_and_scores_sum_to_one(http: httpx.Client) -> None:
    from deployments.classifier.training import load_tickets

    held_out = [t for t in load_tickets() if t["split"] == "test"]
    response = http.post(
        "/classifier/classify_batch", json={"texts": [t["text"] for t in held_out]}
    )
    results = response.json()["results"]
    accuracy = np.mean([r["label"] == t["label"] for r, t in zip(results, held_out, strict=True)])
    assert accuracy >= 0.85, accuracy
    for result in results:
        assert abs(sum(result["scores"].values()) - 1.0) < 1e-6
        assert result["score"] == max(result["scores"].values())
    info = http.get("/classifier/info").json()
    assert set(info["labels"]) >= {"billing", "shipping", "technical", "account", "returns"}


@pytest.mark.parametrize("path", ["http", "handle"])
def test_classifier_batches_its_concurrent_callers(model_servers: LocalCluster, path: str) -> None:
    handle = serve.get_deployment_handle("Classifier", "classifier")
    before = handle.batch_stats.remote().result()
    labels: list[str] = []

    async def call(client: httpx.AsyncClient, i: int) -> None:
        text = f"I was charged twice, invoice {i}"
        if path == "http":
            response = await client.post("/classifier/classify", json={"text": text})
            labels.append(response.json()["label"])
        else:
            labels.append((await handle.classify.remote(ClassifyRequest(text=text))).label)

    _closed_loop(model_servers.base_url, call)
    assert labels.count("billing") == len(labels) == CALLERS * 6
    after = handle.batch_stats.remote().result()
    assert after.median_since(before)[1] >= _least_median_batch(path), after.histogram


# -- vector index -----------------------------------------------------------------------


def _vec(seed: int) -> list[float]:
    v = np.random.default_rng(seed).normal(size=384).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def test_index_add_search_filter_delete_round_trip(http: httpx.Client) -> None:
    items = [
        {
            "id": f"rt-{i}",
            "text": f"text {i}",
            "vector": _vec(i),
            "metadata": {"team": "billing" if i % 2 else "shipping", "n": i},
        }
        for i in range(10)
    ]
    added = http.post("/index/add", json={"items": items})
    assert added.status_code == 200 and added.json()["ids"][0] == "rt-0"
    hits = http.post("/index/search", json={"vector": _vec(3), "k": 3}).json()["hits"]
    assert hits[0]["id"] == "rt-3" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    filtered = http.post(
        "/index/search", json={"vector": _vec(3), "k": 3, "filter": {"team": "shipping"}}
    ).json()["hits"]
    assert filtered and all(h["metadata"]["team"] == "shipping" for h in filtered)
    deleted = http.post("/index/delete", json={"ids": ["rt-3"]}).json()
    assert deleted["deleted"] == 1
    hits = http.post("/index/search", json={"vector": _vec(3), "k": 1}).json()["hits"]
    assert hits[0]["id"] != "rt-3"


def test_index_keeps_acknowledged_writes_across_a_restart(http: httpx.Client) -> None:
    from deployments.vector_index.server import app as vector_index_app

    item = {
        "id": "durable-1",
        "text": "survives restarts",
        "vector": _vec(99),
        "metadata": {"kind": "durable"},
    }
    assert http.post("/index/add", json={"items": [item]}).status_code == 200
    # Redeploy with a different constructor argument: Serve replaces the replica.
    serve.run(vector_index_app({"init": {"nlist": 63}}), name="vector_index", route_prefix="/index")
    hits = http.post(
        "/index/search", json={"vector": _vec(99), "k": 1, "filter": {"kind": "durable"}}
    ).json()["hits"]
    assert hits and hits[0]["id"] == "durable-1" and hits[0]["text"] == "survives restarts"


# -- bad input gets a 4xx naming the field ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/embedder/embed", {"texts": [""]}, "texts.0"),
        ("/embedder/embed", {"texts": "not a list"}, "texts"),
        ("/embedder/embed", {"texts": ["x"] * (MAX_BATCH + 1)}, "texts"),
        ("/classifier/classify", {"text": "   "}, "text"),
        ("/classifier/classify", {"txt": "hello"}, "text"),
        ("/index/search", {"vector": [0.1, 0.2], "k": 3}, "vector"),
        ("/index/search", {"vector": [0.1] * 384, "k": 0}, "k"),
        ("/index/add", {"items": []}, "items"),
    ],
)
def test_bad_input_gets_422_naming_the_field(
    http: httpx.Client, path: str, body: dict, field: str
) -> None:
    response = http.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(d["field"] == field and d["fix"] for d in detail), detail


# -- support records ----------------------------------------------------------------


def test_records_apply_fifty_concurrent_repeats_of_a_refund_once(
    model_servers: LocalCluster,
) -> None:
    """Through the records' own route (gateway, merged calls, the replica's threads):
    fifty repeats of one refund at once, under one idempotency key, change the data
    once and all answer its outcome; the key reused for another amount is a 422. (The
    order may have been refunded by an earlier run of the suite on this machine's
    database: then the one outcome is that refusal, still made once.)"""
    import secrets
    import sqlite3

    from deployments.records.model import database

    key = f"suite-{secrets.token_hex(8)}"
    body = {"text": "Refund order 14550", "email": "ana@example.com", "amount": "1.00"}

    async def fifty() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            headers=client_headers(), base_url=model_servers.base_url, timeout=120
        ) as client:
            return await asyncio.gather(
                *(
                    client.post("/records/refund_order", json=body | {"idempotency_key": key})
                    for _ in range(50)
                )
            )

    answers = asyncio.run(fifty())
    assert [a.status_code for a in answers] == [200] * 50, answers[0].text
    outcomes = [a.json() for a in answers]
    assert sum(not o["replayed"] for o in outcomes) == 1
    assert len({(o["outcome"], o["message"]) for o in outcomes}) == 1, outcomes[0]
    with sqlite3.connect(database()) as db:
        applied = db.execute("SELECT COUNT(*) FROM applied_actions WHERE key = ?", (key,))
        assert applied.fetchone()[0] == 1
        refunded = db.execute("SELECT COUNT(*) FROM refunds WHERE order_id = '14550'")
        assert refunded.fetchone()[0] == 1
    other = httpx.post(
        f"{model_servers.base_url}/records/refund_order",
        json=body | {"amount": "2.00", "idempotency_key": key},
        headers=client_headers(),
        timeout=60,
    )
    assert other.status_code == 422 and "idempotency_key" in other.text, other.text
