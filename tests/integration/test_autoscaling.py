"""Autoscaling really scales: the embedder grows under load and shrinks after, down to
zero, while the classifier, another deployment, stays where it was; at zero, a call
that its cold start cannot fit is refused at once and one that it can waits for it."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from ray import serve

from servegraph._serve_status import serve_details, serve_state
from servegraph.deploy.local_ray import LocalCluster
from servegraph.security.client import client_headers
from tests._cluster import wait_until_running

pytestmark = pytest.mark.integration

FAST_AUTOSCALING = {
    "min_replicas": 1,
    "initial_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1,
}


def keep_calling(
    base_url: str,
    path: str,
    body: dict,
    stop: threading.Event,
    answered: list[int] | None = None,
    bound_s: float = 120,
) -> None:
    """POST `body` to `path` until `stop` is set (for at most `bound_s`, even if the
    test fails), each answer's status into `answered`."""
    with httpx.Client(headers=client_headers(), base_url=base_url, timeout=60) as client:
        ends = time.monotonic() + bound_s
        while not stop.is_set() and time.monotonic() < ends:
            status = client.post(path, json=body).status_code
            if answered is not None:
                answered.append(status)


def running_replicas(app: str, deployment: str) -> int:
    states = serve_state().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_embedder_scales_out_under_load_and_back_in_to_zero(model_servers: LocalCluster) -> None:
    from deployments.embedder import SERVER
    from deployments.embedder.server import app as embedder_app

    to_zero = FAST_AUTOSCALING | {"min_replicas": 0, "downscale_to_zero_delay_s": 3}
    serve.run(
        embedder_app({"overrides": {"autoscaling_config": to_zero}}),
        name="embedder",
        route_prefix="/embedder",
    )
    wait_until_running(["embedder"])
    stop = threading.Event()

    body = {"texts": ["a support ticket"] * 32}
    workers = [
        threading.Thread(
            target=keep_calling,
            args=(model_servers.base_url, "/embedder/embed", body, stop),
            daemon=True,
        )
        for _ in range(12)
    ]
    classifier_counts, peak = [], 1
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, running_replicas("embedder", "Embedder"))
            classifier_counts.append(running_replicas("classifier", "Classifier"))
            time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert peak == 2, "the embedder never scaled out under sustained load"

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and running_replicas("embedder", "Embedder") > 0:
        classifier_counts.append(running_replicas("classifier", "Classifier"))
        time.sleep(0.5)
    assert running_replicas("embedder", "Embedder") == 0, "the embedder never scaled to zero"
    assert set(classifier_counts) == {1}, "the classifier moved while only the embedder was loaded"

    assert SERVER.cold_start_s is not None
    with httpx.Client(
        headers=client_headers(), base_url=model_servers.base_url, timeout=120
    ) as client:
        short = client.post("/embedder/embed", json=body, headers={"x-request-timeout": "2"})
        assert short.status_code == 503, short.text
        assert "scaled to zero" in short.text
        assert int(short.headers["retry-after"]) >= SERVER.cold_start_s
        # The refusal asked for a replica; a caller who can wait for it gets an answer.
        started = time.monotonic()
        waited = client.post("/embedder/embed", json=body, headers={"x-request-timeout": "90"})
        assert waited.status_code == 200, waited.text
    print(f"the call at zero was answered after {time.monotonic() - started:.1f} s")

    serve.run(embedder_app(), name="embedder", route_prefix="/embedder")  # profile defaults
    wait_until_running(["embedder"])


def target_replicas(*deployments: tuple[str, str]) -> tuple[int, ...]:
    """The replicas Serve's controller is aiming for, for each (app, deployment), all
    from one snapshot of the controller's details (`serve_state()` shows only the
    running ones): two reads could fall either side of one decision."""
    apps = serve_details()["applications"]
    assert all(app in apps for app, _ in deployments), f"not deployed: {deployments}"
    return tuple(
        int(apps[app]["deployments"][deployment]["target_num_replicas"])
        for app, deployment in deployments
    )


def test_pipeline_arrivals_grow_every_server_they_call_in_one_decision(
    pipelines: LocalCluster,
) -> None:
    """Graph-aware scaling (`servegraph.deploy.scaling`): four `triage` requests arriving grow
    the classifier and the embedder, which triage calls, in the same decision, with the
    callers'-queue rule switched off, so the growth is the prediction's. A call is said
    to cost 20 s, so 4 requests want more than one replica of each as long as they are
    in the 40 s window (long enough for the new replica to start: 2-16 s here). When
    they leave it, the servers shrink, and a stream of calls to the one that grew loses
    none."""
    from deployments.classifier.server import app as classifier_app
    from deployments.embedder.server import app as embedder_app
    from servegraph.server import graph_autoscaling

    servers = {"classifier": ("Classifier", classifier_app), "embedder": ("Embedder", embedder_app)}
    for name, (_, build) in servers.items():
        scaling = graph_autoscaling(
            name,
            service_time_s=20.0,
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=32,
            long_window_s=40,
            reactive_delay_s=600,
            downscale_delay_s=5,
        )
        serve.run(
            build({"overrides": {"autoscaling_config": scaling}}),
            name=name,
            route_prefix=f"/{name}",
        )
    wait_until_running(list(servers))

    def targets() -> tuple[int, ...]:
        return target_replicas(*((app, d) for app, (d, _) in servers.items()))

    def running() -> tuple[int, ...]:
        return tuple(running_replicas(app, d) for app, (d, _) in servers.items())

    headers = client_headers() | {"X-Request-Timeout": "60"}
    try:
        # Triage requests of earlier tests may still be in the 40 s window
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and targets() != (1, 1):
            time.sleep(0.5)
        assert targets() == (1, 1), f"the servers are not at rest: {targets()}"
        polled: list[tuple[int, ...]] = []
        with httpx.Client(headers=headers, base_url=pipelines.base_url, timeout=120) as client:
            tickets = [
                {"text": f"Where is my order {n}? It is late.", "email": "ana@example.com"}
                for n in range(4)
            ]
            answers: list[httpx.Response] = []
            senders = [
                threading.Thread(
                    target=lambda t=t: answers.append(client.post("/pipelines/triage", json=t))
                )
                for t in tickets
            ]
            for sender in senders:
                sender.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (not polled or polled[-1] != (2, 2)):
                polled.append(targets())
                time.sleep(0.05)
            for sender in senders:
                sender.join(timeout=180)
        assert polled[-1] == (2, 2), f"the servers did not grow: {polled[-5:]}"
        mixed = [p for p in polled if len(set(p)) > 1]
        assert not mixed, f"one server grew a decision before the other: {mixed[:3]}"
        assert sorted({a.status_code for a in answers}) in ([200], [200, 504], [504])

        # The cluster's logical CPUs hold one more encoder replica (each asks for 2):
        # whichever starts is the one whose scale-in is watched; the other's replica
        # waits for CPUs and is never started.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and 2 not in running():
            time.sleep(0.5)
        assert 2 in running(), f"no new replica ran: {running()}"
        grown = list(servers)[running().index(2)]
        path, body = {
            "classifier": ("/classifier/classify", {"text": "refund please"}),
            "embedder": ("/embedder/embed_one", {"text": "refund please"}),
        }[grown]

        stop, answered = threading.Event(), []
        streams = [
            threading.Thread(
                target=keep_calling,
                args=(pipelines.base_url, path, body, stop, answered, 300),
                daemon=True,
            )
            for _ in range(4)
        ]
        for stream in streams:
            stream.start()
        deadline = time.monotonic() + 240  # the window empties, then the delay
        while time.monotonic() < deadline and (running(), targets()) != ((1, 1), (1, 1)):
            time.sleep(0.5)
        stop.set()
        for stream in streams:
            stream.join(timeout=60)
        assert (running(), targets()) == ((1, 1), (1, 1)), "the servers never shrank"
        assert answered and set(answered) == {200}, f"scale-in failed calls: {answered}"
    finally:
        for name, (_, build) in servers.items():
            serve.run(build(), name=name, route_prefix=f"/{name}")  # profile defaults
        wait_until_running(list(servers))
