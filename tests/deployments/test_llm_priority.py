"""The LLM engine's CPU priority (`deployments.llm.engine.lower_cpu_priority`): set on
the thread that builds the engine, it reaches the processes that thread starts, never
goes back down, and leaves the process's other threads alone. Run in a thread of its
own, since a priority once raised cannot be lowered again."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from deployments.llm.engine import lower_cpu_priority


def test_the_priority_reaches_the_engines_process_and_only_rises() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen: dict[str, int] = {}

    def build_engine() -> None:
        seen["set"] = lower_cpu_priority(base + 5)
        seen["lower asked"] = lower_cpu_priority(base + 2)
        child = [sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"]
        seen["child"] = int(subprocess.run(child, capture_output=True, text=True).stdout)

    thread = threading.Thread(target=build_engine)
    thread.start()
    thread.join()
    assert seen == {"set": base + 5, "lower asked": base + 5, "child": base + 5}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # this thread: untouched
