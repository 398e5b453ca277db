"""What a request to the OpenAI routes spends of its key's LLM token budget
(`servegraph.security.endpoints.guard_endpoint` asks an `OpenAIMeter` for each request):

- before the call, the most it may spend, reserved from the budget: its prompt's
  estimate (`servegraph.engine.tokens.PromptEstimate`: characters / 4, plus what recent prompts
  of the route needed beyond that, e.g. the chat template's) plus its output's bound
  (`max_completion_tokens` or `max_tokens`, else what the context leaves; times `n`);
- a streamed chat or completion always asks the engine for its usage on every chunk
  (`stream_options.include_usage` and `continuous_usage_stats` forced on the request),
  so its prompt is charged, and a stream the caller leaves early is charged the tokens
  generated up to then; the usage the caller did not ask for is taken out of the reply
  (the last chunk's, and each chunk's), so it reads as it would have;
- after the call, the engine's counts: `usage`, or `count` for /tokenize; an answer that
  reports none (/detokenize) is charged its prompt's estimate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, get_args

from pydantic import BaseModel

from servegraph.server import CHARS_PER_TOKEN, PromptEstimate

# The request fields that are the prompt, on whichever route has them.
PROMPT_FIELDS = ("messages", "prompt", "suffix", "input", "text_1", "text_2", "tools", "tokens")
GENERATING = ("completions", "chat")  # the routes that generate: an output to bound

_ESTIMATES: dict[str, PromptEstimate] = {}  # per route: what its prompts need beyond chars


class OpenAIMeter:
    """One request to an OpenAI route, metered (`servegraph.security.endpoints.TokenMeter`)."""

    def __init__(self, route: str, body: Any, context_tokens: int) -> None:
        self.route = route
        self._estimate = _ESTIMATES.setdefault(route, PromptEstimate())
        self._chars = prompt_chars(body)
        self.prompt = self._estimate(self._chars)
        self.output = most_output(body, context_tokens - self.prompt) if route in GENERATING else 0
        self.reserve = {"input": self.prompt, "output": self.output}
        self.wants_usage, self.wants_every_chunk = force_stream_usage(body)
        self._input = 0
        self._output = 0
        self._per_choice: dict[int, int] = {}  # a stream's output so far, by choice
        self._reported = False  # the engine's usage was seen
        self._learned = False  # the prompt's count taught the route's estimate
        self._pending = ""  # a streamed event not yet complete

    # -- what was used

    def used(self) -> dict[str, int]:
        output = max(self._output, sum(self._per_choice.values()))
        return {"input": self._input, "output": output}

    def _usage(self, usage: dict[str, Any], choices: list[Any] | None) -> None:
        self._reported = True
        self._input = max(self._input, int(usage.get("prompt_tokens") or 0))
        completion = int(usage.get("completion_tokens") or 0)
        if choices and len(choices) == 1 and isinstance(choices[0], dict):
            # Continuous usage counts the output of the chunk's own choice (n > 1).
            index = int(choices[0].get("index") or 0)
            self._per_choice[index] = max(self._per_choice.get(index, 0), completion)
        else:
            self._output = max(self._output, completion)
        self._learn()

    def _learn(self) -> None:
        """The route's estimate taught this prompt's count, once."""
        if self._input and not self._learned:
            self._learned = True
            self._estimate.observe(self._chars, self._input)

    def whole(self, body: bytes, status: int) -> None:
        """A whole (JSON) answer."""
        try:
            data = json.loads(body)
        except (TypeError, ValueError):
            data = None
        if not isinstance(data, dict):
            data = {}
        if isinstance(usage := data.get("usage"), dict):
            self._usage(usage, None)
        elif isinstance(count := data.get("count"), int):  # /tokenize
            self._reported = True
            self._input = count
            self._learn()
        elif status < 400:  # an answer that reports no tokens: its prompt, as estimated
            self._input = self.prompt

    # -- a stream

    def stream(self, piece: str) -> str:
        """A piece of a streamed answer: what the caller gets of it."""
        self._pending += piece
        *events, self._pending = self._pending.split("\n\n")
        return "".join(kept + "\n\n" for e in events if (kept := self._event(e)) is not None)

    def end(self) -> str:
        """The rest of a stream that ended without its last event's blank line."""
        rest, self._pending = self._pending, ""
        return rest

    def _event(self, event: str) -> str | None:
        """One server-sent event, counted; None to leave it out of the reply."""
        payload = event.strip()
        if not payload.startswith("data:"):
            return event
        payload = payload.removeprefix("data:").strip()
        if not payload.startswith("{"):
            return event  # [DONE]
        try:
            data = json.loads(payload)
        except ValueError:
            return event
        if not isinstance(data, dict):
            return event
        choices = data.get("choices")
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._usage(usage, choices)
            if not choices:  # the usage chunk that ends the stream
                return event if self.wants_usage else None
            if not self.wants_every_chunk:
                del data["usage"]
                return "data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        elif choices and not self._reported:
            for choice in choices:  # an engine that ignored the request: a token a chunk
                index = int(choice.get("index") or 0) if isinstance(choice, dict) else 0
                self._per_choice[index] = self._per_choice.get(index, 0) + 1
        return event


def meter(route: str, context_tokens: Callable[[], int]) -> Callable[..., OpenAIMeter]:
    """The `meter` of `guard_endpoint` for OpenAI route `route`: an `OpenAIMeter` of the
    request body among the endpoint's arguments."""

    def metered(*args: Any, **kwargs: Any) -> OpenAIMeter:
        body = kwargs.get("body")
        if body is None:
            body = next((a for a in args if isinstance(a, BaseModel | dict)), None)
        return OpenAIMeter(route, body, context_tokens())

    return metered


def prompt_chars(body: Any) -> int:
    """The characters of a request's prompt (a token id counts as a token's)."""
    return sum(_chars(_field(body, name)) for name in PROMPT_FIELDS)


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):  # a token id
        return CHARS_PER_TOKEN
    if isinstance(value, BaseModel):
        return _chars(value.model_dump(exclude_none=True))
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_chars(v) for v in value)
    return 0


def most_output(body: Any, context_left: int) -> int:
    """The most output tokens a generating request may ask for: its bound, else all
    the context leaves; for each of its `n` choices (or `best_of` sequences)."""
    bound = _field(body, "max_completion_tokens") or _field(body, "max_tokens")
    try:
        per_choice = int(bound) if bound else max(context_left, 1)
        choices = max(int(_field(body, "n") or 1), int(_field(body, "best_of") or 1), 1)
    except (TypeError, ValueError):
        return max(context_left, 1)
    return max(per_choice, 0) * choices


def force_stream_usage(body: Any) -> tuple[bool, bool]:
    """For a streamed request: the engine asked for its usage on every chunk; what the
    caller asked for itself (the last chunk's usage; every chunk's). (True, True), and
    nothing changed, for a request that does not stream."""
    if not _field(body, "stream"):
        return True, True
    options = _field(body, "stream_options")
    asked = bool(_field(options, "include_usage"))
    every = asked and bool(_field(options, "continuous_usage_stats"))
    forced = {"include_usage": True, "continuous_usage_stats": True}
    if isinstance(body, dict):
        body["stream_options"] = forced
    else:
        options_type = _model_of(type(body).model_fields["stream_options"].annotation)
        body.stream_options = options_type(**forced) if options_type else forced
    return asked, every


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in an annotation like `StreamOptions | None`."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)
