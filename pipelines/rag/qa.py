"""RAG question answering: embed -> retrieve -> prompt with numbered sources -> LLM -> answer.

The LLM answers as JSON constrained by a schema whose `sources` may only hold the
numbers of passages actually retrieved (guided decoding), so even a 135M model cites
sources that exist. Streamed (`/pipelines/rag/stream`), the `generate` node sends the
`answer` field's text as the tokens arrive; the final `result` event is the same
`RagAnswer` the plain route returns.
"""

from __future__ import annotations

from pydantic_core import from_json

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
    prompt = rag.function(
        "prompt",
        build_prompt,
        question=rag.input.question,
        hits=found.hits,
        max_tokens=rag.input.max_tokens,
    )
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


# Tokens of the reply that are not the answer's text: `{"answer":"`, `","sources":[1,2,3]}`.
_JSON_TOKENS = 20
# Characters per token, low for English (about 4) so that odd text (numbers, URLs) fits too.
_CHARS_PER_TOKEN = 2.5


def answer_chars(max_tokens: int) -> int:
    """The longest answer that leaves room to close the JSON and cite within
    `max_tokens`: the grammar then ends the answer in time instead of being cut off."""
    return max(40, int((max_tokens - _JSON_TOKENS) * _CHARS_PER_TOKEN))


def build_prompt(question: str, hits: list[Hit], max_tokens: int = 160) -> dict:
    """Messages with numbered sources, and the JSON schema the answer must follow."""
    numbered = passages(hits)
    sources = "\n\n".join(f"[{p.n}] {p.title}\n{p.text}" for p in numbered) or "(none)"
    numbers = [p.n for p in numbered] or [0]
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": answer_chars(max_tokens)},
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
    """The answer and its citations from the model's JSON. A reply cut off at max_tokens
    is read as far as it goes: the answer's text so far, never the raw JSON."""
    numbered = passages(hits)
    try:
        data = from_json(reply.text, allow_partial="trailing-strings")
        answer, cited = str(data.get("answer", "")), [int(n) for n in data.get("sources", [])]
    except (ValueError, TypeError, AttributeError):  # not JSON at all: the text as written
        answer, cited = reply.text, []
    valid = sorted({n for n in cited if 1 <= n <= len(numbered)})
    return RagAnswer(
        answer=answer.strip(),
        citations=valid,
        cited=[p for p in numbered if p.n in valid],
        passages=numbered,
        usage=reply.usage,
    )
