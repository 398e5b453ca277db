"""The exceptions servegraph raises.

Every error derives from `ServegraphError`, builds its own message from keyword fields,
and pickles across Ray actors (so a replica's error reaches the ingress intact)::

    ServegraphError
    ├── GraphValidationError      the graph is wrong; every problem at once (422 at deploy)
    ├── CatalogError              a model server name or contract that is not known
    ├── InvalidInputError         a model server rejects a request field (422)
    ├── ServerUnavailableError    an invoker could not reach a model server now (queue
    │                             full, replica gone); the runtime names the node (503)
    ├── QuotaExceededError        a write would take a tenant past one of its limits;
    │                             the runtime names the node (429)
    └── PipelineRuntimeError      a request failed while running; carries the node's name
        ├── NodeFailedError        a node raised and no fallback was declared (502)
        ├── NodeInputError         a node got input its contract rejects (422)
        ├── NodeTimeoutError       a node ran past its timeout or the request deadline (504)
        ├── OverloadedError        a model server could not take the call now (503)
        ├── BudgetExceededError    the next node would cost more than the request has left (402)
        └── NodeQuotaError         a node's write would take the tenant past a limit (429)
"""

from __future__ import annotations

from dataclasses import dataclass


class ServegraphError(Exception):
    """Root of every servegraph exception."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a graph: where it is, what is wrong, and how to fix it."""

    node: str
    message: str
    fix: str
    port: str | None = None

    def __str__(self) -> str:
        where = f"{self.node}.{self.port}" if self.port else self.node
        return f"[{where}] {self.message} -> fix: {self.fix}"


class GraphValidationError(ServegraphError):
    """A graph failed validation; `problems` lists every problem found, not just the first."""

    def __init__(self, pipeline: str, problems: list[Problem]) -> None:
        self.pipeline = pipeline
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"pipeline {pipeline!r} has {len(self.problems)} problem(s):\n{lines}")

    def __reduce__(self):  # keyword-built exceptions need this to pickle across actors
        return (type(self), (self.pipeline, self.problems))


class CatalogError(ServegraphError):
    """A model server or method that the catalog does not know."""


class InvalidInputError(ServegraphError, ValueError):
    """A request field a model server cannot take; names the field and the fix (422)."""

    status_code = 422

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"field {field!r}: {problem}; fix: {fix}")

    def __reduce__(self):
        return (type(self), (self.field, self.problem, self.fix))

    def to_detail(self) -> dict[str, str]:
        return {"field": self.field, "error": self.problem, "fix": self.fix}


class ServerUnavailableError(ServegraphError):
    """A model server could not take a call now: its queue is full, or its replica died
    and no other answered before the deadline. Retrying later may succeed (503).

    Raised by invokers, which know servers but not nodes; the runtime re-raises it as
    `OverloadedError` naming the node.
    """

    def __init__(self, server: str, reason: str, retry_after_s: float = 1.0) -> None:
        self.server = server
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(f"model server {server!r} is unavailable: {reason}")

    def __reduce__(self):
        return (type(self), (self.server, self.reason, self.retry_after_s))


class QuotaExceededError(ServegraphError):
    """A write a model server refuses because it would take a tenant past one of its
    limits (`limit`, e.g. "max_documents"): nothing of it was applied. Raised by the
    server; the runtime re-raises it as `NodeQuotaError` naming the node (429)."""

    status_code = 429

    def __init__(self, limit: str, tenant: str, allowed: int, after: int) -> None:
        self.limit = limit
        self.tenant = tenant
        self.allowed = allowed
        self.after = after
        super().__init__(
            f"tenant {tenant!r} is limited to {limit} = {allowed}; this write would make "
            f"it {after}. Nothing was written; fix: delete some, or ask an operator to raise "
            f"the tenant's {limit}"
        )

    def __reduce__(self):
        return (type(self), (self.limit, self.tenant, self.allowed, self.after))


class PipelineRuntimeError(ServegraphError):
    """A request failed inside a pipeline; `node` names where.

    Attributes:
        status_code: the HTTP status the ingress answers with.
    """

    status_code = 500

    def __init__(self, node: str, detail: str) -> None:
        self.node = node
        self.detail = detail
        super().__init__(f"node {node!r}: {detail}")

    def __reduce__(self):
        return (type(self), (self.node, self.detail))


class NodeFailedError(PipelineRuntimeError):
    """A node raised, its retries (if any) were spent, and it declared no fallback."""

    status_code = 502


class NodeInputError(PipelineRuntimeError):
    """A node's input was rejected by its contract (a bad request, not a broken server).

    Attributes:
        problems: each rejected field as ``{"field", "error", "fix"}``.
    """

    status_code = 422

    def __init__(self, node: str, detail: str, problems: list[dict[str, str]] | None = None):
        self.problems = list(problems or [])
        super().__init__(node, detail)

    def __reduce__(self):
        return (type(self), (self.node, self.detail, self.problems))


class NodeTimeoutError(PipelineRuntimeError):
    """A node ran past its own timeout or past what was left of the request's deadline."""

    status_code = 504


class OverloadedError(PipelineRuntimeError):
    """A model server could not take the call now (its queue is full, or its replica is
    gone); the caller should back off and retry after `retry_after_s`."""

    status_code = 503

    def __init__(self, node: str, detail: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(node, detail)

    def __reduce__(self):
        return (type(self), (self.node, self.detail, self.retry_after_s))


class BudgetExceededError(PipelineRuntimeError):
    """The request's maximum cost does not cover the node it stopped before: the node's
    estimated cost (`estimate_usd`) is more than what was left (`left_usd`) of the
    caller's maximum (`max_usd`) after what it had spent (`spent_usd`). 402 Payment
    Required: the same request with a larger maximum can run."""

    status_code = 402

    def __init__(
        self, node: str, estimate_usd: float, left_usd: float, max_usd: float, spent_usd: float
    ) -> None:
        self.estimate_usd = estimate_usd
        self.left_usd = left_usd
        self.max_usd = max_usd
        self.spent_usd = spent_usd
        super().__init__(
            node,
            f"would cost about ${estimate_usd:.3g}, more than the ${max(left_usd, 0.0):.3g} "
            f"left of the request's maximum of ${max_usd:.3g} "
            f"(${spent_usd:.3g} spent before it); "
            f"fix: a maximum of at least ${spent_usd + estimate_usd:.3g} "
            "(the x-servegraph-max-cost-usd header; batch's --max-cost-usd)",
        )

    def __reduce__(self):
        args = (self.node, self.estimate_usd, self.left_usd, self.max_usd, self.spent_usd)
        return (type(self), args)


class NodeQuotaError(PipelineRuntimeError):
    """A node's write was refused: it would take the tenant past `limit` (429). Not
    retried (the limit does not move by waiting) and not hidden by a fallback."""

    status_code = 429

    def __init__(self, node: str, detail: str, limit: str) -> None:
        self.limit = limit
        super().__init__(node, detail)

    def __reduce__(self):
        return (type(self), (self.node, self.detail, self.limit))
