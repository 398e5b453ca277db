"""What a replica spent on each request: its resources shared by processor sharing
among the requests in flight (`Meter`, `metered`), in resource-seconds, carried back
with the response (`attach`, `charge_of`). See `servegraph.cost` for the whole story.

A metered method may also note what its call did (`note`: the dynamic batch it rode in
and how long it queued for it), carried back the same way (`facts_of`): what a
request's waterfall shows of the call."""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

_ATTR = "__servegraph_charge__"
OVERHEAD_GAP_S = 0.01  # shorter gaps between calls are Serve's per-request work
# The item a streamed call's server yields last, carrying the call's charge.
CHARGE_ITEM = "servegraph_charge"
KINDS = ("cpu_s", "gpu_s", "gib_s")  # CPU-seconds, GPU-seconds, GiB-seconds


_FACTS = "__servegraph_facts__"
# What the metered call running in this context noted (`note`): a dict per call, set by
# the metered wrapper; None outside one.
_noted: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "servegraph_noted", default=None
)


def note(**facts: float) -> None:
    """Record facts about the metered call running here (e.g. batch_size,
    queue_wait_ms), to travel back with its response; nothing outside a metered call."""
    noted = _noted.get()
    if noted is not None:
        noted.update(facts)


def facts_of(response: Any) -> dict[str, float] | None:
    """What the call that made `response` noted, if anything."""
    return getattr(response, _FACTS, None)


# Module-level, as `_noted` is used only here: Ray pickles a deployment class's methods
# (the metered wrappers) by value, with what they reference, and a ContextVar cannot be
# pickled; a module's function is pickled by reference.
def _start_noting() -> tuple[dict[str, float], contextvars.Token[dict[str, float] | None]]:
    facts: dict[str, float] = {}
    return facts, _noted.set(facts)


def _stop_noting(token: contextvars.Token[dict[str, float] | None]) -> None:
    _noted.reset(token)


def _with_facts(response: Any, facts: dict[str, float]) -> Any:
    if facts:  # on a response `attach` has just carried a charge with
        object.__setattr__(response, _FACTS, facts)
    return response


def attach(response: Any, charge: dict[str, float]) -> Any:
    """Carry `charge` with `response` (pickled with it; not in its JSON)."""
    object.__setattr__(response, _ATTR, charge)
    return response


def charge_of(response: Any) -> dict[str, float] | None:
    return getattr(response, _ATTR, None)


def replica_resources() -> dict[str, float]:
    """What this replica holds: its CPUs, GPU share and memory (GiB). A replica with a
    placement group (the LLM's engine) holds all of its bundles, whatever the replica's
    own actor took of them; any other holds what Ray assigned its actor."""
    import ray
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is not None:
        held: dict[str, float] = {}
        for bundle in group.bundle_specs:
            for key, amount in bundle.items():
                held[key] = held.get(key, 0.0) + float(amount)
    else:
        held = dict(ray.get_runtime_context().get_assigned_resources())
    return {
        "cpu": float(held.get("CPU", 0.0)),
        "gpu": float(held.get("GPU", 0.0)),
        "gib": float(held.get("memory", 0.0)) / 2**30,
    }


@dataclass(eq=False)  # tickets are told apart by identity: two may hold equal values
class _Ticket:
    held_s: float = 0.0  # processor-sharing seconds accrued


@dataclass
class Meter:
    """The replica's time, shared among the requests it serves (module docstring)."""

    resources: dict[str, float]
    clock: Any = time.monotonic
    _active: list[_Ticket] = field(default_factory=list)
    _last: float | None = None
    busy_s: float = 0.0  # seconds with at least one request in flight
    # Sync methods may run in a thread pool, async ones on the loop: one lock for both.
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> _Ticket:
        with self._lock:
            now = self.clock()
            gap = now - self._last if self._last is not None else None
            self._advance()
            ticket = _Ticket()
            if not self._active and gap is not None and gap < OVERHEAD_GAP_S:
                ticket.held_s, self.busy_s = gap, self.busy_s + gap  # receiving this one
            self._active.append(ticket)
            return ticket

    def held(self, ticket: _Ticket) -> dict[str, float]:
        """The request's resource-seconds so far (it is still in flight)."""
        with self._lock:
            self._advance()
            return {f"{kind}_s": ticket.held_s * amount for kind, amount in self.resources.items()}

    def busy(self) -> float:
        """Seconds with a request in flight since the meter started, to now."""
        with self._lock:
            self._advance()
            return self.busy_s

    def stop(self, ticket: _Ticket) -> dict[str, float]:
        """The request's resource-seconds."""
        with self._lock:
            self._advance()
            self._active.remove(ticket)
        return {f"{kind}_s": ticket.held_s * amount for kind, amount in self.resources.items()}

    def _advance(self) -> None:
        now = self.clock()
        if self._last is not None and self._active:
            elapsed = now - self._last
            self.busy_s += elapsed
            for ticket in self._active:
                ticket.held_s += elapsed / len(self._active)
        self._last = now


def total(charges: list[dict[str, float]]) -> dict[str, float]:
    summed = dict.fromkeys(KINDS, 0.0)
    for charge in charges:
        for kind, value in charge.items():
            summed[kind] = summed.get(kind, 0.0) + value
    return summed


def metered(methods: Iterable[str]) -> Callable[[type], type]:
    """Class decorator for a model server's Serve deployment: each of `methods` (its
    contract's) is metered by processor sharing, and its response carries its charge.
    Serve then wraps the class as usual (apply this under `@serve.deployment`)."""

    def decorate(cls: type) -> type:
        for name in methods:
            setattr(cls, name, _metered_method(getattr(cls, name)))
        cls.meter_stats = _meter_stats  # type: ignore[attr-defined]
        return cls

    return decorate


def _meter_stats(self: Any) -> dict[str, Any]:
    """The replica's meter: seconds with a request in flight since it started (what its
    charges add up to, per resource) and the resources it holds. Called by handle
    (`handle.meter_stats.remote()`): a benchmark's check that a window was saturated."""
    meter = _meter(self)
    return {"busy_s": meter.busy(), "resources": dict(meter.resources)}


_CREATING = threading.Lock()


def _meter(replica: Any) -> Meter:
    """The replica's meter, made on its first metered call (Ray has assigned its
    resources by then)."""
    with _CREATING:
        meter = replica.__dict__.get("_servegraph_meter")
        if meter is None:
            meter = replica.__dict__["_servegraph_meter"] = Meter(replica_resources())
        return meter


def _metered_method(method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def metered_async(self: Any, *args: Any, **kwargs: Any) -> Any:
            meter = _meter(self)
            ticket = meter.start()
            facts, token = _start_noting()  # the method's awaits share this context
            try:
                result = await method(self, *args, **kwargs)
            finally:
                _stop_noting(token)
                charge = meter.stop(ticket)
            return _with_facts(attach(result, charge), facts)

        return metered_async

    @functools.wraps(method)
    def metered_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        meter = _meter(self)
        ticket = meter.start()
        try:
            result = method(self, *args, **kwargs)
        finally:
            charge = meter.stop(ticket)
        return attach(result, charge)

    return metered_sync
