"""The RAG pipelines in-process, no Ray, in milliseconds (as the README promises every
pipeline): `rag_ingest` into the real vector store, then `rag` and its YAML twin
`rag_yaml` over it, with a bag-of-words embedder and a scripted LLM."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from deployments.catalog import CATALOG
from deployments.embedder.contract import Embedding, EmbedResponse
from deployments.llm.contract import ChatResponse, Usage
from deployments.vector_index.contract import CountRequest
from deployments.vector_index.model import VectorIndex
from pipelines import evidence
from pipelines.rag.ingest import knowledge_base
from servegraph import InProcessRuntime
from servegraph.lang.discovery import discover

DIM = 256


def bag_of_words(text: str) -> np.ndarray:
    vector = np.zeros(DIM, dtype=np.float32)
    for word in evidence.content_words(text):
        vector[int(hashlib.md5(word[:5].encode()).hexdigest(), 16) % DIM] += 1
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


class WordEmbedder:
    async def embed(self, request):
        vectors = np.stack([bag_of_words(t) for t in request.texts])
        return EmbedResponse(vectors=vectors, dim=DIM, model="words")

    async def embed_one(self, request):
        return Embedding(vector=bag_of_words(request.text), dim=DIM)


class ScriptedLLM:
    def __init__(self, reply: dict) -> None:
        self.reply = json.dumps(reply)
        self.requests = []

    async def chat(self, request):
        self.requests.append(request)
        return ChatResponse(
            text=self.reply,
            finish_reason="stop",
            model="s",
            usage=Usage(input_tokens=9, output_tokens=9),
        )

    async def chat_stream(self, request):
        yield await self.chat(request)


@pytest.fixture
def graphs():
    return discover("pipelines")


@pytest.fixture
async def servers(tmp_path, graphs):
    servers = {
        "embedder": WordEmbedder(),
        "vector_index": VectorIndex(tmp_path / "index"),
        "llm": ScriptedLLM(
            {"answer": "Refunds are issued within 7 business days.", "sources": [1]}
        ),
    }
    documents = [d.model_dump() for d in knowledge_base()]
    first = await InProcessRuntime(CATALOG, servers).run(
        graphs["rag_ingest"], {"documents": documents}
    )
    assert first.chunks == first.index_count > len(documents) - 1 and first.replaced == 0
    return servers


async def test_reingesting_replaces_chunks_instead_of_adding(servers, graphs) -> None:
    documents = [d.model_dump() for d in knowledge_base()[:2]]
    again = await InProcessRuntime(CATALOG, servers).run(
        graphs["rag_ingest"], {"documents": documents}
    )
    assert (
        again.replaced == again.chunks
        and again.index_count == servers["vector_index"].count(CountRequest()).count
    )


@pytest.mark.parametrize("pipeline", ["rag", "rag_yaml"])
async def test_rag_answers_from_the_relevant_passage_and_cites_it(
    servers, graphs, pipeline
) -> None:
    answer = await InProcessRuntime(CATALOG, servers).run(
        graphs[pipeline], {"question": "How many business days until refunds for returned items?"}
    )
    assert answer.method == "generated"
    assert answer.answer == "Refunds are issued within 7 business days."
    assert answer.cited[0].doc_id == "kb/billing-refunds"
    # The LLM saw the relevant passages only, the refunds article first.
    prompt = servers["llm"].requests[-1].messages[-1].content
    assert "[1] Refunds and double charges" in prompt
    assert "Troubleshooting devices" not in prompt


async def test_rag_and_its_yaml_twin_answer_alike(servers, graphs) -> None:
    question = {"question": "Is return shipping free?", "k": 3}
    runtime = InProcessRuntime(CATALOG, servers)
    python, yaml = [
        (await runtime.run(graphs[name], question)).model_dump(exclude={"usage"})
        for name in ("rag", "rag_yaml")
    ]
    assert python == yaml
