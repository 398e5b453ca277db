"""RAG question answering: embed -> retrieve -> prompt with numbered sources -> LLM -> answer.

The LLM answers as JSON constrained by a schema whose `sources` may only hold the
numbers of passages actually retrieved (guided decoding), so even a 135M model cites
sources that exist. Streamed (`/pipelines/rag/stream`), the `generate` node sends the
`answer` field's text as the tokens arrive; the final `result` event is the same
`RagAnswer` the plain route returns.
"""

from __future__ import annotations

import json

from deployments.schemas import ChatResponse, Hit
from pipelines.rag.models import Passage, RagAnswer, RagQuery
from servegraph import Pipeline

SYSTEM = (
    "You are a support assistant. Answer the question using only the numbered "
    "sources. Reply in JSON with the answer and the numbers of the sources you used."
)


def build_pipeline() -> Pipeline:
    rag = Pipeline(
        "rag",
        input=RagQuery,
        output=RagAnswer,
        description="Answer a question from the knowledge base, citing sources.",
        # The LLM takes 64 running + 64 queued; more would only wait to be refused.
        max_in_flight=128,
    )
    query = rag.call("embed", "embedder", "embed_one", text=rag.input.question)
    found = rag.call(
        "retrieve",
        "vector_index",
        "search",
        vector=query.vector,
        k=rag.input.k,
        filter=rag.input.filter,
        idempotent=True,
        retries=1,
    )
    prompt = rag.function("prompt", build_prompt, question=rag.input.question, hits=found.hits)
    reply = rag.call(
        "generate",
        "llm",
        "chat",
        messages=prompt.messages,
        json_schema=prompt.schema,
        max_tokens=rag.input.max_tokens,
        stream=True,  # POST /pipelines/rag/stream sends the answer's text as it is written
        stream_field="answer",
    )
    rag.returns(rag.function("answer", make_answer, reply=reply, hits=found.hits))
    return rag


def passages(hits: list[Hit]) -> list[Passage]:
    return [
        Passage(
            n=i,
            id=h.id,
            doc_id=str(h.metadata.get("doc_id", h.id)),
            title=str(h.metadata.get("title", "")),
            text=h.text,
            score=h.score,
        )
        for i, h in enumerate(hits, start=1)
    ]


def build_prompt(question: str, hits: list[Hit]) -> dict:
    """Messages with numbered sources, and the JSON schema the answer must follow."""
    numbered = passages(hits)
    sources = "\n\n".join(f"[{p.n}] {p.title}\n{p.text}" for p in numbered) or "(none)"
    numbers = [p.n for p in numbered] or [0]
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 600},
            "sources": {
                "type": "array",
                "items": {"type": "integer", "enum": numbers},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["answer", "sources"],
    }
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Sources:\n{sources}\n\nQuestion: {question}"},
        ],
        "schema": schema,
    }


def make_answer(reply: ChatResponse, hits: list[Hit]) -> RagAnswer:
    numbered = passages(hits)
    try:
        data = json.loads(reply.text)
        answer, cited = str(data.get("answer", "")), [int(n) for n in data.get("sources", [])]
    except (ValueError, TypeError, AttributeError):  # cut off at max_tokens mid-JSON
        answer, cited = reply.text, []
    valid = sorted({n for n in cited if 1 <= n <= len(numbered)})
    return RagAnswer(
        answer=answer.strip(),
        citations=valid,
        cited=[p for p in numbered if p.n in valid],
        passages=numbered,
        usage=reply.usage,
    )
