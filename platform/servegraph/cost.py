"""What each request costs: the resources a replica spent on it, in resource-seconds,
then in money (a price table) and energy (a power table).

A model-server replica holds its resources (its CPUs, its GPU share, its memory) the
whole time it serves; `Meter` shares that time among the requests it serves at once, by
processor sharing: while n requests are in flight, each is charged dt / n of the
replica. The charges of a window add up to the replica's busy time, exactly.

Between two calls the replica's process still works for them: Serve receives,
deserialises and dispatches each request outside the method the meter wraps (a
millisecond or two here, as much as a vector search itself). A gap shorter than
`OVERHEAD_GAP_S` with nothing in flight is that work, and is charged to the request
that starts after it; a longer gap is idle time.

- A batch of the encoders' is charged alike to every request in it, however many
  items each brought: each held the replica for the batch.
- The LLM: vLLM's continuous batching runs one decode step for every sequence in
  flight, so an equal share per request per moment is a split by tokens processed:
  a request generating 200 tokens stays in flight four times as long as one generating
  50, and is charged about four times as much. (Its prompt's prefill is shared alike,
  the one part not split by its own tokens.)

Idle time (nothing in flight) is charged to nobody: the unit economics of a request
are what serving it took, and the idle share is the fleet's utilisation, which Ray's
own metrics show.

The charge travels back with the response (`attach` / `charge_of`, a side channel that
survives Ray's serialisation and stays out of the response's JSON), the pipeline
runtime records it on the node (`NodeRecord.charge`), and the ingress prices it
(`Prices`) into `x-servegraph-usage`, the stream's `usage` event, batch rows and the
metrics.

A caller may cap a request's cost (`Budget`). A call's cost is known only once it has
run, so the runtime stops before a call whose *estimate* does not fit what is left: the
mean of the method's recent charges (`CostModel`), learned by the runtime from every
request's calls, under the load of the moment. For the LLM the estimate is a line,
per call plus per output token, and the call's `max_tokens` is lowered to what is left
buys. The first call of a method in a process has no estimate: it runs, and calls with
a budget that come while it does wait for its charge (`CostModel.first_charge`).

An estimate cannot bound a cost that depends on who else is served at the same moment
(a decode step shared by two sequences costs each of them four times what it does
shared by eight), so the call also carries what is left (`allowance()`), and a server
that can stop part-way stops there: the LLM ends its generation when its charge
reaches it (`deployments/llm/engine.py`), as if at max_tokens. A call that cannot stop
part-way (an encoder's batch) can pass it by how far its cost differs from its
estimate; the usage reports what the request actually cost.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_ATTR = "__servegraph_charge__"
OVERHEAD_GAP_S = 0.01  # shorter gaps between calls are Serve's per-request work
# The item a streamed call's server yields last, carrying the call's charge.
CHARGE_ITEM = "servegraph_charge"
KINDS = ("cpu_s", "gpu_s", "gib_s")  # CPU-seconds, GPU-seconds, GiB-seconds


_allowance: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "servegraph_call_allowance_usd", default=None
)


def allowance() -> float | None:
    """The most the running model-server call may cost (USD), when its request has a
    budget: what the budget had left when the call started. Set by the runtime around
    each call; a server's client that can stop its work part-way passes it on. Always
    a number >= 0, or None (`bounded_allowance`)."""
    return bounded_allowance(_allowance.get())


def bounded_allowance(usd: float | None) -> float | None:
    """What is left of a budget as a call's allowance: `usd` when it is a number >= 0;
    0 for less, or for NaN (a budget that is not a number allows nothing); None, no
    limit, for no budget or an infinite one (a maximum beyond any cost)."""
    if usd is None or usd == math.inf:
        return None
    return usd if usd >= 0 else 0.0  # NaN compares false: 0


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


class Prices(BaseSettings):
    """Price and power tables, from the environment (``SERVEGRAPH_COST_``).

    Prices: AWS us-west-2 on-demand, Linux, for `cluster.yaml`'s instance types, split
    per resource: an m6i.2xlarge ($0.384/h, 8 vCPU, 32 GiB) split in the ratio of Google
    Cloud's published N2 prices per vCPU-hour and per GiB-hour ($0.031611 : $0.004237)
    gives $0.03125 per vCPU-hour and $0.00419 per GiB-hour; a g5.2xlarge ($1.212/h) less
    the same 8 vCPUs and 32 GiB gives $0.828 per A10G GPU-hour.

    Power: Cloud Carbon Footprint's coefficients for AWS (cloudcarbonfootprint.org,
    methodology): a vCPU at 3.5 W (its maximum; the minimum, idle, is 0.74 W: a request
    being served keeps its CPUs busy), memory 0.392 W per GiB; an A10G at its 150 W
    board power; times a data-centre PUE of 1.135 (AWS's, as CCF uses).
    """

    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_COST_", extra="ignore")

    usd_per_cpu_hour: float = Field(0.03125, description="Per vCPU-hour.")
    usd_per_gpu_hour: float = Field(0.828, description="Per GPU-hour (A10G by default).")
    usd_per_gib_hour: float = Field(0.00419, description="Per GiB-hour of memory.")
    watts_per_cpu: float = Field(3.5, description="Per vCPU at load.")
    watts_per_gpu: float = Field(150.0, description="Per GPU at load (A10G board power).")
    watts_per_gib: float = Field(0.392, description="Per GiB of memory.")
    pue: float = Field(1.135, description="Data-centre power usage effectiveness.")

    def usd(self, charge: dict[str, float]) -> float:
        return (
            charge.get("cpu_s", 0.0) * self.usd_per_cpu_hour
            + charge.get("gpu_s", 0.0) * self.usd_per_gpu_hour
            + charge.get("gib_s", 0.0) * self.usd_per_gib_hour
        ) / 3600

    def joules(self, charge: dict[str, float]) -> float:
        watts_s = (
            charge.get("cpu_s", 0.0) * self.watts_per_cpu
            + charge.get("gpu_s", 0.0) * self.watts_per_gpu
            + charge.get("gib_s", 0.0) * self.watts_per_gib
        )
        return watts_s * self.pue


@functools.cache
def prices() -> Prices:
    """The tables, read from the environment once per process: pricing runs on every
    request, and a settings object re-reads the environment each time it is made."""
    return Prices()


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
            try:
                result = await method(self, *args, **kwargs)
            finally:
                charge = meter.stop(ticket)
            return attach(result, charge)

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


@dataclass(frozen=True)
class Estimate:
    """A method's expected cost in USD: `per_call`, plus `per_token` for each output
    token (zero for a method without token usage)."""

    per_call: float
    per_token: float = 0.0

    def at(self, tokens: int = 0) -> float:
        return self.per_call + self.per_token * tokens


class CostModel:
    """What each model-server method has cost lately, per call (and per output token
    where it reports token usage): the estimates a `Budget` is checked against.

    The last `window` charges of each method, each weighing half as much as the one
    `half_life` calls after it: a call's cost follows the load of the moment (on a
    shared machine an encoder's batch takes longer while the LLM decodes; an LLM
    token costs a request less the more sequences share the decode step), so the
    estimate follows the recent calls. The weighted mean per call, or for a method with
    tokens a weighted least-squares line through (output tokens, cost). Where that line
    has no slope or would go negative (or the token counts have no spread), the mean
    cost per token instead, with nothing per call: that overestimates short replies,
    the safe side for a budget.
    """

    def __init__(self, window: int = 64, half_life: float = 4.0) -> None:
        self.window = window
        self.half_life = half_life
        self._seen: dict[tuple[str, str], deque[tuple[int, float]]] = {}
        self._first: dict[tuple[str, str], asyncio.Event] = {}  # the first calls in flight

    def observe(self, server: str, method: str, usd: float, tokens: int | None = None) -> None:
        if not math.isfinite(usd):  # a charge that is not a number teaches nothing
            return
        seen = self._seen.setdefault((server, method), deque(maxlen=self.window))
        seen.append((tokens if tokens is not None else -1, usd))

    async def first_charge(self, server: str, method: str) -> Estimate | None:
        """The estimate for a method never charged yet: None for the first caller, whose
        call runs to learn it (it must call `settled` when it ends); later callers wait
        for that call to end, then get the estimate (None still, if it failed)."""
        key = (server, method)
        running = self._first.get(key)
        if running is None:
            self._first[key] = asyncio.Event()
            return None
        await running.wait()
        return self.estimate(server, method)

    def settled(self, server: str, method: str) -> None:
        """A call ended (its charge observed, if it came back): release the callers
        waiting on the method's first charge."""
        running = self._first.pop((server, method), None)
        if running is not None:
            running.set()

    def estimate(self, server: str, method: str) -> Estimate | None:
        seen = self._seen.get((server, method))
        if not seen:
            return None
        n = len(seen)
        weights = [0.5 ** ((n - 1 - i) / self.half_life) for i in range(n)]
        total_weight = sum(weights)

        def mean(values: Iterable[float]) -> float:
            return sum(w * v for w, v in zip(weights, values, strict=True)) / total_weight

        mean_usd = mean(usd for _, usd in seen)
        if any(tokens < 0 for tokens, _ in seen):
            return Estimate(mean_usd)
        mean_tokens = mean(tokens for tokens, _ in seen)
        if mean_tokens <= 0:
            return Estimate(mean_usd)
        spread = mean((tokens - mean_tokens) ** 2 for tokens, _ in seen)
        if spread > 0:
            slope = mean((t - mean_tokens) * (usd - mean_usd) for t, usd in seen) / spread
            intercept = mean_usd - slope * mean_tokens
            if slope > 0 and intercept >= 0:
                return Estimate(intercept, slope)
        return Estimate(0.0, mean_usd / mean_tokens)


@dataclass
class Budget:
    """A request's maximum cost (USD), what its finished calls have spent, and what its
    running calls have set aside (their estimates), so that parallel branches share
    one budget. `capped` records each node whose output tokens were lowered to fit:
    node -> {field: value}."""

    max_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    capped: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def left_usd(self) -> float:
        return self.max_usd - self.spent_usd - self.reserved_usd

    def report(self) -> dict[str, Any]:
        """The budget's part of a request's usage."""
        return {"max_usd": self.max_usd, "capped": self.capped}


@dataclass
class PipelineCost:
    """`servegraph cost`'s row: a pipeline's requests in the window, and its cost and
    energy per 1,000 requests, in all and per node."""

    pipeline: str
    requests: float
    usd_per_1000: float
    wh_per_1000: float
    nodes_usd_per_1000: dict[str, float]


def per_thousand(query: Callable[[str], list[dict[str, Any]]], window: str) -> list[PipelineCost]:
    """Cost and energy per 1,000 requests of each pipeline over `window` (a PromQL
    duration, e.g. "1h"), from the metrics (`query`: a Prometheus instant query)."""

    def by(expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {
            tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in query(f"sum by ({', '.join(labels)}) (increase({expr}[{window}]))")
        }

    requests = by("ray_servegraph_pipeline_requests_total", "pipeline")
    usd = by("ray_servegraph_node_cost_usd_total", "pipeline", "node")
    joules = by("ray_servegraph_node_energy_joules_total", "pipeline", "node")
    rows = []
    for (pipeline,), count in sorted(requests.items()):
        if count <= 0:
            continue
        nodes = {node: v for (p, node), v in usd.items() if p == pipeline}
        spent_j = sum(v for (p, _), v in joules.items() if p == pipeline)
        rows.append(
            PipelineCost(
                pipeline,
                count,
                1000 * sum(nodes.values()) / count,
                1000 * spent_j / 3600 / count,
                {node: 1000 * v / count for node, v in sorted(nodes.items())},
            )
        )
    return rows
