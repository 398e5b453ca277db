"""vLLM's model worker forked from a server started with its settings
(`deployments.llm.worker_server`): forked where the settings vLLM gives the worker at its
start are the server's, spawned where they differ; the engine core's server starts it
only where the replica asked, and never fails on it. A real forkserver with a light
preload; vLLM's own code for the settings vLLM computes."""

from __future__ import annotations

import multiprocessing.forkserver
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from deployments.llm import worker_server
from tests.deployments import _forkservers

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Python's forkserver")

GOMP = "/venv/torch/lib/libgomp.so.1"
IOMP = "/opt/intel/libiomp5.so"


@pytest.mark.parametrize(
    ("server", "worker", "differ"),
    [
        (
            {"LD_PRELOAD": GOMP, "OMP_NUM_THREADS": "1"},
            {"LD_PRELOAD": GOMP, "OMP_NUM_THREADS": "1"},
            [],
        ),
        ({"LD_PRELOAD": GOMP}, {"LD_PRELOAD": f"/lib/tcmalloc.so:{GOMP}"}, ["LD_PRELOAD"]),
        ({"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"}, ["OMP_NUM_THREADS"]),
        ({}, {"GOMP_CPU_AFFINITY": "0"}, ["GOMP_CPU_AFFINITY"]),
        # GNU's runtime reads no KMP_ setting; Intel's does
        ({"LD_PRELOAD": GOMP}, {"LD_PRELOAD": GOMP, "KMP_INIT_AT_FORK": "FALSE"}, []),
        ({"LD_PRELOAD": IOMP}, {"LD_PRELOAD": IOMP, "KMP_AFFINITY": "x"}, ["KMP_AFFINITY"]),
        # a folder added to the search path after the server started (OpenCV's): kept
        ({"LD_LIBRARY_PATH": "/a"}, {"LD_LIBRARY_PATH": "/cv2/libs:/a"}, []),
        ({"LD_LIBRARY_PATH": ""}, {"LD_LIBRARY_PATH": "/cv2/libs"}, []),
        # the loader's, and Intel's or LLVM's runtime's where GNU's is not preloaded
        ({}, {"LD_BIND_NOW": "1"}, ["LD_BIND_NOW"]),
        ({}, {"KMP_AFFINITY": "x"}, ["KMP_AFFINITY"]),
        # a folder the server searches that the worker would not
        ({"LD_LIBRARY_PATH": "/a:/b"}, {"LD_LIBRARY_PATH": "/a"}, ["LD_LIBRARY_PATH"]),
    ],
)
def test_the_settings_a_forked_worker_would_get_wrong(
    server: dict[str, str], worker: dict[str, str], differ: list[str]
) -> None:
    assert worker_server.differences(server, worker) == differ


def test_only_a_processs_start_time_settings_are_compared() -> None:
    environ = {"LD_PRELOAD": GOMP, "OMP_NUM_THREADS": "1", "PATH": "/bin", "VLLM_X": "1"}
    assert worker_server.exec_settings(environ) == {"LD_PRELOAD": GOMP, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """This process's forkserver (a light preload), as the engine core's server started
    over with this process's settings: started on this machine's first CPU (as an
    OpenMP runtime binds it), it records that and goes back to all of this process's.
    Stopped after, its children first."""
    fs: Any = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    monkeypatch.setattr(fs, "_preload_modules", fs._preload_modules)
    monkeypatch.setattr(fs, "ensure_running", fs.ensure_running)  # use_for_workers sets it
    multiprocessing.forkserver.set_forkserver_preload(
        ["deployments.llm.forkserver", worker_server.FIRST]
    )
    cpus = os.sched_getaffinity(0)
    os.environ[worker_server.CPUS_ENV] = ",".join(map(str, sorted(cpus)))
    try:
        os.sched_setaffinity(0, {min(cpus)})
        multiprocessing.forkserver.ensure_running()
    finally:
        os.sched_setaffinity(0, cpus)
        del os.environ[worker_server.CPUS_ENV]
    # This process is the engine core that asks it for its worker
    monkeypatch.setattr(worker_server, "_settings", worker_server.exec_settings(os.environ))
    yield fs
    _forkservers.stop(fs)


def test_the_server_really_starts_over_and_forks_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The whole path in a real server: the first pass `exec`s the same process (its pid,
    socket and pipe kept) with the settings (a stub for vLLM's), the second imports the
    preload again and gets ready; a worker with those settings is forked from it."""
    import psutil

    from tests.deployments.worker_settings_stub import STUB

    fs: Any = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
    monkeypatch.setattr(fs, "_preload_modules", fs._preload_modules)
    for name in STUB:
        monkeypatch.delenv(name, raising=False)
    multiprocessing.forkserver.set_forkserver_preload(
        [
            "deployments.llm.forkserver",
            "tests.deployments.worker_settings_stub",
            worker_server.FIRST,
            worker_server.LAST,
        ]
    )
    multiprocessing.forkserver.ensure_running()
    try:
        for name, value in STUB.items():  # this process is the engine core vLLM set them in
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(worker_server, "_settings", worker_server.exec_settings(os.environ))
        parent, _, _ = _start_worker()
        assert parent == fs._forkserver_pid  # the process it started, the same pid
        server = psutil.Process(fs._forkserver_pid)
        # What the process was exec'd with (a `putenv` would not show here)
        assert all(server.environ().get(name) == value for name, value in STUB.items())
    finally:
        _forkservers.stop(fs)


def _report(queue: Any) -> None:
    queue.put((os.getppid(), os.environ.get("SERVEGRAPH_TEST_LATE"), os.sched_getaffinity(0)))


def _start_worker() -> tuple[int, str | None, set[int]]:
    context = worker_server.WorkerContext()
    queue = context.Queue()
    process = context.Process(target=_report, args=(queue,), daemon=True)
    process.start()
    parent, late, cpus = queue.get(timeout=60)
    process.join(timeout=30)
    assert process.exitcode == 0
    return parent, late, cpus


def test_a_worker_with_the_servers_settings_is_forked_from_it(
    started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVEGRAPH_TEST_LATE", "the core's, at start")
    # A folder added by an import after the server started (OpenCV's, for its processes)
    search = os.environ.get("LD_LIBRARY_PATH")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/opt/cv2/libs:{search}" if search else "/opt/cv2")
    parent, late, _ = _start_worker()
    assert parent == started._forkserver_pid
    assert late == "the core's, at start"  # the requester's environment, not the server's


def test_a_forked_worker_runs_where_the_servers_openmp_runtime_bound_it(started: Any) -> None:
    """The server went back to its replica's CPUs after its OpenMP runtime bound it: the
    engine core forked from it runs there; the worker is bound back."""
    import psutil

    parent, _, cpus = _start_worker()  # once the server has imported its preload
    assert parent == started._forkserver_pid
    assert cpus == {min(os.sched_getaffinity(0))}
    server = psutil.Process(started._forkserver_pid)
    assert set(server.cpu_affinity()) == os.sched_getaffinity(0)


def test_a_worker_vllm_gives_other_settings_is_spawned_as_vllm_does_it(
    started: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    parent, _, cpus = _start_worker()
    assert parent == os.getpid()
    assert cpus == os.sched_getaffinity(0)  # where its own OpenMP runtime binds it
    assert "OMP_NUM_THREADS" in caplog.text


def test_where_the_server_is_gone_the_worker_is_spawned(
    started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone(fds: list[int]) -> Any:
        raise FileNotFoundError("/tmp/pymp-gone/listener")

    monkeypatch.setattr(multiprocessing.forkserver, "connect_to_new_process", gone)
    parent, _, _ = _start_worker()
    assert parent == os.getpid()


def test_vllms_context_function_is_replaced_by_one_that_still_runs_it(
    started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    called = []

    def vllm_get_mp_context() -> Any:
        called.append(True)
        return multiprocessing.get_context("spawn")

    executor = types.ModuleType("vllm.v1.executor.multiproc_executor")
    executor.get_mp_context = vllm_get_mp_context  # type: ignore[attr-defined]
    for name in ("vllm", "vllm.v1", "vllm.v1.executor"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vllm.v1.executor"].multiproc_executor = executor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm.v1.executor.multiproc_executor", executor)

    assert worker_server.use_for_workers()
    assert worker_server.use_for_workers()  # not wrapped twice
    assert isinstance(executor.get_mp_context(), worker_server.WorkerContext)  # type: ignore[attr-defined]
    assert called == [True]
    started.ensure_running()  # the core's: checks nothing, starts nothing


def test_without_settings_the_core_starts_its_workers_as_vllm_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_server, "_settings", None)
    assert not worker_server.use_for_workers()  # an engine core whose server has none


def _no_exec(*args: Any) -> None:
    raise AssertionError(f"exec {args[:2]}")


def test_the_server_starts_over_with_the_workers_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.delenv(worker_server.CPUS_ENV, raising=False)
    monkeypatch.setattr(
        worker_server, "predicted_settings", lambda: {"OMP_NUM_THREADS": "3", "LD_PRELOAD": GOMP}
    )
    monkeypatch.setattr(os, "execve", lambda path, argv, env: execs.append((path, argv, env)))
    worker_server.start_over()
    [(path, argv, env)] = execs
    assert (path, argv) == (sys.executable, sys.orig_argv)  # the same command line
    assert env["OMP_NUM_THREADS"] == "3" and env["LD_PRELOAD"] == GOMP
    assert env[worker_server.CPUS_ENV] == ",".join(map(str, sorted(os.sched_getaffinity(0))))


def test_started_over_the_server_records_its_settings_and_goes_back_to_its_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpus = os.sched_getaffinity(0)
    for name in ("_settings", "_bound", "_replica_cpus"):
        monkeypatch.setattr(worker_server, name, None)
    monkeypatch.setenv(worker_server.CPUS_ENV, ",".join(map(str, sorted(cpus))))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setattr(os, "execve", _no_exec)
    try:
        os.sched_setaffinity(0, {min(cpus)})  # as its OpenMP runtime bound it
        worker_server.start_over()
        assert os.sched_getaffinity(0) == cpus
    finally:
        os.sched_setaffinity(0, cpus)
    assert worker_server._settings is not None
    assert worker_server._settings["OMP_NUM_THREADS"] == "3"
    assert worker_server._bound == {min(cpus)}
    assert worker_server.CPUS_ENV not in os.environ  # not passed on


def test_once_its_preload_is_imported_the_server_is_back_on_its_replicas_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An OpenMP runtime a wheel bundles binds the thread that loads it."""
    cpus = os.sched_getaffinity(0)
    monkeypatch.setattr(worker_server, "_settings", {})
    monkeypatch.setattr(worker_server, "_replica_cpus", cpus)
    monkeypatch.setattr(worker_server, "WORKER_MODULES", ("json",))
    monkeypatch.setattr(worker_server, "other_threads", list)  # this process runs others
    try:
        os.sched_setaffinity(0, {min(cpus)})
        worker_server.ready()
        assert os.sched_getaffinity(0) == cpus
    finally:
        os.sched_setaffinity(0, cpus)
    assert worker_server._settings == {}


def test_threads_a_fork_is_not_safe_from_are_found_and_fork_aware_ones_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    before = worker_server.other_threads()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        found = worker_server.other_threads()
        assert len(found) == len(before) + 1
        monkeypatch.setattr(
            worker_server, "FORK_SAFE_THREADS", worker_server.FORK_SAFE_THREADS | set(found)
        )
        assert worker_server.other_threads() == []
    finally:
        stop.set()
        thread.join()


@pytest.mark.parametrize("failure", ["settings", "worker import", "a thread left"])
def test_a_failure_never_fails_the_engine_cores_server_and_the_worker_is_spawned(
    failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forkserver's preload stops at any error but an ImportError."""
    import threading

    monkeypatch.setattr(os, "execve", _no_exec)
    monkeypatch.delenv(worker_server.CPUS_ENV, raising=False)
    monkeypatch.setattr(worker_server, "_settings", {})
    monkeypatch.setattr(worker_server, "_replica_cpus", os.sched_getaffinity(0))
    monkeypatch.setattr(worker_server, "WORKER_MODULES", ("json",))
    stop = threading.Event()
    if failure == "settings":

        def fails() -> dict[str, str]:
            raise RuntimeError("no CPU list")

        monkeypatch.setattr(worker_server, "predicted_settings", fails)
        worker_server.start_over()
    else:
        if failure == "worker import":
            monkeypatch.setattr(worker_server, "WORKER_MODULES", ("servegraph_no_such_module",))
        threading.Thread(target=stop.wait, daemon=True).start()  # this process has others too
        worker_server.ready()
    stop.set()
    assert worker_server._settings is None


def test_the_restated_preload_is_the_one_vllm_sets() -> None:
    """`vllm_ld_preload` restates vLLM's CPU platform's rule: an engine configuration's
    check sets `LD_PRELOAD` for the processes vLLM starts. Imports vLLM (about 5 s)."""
    from vllm.config import VllmConfig

    from deployments.llm import forkserver

    before = dict(os.environ)
    try:
        os.environ.pop("LD_PRELOAD", None)
        predicted = worker_server.vllm_ld_preload("")
        VllmConfig()  # runs the platform's check
        assert os.environ.get("LD_PRELOAD", "") == predicted
        assert "libgomp" in predicted  # torch's, on this machine
    finally:
        forkserver._become(before)


def test_a_cpu_engines_replica_asks_for_its_worker_forked_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from deployments.llm.forkserver import ENV
    from deployments.llm.server import engine_forkserver_env
    from deployments.llm.settings import LLMSettings

    for name in ("SERVEGRAPH_LLM_WORKER_FORKSERVER", "SERVEGRAPH_LLM_ENGINE_FORKSERVER"):
        monkeypatch.delenv(name, raising=False)
    assert engine_forkserver_env(LLMSettings(), gpu_engine=False) == {ENV: "worker"}
    off = LLMSettings(worker_forkserver=False)
    assert engine_forkserver_env(off, gpu_engine=False) == {ENV: "1"}  # the core only
    assert engine_forkserver_env(LLMSettings(), gpu_engine=True) == {}  # ray.serve.llm's
