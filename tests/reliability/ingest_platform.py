"""A second, small platform in its own process for the whole-cluster kill test: its own
local Ray with the embedder, the vector index and the `rag_ingest` pipeline, on the
index folder it is given, behind HAProxy (`ingress="haproxy"`, the option the session's
platform does not use). Prints ``READY <base url>`` when it serves; stops on SIGTERM.

    python -m tests.reliability.ingest_platform PORT
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from servegraph._serve_status import serve_state


def main(port: int) -> None:

    from deployments.catalog import CATALOG
    from servegraph.deploy.local_ray import local_cluster
    from servegraph.deploy.planner import plan_platform
    from servegraph.lang.discovery import discover

    stop = threading.Event()
    graphs = {"rag_ingest": discover("pipelines")["rag_ingest"]}
    with local_cluster(http_port=port, dashboard=False, ingress="haproxy") as cluster:
        # After Ray started, as `servegraph run` does: Ray's core worker installs a SIGTERM
        # handler that aborts the process, with no clean stop (HAProxy's files left).
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        plan_platform(graphs, CATALOG, packages=["pipelines"]).deploy()
        deadline = time.monotonic() + 600
        while any(a.status != "RUNNING" for a in serve_state().applications.values()):
            if time.monotonic() > deadline:
                raise TimeoutError("the ingest platform did not start in 600 s")
            time.sleep(0.5)
        print("READY", cluster.base_url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main(int(sys.argv[1]))
