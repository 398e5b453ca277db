"""What the kernel says of a process's threads, read from /proc (Linux): for the tests of
the LLM engine's CPU priority."""

from __future__ import annotations

import contextlib
from pathlib import Path


def thread_nice(pid: int) -> dict[int, int]:
    """Each thread's nice value, by thread id (field 19 of /proc/PID/task/TID/stat; a
    thread's name, field 2, is in parentheses and may hold spaces). A thread that ends
    while it is read is left out."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = int(fields[16])
    return out
