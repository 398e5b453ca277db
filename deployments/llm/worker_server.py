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

So the engine core's server starts over with them (`prepare`, first in its preload, while
the replica is still importing): it imports what vLLM's computation of them needs (torch
and vLLM's `OMPProcessManager`, the class that sets them for the worker), computes them
with it, and `exec`s itself with them in its environment, keeping its socket and pipe.
Started again, it records the CPUs its OpenMP runtime bound it to, goes back to its
replica's CPUs, imports the core's and the worker's modules, and goes back to the
replica's CPUs once more (`deployments.llm.worker_server_settled`: an OpenMP runtime a
wheel bundles, loaded by those imports, binds it again), so that the engine core forked
from it runs where a spawned one did. When the core starts its worker, the
settings vLLM gives the worker are compared with the server's (`differences`): all the
same, the worker is forked from the server and bound back to the recorded CPUs; any
different (another tensor-parallel size, a NUMA binding, a vLLM that computes them
otherwise), the worker is spawned, as vLLM does it, with a warning naming them. The fork
is safe: the server runs no thread, and its OpenMP runtime has run no parallel region
(vLLM's own rule for forking its workers, in `multiproc_executor`).

One server for both processes: a server of the worker's own would import torch and vLLM
a third time beside the replica's and the core's, and a start on 2 cores is bound by its
CPU (a second server measured no faster at rest than the spawned worker, 2026-12-07).
The first pass's import of torch before the `exec` is what this costs.

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

# Set by `forkserver.start_early` for the engine core's server only: compute the worker's
# settings and start over with them
ENV = "SERVEGRAPH_LLM_WORKER_SERVER"
# Set by the server for itself as it starts over: the CPUs to go back to
CPUS_ENV = "SERVEGRAPH_LLM_WORKER_SERVER_CPUS"
# What the worker's process imports before it runs (its target's module and its class),
# after the engine core's; then the server goes back to its replica's CPUs
PRELOAD = [
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.cpu_worker",
    "deployments.llm.worker_server_settled",
]
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


def prepare() -> None:
    """In the engine core's server, first in its preload: where `forkserver.start_early`
    asked for it, compute the worker's settings with vLLM's code and `exec` this process
    again with them; started over, record them and its OpenMP runtime's binding, and go
    back to its replica's CPUs. Never raises: the server's preload stops at any error
    but an ImportError, and without the settings the worker is spawned as before."""
    global _settings, _bound, _replica_cpus
    cpus = os.environ.pop(CPUS_ENV, None)
    if cpus is not None:  # started over
        _settings = exec_settings(os.environ)
        _bound = os.sched_getaffinity(0)
        _replica_cpus = {int(cpu) for cpu in cpus.split(",")}
        os.sched_setaffinity(0, _replica_cpus)
        return
    if os.environ.pop(ENV, None) != "1":
        return
    try:
        settings = predicted_settings()
        replica_cpus = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        # The same command line, socket and pipes (passed to this process, inherited)
        os.execve(sys.executable, sys.orig_argv, {**os.environ, **settings, CPUS_ENV: replica_cpus})
    except Exception as exc:
        _log.warning("model worker's settings not prepared (%s): the worker is spawned", exc)


def settle() -> None:
    """In the server started over, once its preload is imported
    (`deployments.llm.worker_server_settled`): back on its replica's CPUs."""
    if _replica_cpus is not None:
        os.sched_setaffinity(0, _replica_cpus)


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

    - `LD_PRELOAD`, and the settings of GNU's OpenMP runtime (`OMP_*`, `GOMP_*`): all;
    - those of Intel's or LLVM's (`KMP_*`) where the preloaded runtime is one of theirs:
      GNU's does not read them, and modules the replica imports set some for their own
      reasons (scikit-learn and joblib: `KMP_DUPLICATE_LIB_OK`, `KMP_INIT_AT_FORK`);
    - `LD_LIBRARY_PATH` where the server's has a folder the worker's lacks. A folder added
      after the server started is left out of the forked worker's library search, not of
      its processes' (its environment is the worker's): OpenCV adds its own for its
      processes as the replica imports it, and finds its libraries without it.
    """
    names = set(server) | set(worker)
    preload = worker.get("LD_PRELOAD", "")
    intel = "libiomp" in preload or "libomp" in preload
    differ = [
        name
        for name in names
        if (name == "LD_PRELOAD" or name.startswith(("OMP_", "GOMP_")))
        or (name.startswith("KMP_") and intel)
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
        differ = differences(_settings or {}, exec_settings(os.environ))
        wrapped = os.fsdecode(multiprocessing.spawn.get_executable()) != sys.executable
        if _settings is not None and not differ and not wrapped:
            from multiprocessing import popen_forkserver

            try:
                return popen_forkserver.Popen(process_obj)
            except OSError as exc:  # the server is gone
                _log.warning("engine core's server unreachable (%s): model worker spawned", exc)
        elif _settings is not None:
            _log.warning(
                "model worker spawned: %s",
                "vLLM starts it through a wrapper (NUMA binding)"
                if wrapped
                else f"vLLM gives it settings its server did not start with: {differ}",
            )
        from multiprocessing import popen_spawn_posix

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
    vllm_context = getattr(multiproc_executor, "get_mp_context", None)
    if vllm_context is None:
        _log.warning("vLLM's executor has no get_mp_context: the model worker is spawned")
        return False
    if getattr(vllm_context, "_servegraph", False):
        return True
    context = WorkerContext()

    def get_mp_context() -> Any:
        vllm_context()
        return context

    get_mp_context._servegraph = True  # type: ignore[attr-defined]
    setattr(multiproc_executor, "get_mp_context", get_mp_context)  # noqa: B010  # untyped module
    # The core asks the server it was forked from, whose address and pipe it inherited
    # (`multiprocessing.forkserver` sets them in a forked child). It did not start that
    # server and cannot wait on it, as `ensure_running` would: the server is its
    # replica's, and outlives the core.
    server = multiprocessing.forkserver._forkserver
    server.ensure_running = lambda: None  # type: ignore[method-assign]
    return True


prepare()  # in the engine core's server only (`ENV`, `CPUS_ENV`): its preload imports this
