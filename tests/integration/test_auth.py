"""API keys on the real platform: every HTTP surface asks for one (pipelines, the model
servers' own routes, the OpenAI routes with the official client), revocation reaches
the replicas, usage is exported per key name, and no key ever reaches a log file, a
span or a metric. (That a key's limit holds across two ingress replicas is in
test_ingress_replicas.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.keys import AuthSettings, KeyStore
from tests._cluster import SPANS_DIR

pytestmark = pytest.mark.integration
QUESTION = {"question": "How long do refunds take after a return?"}


def store() -> KeyStore:
    return KeyStore(AuthSettings().store_path)


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def keys_cli(*args: str) -> str:
    """`servegraph keys ...` as an operator runs it, in its own process."""
    done = subprocess.run(
        [sys.executable, "-m", "servegraph.cli", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_every_surface_asks_for_a_key_and_the_scope(pipelines: LocalCluster) -> None:
    base = pipelines.base_url
    reader = store().create("it-reader", ["invoke:*"])
    with httpx.Client(base_url=base, timeout=180) as anonymous:
        for method, path, body in [
            ("POST", "/pipelines/rag", QUESTION),
            ("POST", "/pipelines/rag/stream", QUESTION),
            ("GET", "/pipelines/rag/graph", None),
            ("POST", "/index/delete", {"filter": {"source": "kb"}}),
            ("GET", "/embedder/stats", None),
            ("GET", "/v1/models", None),
        ]:
            answer = anonymous.request(method, path, json=body)
            assert answer.status_code == 401, (path, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer"), path
        for open_path in ("/pipelines/docs", "/pipelines/openapi.json", "/index/docs"):
            assert anonymous.get(open_path).status_code == 200, open_path
    with httpx.Client(base_url=base, timeout=180, headers=bearer(reader)) as client:
        assert client.post("/pipelines/rag", json=QUESTION).status_code == 200
        refused = client.post("/pipelines/rag_ingest", json={"documents": []})
        assert refused.status_code == 403 and "write:rag_ingest" in refused.text
        refused = client.post("/index/delete", json={"filter": {"source": "kb"}})
        assert refused.status_code == 403 and "'admin'" in refused.text
        assert client.get("/v1/models").status_code == 403
    assert store().verify(reader) is not None  # nothing above deleted anything


def test_the_openai_client_authenticates_with_its_api_key(pipelines: LocalCluster) -> None:
    chat = {
        "model": "smollm2-135m-instruct",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "Say hi."}],
    }
    llm_key = store().create("it-llm", ["llm"], tokens_per_min=40)
    client = openai.OpenAI(base_url=f"{pipelines.base_url}/v1", api_key=llm_key, max_retries=0)
    assert client.chat.completions.create(**chat).usage.total_tokens > 0  # type: ignore[union-attr]
    # That reply's tokens (a ~30-token prompt and 5) spent the 40-token budget: the next
    # call is refused until it refills, with the time to wait.
    client.chat.completions.create(**chat)
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(**chat)
    assert int(limited.value.response.headers["retry-after"]) >= 1
    wrong = openai.OpenAI(
        base_url=f"{pipelines.base_url}/v1", api_key="sg_0123456789ab_" + "x" * 43, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_a_revoked_key_is_refused_within_seconds(pipelines: LocalCluster) -> None:
    key = keys_cli("create", "--name", "it-revoked", "--scope", "invoke:rag").split()[-1]
    assert "it-revoked" in keys_cli("list") and key not in keys_cli("list")
    with httpx.Client(base_url=pipelines.base_url, timeout=60, headers=bearer(key)) as client:
        assert client.get("/pipelines/rag/graph").status_code == 200
        keys_cli("revoke", "it-revoked")
        revoked_at = time.monotonic()
        while client.get("/pipelines/rag/graph").status_code == 200:
            assert time.monotonic() - revoked_at < 30, "still admitted 30 s after revocation"
            time.sleep(0.1)
    print(f"refused {time.monotonic() - revoked_at:.2f} s after revocation")


def replicas_of(series: list[str]) -> set[str]:
    return {m.group(1) for s in series if (m := re.search(r'replica="([^"]+)"', s))}


def wait_for_series(
    pipelines: LocalCluster,
    pattern: str,
    enough: Callable[[list[str]], bool] = bool,
    timeout_s: float = 120,
) -> list[str]:
    """Prometheus lines matching `pattern`, once Ray has exported `enough` of them (it
    exports on its own interval)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(pipelines.metrics_url, timeout=10).text
        found = [line for line in text.splitlines() if re.search(pattern, line)]
        if enough(found) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_usage_is_exported_per_key_name_and_no_key_is_ever_written_down(
    pipelines: LocalCluster,
) -> None:
    import ray

    key = store().create("it-secret", ["invoke:*", "llm"])
    bogus = "sg_0123456789ab_" + "S" * 43
    with httpx.Client(base_url=pipelines.base_url, timeout=180, headers=bearer(key)) as client:
        assert client.post("/pipelines/rag", json=QUESTION).status_code == 200
        assert client.post("/pipelines/rag", json={"question": ""}).status_code == 422
        assert client.post("/pipelines/rag_ingest", json={}).status_code == 403
        assert client.post("/v1/chat/completions", json={"model": "x"}).status_code >= 400
        refused = client.post("/pipelines/rag", json=QUESTION, headers=bearer(bogus))
        assert refused.status_code == 401 and bogus not in refused.text
    tokens = wait_for_series(pipelines, r'servegraph_key_llm_tokens(_total)?\{[^}]*key="it-secret"')
    assert {"input", "output"} <= {re.search(r'direction="(\w+)"', t).group(1) for t in tokens}
    statuses = {"200", "422", "403"}
    requests = wait_for_series(
        pipelines,
        r'servegraph_key_requests(_total)?\{[^}]*key="it-secret"',
        enough=lambda found: all(any(f'status="{s}"' in line for line in found) for s in statuses),
    )
    assert all(any(f'status="{s}"' in line for line in requests) for s in statuses), requests

    secrets = [key, key.split("_", 2)[2], bogus, bogus.split("_", 2)[2]]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    places = [*logs.rglob("*"), *Path(SPANS_DIR).glob("*")]
    searched = 0
    for path in places:
        if path.is_file():
            data = path.read_bytes()
            searched += 1
            assert not any(s.encode() in data for s in secrets), f"a key is written in {path}"
    metrics = httpx.get(pipelines.metrics_url, timeout=10).text
    assert not any(s in metrics for s in secrets)
    assert searched > 20, f"only {searched} files searched"
    assert os.environ["SERVEGRAPH_API_KEY"] not in metrics


def test_a_killed_limiter_never_turns_requests_into_errors(pipelines: LocalCluster) -> None:
    """The shared limiter actor dies (and restarts): limited keys' requests are still
    answered, admitted while it is away, limited again once it is back."""
    import ray

    from servegraph.security.limits import ACTOR_NAME, ACTOR_NAMESPACE

    key = store().create("it-limiter-fault", ["invoke:*"], requests_per_s=1000)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=pipelines.base_url, timeout=60, headers=bearer(key)
        ) as client:
            answers = await asyncio.gather(*(client.get("/pipelines/rag/graph") for _ in range(32)))
        return [a.status_code for a in answers]

    assert set(asyncio.run(burst())) == {200}  # the actor exists now
    ray.kill(ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE), no_restart=False)
    assert set(asyncio.run(burst())) == {200}
    assert set(asyncio.run(burst())) == {200}


def test_nothing_the_local_platform_runs_listens_beyond_this_machine(
    pipelines: LocalCluster,
) -> None:
    """Every server of the running platform listens on the loopback only: Ray's (the GCS,
    the raylet, each worker, the dashboard agent, the Prometheus exporter with per-key
    counts and costs) and Serve's proxy. Two exceptions, both Ray's own, with no host
    setting: each Serve replica's server for calls between deployments binds every
    interface, and refuses a call without the cluster's Ray token; HAProxy, when it is
    the ingress, binds its stats page and metrics on every interface (README)."""
    import ipaddress
    from urllib.parse import urlparse

    import grpc
    import psutil

    listening: dict[tuple[str, int], str] = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN and name != "haproxy":
                    listening[(conn.laddr.ip, conn.laddr.port)] = name

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return address.is_loopback

    def refuses_without_ray_token(port: int) -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            try:
                call(b"", timeout=10)
            except grpc.RpcError as error:
                return error.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

    assert urlparse(pipelines.metrics_url).port in {port for _, port in listening}
    assert len(listening) > 10, listening  # Ray's servers, each worker's, Serve's
    exposed = {(ip, port): name for (ip, port), name in listening.items() if not loopback(ip)}
    replicas = {port for (_, port), name in exposed.items() if name.startswith("ray::ServeReplica")}
    assert replicas, exposed  # each replica's server, which Ray binds on every interface
    others = {f"{ip}:{port}": name for (ip, port), name in exposed.items() if port not in replicas}
    assert not others, others
    open_ = {port: exposed for port in replicas if not refuses_without_ray_token(port)}
    assert not open_, open_
