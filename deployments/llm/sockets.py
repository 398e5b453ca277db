"""Where a replica's vLLM puts its ZMQ sockets: a folder of the replica's own, which it
removes as it leaves and which the next replica removes if it could not.

vLLM binds the sockets between its engine client, its engine core and its model worker
as files named by a uuid in `VLLM_RPC_BASE_PATH`, the temp folder by default. A socket's
file goes when the process that bound it closes it; a process killed leaves it (Ray
kills a replica's engine processes that do not exit in time; an operator or the kernel's
OOM killer kills replicas). On this machine runs had left 1,232 of them in /tmp. So each
replica's engine binds in a folder of its own (mode 0700, named by the replica's process
id), removed when the replica leaves (`remove`), and a replica starting removes the
folders of this user's replicas whose process has gone (`sweep`). An operator's own
`VLLM_RPC_BASE_PATH` is left as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ENV = "VLLM_RPC_BASE_PATH"
PREFIX = "servegraph-vllm-"
# A Unix socket's path is at most 107 bytes; vLLM adds "/" and a 36-character uuid.
_SOCKET_PATH_MAX = 107


def private_folder(base: Path | None = None) -> Path | None:
    """Point this process's vLLM (and the processes it starts, which inherit the
    environment) at a new folder of its own under `base` (the temp folder), after
    sweeping the folders of replicas that have gone; the folder, or None where the
    operator set `VLLM_RPC_BASE_PATH` or the folder's path would be too long for a
    socket (vLLM's default then stands)."""
    if os.environ.get(ENV):
        return None
    base = Path(base or tempfile.gettempdir())
    sweep(base)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
    if len(str(folder)) + 1 + 36 > _SOCKET_PATH_MAX:
        folder.rmdir()
        return None
    os.environ[ENV] = str(folder)
    return folder


def remove(folder: Path | None) -> None:
    """The replica leaves: its sockets' folder goes with it."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(base: Path) -> list[Path]:
    """Remove the socket folders under `base` of this user's replicas whose process is
    gone; the folders removed. A folder whose process id is alive is kept, whichever
    process that now is (a reused id keeps a leftover until a later sweep)."""
    removed = []
    for folder in base.glob(f"{PREFIX}*"):
        pid = folder.name.removeprefix(PREFIX).split("-", 1)[0]
        try:
            if not pid.isdigit() or _alive(int(pid)) or folder.lstat().st_uid != os.getuid():
                continue
        except OSError:  # gone meanwhile
            continue
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
