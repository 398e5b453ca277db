"""Which process spent the CPU: every process's CPU time read before and after a window
(psutil), grouped by its part in the platform (Ray names its workers' processes:
`ray::ProxyActor`, `ray::ServeReplica:<app>:<deployment>`), so that a throughput
figure comes with the process that saturated first and the load generator's own CPU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil

Snapshot = dict[int, tuple[str, float]]


def snapshot() -> Snapshot:
    """pid -> (command line, CPU seconds, user + system) of every process."""
    taken = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            times = proc.cpu_times()
            taken[proc.pid] = (" ".join(proc.info["cmdline"] or []), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return taken


def platform_role(cmdline: str) -> str | None:
    """A process's part in the platform, from its command line; None: not the platform's."""
    if any(p in cmdline for p in ("ProxyActor", "HAProxyManager", "/haproxy ")):
        # Serve's proxy actor; or HAProxy in its place (`--ingress haproxy`) with the
        # Python actor that manages it (it reads a metrics line per request)
        return "proxy"
    if "ServeReplica:" in cmdline:
        # "<app>:<deployment>", less the method Ray adds while one runs (".call_many")
        return cmdline.split("ServeReplica:", 1)[1].split()[0].split(".")[0]
    if "ServeController" in cmdline:
        return "controller"
    if "EngineCore" in cmdline or "VLLM" in cmdline:
        return "llm engine"
    if any(d in cmdline for d in ("raylet", "gcs_server", "dashboard", "log_monitor", "ray::")):
        return "ray, other"
    return None


@dataclass
class Usage:
    """CPU seconds per role over a window, and the most of a core one process of the
    role used."""

    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    busiest: dict[str, float] = field(default_factory=dict)
    idle_cores: float = 0.0  # the whole machine's idle time over the window, in cores
    # time the hypervisor ran something else on this VM's cores, in cores: CPU this
    # machine's processes wanted and did not get
    steal_cores: float = 0.0

    def rows(self) -> list[str]:
        return [
            f"{role}: {cpu:.2f} CPU-s ({self.busiest[role] * 100:.0f} % of a core, busiest process)"
            for role, cpu in sorted(self.cpu_s.items(), key=lambda kv: -kv[1])
        ]


def usage(
    before: Snapshot, after: Snapshot, seconds: float, role: Callable[[int, str], str | None]
) -> Usage:
    used = Usage(seconds)
    for pid, (cmdline, spent) in after.items():
        name = role(pid, cmdline)
        if name is None:
            continue
        cpu = spent - before.get(pid, (cmdline, 0.0))[1]
        used.cpu_s[name] = used.cpu_s.get(name, 0.0) + cpu
        used.busiest[name] = max(used.busiest.get(name, 0.0), cpu / max(seconds, 1e-9))
    return used


@contextmanager
def measured(
    role: Callable[[int, str], str | None] | None = None, clients: set[int] | None = None
) -> Iterator[list[Usage]]:
    """`with measured() as out:` ... then `out[0]` is the window's `Usage`; processes in
    `clients` (pids) count as "client"."""
    import time

    clients = clients or set()

    def classify(pid: int, cmdline: str) -> str | None:
        if pid in clients:
            return "client"
        return role(pid, cmdline) if role else platform_role(cmdline)

    out: list[Usage] = []
    # the machine's idle and stolen time over its own interval, snapshots included
    machine_started, (idle_before, steal_before) = time.perf_counter(), idle_and_steal_s()
    before, started = snapshot(), time.perf_counter()
    try:
        yield out
    finally:
        seconds = max(time.perf_counter() - started, 1e-9)
        window = usage(before, snapshot(), seconds, classify)
        idle, steal = idle_and_steal_s()
        machine_s = max(time.perf_counter() - machine_started, 1e-9)
        window.idle_cores = (idle - idle_before) / machine_s
        window.steal_cores = (steal - steal_before) / machine_s
        out.append(window)


def idle_and_steal_s() -> tuple[float, float]:
    """The whole machine's idle CPU seconds so far, all cores (iowait counted idle), and
    its stolen ones (Linux's `steal`: a virtual machine's cores given to others)."""
    times = psutil.cpu_times()
    return times.idle + getattr(times, "iowait", 0.0), getattr(times, "steal", 0.0)
