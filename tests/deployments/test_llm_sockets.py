"""The LLM replica's socket folder (`deployments.llm.sockets`): vLLM's ZMQ sockets bound in
a folder of the replica's own, and what a killed replica leaves removed by the next one.
Real processes and real ZMQ sockets; vLLM reading the variable is checked on the real
engine (tests/integration/test_model_servers.py)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from deployments.llm import sockets


@pytest.fixture(autouse=True)
def no_operator_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # set, then unset: monkeypatch then restores the variable whatever a test set it to
    monkeypatch.setenv(sockets.ENV, "")
    monkeypatch.delenv(sockets.ENV)


@pytest.fixture
def base() -> Iterator[Path]:
    """A short temporary folder (pytest's tmp_path is too long a path for a socket)."""
    folder = Path(tempfile.mkdtemp(prefix="sgt-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_folder_too_long_for_a_socket_leaves_vllms_default(base: Path) -> None:
    deep = base / ("d" * 80)
    deep.mkdir()
    assert sockets.private_folder(deep) is None
    assert sockets.ENV not in os.environ and list(deep.iterdir()) == []


def test_a_replica_binds_in_a_folder_of_its_own_which_goes_with_it(base: Path) -> None:
    folder = sockets.private_folder(base)
    assert folder is not None and folder.parent == base
    assert folder.name.startswith(f"{sockets.PREFIX}{os.getpid()}-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert os.environ[sockets.ENV] == str(folder)
    # vLLM's address for a socket (`vllm.utils.network_utils.get_open_zmq_ipc_path`)
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.bind(f"ipc://{os.environ[sockets.ENV]}/{uuid.uuid4()}")
    assert [p for p in folder.iterdir() if p.is_socket()]
    socket.close(linger=0)
    context.term()
    assert sockets.sweep(base) == []  # locked by this process: kept
    sockets.remove(folder)
    assert not folder.exists()


def test_an_operators_folder_stands(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sockets.ENV, str(base))
    assert sockets.private_folder(base) is None
    assert os.environ[sockets.ENV] == str(base) and list(base.iterdir()) == []


def test_a_killed_replicas_sockets_are_removed_by_the_next_replica(base: Path) -> None:
    """A process binds as a replica's engine does and is killed (SIGKILL: no clean-up),
    leaving its socket file; the next replica's start sweeps its folder away and keeps
    what is not a gone replica's."""
    replica = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import os, sys, uuid, zmq
                from pathlib import Path
                from deployments.llm import sockets
                folder = sockets.private_folder(Path({str(base)!r}))
                socket = zmq.Context().socket(zmq.PULL)
                socket.bind(f"ipc://{{os.environ[sockets.ENV]}}/{{uuid.uuid4()}}")
                print(folder, flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert replica.stdout is not None
    left = Path(replica.stdout.readline().strip())
    assert [p for p in left.iterdir() if p.is_socket()]
    assert sockets.sweep(base) == []  # alive: kept
    replica.send_signal(signal.SIGKILL)
    replica.wait(timeout=30)
    assert [p for p in left.iterdir() if p.is_socket()], "the kill left its socket"

    # kept: a folder whose replica is still making it (no lock file yet), what is not a
    # replica's folder, a link; removed: a folder whose lock nobody holds, whatever
    # process id its name gives (a reused one, another namespace's)
    making, unrelated = base / f"{sockets.PREFIX}{os.getpid()}-making", base / "unrelated"
    for other in (making, unrelated):
        other.mkdir()
    (base / f"{sockets.PREFIX}999999999999-link").symlink_to(unrelated)
    reused = base / f"{sockets.PREFIX}{os.getpid()}-gone"
    reused.mkdir()
    (reused / sockets.LOCK).touch()
    folder = sockets.private_folder(base)  # the next replica
    assert not left.exists() and not reused.exists()
    assert making.exists() and unrelated.exists()
    assert (base / f"{sockets.PREFIX}999999999999-link").is_symlink()
    assert folder is not None and folder.exists()
    assert sockets.sweep(base) == []  # its own, locked: kept
