"""The LLM engine's CPU priority (`deployments.llm.engine.lower_cpu_priority`): set on
the thread that builds the engine, `offset` below its priority, it reaches the processes
that thread starts, stops at 19, and leaves the process's other threads alone. Run in
a thread of its own, since a priority once lowered cannot be raised again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from deployments.llm.engine import lower_cpu_priority


def test_the_priority_reaches_the_engines_process_and_stops_at_19() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen: dict[str, int] = {}

    def build_engine() -> None:
        seen["set"] = lower_cpu_priority(3)
        seen["capped"] = lower_cpu_priority(40)
        child = [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"]
        seen["child"] = int(subprocess.run(child, capture_output=True, text=True).stdout)

    thread = threading.Thread(target=build_engine)
    thread.start()
    thread.join()
    assert seen == {"set": base + 3, "capped": 19, "child": 19}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # this thread: untouched
