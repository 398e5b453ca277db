"""The LLM's contract on vLLM's offline engine, in this process, without Ray: what the
in-process runtime serves (an ML engineer's notebook, the benchmarks' raw baseline).

The Serve deployment is `ray.serve.llm`'s engine, not a class of ours, so this is the
one model server whose in-process class is not its Serve class: both take the engine
arguments from `deployments.llm.server.engine_kwargs` and stream through the same
`FieldStream`, and `tests/deployments/test_contracts.py` holds both to the contract.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any, cast

from deployments.llm.client import FieldStream
from deployments.llm.contract import ChatChunk, ChatRequest, ChatResponse, Usage
from deployments.llm.server import engine_kwargs
from deployments.llm.settings import LLMSettings


class InProcessLLM:
    """vLLM's offline engine (`vllm.LLM`) behind the `chat` contract.

    Create it under `if __name__ == "__main__":`: vLLM starts workers with spawn.
    """

    def __init__(self, settings: LLMSettings | None = None) -> None:
        from vllm import LLM

        settings = settings or LLMSettings()

        # On CPU vLLM otherwise reserves most of RAM for its KV cache; size it as the
        # Serve deployment does (deployments.llm.server).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        self.model_id = settings.model_id
        self._llm = LLM(model=settings.path, **engine_kwargs(settings))
        self._lock = asyncio.Lock()  # the offline engine serves one call at a time

    def close(self) -> None:
        """Stop the engine's processes. Without it the interpreter's exit waits on them
        forever (multiprocessing joins its children at exit)."""
        self._llm.llm_engine.engine_core.shutdown()

    async def chat(self, request: ChatRequest) -> ChatResponse:
        return (await self.chat_many([request]))[0]

    async def chat_many(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        """Several chats in one engine call: the offline engine's way to batch."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = []
        for request in requests:
            options: dict[str, Any] = {
                "max_tokens": request.max_tokens,
                "temperature": request.temperature,
                "stop": request.stop,
            }
            if request.json_schema is not None:
                options["structured_outputs"] = StructuredOutputsParams(
                    json=json.dumps(request.json_schema)
                )
            params.append(SamplingParams(**options))
        conversations = [[m.model_dump() for m in request.messages] for request in requests]
        async with self._lock:
            outputs = await asyncio.to_thread(
                self._llm.chat, cast(Any, conversations), params, use_tqdm=False
            )
        return [
            ChatResponse(
                text=output.outputs[0].text,
                finish_reason=output.outputs[0].finish_reason,
                model=self.model_id,
                usage=Usage(
                    input_tokens=len(output.prompt_token_ids or []),
                    output_tokens=len(output.outputs[0].token_ids),
                ),
            )
            for output in outputs
        ]

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[Any]:
        """The offline engine has no token stream: one chunk with the whole text, then the
        reply. The same contract as the Serve deployment, for in-process runs and tests."""
        reply = await self.chat(request)
        if text := FieldStream.for_request(request).feed(reply.text):
            yield ChatChunk(text=text)
        yield reply
