"""Where a replica's vLLM puts its ZMQ sockets: a folder of the replica's own, which it
removes as it leaves and which the next replica on the node removes if it could not.

vLLM binds the sockets between its engine client, its engine core and its model worker
as files named by a uuid in `VLLM_RPC_BASE_PATH`, the temp folder by default. A socket's
file goes when the process that bound it closes it; a process killed leaves it (Ray
kills a replica's engine processes that do not exit in time; an operator or the kernel's
OOM killer kills replicas). On this machine runs had left 1,232 of them in /tmp. So each
replica's engine binds in a folder of its own (mode 0700), removed when the replica
leaves (`remove`). The replica holds a lock on a file in it while it lives, and a
replica starting removes this user's folders whose lock nobody holds (`sweep`): a
killed replica's lock goes with its process, whatever its process id or namespace.
Tidying is best effort: a folder that cannot be made or swept leaves vLLM's default,
never a replica that does not start. An operator's own `VLLM_RPC_BASE_PATH` stands.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

ENV = "VLLM_RPC_BASE_PATH"
PREFIX = "servegraph-vllm-"
LOCK = ".replica.lock"
# A Unix socket's path is at most 107 bytes; vLLM adds "/" and a 36-character uuid.
_SOCKET_PATH_MAX = 107

_log = logging.getLogger(__name__)
_held: list[int] = []  # the lock files' descriptors of this process's folders


def private_folder(base: Path | None = None) -> Path | None:
    """Point this process's vLLM (and the processes it starts, which inherit the
    environment) at a new folder of its own under `base` (the temp folder), locked
    while this process lives, after sweeping the folders of replicas that have gone;
    the folder, or None where the operator set `VLLM_RPC_BASE_PATH`, the folder's path
    would be too long for a socket, or it could not be made (vLLM's default stands)."""
    if os.environ.get(ENV):
        return None
    base = Path(base or tempfile.gettempdir())
    try:
        sweep(base)
    except Exception:  # tidying, never a reason not to start
        _log.warning("sweeping %s for gone replicas' socket folders failed", base, exc_info=True)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
        if len(str(folder)) + 1 + 36 > _SOCKET_PATH_MAX:
            folder.rmdir()
            return None
        lock = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        _log.warning("no socket folder of its own under %s; vLLM's default", base, exc_info=True)
        return None
    _held.append(lock)
    os.environ[ENV] = str(folder)
    return folder


def remove(folder: Path | None) -> None:
    """The replica leaves: its sockets' folder goes with it."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(base: Path) -> list[Path]:
    """Remove this user's socket folders under `base` whose replica has gone (nobody
    holds the lock in it); the folders removed. A folder with no lock file yet (its
    replica is making it) is kept."""
    removed = []
    for folder in base.glob(f"{PREFIX}*"):
        try:
            if folder.is_symlink() or folder.lstat().st_uid != os.getuid():
                continue
            if not folder.is_dir() or not _abandoned(folder / LOCK):
                continue
        except OSError:  # gone meanwhile, or not ours to look into
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _abandoned(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its replica lives
    finally:
        os.close(fd)
    return True
