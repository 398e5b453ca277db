"""The LLM engine core's start from a preloaded forkserver (`deployments.llm.forkserver`):
started only where the replica asked for it, a forked process runs with its requester's
environment as it was at `start()` (not the server's, from when it started), and vLLM's
context function is replaced by one that still runs vLLM's own. A real forkserver; a
stand-in module for vLLM's (importing vLLM takes 10 s)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from deployments.llm import forkserver
from tests.deployments import _forkservers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Python's forkserver")


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A forkserver of this test's own (the module's preload, light here), stopped after
    (its children first: none of them outlives the test)."""
    fs: Any = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    monkeypatch.setattr(fs, "_preload_modules", fs._preload_modules)
    monkeypatch.setenv(forkserver.ENV, "1")
    monkeypatch.setattr(forkserver, "PRELOAD", ["deployments.llm.forkserver"])
    monkeypatch.setattr(forkserver, "_started", False)
    monkeypatch.setattr(forkserver, "in_an_actor", lambda: True)
    assert forkserver.start_early()
    assert forkserver.ENV not in os.environ  # not passed on to what the replica starts
    yield
    _forkservers.stop(fs)


def _report(queue: Any, name: str) -> None:
    queue.put((os.environ.get(name), os.getppid()))


def test_nothing_starts_where_the_replica_did_not_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(forkserver.ENV, raising=False)
    monkeypatch.setattr(forkserver, "_started", False)
    assert not forkserver.start_early()
    assert not forkserver.use_for_engine_core()


def test_nothing_starts_outside_an_actor_even_with_the_replicas_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ray.serve.llm's download task runs with the replica's runtime environment."""
    monkeypatch.setenv(forkserver.ENV, "1")
    monkeypatch.setattr(forkserver, "_started", False)
    assert not forkserver.start_early()  # this test process is no Ray actor
    assert not forkserver.use_for_engine_core()


REQUESTER = """
import os, sys, time
from deployments.llm import forkserver
forkserver.in_an_actor = lambda: True
os.environ[forkserver.ENV] = "1"
forkserver.PRELOAD[:] = ["deployments.llm.forkserver"]
assert forkserver.start_early()
core = forkserver.EnvironForkServerContext().Process(target=time.sleep, args=(120,))
core.start()
print(core.pid, flush=True)
time.sleep(120)
"""


def test_a_forked_process_ends_when_its_requester_is_killed() -> None:
    """Ray kills a dead worker's children, not their children: the engine core, the
    server's child, watches its replica itself (here `kill -9` of the requester)."""
    import subprocess

    import psutil

    requester = subprocess.Popen([sys.executable, "-c", REQUESTER], stdout=subprocess.PIPE)
    try:
        assert requester.stdout is not None
        core = psutil.Process(int(requester.stdout.readline()))
        assert core.is_running() and core.ppid() != requester.pid  # the server's child
    finally:
        requester.kill()
        requester.wait()
    gone, alive = psutil.wait_procs([core], timeout=forkserver.ORPHAN_GRACE_S + 20)
    for process in alive:
        process.kill()
    assert gone and not alive


def test_a_forked_process_runs_with_its_requesters_environment_at_start(
    server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Set after the server started: a plain forkserver child would not see it
    monkeypatch.setenv("SERVEGRAPH_TEST_LATE", "set after the server started")
    context = forkserver.EnvironForkServerContext()
    queue = context.Queue()
    process = context.Process(target=_report, args=(queue, "SERVEGRAPH_TEST_LATE"))
    process.start()
    value, parent = queue.get(timeout=30)
    process.join(timeout=30)
    assert process.exitcode == 0
    assert value == "set after the server started"
    assert parent != os.getpid()  # forked by the server, not by this process


def test_vllms_context_function_is_replaced_by_one_that_still_runs_it(
    server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    called = []

    def vllm_get_mp_context() -> Any:  # vLLM's sets the environment, then answers spawn
        called.append(True)
        os.environ["SERVEGRAPH_TEST_VLLM_SET"] = "spawn"
        return multiprocessing.get_context("spawn")

    utils = types.ModuleType("vllm.v1.engine.utils")
    utils.get_mp_context = vllm_get_mp_context  # type: ignore[attr-defined]
    for name in ("vllm", "vllm.v1", "vllm.v1.engine"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.utils", utils)
    monkeypatch.setenv("SERVEGRAPH_TEST_VLLM_SET", "before vLLM's")  # restored after

    assert forkserver.use_for_engine_core()
    assert forkserver.use_for_engine_core()  # a second replica start: not wrapped twice
    context = utils.get_mp_context()  # type: ignore[attr-defined]
    assert called == [True]
    assert isinstance(context, forkserver.EnvironForkServerContext)
    queue = context.Queue()
    process = context.Process(target=_report, args=(queue, "SERVEGRAPH_TEST_VLLM_SET"))
    process.start()
    assert queue.get(timeout=30)[0] == "spawn"  # what vLLM set reaches the engine core
    process.join(timeout=30)
    assert process.exitcode == 0


def test_without_vllms_function_the_engine_core_is_spawned_as_before(
    server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("vllm", "vllm.v1", "vllm.v1.engine", "vllm.v1.engine.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    assert not forkserver.use_for_engine_core()
