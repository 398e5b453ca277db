"""The model servers' contracts on the raw models, in this process, without Ray.

For `servegraph.InProcessRuntime`: run a pipeline on the real models in one process (an ML
engineer's notebook, the benchmarks' raw baseline). Same contracts as the deployments;
no batching across callers, no replicas.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from deployments import schemas as s
from deployments.encoders import SentenceEncoder, TicketClassifier
from deployments.settings import ModelSettings
from deployments.vector_store import VectorStore


class LocalEmbedder:
    def __init__(self, settings: ModelSettings) -> None:
        self._model = SentenceEncoder(settings.embedder_dir)
        self.dim = self._model.dim

    async def embed(self, request: s.EmbedRequest) -> s.EmbedResponse:
        vectors = self._model.encode(request.texts)
        return s.EmbedResponse(vectors=vectors, dim=self.dim, model="local")

    async def embed_one(self, request: s.EmbedOneRequest) -> s.Embedding:
        return s.Embedding(vector=self._model.encode([request.text])[0], dim=self.dim)


class LocalClassifier:
    def __init__(self, settings: ModelSettings) -> None:
        encoder = SentenceEncoder(settings.embedder_dir)
        self._model = TicketClassifier(settings.classifier_dir, encoder)

    async def classify(self, request: s.ClassifyRequest) -> s.Classification:
        (result,) = self._model.classify([request.text])
        return result

    async def classify_batch(self, request: s.ClassifyBatchRequest) -> s.ClassifyBatchResponse:
        return s.ClassifyBatchResponse(results=self._model.classify(request.texts))


class LocalIndex:
    def __init__(self, path: Path) -> None:
        self.store = VectorStore(path)

    async def add(self, request: s.AddRequest) -> s.AddResponse:
        ids, replaced, count = self.store.add(
            [item.model_dump() for item in request.items], request.replace
        )
        return s.AddResponse(ids=ids, replaced=replaced, count=count)

    async def search(self, request: s.SearchRequest) -> s.SearchResponse:
        hits = self.store.search(request.vector, request.k, request.filter)
        return s.SearchResponse(hits=[s.Hit(**hit) for hit in hits])

    async def count(self, request: s.CountRequest) -> s.CountResponse:
        return s.CountResponse(count=self.store.count(request.filter))

    async def delete(self, request: s.DeleteRequest) -> s.DeleteResponse:
        deleted, count = self.store.delete(request.ids, request.filter, request.any_of)
        return s.DeleteResponse(deleted=deleted, count=count)


class LocalLLM:
    """vLLM's offline engine (`vllm.LLM`) behind the `chat` contract.

    Create it under `if __name__ == "__main__":`: vLLM starts workers with spawn.
    """

    def __init__(self, settings: ModelSettings) -> None:
        from vllm import LLM

        from deployments.llm import engine_kwargs

        # On CPU vLLM otherwise reserves most of RAM for its KV cache; size it as the
        # Serve deployment does (deployments.llm).
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.llm_kv_cache_gib))
        self.model_id = settings.llm_model_id
        self._llm = LLM(model=settings.llm_path, **engine_kwargs(settings))
        self._lock = asyncio.Lock()  # the offline engine serves one call at a time

    def close(self) -> None:
        """Stop the engine's processes. Without it the interpreter's exit waits on them
        forever (multiprocessing joins its children at exit)."""
        self._llm.llm_engine.engine_core.shutdown()

    async def chat(self, request: s.ChatRequest) -> s.ChatResponse:
        return (await self.chat_many([request]))[0]

    async def chat_many(self, requests: list[s.ChatRequest]) -> list[s.ChatResponse]:
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
            s.ChatResponse(
                text=output.outputs[0].text,
                finish_reason=output.outputs[0].finish_reason,
                model=self.model_id,
                usage=s.Usage(
                    input_tokens=len(output.prompt_token_ids or []),
                    output_tokens=len(output.outputs[0].token_ids),
                ),
            )
            for output in outputs
        ]

    async def chat_stream(self, request: s.ChatRequest) -> AsyncIterator[Any]:
        """The offline engine has no token stream: one chunk with the whole text, then the
        reply. The same contract as the Serve deployment, for in-process runs and tests."""
        from deployments.llm import FieldStream

        reply = await self.chat(request)
        if text := FieldStream.for_request(request).feed(reply.text):
            yield s.ChatChunk(text=text)
        yield reply


def local_servers(index_path: Path, *, llm: bool = True) -> dict[str, Any]:
    """Every model server of the catalog, in this process."""
    settings = ModelSettings()
    servers: dict[str, Any] = {
        "embedder": LocalEmbedder(settings),
        "classifier": LocalClassifier(settings),
        "vector_index": LocalIndex(index_path),
    }
    if llm:
        servers["llm"] = LocalLLM(settings)
    return servers
