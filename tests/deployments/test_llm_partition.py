"""The CPU partition on a CPU engine's node (`deployments.llm.partition`): a sweep moves
every process of the Ray session on the node, each thread, off the cores the model
worker is bound to, but the worker; `shared` leaves the model servers' replicas on every
core; processes of no Ray session are not touched.

Real processes stand in for Ray's, under the titles Ray and vLLM give theirs: a
"raylet" (a shell under that name, whose command line names its session's folder) that
started an LLM replica (which started a "VLLM::Worker" bound to core 0), an embedder
replica and an ingress replica with two threads; a daemon of the session that the
raylet did not start; and a process of no session. Linux, 2 cores at least."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from deployments.llm import partition

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or len(os.sched_getaffinity(0)) < 2,
    reason="per-thread affinity; a core for the worker and one for the rest",
)

SLEEP = "import time; time.sleep(120)"
# the core the stand-in worker is bound to, as vLLM binds its worker: one this test may use
WORKER_CPU = min(os.sched_getaffinity(0))
TWO_THREADS = "import threading, time; threading.Thread(target=time.sleep, args=(120,)).start()"


@dataclass
class Node:
    raylet: psutil.Process
    replica: psutil.Process
    worker: psutil.Process
    embedder: psutil.Process
    ingress: psutil.Process
    other_worker: psutil.Process  # another LLM replica's, bound by its own vLLM
    daemon: psutil.Process
    outsider: psutil.Process


def _titled(title: str, tag: str) -> psutil.Process:
    """The process titled `title` whose command line has `tag`, once it exists."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or [""]
            if cmdline[0] == title and tag in " ".join(cmdline):
                return process
        time.sleep(0.05)
    raise AssertionError(f"no process titled {title!r}")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    tag = uuid.uuid4().hex  # this test's processes, apart from any other's (a last test's)
    session = tmp_path / "session_2026-12-07_00-00-00_000000_1"
    (tmp_path / "replica.sh").write_text(  # it outlives its worker, as a replica does
        f'(exec -a "VLLM::Worker:{tag}" sleep 120) &\nsleep 120 &\nwait\n'
    )
    (tmp_path / "raylet.sh").write_text(
        f'(exec -a "ray::ServeReplica:llm:LLMServer:{tag}" bash {tmp_path}/replica.sh) &\n'
        f'(exec -a "ray::ServeReplica:embedder:Embedder" {sys.executable} -c "{SLEEP}" {tag}) &\n'
        f'(exec -a "ray::ServeReplica:rag:Ingress" {sys.executable} -c "{TWO_THREADS}" {tag}) &\n'
        f'(exec -a "VLLM::Worker:other:{tag}" sleep 120) &\n'
        "wait\n"
    )
    raylet_bin = tmp_path / "raylet"  # its process's name, as the raylet's
    raylet_bin.symlink_to(shutil.which("bash") or "/bin/bash")
    started = [
        subprocess.Popen(
            [raylet_bin, tmp_path / "raylet.sh", f"--raylet_socket_name={session}/sockets/raylet"],
            start_new_session=True,
        ),
        subprocess.Popen(  # a daemon of the session, not the raylet's child
            [sys.executable, "-c", SLEEP, f"--log_dir={session}/logs"],
            start_new_session=True,
        ),
        subprocess.Popen(["sleep", "120"], start_new_session=True),  # no session's
    ]
    try:
        worker = _titled(f"VLLM::Worker:{tag}", tag)
        os.sched_setaffinity(worker.pid, {WORKER_CPU})  # as vLLM binds its worker
        other_worker = _titled(f"VLLM::Worker:other:{tag}", tag)
        os.sched_setaffinity(other_worker.pid, {WORKER_CPU})
        ingress = _titled("ray::ServeReplica:rag:Ingress", tag)
        while len(ingress.threads()) < 2:  # its second thread, once it runs
            time.sleep(0.05)
        yield Node(
            raylet=psutil.Process(started[0].pid),
            replica=_titled(f"ray::ServeReplica:llm:LLMServer:{tag}", tag),
            worker=worker,
            embedder=_titled("ray::ServeReplica:embedder:Embedder", tag),
            ingress=ingress,
            other_worker=other_worker,
            daemon=psutil.Process(started[1].pid),
            outsider=psutil.Process(started[2].pid),
        )
    finally:
        for process in started:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def cpus(process: psutil.Process) -> set[int]:
    """The cores of each of the process's threads, all the same."""
    each = {frozenset(os.sched_getaffinity(t.id)) for t in process.threads()}
    assert len(each) == 1, each
    return set(next(iter(each)))


def test_a_sweep_moves_the_sessions_processes_and_can_leave_the_servers_on_every_core(
    node: Node,
) -> None:
    everything = partition.node_cpus()
    rest = everything - {WORKER_CPU}
    outsider = cpus(node.outsider)
    done = partition.sweep("shared", replica=node.replica)
    assert done is not None
    assert (done.worker_cpus, done.rest) == ({WORKER_CPU}, rest)
    assert cpus(node.worker) == {WORKER_CPU}
    for moved in (node.raylet, node.replica, node.ingress, node.daemon):
        assert cpus(moved) == rest, moved.cmdline()
    assert len(node.ingress.threads()) == 2
    assert cpus(node.embedder) == everything
    assert cpus(node.outsider) == outsider  # of no session: untouched
    assert cpus(node.other_worker) == {WORKER_CPU}  # another replica's worker: untouched
    assert (done.moved, done.widened) == (5, 1)  # and the replica's other child


def test_a_sweep_moves_the_servers_replicas_too_or_widens_them_again(node: Node) -> None:
    rest = partition.node_cpus() - {WORKER_CPU}
    assert partition.sweep("exclusive", replica=node.replica) is not None
    assert cpus(node.embedder) == rest and cpus(node.worker) == {WORKER_CPU}
    # a later sweep widens a server replica again (or one the raylet started since)
    assert partition.sweep("shared", replica=node.replica) is not None
    assert cpus(node.embedder) == partition.node_cpus()


def test_nothing_moves_without_a_worker_or_a_core_beside_it(node: Node) -> None:
    before = {p.pid: cpus(p) for p in (node.raylet, node.ingress, node.embedder)}
    os.sched_setaffinity(node.worker.pid, partition.node_cpus())  # the worker on every core
    assert partition.sweep("shared", replica=node.replica) is None
    assert not partition.Partition("shared", lambda: True, node.replica).start()
    assert partition.sweep("exclusive", replica=node.embedder) is None  # no worker under it
    assert {p.pid: cpus(p) for p in (node.raylet, node.ingress, node.embedder)} == before


def test_a_server_replica_is_known_by_its_deployment_under_any_application() -> None:
    titles = partition.server_titles()
    assert ":Embedder" in titles and ":Classifier" in titles
    assert not any("LLMServer" in t for t in titles)
    assert partition.is_server_replica("ray::ServeReplica:embedder-v2:Embedder.embed", titles)
    assert not partition.is_server_replica("ray::ServeReplica:rag:RagIngress", titles)
    assert not partition.is_server_replica("ray::ServeController", titles)


def test_the_partition_holds_while_the_engine_is_busy_and_opens_once_idle(node: Node) -> None:
    """The partition's decisions on a clock of the test's: every process on every core
    at the start (the engine idle), the mode's placement from the first look that finds
    the engine busy, every core again `IDLE_S` after the last, and a sweep each
    `RESWEEP_S` for processes started since."""
    now, busy = [0.0], [False]
    kept = partition.Partition("exclusive", lambda: busy[0], node.replica, lambda: now[0])
    everything, rest = partition.node_cpus(), partition.node_cpus() - {WORKER_CPU}
    partition.sweep("exclusive", replica=node.replica)  # as a replica before left it
    assert kept.step() is not None and kept.placement == "open"
    assert cpus(node.embedder) == cpus(node.ingress) == cpus(node.raylet) == everything
    assert cpus(node.worker) == {WORKER_CPU}
    assert kept.step() is None  # nothing changed
    busy[0], now[0] = True, 1.0
    assert kept.step() is not None and kept.placement == "exclusive"
    assert cpus(node.embedder) == cpus(node.ingress) == rest
    os.sched_setaffinity(node.ingress.pid, everything)  # its main thread, as if started since
    assert kept.step() is None and os.sched_getaffinity(node.ingress.pid) == everything
    now[0] += partition.RESWEEP_S
    assert kept.step() is not None and cpus(node.ingress) == rest
    busy[0], last = False, now[0]
    now[0] = last + partition.IDLE_S - 0.1
    assert kept.step() is None and cpus(node.embedder) == rest  # not idle long enough
    now[0] = last + partition.IDLE_S
    assert kept.step() is not None and kept.placement == "open"
    assert cpus(node.embedder) == cpus(node.ingress) == everything


def test_shared_leaves_the_servers_on_every_core_while_the_engine_is_busy(node: Node) -> None:
    kept = partition.Partition("shared", lambda: True, node.replica)
    assert kept.step() is not None and kept.placement == "shared"
    assert cpus(node.embedder) == partition.node_cpus()
    assert cpus(node.ingress) == partition.node_cpus() - {WORKER_CPU}


def test_open_puts_everything_back_even_once_the_worker_is_gone(node: Node) -> None:
    """An engine that died, or a replica leaving (`Partition.stop`), leaves nothing
    partitioned: `open` needs no worker. Model workers stay where vLLM bound them."""
    everything = partition.node_cpus()
    assert partition.sweep("exclusive", replica=node.replica) is not None
    node.worker.kill()
    gone, _ = psutil.wait_procs([node.worker], timeout=10)
    assert gone
    assert partition.sweep("exclusive", replica=node.replica) is None  # nothing to keep off
    assert partition.sweep("open", replica=node.replica) is not None
    for process in (node.raylet, node.replica, node.ingress, node.embedder, node.daemon):
        assert cpus(process) == everything, process.cmdline()
    assert cpus(node.other_worker) == {WORKER_CPU}
