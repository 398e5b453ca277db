"""Issue 23's overload burst as its reporter measured it: `make run`'s command
(`servegraph run`, Serve's proxy in front) on a fresh platform, then several bursts of
1,200 concurrent `triage` requests at a 20 s deadline from one raw-socket client, each
timed from the caller's side with the client's own CPU (`benchmarks.reliability`'s
burst, which runs on a cluster of its own instead).

    .venv/bin/python -m benchmarks.overload_run [--platforms 2] [--bursts 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.chaos_runs import Platform
from benchmarks.reliability import overload_burst
from benchmarks.traffic import proxy_gating

KEPT = (
    "statuses",
    "bare_500",
    "p50_s_by_status",
    "p99_s_by_status",
    "max_s",
    "later_than_deadline_plus_5s",
    "503_with_retry_after",
    "503_refused_by",
    "client_cpu_s",
)
SETTLE_S = 15  # between bursts: the 504s' LLM work is cancelled and its batch empties


def on_a_fresh_platform(bursts: int) -> list[dict[str, Any]]:
    """`servegraph run` started (`benchmarks.chaos_runs.Platform`, on a fresh vector
    index), `bursts` bursts sent, then stopped."""
    index = Path(tempfile.mkdtemp(prefix="servegraph-overload-"))
    os.environ["SERVEGRAPH_INDEX_PATH"] = str(index)  # the platform's process inherits it
    platform = Platform(index, uuid.uuid4().hex)
    results = []
    try:
        platform.start()
        proxy_gating(platform.base_url)
        for n in range(bursts):
            if n:
                time.sleep(SETTLE_S)
            burst = overload_burst(platform.base_url)
            results.append({k: burst[k] for k in KEPT if k in burst})
            print(json.dumps({f"burst {n + 1}": results[-1]}), flush=True)
    finally:
        platform.stop()
        shutil.rmtree(index, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platforms", type=int, default=2, help="fresh platforms, in turn")
    parser.add_argument("--bursts", type=int, default=3, help="bursts on each platform")
    parser.add_argument("--json", type=Path, help="where to write every burst's figures")
    args = parser.parse_args(argv)
    runs = {f"platform {p + 1}": on_a_fresh_platform(args.bursts) for p in range(args.platforms)}
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
