"""vLLM's model worker, forked from the engine core's server too, which starts with
the worker's settings.

With the engine core forked (`deployments.llm.forkserver`), the largest part of an LLM
replica's start on CPU after its own imports was vLLM's model worker: the core spawns it
only once the core runs, and it imports torch and vLLM once more (11 s of a 36.6 s start
here, 22 s of a 56.8 s start for a replica added under load; issue 25,
`benchmarks.cold_start`, 2026-12-07).

A forked worker skips those imports, but on CPU vLLM starts its worker with settings that
only a new process reads:

- `LD_PRELOAD` (torch's OpenMP runtime, so that vLLM's kernels and torch share one; and
  tcmalloc where vLLM ships it), which the loader applies at `exec`;
- OpenMP's: the thread count and the cores the threads are bound to (`OMP_NUM_THREADS`,
  `GOMP_CPU_AFFINITY`, `KMP_AFFINITY` or `OMP_PLACES`), which the OpenMP runtime reads
  once, as it loads (GNU's binds the process's first thread then).

So the engine core's server starts over with them (`start_over`, first in its preload,
while the replica is still importing): it imports what vLLM's computation of them needs
(torch and vLLM's `OMPProcessManager`, the class that sets them for the worker),
computes them with it, and `exec`s itself with them in its environment, keeping its pid,
socket and pipe. Started again, it records the CPUs its OpenMP runtime bound it to and
goes back to its replica's CPUs; last in its preload (`ready`) it imports the worker's
modules, checks that it runs no thread a fork is unsafe from, and goes back to the
replica's CPUs once more (an OpenMP runtime a wheel bundles, loaded by those imports,
binds it again). The engine core forked from it runs on its replica's CPUs, as a spawned one did
(`forkserver.EnvironProcess`), but with the worker's OpenMP runtime as the worker has
it, thread count and binding: vLLM sets the core's torch threads to one once the worker
is ready (the core schedules, the worker computes); a parallel region the core ran
before that would run on the worker's cores. When the core starts its worker, the
settings vLLM gives the worker are compared with the server's (`differences`): all the
same, the worker is forked from the server and bound back to the recorded CPUs; any
different (another tensor-parallel size, a NUMA binding, a vLLM that computes them
otherwise), the worker is spawned, as vLLM does it, with a warning naming them. The fork
is safe: the server runs no other thread but a fork-aware one (`other_threads`), and its
OpenMP runtime has run no parallel region (vLLM's own rule for forking its workers, in
`multiproc_executor`).

One server for both processes: a server of the worker's own would import torch and vLLM
a third time beside the replica's and the core's, and a start on 2 cores is bound by its
CPU (a second server, tried first, moved that work rather than removing it: its starts
at rest stayed within the spawned worker's range, 2026-12-07). The first pass's import
of torch before the `exec` is what one server costs.

The forked worker is the server's child: `forkserver.EnvironProcess` gives it the
core's environment as it was at `start()` and ends it when the core ends.

By hand for the reasons `deployments.llm.forkserver` gives: vLLM forces `spawn` in a Ray
actor and has no hook before its worker starts. So, in the core, `use_for_workers`
replaces the function vLLM's executor asks for its process context
(`vllm.v1.executor.multiproc_executor.get_mp_context`), as `forkserver` does for the core.

Only where the engine core is forked and the replica asked for it
(`SERVEGRAPH_LLM_WORKER_FORKSERVER`, default on for a CPU engine).
"""

from __future__ import annotations

import logging
import multiprocessing.context
import multiprocessing.forkserver
import multiprocessing.spawn
import os
import sys
from collections.abc import Mapping
from typing import Any

from deployments.llm import forkserver

# First and last in the engine core's server's preload where the replica asked for its
# worker forked (`forkserver.start_early`): `start_over`, then `ready`
FIRST = "deployments.llm.worker_server_start"
LAST = "deployments.llm.worker_server_ready"
# Set by the server for itself as it starts over: the CPUs to go back to
CPUS_ENV = "SERVEGRAPH_LLM_WORKER_SERVER_CPUS"
# What the worker's process imports before it runs: its target's module and its class
WORKER_MODULES = ("vllm.v1.executor.multiproc_executor", "vllm.v1.worker.cpu_worker")
# The settings a process reads as it starts: the loader's, and the OpenMP runtime's
# (GNU's, Intel's, LLVM's), read once as it loads
EXEC_PREFIXES = ("LD_", "OMP_", "GOMP_", "KMP_")

_log = logging.getLogger(__name__)
# In the server started over, and the processes forked from it: its `exec_settings`,
# and the CPUs its OpenMP runtime bound it to as it loaded
_settings: dict[str, str] | None = None
_bound: set[int] | None = None
_replica_cpus: set[int] | None = None


def exec_settings(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in environ.items() if name.startswith(EXEC_PREFIXES)}


def start_over() -> None:
    """First in the engine core's server's preload (`FIRST`): compute the worker's
    settings with vLLM's code and `exec` this process again with them; started over,
    record them and the CPUs its OpenMP runtime bound it to as it loaded, and go back to
    its replica's CPUs. Never raises: the server's preload stops at any error but an
    ImportError; without the settings the worker is spawned as before."""
    global _settings, _bound, _replica_cpus
    try:
        cpus = os.environ.pop(CPUS_ENV, None)
        if cpus is not None:  # started over
            _replica_cpus = {int(cpu) for cpu in cpus.split(",")}
            _bound = os.sched_getaffinity(0)
            _settings = exec_settings(os.environ)
            os.sched_setaffinity(0, _replica_cpus)
            return
        if sys.version_info >= (3, 14):  # its forkserver reads a key before the preload
            raise RuntimeError("Python 3.14's forkserver cannot start over in its preload")
        settings = predicted_settings()
        replica_cpus = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # The same command line, socket and pipes (passed to this process, inherited)
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **settings, CPUS_ENV: replica_cpus})
    except Exception as exc:
        _settings = None
        _log.warning("model worker's settings not prepared (%s): the worker is spawned", exc)


def ready() -> None:
    """Last in the server's preload (`LAST`), started over: import the worker's modules,
    check that no import left a thread running that a fork is not safe from
    (`other_threads`: a fork copies only the thread that forks, so the engine core and
    the worker would get that thread's locks or an OpenMP pool in a state no thread of
    theirs can leave), and go back to the replica's CPUs once more: an
    OpenMP runtime a wheel bundles (scikit-learn's, sentencepiece's), loaded by these
    imports, reads the worker's binding as it loads and binds the server again (seen:
    importing vLLM's engine core put the server on core 0). Never raises; on a failure
    the worker is spawned as before."""
    global _settings
    if _settings is None or _replica_cpus is None:
        return
    try:
        import importlib

        for module in WORKER_MODULES:
            importlib.import_module(module)
        if others := other_threads():
            raise RuntimeError(f"threads {others} run beside the one that forks")
        os.sched_setaffinity(0, _replica_cpus)
    except Exception as exc:
        _settings = None
        _log.warning("model worker's server not ready (%s): the worker is spawned", exc)


# Native threads that survive a fork by design. jemalloc's background purging thread,
# started by the allocator a wheel bundles as vLLM's engine core's imports load it
# (pyarrow's): its fork handlers hold its locks across the fork and rebuild its state in
# the child. The engine core's server has run it since the core was first forked.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})


def other_threads() -> list[str]:
    """The names of this process's threads, but the calling one's, that a fork would
    leave in an unknown state (`FORK_SAFE_THREADS` left out)."""
    import threading

    me = threading.get_native_id()
    names = []
    for task in os.listdir("/proc/self/task"):
        if int(task) != me:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
    return sorted(name for name in names if name not in FORK_SAFE_THREADS)


def predicted_settings() -> dict[str, str]:
    """The loader's and OpenMP's settings vLLM gives a CPU engine's only worker (tensor
    parallel size 1, local rank 0), computed as vLLM does: `LD_PRELOAD` by the rule of
    `CpuPlatform.check_and_update_config` (restated: it runs on a whole engine
    configuration), OpenMP's by vLLM's own `OMPProcessManager`. Imports torch."""
    from types import SimpleNamespace

    from vllm.utils.ompmultiprocessing import OMPProcessManager

    before = dict(os.environ)
    try:
        os.environ["LD_PRELOAD"] = vllm_ld_preload(before.get("LD_PRELOAD", ""))
        parallel = SimpleNamespace(
            local_world_size=1, data_parallel_rank_local=0, _api_process_count=1
        )
        config: Any = SimpleNamespace(parallel_config=parallel, kv_transfer_config=None)
        with OMPProcessManager(config).configure_omp_envs(rank=0, local_rank=0):
            return exec_settings(os.environ)
    finally:
        forkserver._become(before)


def vllm_ld_preload(current: str) -> str:
    """`LD_PRELOAD` as vLLM's CPU platform sets it for its processes (vLLM 0.32,
    `CpuPlatform.check_and_update_config`): torch's OpenMP runtime added where no OpenMP
    runtime is preloaded, then vLLM's tcmalloc put first where vLLM ships one and it is
    not preloaded. Where this drifts from vLLM, the settings differ at the worker's start
    and it is spawned (and `tests/deployments/test_llm_worker_server.py` fails)."""
    import glob
    import platform

    import torch
    from vllm.platforms import CpuArchEnum
    from vllm.platforms.interface import Platform

    if platform.system() != "Linux":
        return current
    arch = Platform.get_cpu_architecture()
    if arch in (
        CpuArchEnum.ARM,
        CpuArchEnum.POWERPC,
        CpuArchEnum.X86,
        CpuArchEnum.S390X,
    ) and not any(name in current for name in ("libomp", "libgomp", "libiomp")):
        torch_dir = os.path.dirname(torch.__file__)
        found = [
            path
            for libs in (os.path.join(os.path.dirname(torch_dir), "torch.libs"), torch_dir + "/lib")
            for path in glob.glob(os.path.join(libs, "libgomp*.so*"))
        ]
        if found:
            current = f"{current}:{found[0]}" if current else found[0]
    if (
        arch in (CpuArchEnum.ARM, CpuArchEnum.X86, CpuArchEnum.S390X)
        and "libtcmalloc" not in current
    ):
        import vllm

        libs = os.path.join(os.path.dirname(vllm.__file__), "libs")
        for pattern in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            if found := glob.glob(os.path.join(libs, pattern)):
                current = f"{found[0]}:{current}" if current else found[0]
                break
    return current


def differences(server: Mapping[str, str], worker: Mapping[str, str]) -> list[str]:
    """The settings read at a process's start (`exec_settings`) in which a worker started
    with `worker` would differ from one forked from a server started with `server`:

    - the loader's (`LD_*`) and those of GNU's OpenMP runtime (`OMP_*`, `GOMP_*`): all;
    - those of Intel's or LLVM's (`KMP_*`) unless GNU's is the one preloaded: GNU's does
      not read them, and modules the replica imports set some for their own reasons
      (scikit-learn and joblib: `KMP_DUPLICATE_LIB_OK`, `KMP_INIT_AT_FORK`);
    - `LD_LIBRARY_PATH` where the server's has a folder the worker's lacks. A folder added
      after the server started is left out of the forked worker's library search, not of
      its processes' (its environment is the worker's): OpenCV adds its own for its
      processes as the replica imports it, and finds its libraries without it.
    """
    names = set(server) | set(worker)
    gnu = "libgomp" in worker.get("LD_PRELOAD", "")
    differ = [
        name
        for name in names
        if name != "LD_LIBRARY_PATH" and not (name.startswith("KMP_") and gnu)
        if server.get(name) != worker.get(name)
    ]
    search = worker.get("LD_LIBRARY_PATH", "").split(":")
    if any(f not in search for f in server.get("LD_LIBRARY_PATH", "").split(":") if f):
        differ.append("LD_LIBRARY_PATH")
    return sorted(differ)


class WorkerProcess(forkserver.EnvironProcess):
    """vLLM's model worker: forked from the engine core's server where the settings vLLM
    gave it at `start()` are the server's, else spawned."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:  # multiprocessing's name
        from multiprocessing import popen_spawn_posix

        if _settings is None:  # a core whose server has none never asks (`use_for_workers`)
            return popen_spawn_posix.Popen(process_obj)
        differ = differences(_settings, exec_settings(os.environ))
        wrapped = os.fsdecode(multiprocessing.spawn.get_executable()) != sys.executable
        if not differ and not wrapped:
            from multiprocessing import popen_forkserver

            try:
                return popen_forkserver.Popen(process_obj)
            except (OSError, EOFError) as exc:  # the server is gone
                _log.warning("engine core's server unreachable (%s): model worker spawned", exc)
        else:
            _log.warning(
                "model worker spawned: %s",
                "vLLM starts it through a wrapper (NUMA binding)"
                if wrapped
                else f"vLLM gives it settings its server did not start with: {differ}",
            )
        return popen_spawn_posix.Popen(process_obj)

    def _place(self) -> None:
        if _bound is not None:  # forked: back where the server's OpenMP runtime bound it
            os.sched_setaffinity(0, _bound)


class WorkerContext(multiprocessing.context.ForkServerContext):
    Process = WorkerProcess


def use_for_workers() -> bool:
    """In an engine core forked from a server started over with the worker's settings:
    make vLLM's executor start its workers in `WorkerContext`, by a function that still
    runs vLLM's own first (for what it sets in the environment). Whether it did."""
    if _settings is None:
        return False
    try:
        from vllm.v1.executor import multiproc_executor
    except ImportError:
        return False
    if not forkserver.replace_context(multiproc_executor, WorkerContext(), "the model worker"):
        return False
    # The core asks the server it was forked from, whose address and pipe it inherited
    # (`multiprocessing.forkserver` sets them in a forked child). It knows no pid of that
    # server, so `ensure_running` would start a server of its own: the server is its
    # replica's, and outlives the core.
    server = multiprocessing.forkserver._forkserver
    server.ensure_running = lambda: None  # type: ignore[method-assign]
    return True
