"""The LLM engine's CPU priority (`deployments.llm.engine.lower_engine_priority`): every
process the replica started, each of their threads, runs `offset` below the replica
(capped at 19), and the replica's own threads keep theirs. A child process stands in for
vLLM's engine; Linux only (a priority is a thread's there)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deployments.llm.engine import lower_engine_priority
from tests.procs import thread_nice

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities")

ENGINE = """
import threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def test_the_engines_processes_run_below_the_replica_and_the_replica_keeps_its_own() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    engine = subprocess.Popen([sys.executable, "-c", ENGINE], stdout=subprocess.PIPE, text=True)
    try:
        assert engine.stdout is not None and engine.stdout.readline() == "ready\n"
        assert len(thread_nice(engine.pid)) == 2  # its main thread and the one it started
        assert engine.pid in lower_engine_priority(3)
        assert set(thread_nice(engine.pid).values()) == {min(base + 3, 19)}
        assert lower_engine_priority(40) and set(thread_nice(engine.pid).values()) == {19}
        assert set(thread_nice(os.getpid()).values()) == {base}  # the replica's threads: untouched
    finally:
        engine.kill()
        engine.wait()


def test_only_the_processes_named_are_lowered_where_asked() -> None:
    """On a partitioned node only vLLM's worker is lowered (`LLMServer.__init__`): its
    engine core keeps the replica's priority."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    started = [
        subprocess.Popen([sys.executable, "-c", ENGINE, name], stdout=subprocess.PIPE, text=True)
        for name in ("VLLM::Worker", "EngineCore")
    ]
    try:
        for process in started:
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        worker, core = started
        assert lower_engine_priority(3, only="VLLM::Worker") == [worker.pid]
        assert set(thread_nice(worker.pid).values()) == {min(base + 3, 19)}
        assert set(thread_nice(core.pid).values()) == {base}
    finally:
        for process in started:
            process.kill()
            process.wait()
