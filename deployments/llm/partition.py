"""The CPU partition on the node a CPU engine shares with the platform: vLLM's model
worker keeps its cores, and the platform's own processes run on the others.

vLLM on CPU binds its worker's threads to every core but the last (one logical CPU per
physical core; on 2 cores, core 0 with one thread) and leaves the last to "other
processes", its engine core among them. In the one-process monolith
(`benchmarks/monolith.py`) the other processes fit there. On the platform they do not:
Ray's daemons, Serve's proxy and controller, the pipelines' ingress, the gateways, the
LLM's own Serve replica and its engine core took 0.41 of a core beside the worker, the
scheduler spread them over both cores, and the worker, at nice 19 beneath them, got 0.80
of its core instead of the monolith's 0.96: `rag` answered 0.73-0.76 of the monolith's
requests per second. With every process but the worker moved off the worker's core, by
hand, it answered as many (`benchmarks.rag_cpu`, 2026-12-07, README).

So the LLM's replica (`Partition`, from its engine's start), while its engine has
requests, keeps every process of its Ray session on its node (the raylet and what it
started, the session's daemons), each thread (Linux's affinity is a thread's), off the
cores its worker is bound to; a sweep every `RESWEEP_S` catches processes started
since (those the raylet starts inherit its cores anyway). Once the engine has had no
request for `IDLE_S`, every process is back on every core (`open`): the HTTP path of an
encoder (Serve's proxy, its gateway) costs far more CPU than its forward pass, and
confined to the cores vLLM leaves while the LLM idled, it answered the classifier's
50 requests/s over HTTP at a p99 of 3.6 s. The model servers' replicas (each catalog
server's serving deployment: the encoders' forward passes, the index's searches) are
placed by the mode (`LLMSettings.cpu_partition`) while the engine has requests:

- `shared`: on every core, the worker's included, where they run at a higher priority
  than the worker (nice 15 against 19);
- `exclusive`: off the worker's cores too. The LLM's throughput first: on 2 cores the
  classifier at 50 requests/s by handle beside 8 `rag` callers then had a p99 of 18 s,
  its share of one core too small;
- `off` (the default): nothing moves.

Off by default, for what it costs the encoders (`benchmarks.speed`, same machine, one
run each, 2026-12-07): the classifier at 50 requests/s by handle had a p99 of 235 ms
with the LLM idle and 446 ms beside 8 `rag` callers without a partition, 548 and 719 ms
with `shared`, 200 ms and 18 s with `exclusive` (first version). And vLLM's automatic
binding leaves "other processes" one core whatever the node's size (all but the last
on x86), so on a larger node a partition would put the whole platform on one core
while the LLM generates: the worker's cores should be sized from the LLM's ask first
(`VLLM_CPU_OMP_THREADS_BIND`, which the partition follows: it reads the worker's cores
from the running worker).

With a partition the engine core keeps its replica's priority and only the worker is
lowered (`engine.lower_engine_priority`): the core schedules each of the worker's steps
and the worker waits for it, so a core lowered beneath the replicas it now shares its
cores with starved the worker it feeds.

Measured (`benchmarks.rag_cpu`, 4 closed-loop `rag` callers, 2-core machine,
2026-12-07, one run each), answers/s of the platform over the monolith's in the same
run: no partition 0.70-0.71; `shared` 0.73, and 0.82 with the engine core at its
replica's priority; the model servers off the worker's cores too 0.87, and 0.87-0.98
with the engine core at its replica's priority. In `shared` the embedder's forward
passes (about a tenth of a core) land on the worker's core, where the scheduler sees
the least weight, and take it from the worker.

Where the partition cannot hold (the worker bound to every core of the node; a node
with one core), nothing moves and the replica says so in its log. A replica leaving
(`LLMServer.__del__`, `Partition.stop`) puts every process back on every core; one that
died does not, and its successor's first sweep does (`open`, which needs no worker). No
model worker is ever moved, another replica's included: vLLM binds its own.

The replica starts on every core of its node (`prepare`, at its module's import), as it
did before any partition: vLLM's automatic binding reads the cores its process may run
on, and its engine core and worker, started from the replica, must find the whole node
to bind the worker as on a first start (a replica started after a sweep inherits the
raylet's other cores). An operator's own binding (`VLLM_CPU_OMP_THREADS_BIND`) is
followed as vLLM follows it: the worker's cores are read from the running worker.

By hand because neither Ray nor vLLM offers it: Ray places work by logical resources and
leaves cores to the OS (its `num_cpus` is no binding); vLLM binds its own worker only.
A cpuset per process (cgroups) would need privileges a replica does not have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import psutil

Mode = Literal["off", "shared", "exclusive"]
# The variable `LLMSettings.cpu_partition` reads, which the replica's runtime env sets
ENV = "SERVEGRAPH_LLM_CPU_PARTITION"
Placement = Literal["open", "shared", "exclusive"]
# vLLM's title for its model worker's process (`setproctitle`)
WORKER_TITLE = "VLLM::Worker"
RESWEEP_S = 10.0
# How often the partition's thread looks whether the engine has requests, and how long
# the engine is idle before every process gets every core back (`open`)
POLL_S = 0.5
IDLE_S = 5.0

_log = logging.getLogger(__name__)


def node_cpus() -> set[int]:
    """The CPUs this node lets its processes run on: Linux intersects a wider mask with
    the process's cpuset (a container's cores), whatever this thread's own mask."""
    mine = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        return os.sched_getaffinity(0)
    finally:
        os.sched_setaffinity(0, mine)


def prepare(mode: str) -> None:
    """At the LLM replica's import, before its engine's processes start: this process on
    every core of its node, where a partition is on."""
    if mode != "off":
        os.sched_setaffinity(0, node_cpus())


@dataclass
class Sweep:
    """One pass: the worker's cores, the others, and how many processes moved."""

    worker_cpus: set[int]
    rest: set[int]
    moved: int = 0
    widened: int = 0


def server_titles() -> tuple[str, ...]:
    """The process titles of the model servers' serving replicas but the LLM's (Ray
    titles a replica `ServeReplica:<application>:<deployment>`; any application, so a
    server deployed under another name, a version's, is one too)."""
    from deployments.catalog import CATALOG

    return tuple(f":{spec.deployment}" for spec in CATALOG.values() if ":" not in spec.deployment)


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def is_server_replica(cmdline: str, titles: Iterable[str]) -> bool:
    if "ServeReplica:" not in cmdline:
        return False
    # "ServeReplica:<app>:<deployment>", with ".<method>" while one runs
    name = cmdline.split("ServeReplica:", 1)[1].split()[0]
    deployment = name.rpartition(":")[2].split(".")[0]
    return f":{deployment}" in titles


def session_processes(raylet: psutil.Process) -> list[psutil.Process]:
    """The processes of `raylet`'s Ray session on this node: the raylet, what it started,
    and the daemons whose command line names the session's folder (GCS, dashboard, log
    monitor, on the head node)."""
    found = {raylet.pid: raylet}
    with contextlib.suppress(psutil.Error):
        for child in raylet.children(recursive=True):
            found[child.pid] = child
    session = _session_dir(_cmdline(raylet))
    if session:
        for process in psutil.process_iter():
            # the folder itself or a path in it, not a session whose name starts alike
            if process.pid not in found and any(
                arg.split("=", 1)[-1] == session or session + "/" in arg
                for arg in _cmdline(process).split()
            ):
                found[process.pid] = process
    return list(found.values())


def _session_dir(cmdline: str) -> str | None:
    for arg in cmdline.split():
        value = arg.split("=", 1)[-1]
        if "/session_" in value:
            # ".../session_<date>_<pid>/sockets/raylet" -> ".../session_<date>_<pid>"
            head, tail = value.split("/session_", 1)
            return f"{head}/session_{tail.split('/', 1)[0]}"
    return None


def raylet_of(process: psutil.Process) -> psutil.Process | None:
    """The raylet that started `process` (a Ray worker's parent)."""
    with contextlib.suppress(psutil.Error):
        for parent in process.parents():
            if "raylet" in parent.name():
                return parent
    return None


def _set(process: psutil.Process, cpus: set[int]) -> bool:
    """Every thread of `process` on `cpus`; whether it moved (False: it had ended)."""
    try:
        threads = process.threads()
    except psutil.Error:
        return False
    for thread in threads:
        # a thread that ended meanwhile; a process of another user's (not ours to move)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(thread.id, cpus)
    return True


def sweep(placement: Placement, replica: psutil.Process | None = None) -> Sweep | None:
    """Place the session's processes on this node against the cores of the LLM replica's
    (`replica`, this process by default) model worker: `open`, every one on every core
    (also where the worker is gone: an engine that died leaves nothing partitioned);
    `shared`, the platform's own off the worker's cores and the model servers' replicas
    on every core; `exclusive`, both off. No model worker is touched, this replica's or
    another's. None where there is nothing to do: no worker (but `open`), or no core
    left beside it."""
    replica = replica or psutil.Process()
    try:
        children = replica.children(recursive=True)
    except psutil.Error:  # the replica gone
        return None
    workers = [p for p in children if WORKER_TITLE in _cmdline(p)]
    taken: set[int] = set()
    for worker in workers:
        with contextlib.suppress(psutil.Error, OSError):
            taken |= os.sched_getaffinity(worker.pid)
    everything = node_cpus()
    rest = everything if placement == "open" else everything - taken
    if placement != "open" and (not taken or not rest):
        return None
    raylet = raylet_of(replica)
    if raylet is None:
        return None
    titles = server_titles() if placement != "exclusive" else ()
    done = Sweep(taken, rest)
    for process in session_processes(raylet):
        cmdline = _cmdline(process)
        if WORKER_TITLE in cmdline:  # vLLM binds its workers itself
            continue
        if titles and is_server_replica(cmdline, titles):
            done.widened += _set(process, everything)
        else:
            done.moved += _set(process, rest)
    return done


class Partition:
    """The partition of the LLM replica's node, kept by a daemon thread of its own: a
    sweep at `start`, then one whenever the placement changes (the mode's while the
    engine has requests, `open` once it has had none for `IDLE_S`) and every
    `RESWEEP_S` for processes started since.
    `busy` says whether the engine has requests (read from the thread); `wake` (a
    request arrived) makes the thread look again at once rather than within `POLL_S`."""

    def __init__(
        self,
        mode: Mode,
        busy: Callable[[], bool],
        replica: psutil.Process | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = mode
        self._busy = busy
        self._replica = replica
        self._clock = clock
        self._last_busy = -math.inf
        self._last_sweep = -math.inf
        self.placement: Placement | None = None  # the last sweep's
        self._wake = threading.Event()
        self._stop = threading.Event()

    def step(self) -> Sweep | None:
        """One look: sweep where the model servers' place changed or `RESWEEP_S` passed."""
        now = self._clock()
        if self._busy():
            self._last_busy = now
        placement: Placement = (
            "open" if now - self._last_busy >= IDLE_S or self.mode == "off" else self.mode
        )
        if placement == self.placement and now - self._last_sweep < RESWEEP_S:
            return None
        done = sweep(placement, replica=self._replica)
        self._last_sweep = now
        if done is not None:
            self.placement = placement
        return done

    def start(self) -> bool:
        """The first sweep, then the thread; whether the partition holds here. Never
        raises: the replica serves without a partition rather than not at all."""
        try:
            first = self.step()
        except Exception:
            _log.exception("CPU partition %r not applied", self.mode)
            return False
        if first is None or not first.worker_cpus or first.worker_cpus >= node_cpus():
            _log.warning(
                "CPU partition %r not applied: no model worker found, or it is bound to "
                "every core of the node (%s)",
                self.mode,
                sorted(node_cpus()),
            )
            return False
        _log.info(
            "CPU partition %r: the model worker on cores %s; while the engine has "
            "requests, the platform's processes on the others",
            self.mode,
            sorted(first.worker_cpus),
        )
        threading.Thread(target=self._run, name="cpu-partition", daemon=True).start()
        return True

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """End the thread and put every process back on every core (the replica is
        leaving: its node is no longer the LLM's to partition)."""
        self._stop.set()
        self._wake.set()
        try:
            sweep("open", replica=self._replica)
        except Exception:
            _log.exception("CPU partition: the node not opened again")

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(POLL_S)
            self._wake.clear()
            try:
                self.step()
            except Exception:  # the next look tries again; the engine is untouched
                _log.exception("CPU partition: a sweep failed")
