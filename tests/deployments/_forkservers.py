"""This test process's own forkserver, stopped after a test: its children first (none
of them outlives the test), then the server, which exits once its alive pipe closes."""

from __future__ import annotations

from typing import Any


def stop(server: Any) -> None:
    import psutil

    children = psutil.Process(server._forkserver_pid).children(recursive=True)
    for child in children:
        child.kill()
    psutil.wait_procs(children, timeout=30)
    server._stop()
