"""The pipelines' side of the LLM: `LLMClient` turns a node's typed `ChatRequest` into
the OpenAI request the `LLMServer` deployment takes, through its handle (one hop, no
HTTP), and adds what pipelines need that the OpenAI schema spreads around: guided JSON
from a plain JSON schema, token usage, and 4xx errors that name the field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic_core import from_json

from deployments.llm.contract import ChatChunk, ChatRequest, ChatResponse, Usage
from deployments.llm.settings import LLMSettings
from servegraph.server import (
    CHARGE_ITEM,
    InvalidInputError,
    allowance,
    annotate,
    attach_charge,
    cancel_off_loop,
    report_tokens,
    tokens_counted,
)

STOPPED = "servegraph_stopped"  # in the engine's charge item: why it ended the reply early


class LLMClient:
    """Calls the `LLMServer` deployment with a pipeline node's typed `ChatRequest`."""

    def __init__(self, handle: Any, model_id: str | None = None) -> None:
        # Imported here, when the ingress makes its clients (`ServeInvoker.prepare`), not
        # on the first request: it imports torch, over a second of the event loop's time.
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        self._request_model = ChatCompletionRequest
        self.model_id = model_id or LLMSettings().model_id
        # LLMServer.chat is an async generator: the handle must be a streaming one.
        self._handle = handle.options(stream=True)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        if allowance() is not None or tokens_counted():
            # The engine can stop a reply at the request's budget only between the
            # items of a stream, and only a stream tells the tokens used so far (a call
            # cut short by a deadline or a caller gone is charged them): take the
            # streamed reply, whole.
            async for item in self.chat_stream(request):
                if isinstance(item, ChatResponse):
                    return item
        response, charge = None, None
        stream = self._handle.chat.remote(self._openai_request(request), None)
        try:
            async for item in stream:
                if isinstance(item, dict) and CHARGE_ITEM in item:
                    charge = item[CHARGE_ITEM]
                    continue
                response = item
        except asyncio.CancelledError:
            # Serve does not cancel a child call when only its awaiting task is
            # cancelled (servegraph.serving.handles.cancel_when_abandoned): abort the generation.
            cancel_off_loop(stream)
            raise
        reply = _to_chat_response(response, self.model_id)
        _annotate_reply(reply)
        return attach_charge(reply, charge) if charge else reply

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatChunk | ChatResponse]:
        """`chat`, streamed: `ChatChunk`s as tokens arrive, then the whole `ChatResponse`.
        The engine reports its usage on every chunk, and the tokens used so far are
        reported as they arrive (`report_tokens`), so a reply cut short still counts."""
        field = FieldStream.for_request(request)
        text: list[str] = []
        finish_reason: str | None = None
        usage = Usage(input_tokens=0, output_tokens=0)
        ended: list[dict[str, Any]] = []
        deltas = 0
        allowed = allowance()
        openai_request = self._openai_request(request, stream=True)
        stream = self._handle.chat.remote(openai_request, None, allowed)
        try:
            async for batch in self._lines(stream, ended):
                for line in batch:
                    payload = line.removeprefix("data:").strip()
                    if not payload or payload == "[DONE]":
                        continue
                    data = json.loads(payload)
                    if "error" in data:
                        error = data["error"]
                        _raise_engine_error(error.get("message", ""), error.get("code"))
                    for choice in data.get("choices") or []:
                        if delta := (choice.get("delta") or {}).get("content"):
                            text.append(delta)
                            deltas += 1
                            if new := field.feed(delta):
                                yield ChatChunk(text=new)
                        finish_reason = choice.get("finish_reason") or finish_reason
                    if counts := data.get("usage"):
                        usage = Usage(
                            input_tokens=counts["prompt_tokens"],
                            output_tokens=counts["completion_tokens"],
                        )
                    report_tokens(usage.input_tokens, max(usage.output_tokens, deltas))
        except (asyncio.CancelledError, GeneratorExit):
            cancel_off_loop(stream)  # the caller is gone: abort the generation
            raise
        if ended and ended[0].get(STOPPED):
            # The engine ended the reply at the request's budget: a reply cut short, as at
            # max_tokens. Its usage is the last chunk's (or, without one, a token a delta).
            finish_reason = "length"
            usage = usage if usage.output_tokens else Usage(input_tokens=0, output_tokens=deltas)
        reply = ChatResponse(
            text="".join(text), finish_reason=finish_reason, usage=usage, model=self.model_id
        )
        _annotate_reply(reply)
        yield attach_charge(reply, ended[0][CHARGE_ITEM]) if ended else reply

    async def _lines(self, stream: Any, ended: list[dict[str, Any]]) -> AsyncIterator[list[str]]:
        """LLMServer yields lists of SSE lines ("data: {chunk json}"), or an ErrorResponse
        (raised here as the engine's error), and last the call's charge (that item is
        kept in `ended`)."""
        async for batch in stream:
            if isinstance(batch, dict) and CHARGE_ITEM in batch:
                ended.append(batch)
                continue
            lines = batch if isinstance(batch, list) else [batch]
            for line in lines:
                if not isinstance(line, str):
                    _to_chat_response(line, self.model_id)  # raises the engine's error
            yield lines

    def _openai_request(self, request: ChatRequest, *, stream: bool = False) -> Any:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [m.model_dump() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": stream,
        }
        if stream:
            # Usage on every chunk, not only the last: a reply ended early (at the
            # request's budget, its deadline, its caller gone) has its tokens counted.
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if request.stop:
            body["stop"] = request.stop
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        annotate(
            **{
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "vllm",
                "gen_ai.request.model": self.model_id,
                "gen_ai.request.max_tokens": request.max_tokens,
                "gen_ai.request.temperature": request.temperature,
                "servegraph.llm.guided_json": request.json_schema is not None,
                "servegraph.llm.stream": stream,
            }
        )
        return self._request_model(**body)


class FieldStream:
    """Turns a reply's text deltas into the deltas a caller should see: all of it, or,
    for a guided-JSON reply, only the text of one top-level string field so far.

    The partial JSON is parsed with pydantic-core's `allow_partial` (the same parser
    as pydantic), so escapes are decoded and a half-written escape is held back.
    """

    def __init__(self, field: str | None) -> None:
        self.field = field
        self._text = ""
        self._sent = ""

    @classmethod
    def for_request(cls, request: ChatRequest) -> FieldStream:
        """Its `stream_field` applies only to a guided-JSON reply."""
        return cls(request.stream_field if request.json_schema is not None else None)

    def feed(self, delta: str) -> str:
        if self.field is None:
            return delta
        self._text += delta
        try:
            value = from_json(self._text, allow_partial="trailing-strings")
        except ValueError:
            return ""
        current = value.get(self.field) if isinstance(value, dict) else None
        if not isinstance(current, str) or not current.startswith(self._sent):
            return ""
        new, self._sent = current[len(self._sent) :], current
        return new


def _annotate_reply(reply: ChatResponse) -> None:
    annotate(
        **{
            "gen_ai.usage.input_tokens": reply.usage.input_tokens,
            "gen_ai.usage.output_tokens": reply.usage.output_tokens,
            "gen_ai.response.finish_reasons": [reply.finish_reason or "unknown"],
        }
    )


def _raise_engine_error(message: str, code: Any) -> None:
    code = int(code or 500)
    if 400 <= code < 500:
        raise InvalidInputError("messages", message, "shorten the prompt or lower max_tokens")
    raise RuntimeError(f"LLM engine error {code}: {message}")


def _to_chat_response(response: Any, model_id: str) -> ChatResponse:
    error = getattr(response, "error", None)
    if error is not None:
        _raise_engine_error(getattr(error, "message", str(error)), getattr(error, "code", 500))
    choice = response.choices[0]
    usage = response.usage
    return ChatResponse(
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        model=model_id,
    )
