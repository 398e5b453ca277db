"""vLLM's engine core, forked from a server that imported vLLM while the replica did.

An LLM replica on CPU is three Python processes, each importing torch and vLLM (9-10 s
each on this machine, issue 25's `benchmarks.cold_start`): the replica, vLLM's engine
core and its model worker, one after the other. vLLM starts both children with `spawn`
inside a Ray actor (forking a process that runs Ray's threads is unsafe), so each
imports everything again once the process before it has finished.

Here the replica starts Python's `forkserver` the moment its own module is imported
(before its heavy imports), preloading the engine core's modules, so that the two
imports run side by side, and vLLM's engine core is forked from that server. The server
is a fresh interpreter that runs no thread of Ray's, so its forks are safe (its imports
start one native thread, jemalloc's, which is fork-aware: `worker_server.other_threads`).
A forked process has read its environment already, in the server; so the core takes
its requester's whole environment as it was at `start()` (what vLLM sets before
starting it: the worker's start method, Ray's address, `LD_PRELOAD`), which it passes
on to the processes it starts. What only an `exec` applies does not reach the
core itself, but the server's own (below): vLLM's `LD_PRELOAD` (tcmalloc, torch's
OpenMP; the core schedules, the worker computes) and its `numactl` wrapper where NUMA
binding is asked for.

Ray kills a dead worker's children, not their children: the core, the server's child,
watches its replica itself and stops when the replica is gone (`_end_with_requester`).

The model worker is forked from the same server where the replica asked for it: the
server then starts over with the settings vLLM gives the worker, which only a new
process reads (torch's OpenMP runtime in its `LD_PRELOAD`, its cores in the OpenMP
settings), and the core runs with them too, on its replica's CPUs
(`deployments.llm.worker_server`). Otherwise the core spawns it, as vLLM does it.

By hand because neither library offers it: vLLM has a `forkserver` start method with
preloading (`VLLM_WORKER_MULTIPROC_METHOD=forkserver`, its API server's), but forces
`spawn` in a Ray actor without a way out, and `ray.serve.llm` has no start-up hook
before the engine core starts. So `use_for_engine_core` replaces the function vLLM's
engine-core launcher asks for its process context (`vllm.v1.engine.utils.get_mp_context`)
by one that calls vLLM's own (which still sets what it sets for the processes it starts)
and returns the server's. Where vLLM no longer has it, the engine starts as before,
with a warning.

Only for a CPU engine, and only in the replica (`ENV` set in its runtime environment by
`deployments.llm.server`); `SERVEGRAPH_LLM_ENGINE_FORKSERVER=false` turns it off.
This module imports nothing heavy: the server and its children import it too.
"""

from __future__ import annotations

import logging
import multiprocessing.context
import multiprocessing.forkserver
import os
from typing import Any

ENV = "SERVEGRAPH_LLM_FORKSERVER"  # "1": the engine core forked; "worker": its worker too
# What the engine core's process imports before it runs (its target's module and the
# executor it starts the worker with): the imports the fork skips.
PRELOAD = [
    "deployments.llm.forkserver",
    "vllm.v1.engine.core",
    "vllm.v1.executor.multiproc_executor",
]

# After its requester is gone, how long a process has to stop on SIGTERM before SIGKILL
ORPHAN_GRACE_S = 10.0

_log = logging.getLogger(__name__)
_started = False


class EnvironProcess(multiprocessing.context.ForkServerProcess):
    """A forkserver process that runs with its requester's environment at `start()`,
    and ends when its requester does."""

    _requester_environ: dict[str, str] | None = None
    _requester_cpus: set[int] | None = None

    def start(self) -> None:
        self._requester_environ = dict(os.environ)
        self._requester_cpus = os.sched_getaffinity(0)
        super().start()

    def run(self) -> None:
        if self._requester_environ is not None:
            _become(self._requester_environ)
        self._place()
        _end_with_requester()
        super().run()

    def _place(self) -> None:
        """Before this process starts a thread: on its requester's CPUs (a spawned
        engine core inherits them; the server's may differ), and where its server
        started over with its worker's settings, starting its worker from the server
        (`worker_server.use_for_workers`)."""
        if self._requester_cpus is not None:
            os.sched_setaffinity(0, self._requester_cpus)
        from deployments.llm import worker_server

        worker_server.use_for_workers()


def _end_with_requester() -> None:
    """Stop this process when its requester's end of the start-up pipe closes: the
    requester exited, was killed, or dropped the process.

    A spawned engine core is its replica's child, and Ray kills a worker's children
    when the worker exits; a forked one is the server's child, which Ray does not reach
    (its kill is not recursive), and vLLM's core does not watch its parent. So this
    thread does: SIGTERM (vLLM's handler shuts the engine down and its worker with it),
    then SIGKILL if the process is still there after `ORPHAN_GRACE_S`.
    `multiprocessing.forkserver` keeps that pipe's write end open in the requester for
    this purpose (the process's `parent_process().sentinel`)."""
    import signal
    import threading
    from multiprocessing.connection import wait

    parent = multiprocessing.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(ORPHAN_GRACE_S)  # the grace, then the end either way
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="servegraph-orphan-watch", daemon=True).start()


def _become(environ: dict[str, str]) -> None:
    """Make this process's environment `environ`, changing only what differs: emptied
    and filled again, it leaves `setproctitle` (vLLM names its processes with it:
    `VLLM::EngineCore`) no room for a title."""
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


class EnvironForkServerContext(multiprocessing.context.ForkServerContext):
    Process = EnvironProcess


def start_early() -> bool:
    """Start the forkserver, preloading vLLM's engine core, when this process is an
    LLM replica that asked for it (`ENV`); whether it did. Returns at once: the server
    imports on its own."""
    global _started
    asked = os.environ.pop(ENV, None)  # not passed on to the children
    if _started or asked not in ("1", "worker"):
        return _started
    if not in_an_actor():  # e.g. ray.serve.llm's download task, which has its env
        return False
    from deployments.llm import worker_server

    # Where the worker is forked too, the server starts over with its settings first
    # (before the heavy imports) and imports the worker's modules last
    preload = [PRELOAD[0], worker_server.FIRST, *PRELOAD[1:], worker_server.LAST]
    try:
        multiprocessing.forkserver.set_forkserver_preload(preload if asked == "worker" else PRELOAD)
        multiprocessing.forkserver.ensure_running()
    except Exception as exc:  # the engine then starts as before
        _log.warning("engine forkserver not started (%s); the engine core is spawned", exc)
        return False
    _started = True
    return True


def in_an_actor() -> bool:
    import sys

    ray = sys.modules.get("ray")  # a replica has imported it before its deployment
    if ray is None:
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # Ray not initialised in this process
        return False


def use_for_engine_core() -> bool:
    """Make vLLM fork its engine core from the server (`start_early`, which must have
    run): replace `vllm.v1.engine.utils.get_mp_context` by one that calls it, then
    returns the server's context. Whether the core will be forked."""
    if not _started:
        return False
    try:
        import vllm.v1.engine.utils as engine_utils
    except ImportError:
        return False
    return replace_context(engine_utils, EnvironForkServerContext(), "the engine core")


def replace_context(module: Any, context: Any, starts: str) -> bool:
    """Replace vLLM's `module.get_mp_context` (what vLLM asks for the context it starts
    `starts` in) by a function that still calls vLLM's own first, for what it sets in
    the environment, then returns `context`; once, however often it is asked. Whether
    it did: where vLLM no longer has the function, it starts the process as before."""
    vllm_context = getattr(module, "get_mp_context", None)
    if vllm_context is None:
        _log.warning("vLLM's %s has no get_mp_context: %s is spawned", module.__name__, starts)
        return False
    if getattr(vllm_context, "_servegraph", False):
        return True

    def get_mp_context() -> Any:
        vllm_context()
        return context

    get_mp_context._servegraph = True  # type: ignore[attr-defined]
    setattr(module, "get_mp_context", get_mp_context)  # noqa: B010  # untyped module
    return True
