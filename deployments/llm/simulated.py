"""A simulated LLM engine for benchmarks (`servegraph.deploy.simulated`): `ray.serve.llm`'s
`LLMServer` runs it in place of vLLM (its `RAYLLM_VLLM_ENGINE_CLS` hook), so the
deployment, its ingress, the pipelines' client, metering and shedding are the real
ones. A reply takes the prefill's time for its prompt, then one decode step per token,
each step as long as the measured curve says for the sequences running now (continuous
batching: more running, slower steps). A guided-JSON reply is a valid instance of its
schema, its enum values drawn at random (seeded per request), so a pipeline's branches
are taken as they would be.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

# ray.serve.llm does not export the engine protocol; its engine hook takes a subclass.
from ray.llm._internal.serve.core.engine.protocol import LLMEngine

from servegraph.server import simulated_curves, simulated_json

MAX_NUM_SEQS = 64  # as `engine_kwargs` gives vLLM


class SimulatedEngine(LLMEngine):
    def __init__(self, llm_config: Any) -> None:  # the base's is abstract: not called
        self.llm_config = llm_config
        curves = simulated_curves()
        if curves is None or curves.llm is None:
            raise RuntimeError(
                "SimulatedEngine needs SERVEGRAPH_SIMULATED_MODELS with an llm curve"
            )
        self.curve = curves.llm
        self.model_id = llm_config.model_id
        self.running = 0
        # vLLM runs at most `max_num_seqs` sequences (64, deployments.llm.server); the
        # rest wait for a place, their prefill too
        self._places = asyncio.Semaphore(MAX_NUM_SEQS)

    async def start(self) -> None:
        await asyncio.sleep(self.curve.load_s)

    def routing_stats(self) -> dict[str, Any]:
        return {}

    async def check_health(self) -> None:
        return None

    async def reset_prefix_cache(self) -> None:
        return None

    async def resolve_lora(self, lora_model: Any) -> None:
        raise NotImplementedError("the simulated engine serves no LoRA")

    # An async generator, as vLLM's engine's is; the base declares a coroutine.
    async def chat(  # type: ignore[override]
        self, request: Any, raw_request_info: Any = None
    ) -> AsyncGenerator[Any, None]:
        from ray.serve.llm.openai_api_models import ChatCompletionResponse

        prompt_tokens = 1 + sum(len(str(m.get("content") or "")) for m in request.messages) // 4
        most = request.max_completion_tokens or request.max_tokens or self.curve.reply_tokens
        tokens = max(1, min(int(most), self.curve.reply_tokens))
        text = _reply(request, random.Random(str(request.messages)))
        pieces = [
            text[len(text) * i // tokens : len(text) * (i + 1) // tokens] for i in range(tokens)
        ]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        options = request.stream_options
        every = bool(options and options.continuous_usage_stats)

        def usage(done: int) -> dict[str, int]:
            return {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": done,
                "total_tokens": prompt_tokens + done,
            }

        await self._places.acquire()
        self.running += 1
        try:
            await asyncio.sleep(prompt_tokens * self.curve.prefill_s_per_token)
            for done, piece in enumerate(pieces, start=1):
                await asyncio.sleep(self.curve.step(self.running))
                if request.stream:
                    chunk = {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": self.model_id,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": piece},
                                "finish_reason": "stop" if done == tokens else None,
                            }
                        ],
                        **({"usage": usage(done)} if every else {}),
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
        finally:
            self.running -= 1
            self._places.release()
        if request.stream:
            if options and options.include_usage:
                tail = {"id": rid, "object": "chat.completion.chunk", "created": created}
                tail |= {"model": self.model_id, "choices": [], "usage": usage(tokens)}
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield ChatCompletionResponse(
            id=rid,
            created=created,
            model=self.model_id,
            choices=[
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            usage=usage(tokens),
        )

    async def completions(self, request: Any, raw_request_info: Any = None) -> Any:
        raise NotImplementedError("the simulated engine serves chat only")

    async def embeddings(self, request: Any, raw_request_info: Any = None) -> Any:
        raise NotImplementedError("the simulated engine serves chat only")

    async def transcriptions(self, request: Any, raw_request_info: Any = None) -> Any:
        raise NotImplementedError("the simulated engine serves chat only")


def _reply(request: Any, rng: random.Random) -> str:
    """What the simulated model says: for guided JSON, an instance of the schema."""
    response_format = request.response_format
    schema = getattr(getattr(response_format, "json_schema", None), "json_schema", None)
    if schema is None:
        return "This is a simulated reply. " * 8
    return json.dumps(simulated_json(schema, rng))
