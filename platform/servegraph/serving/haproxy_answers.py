"""What HAProxy answers itself in Serve's HAProxy mode (`servegraph run --ingress haproxy`):
the platform's 502 `ReplicaLost` with Retry-After, as Serve's proxy answers it
(`servegraph.serving.proxy_answers`), not a bare 500.

HAProxy answers on its own when it gets no answer from an app's replica: the replica
stopped mid-request (it died or was restarted: a 502), its retries against a replica
not yet marked down ran out (a 503), or it did not answer in time (a 504). (With no
replica marked up, a request goes to Serve's fallback proxy, which answers as Serve's
proxy does.) Serve's HAProxy manager sends all three as one file, a bare
`500 Internal Server Error` (`errorfile 502/503/504` in its configuration, the file
written by `ray.serve._private.haproxy.HAProxyApi._initialize_directories_and_error_files`).
Here that file is the platform's answer for a lost request: `502` with `Retry-After`,
and a JSON body with the platform's error fields, saying the request may or may not have
been carried out. One status for the three, as Serve has one file: the cautious one (a
503 here means refused before any work, `servegraph.serving.admission`).

Serve has no setting for that file. Its controller calls a hook as it starts, before it
creates the HAProxy managers (`RAY_SERVE_CONTROLLER_CALLBACK_IMPORT_PATH`, set by
`servegraph.deploy.local_ray` for the HAProxy ingress): `use_platform_answers` puts a
subclass of Serve's manager in its place, which writes this file over Serve's. Written
against Ray 2.60's private names: where they have changed, the hook logs a warning and
Serve's manager runs unchanged (tests/reliability/test_cluster_kill.py then fails).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.serve._private import haproxy as serves

from servegraph._files import write_atomically
from servegraph.serving.proxy_answers import LOST, RETRY_AFTER_S

_log = logging.getLogger("ray.serve")

UNANSWERED = {
    **LOST,
    "detail": "HAProxy, the platform's HTTP front, got no answer for this request from the "
    "app's replica: it stopped before it answered (it died or was restarted), or it did "
    "not answer in time; the request may or may not have been carried out",
}


def error_file() -> str:
    """The whole HTTP response HAProxy sends for its own 502, 503 and 504."""
    body = json.dumps(UNANSWERED)
    head = [
        "HTTP/1.1 502 Bad Gateway",
        "content-type: application/json",
        f"retry-after: {RETRY_AFTER_S}",
        "cache-control: no-store",
        "connection: close",
        f"content-length: {len(body.encode())}",
    ]
    return "\r\n".join(head) + "\r\n\r\n" + body


_ServesManager: Any = getattr(serves.HAProxyManager, "__ray_actor_class__", object)


class HAProxyManager(_ServesManager):
    """Serve's HAProxy manager, whose error file is the platform's (same class name:
    the dashboard and Serve's own checks list it as Serve's). Serve's constructor
    writes its file and schedules HAProxy's start on the actor's event loop, which runs
    once the constructor has returned: the file is rewritten before that."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        api = getattr(self, "_haproxy", None)
        path = getattr(getattr(api, "cfg", None), "error_file_path", None)
        if not path:
            _log.warning("Serve's HAProxy manager names no error file; its bare 500s stay")
            return
        try:  # the platform's answers, never a reason for HAProxy not to start
            write_atomically(Path(path), error_file())
        except OSError:
            _log.warning("HAProxy's own errors stay Serve's bare 500s", exc_info=True)
            return
        _log.info("HAProxy's own errors answer as the platform's 502 (%s)", path)


def use_platform_answers() -> None:
    """The controller's hook: HAProxy's managers are the platform's subclass."""
    from ray.serve._private import controller

    if (
        _ServesManager is object  # Serve's manager is no longer a Ray actor class
        or getattr(controller, "HAProxyManager", None) is not serves.HAProxyManager
    ):
        _log.warning(
            "Serve's HAProxy manager is not where servegraph expects it (Ray changed); "
            "HAProxy's own errors stay bare 500s"
        )
        return
    import ray

    options = dict(getattr(serves.HAProxyManager, "_default_options", None) or {"num_cpus": 0})
    hooked: Any = controller  # Serve's module, whose name the controller reads
    hooked.HAProxyManager = ray.remote(**options)(HAProxyManager)
