"""The RAG pipeline written the obvious way, as a team would before adopting a platform:
one FastAPI process, vLLM's async engine, sentence-transformers and FAISS in-process, no
Ray. Same models, same knowledge base and chunking, same prompt, guided JSON and answer
parsing as `pipelines/rag` (their functions are imported, not copied).

    .venv/bin/python -m benchmarks.monolith [--port 8100]   # serves POST /rag

`benchmarks.load` drives it and the platform with the same open-loop traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI

from deployments.embedder.contract import Embedding, EmbedResponse
from deployments.embedder.model import EmbedderSettings
from deployments.llm.contract import ChatResponse, Usage
from deployments.llm.server import engine_kwargs
from deployments.llm.settings import LLMSettings
from deployments.vector_index.contract import Hit
from pipelines.rag.ingest import chunk_documents, knowledge_base
from pipelines.rag.models import RagAnswer, RagQuery
from pipelines.rag.qa import build_prompt, make_answer, rank, split_passages


class Monolith:
    """Everything the RAG answer needs, loaded in this process."""

    def __init__(self, settings: LLMSettings) -> None:
        import faiss
        from sentence_transformers import SentenceTransformer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
        self.encoder = SentenceTransformer(str(EmbedderSettings().model_dir), device="cpu")
        chunks = chunk_documents(knowledge_base(), chunk_chars=600)
        self.records: list[dict[str, Any]] = chunks["records"]
        vectors = self.encoder.encode(
            chunks["texts"], normalize_embeddings=True, convert_to_numpy=True
        )
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.asarray(vectors, dtype=np.float32))
        self.model_id = settings.model_id
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(model=settings.path, **engine_kwargs(settings))
        )
        self.tokenizer = self.engine.tokenizer

    async def answer(self, query: RagQuery) -> RagAnswer:
        vector = await asyncio.to_thread(
            self.encoder.encode, [query.question], normalize_embeddings=True
        )
        scores, rows = self.index.search(np.asarray(vector, dtype=np.float32), query.k)
        hits = [
            Hit(
                id=self.records[row]["id"],
                text=self.records[row]["text"],
                score=float(score),
                metadata=self.records[row]["metadata"],
            )
            for score, row in zip(scores[0], rows[0], strict=True)
            if row >= 0
        ]
        split = split_passages(query.question, hits)  # the same re-ranking as the pipeline
        sentences = await asyncio.to_thread(
            self.encoder.encode, split["texts"], normalize_embeddings=True
        )
        dim = int(sentences.shape[1])
        ranked = rank(
            query.question,
            Embedding(vector=vector[0], dim=dim),
            hits,
            split,
            EmbedResponse(vectors=sentences, dim=dim, model="local"),
        )
        prompt = build_prompt(query.question, ranked, query.max_tokens)
        reply = await self.chat(prompt["messages"], prompt["schema"], query.max_tokens)
        return make_answer(reply, ranked)

    async def chat(self, messages: list[dict], schema: dict, max_tokens: int) -> ChatResponse:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            structured_outputs=StructuredOutputsParams(json=json.dumps(schema)),
        )
        final = None
        async for output in self.engine.generate(text, params, request_id=uuid.uuid4().hex):
            final = output
        assert final is not None
        completion = final.outputs[0]
        return ChatResponse(
            text=completion.text,
            finish_reason=completion.finish_reason,
            usage=Usage(
                input_tokens=len(final.prompt_token_ids or []),
                output_tokens=len(completion.token_ids),
            ),
            model=self.model_id,
        )


def create_app(settings: LLMSettings | None = None) -> FastAPI:
    state: dict[str, Monolith] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["m"] = Monolith(settings or LLMSettings())
        yield
        state["m"].engine.shutdown()

    app = FastAPI(title="RAG monolith", lifespan=lifespan)

    @app.post("/rag", response_model=RagAnswer)
    async def rag(query: RagQuery) -> RagAnswer:
        return await state["m"].answer(query)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    uvicorn.run(create_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
