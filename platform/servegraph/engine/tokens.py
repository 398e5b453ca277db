"""LLM tokens a request spends, for the key's token budget (`servegraph.security`,
`servegraph.security.limits`): what its calls incurred, whatever became of them, and the most it
may spend, reserved from the budget before it runs.

- `Tally`: a request's tokens, every LLM call's together, readable at any moment. A
  call's tokens count as its reply arrives (its client `report`s them), not when it
  ends, so a call cut short by a deadline, a failure or a caller who hung up is charged
  what the engine did up to then.
- `PromptEstimate`: a prompt's tokens before anything has tokenized it.
- `most_output_tokens`: the most output tokens a pipeline run may ask the LLM for.

Imports neither Ray nor a model.
"""

from __future__ import annotations

import contextvars
import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from servegraph.lang.catalog import Catalog
from servegraph.lang.graph import INPUT, CallNode, Graph, LoopNode, SwitchNode

CHARS_PER_TOKEN = 4  # English text in a BPE vocabulary: about four characters a token


@dataclass
class Incurred:
    """One call's LLM tokens so far: totals, which only grow."""

    input: int = 0
    output: int = 0

    def update(self, input_tokens: int, output_tokens: int) -> None:
        self.input = max(self.input, int(input_tokens))
        self.output = max(self.output, int(output_tokens))


@dataclass
class Tally:
    """A request's LLM tokens: every call's, those that failed, timed out or were
    cancelled included, as far as each got."""

    calls: list[Incurred] = field(default_factory=list)

    def call(self) -> Incurred:
        """A new call's count, part of this tally from now on."""
        incurred = Incurred()
        self.calls.append(incurred)
        return incurred

    def totals(self) -> dict[str, int]:
        return {
            "input": sum(c.input for c in self.calls),
            "output": sum(c.output for c in self.calls),
        }


_running: contextvars.ContextVar[Incurred | None] = contextvars.ContextVar(
    "servegraph_llm_tokens", default=None
)


@contextmanager
def counting(incurred: Incurred) -> Iterator[Incurred]:
    """The running model-server call's tokens go to `incurred` (set by the runtime
    around each call)."""
    token = _running.set(incurred)
    try:
        yield incurred
    finally:
        _running.reset(token)


def counted() -> bool:
    """Whether the running call's tokens are being counted: a client that can report
    them as the reply arrives should then (`report`)."""
    return _running.get() is not None


def report(input_tokens: int, output_tokens: int) -> None:
    """A server's client, as a call's reply arrives: the LLM tokens the call has used so
    far (totals: the prompt's, and the output's up to now). Nothing outside a call."""
    incurred = _running.get()
    if incurred is not None:
        incurred.update(input_tokens, output_tokens)


def estimate(chars: int) -> int:
    """Tokens in `chars` characters of text, at `CHARS_PER_TOKEN`."""
    return math.ceil(max(chars, 0) / CHARS_PER_TOKEN)


class PromptEstimate:
    """A prompt's tokens before it is tokenized: its characters / 4, plus the most that
    recent prompts of the same kind needed beyond that (a chat template's system prompt
    and markup; a pipeline's retrieved passages, which its request does not contain),
    learned from their actual counts. An estimate for a reservation: what is actually
    used is charged when it is known."""

    def __init__(self, window: int = 32) -> None:
        self._beyond: deque[int] = deque(maxlen=window)

    def __call__(self, chars: int) -> int:
        return estimate(chars) + max(self._beyond, default=0)

    def observe(self, chars: int, tokens: int) -> None:
        """A prompt of `chars` characters was `tokens` tokens."""
        if tokens > 0:
            self._beyond.append(max(0, tokens - estimate(chars)))


def most_output_tokens(graph: Graph, catalog: Catalog, request: BaseModel | None) -> int:
    """The most LLM output tokens a run of `graph` may ask for: each call of a method
    whose contract bounds them (`budget_field`, the LLM's `max_tokens`) at its constant,
    at the field of the run's `request` it is wired to, else at the field's default; a
    loop's body as often as it may run, the largest case of a switch, every branch of
    a parallel node, and a fallback call as well as its node (both may run)."""
    total = 0
    for node in graph.nodes:
        calls = [node] if isinstance(node, CallNode) else []
        if node.fallback and node.fallback.server:
            fallback = CallNode(
                name=node.name,
                server=node.fallback.server,
                method=node.fallback.method or "",
                inputs=node.inputs,
                params=node.params,
            )
            calls.append(fallback)
        for call in calls:
            total += _bound(call, catalog, request)
        children = [sub for _, sub in node.children()]
        if isinstance(node, SwitchNode):
            total += max((most_output_tokens(s, catalog, None) for s in children), default=0)
        elif isinstance(node, LoopNode):
            total += node.max_iterations * most_output_tokens(node.body, catalog, None)
        else:
            total += sum(most_output_tokens(s, catalog, None) for s in children)
    return total


def _bound(call: CallNode, catalog: Catalog, request: BaseModel | None) -> int:
    try:
        contract = catalog.contract(call.server, call.method)
    except Exception:  # a graph is validated before it runs; nothing to bound here
        return 0
    bound = contract.budget_field
    if bound is None or contract.usage is None:
        return 0
    value: Any = call.params.get(bound)
    ref = call.inputs.get(bound)
    if value is None and ref is not None and request is not None:
        head, *path = ref.split(".")
        if head == INPUT and len(path) == 1:
            value = getattr(request, path[0], None)
    if value is None:
        default = contract.request.model_fields[bound].default
        value = None if default is PydanticUndefined else default
    try:
        return max(int(value), 0) if value is not None else 0
    except (TypeError, ValueError):
        return 0
