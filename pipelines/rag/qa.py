"""RAG question answering, built so that a 135M model's answers stay clean and grounded:

    embed ─► retrieve ─► split (passages → sentences) ─► embed_sentences ─► rank
          ─► prompt (relevant passages only, best first) ─► generate (guided JSON)
          ─► answer (checked; an extractive answer when the generated one fails)

- `rank` scores every retrieved passage by its sentence closest to the question (the
  embedder's vectors, one batched call) and keeps those that pass a relevance bar: the
  model only sees, and may only cite, passages that are about the question.
- The LLM answers as JSON constrained by a schema (guided decoding): the answer, bounded
  in length so the grammar closes it inside the token budget, then the numbers of the
  passages it used (only those shown). The answer comes first on purpose: with the
  citations first, SmolLM2-135M answered 11 of 12 development questions with a number
  or a date, as if continuing the list of numbers.
- `answer` keeps the generated answer's sentences that the relevant passages support
  (their content words, numbers and negations are the passages'; see
  `pipelines.evidence`), without repeats or an unfinished last sentence, each citing the
  passage that supports it best. If none is left, the answer is the best passage's
  sentences closest to the question, cited. `method` says which path produced it;
  `truncated` that the reply hit `max_tokens` and was read as partial JSON.

Streamed (`/pipelines/rag/stream`), `generate` sends the `answer` field's text as it is
written; the final `result` event is the `RagAnswer` the plain route returns, which
holds the checked answer (the extractive one, if the streamed text failed its checks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

from pydantic_core import from_json

from deployments.embedder import embedder
from deployments.embedder.contract import Embedding, EmbedResponse
from deployments.llm import llm
from deployments.llm.contract import ChatResponse
from deployments.vector_index import vector_index
from deployments.vector_index.contract import Hit
from pipelines import evidence
from pipelines.rag.models import Passage, RagAnswer, RagQuery, Ranked, Sentence
from servegraph import AnswerCache, Pipeline, Ref

SYSTEM = (
    "You are a support assistant. Answer the question using only the numbered "
    "sources. Reply in JSON with the answer and the numbers of the sources you used."
)
# A passage is relevant when its sentence closest to the question is at least this
# similar to it (all-MiniLM-L6-v2 cosine), and within MARGIN of the best passage's.
RELEVANCE_BAR = 0.3
MARGIN = 0.15
# A generated answer is used when at least this share of its content words are in
# the passages it cites.
MIN_SUPPORT = 0.6
EXTRACTIVE_SENTENCES = 2
MAX_SENTENCES = 2
NOTHING_FOUND = "The knowledge base has no passage about this question."
# Two questions share a cached answer from this similarity (all-MiniLM-L6-v2 cosine):
# tuned on labelled pairs (pipelines/rag/eval/cache_pairs.jsonl, benchmarks.cache).
CACHE_THRESHOLD = 0.95


def build_pipeline(version: str = "v1", prompt_passages: int = 0) -> Pipeline:
    """`rag` at `version`; `prompt_passages` > 0 shows the LLM at most that many of the
    relevant passages (`pipelines.rag.v2`), else all of them."""
    rag = Pipeline(
        "rag",
        input=RagQuery,
        output=RagAnswer,
        description="Answer a question from the knowledge base, citing sources.",
        # The LLM takes 64 running + 64 queued; more would only wait to be refused.
        max_in_flight=128,
        signals=answer_signals,
        version=version,
        # A repeated question (in other words too) is answered from the cache, until a
        # passage the answer was built from is written (`servegraph.serving.answer_cache`).
        cache=AnswerCache(
            question="question",
            sources="passages.id",
            threshold=CACHE_THRESHOLD,
            cacheable="pipelines.rag.qa:cacheable",
        ),
    )
    ranked = retrieve_ranked(rag, rag.input.question, k=rag.input.k, filter=rag.input.filter)
    prompt = rag.function(
        "prompt",
        build_prompt,
        question=rag.input.question,
        ranked=ranked,
        max_tokens=rag.input.max_tokens,
        **({"max_passages": prompt_passages} if prompt_passages else {}),
    )
    reply = rag.call(
        "generate",
        llm.chat(
            messages=prompt.messages,
            json_schema=prompt.schema,
            max_tokens=rag.input.max_tokens,
            stream_field="answer",
        ),
        stream=True,  # POST /pipelines/rag/stream sends the answer's text as it is written
    )
    rag.returns(rag.function("answer", make_answer, reply=reply, ranked=ranked))
    return rag


def cacheable(answer: RagAnswer) -> bool:
    """Whether an answer may be kept: not one that found nothing (no passage to forget
    it by when a document about the question is ingested), nor one cut short."""
    return answer.method != "no_sources" and bool(answer.passages) and not answer.truncated


class AnswerSignals(TypedDict):
    generated: float
    extractive: float
    no_sources: float
    citations: float
    cited_relevance: float
    truncated: float


def answer_signals(answer: RagAnswer) -> AnswerSignals:
    """What a rag answer says about its quality without a label, compared across
    versions (issue 28): which path produced it (the LLM's answer kept by the evidence
    check, or the extractive one in its place, or nothing found), its citations and how
    relevant to the question the cited passages are (their best sentence's similarity
    to it, the re-ranking's score; 0 when none is cited), and whether the LLM's reply
    was cut at max_tokens."""
    cited = [p.relevance for p in answer.cited]
    return {
        "generated": float(answer.method == "generated"),
        "extractive": float(answer.method == "extractive"),
        "no_sources": float(answer.method == "no_sources"),
        "citations": float(len(answer.citations)),
        "cited_relevance": sum(cited) / len(cited) if cited else 0.0,
        "truncated": float(answer.truncated),
    }


def retrieve_ranked(
    p: Pipeline,
    question: Ref,
    k: Ref | int,
    filter: Ref | dict | None,
    ranker: Callable | None = None,
) -> Ref:
    """Add embed ─► retrieve ─► split ─► embed_sentences ─► rank to `p`: the passages
    closest to `question`, re-ranked by their sentences (`ranker` gets the same inputs
    as `rank`). Shared by `rag` and the triage agent's `search_kb`."""
    query = p.call("embed", embedder.embed_one(text=question))
    found = p.call(
        "retrieve",
        vector_index.search(vector=query.vector, k=k, filter=filter),
        idempotent=True,
        retries=1,
    )
    split = p.function("split", split_passages, question=question, hits=found.hits)
    vectors = p.call("embed_sentences", embedder.embed(texts=split.texts))
    return p.function(
        "rank",
        ranker or rank,
        question=question,
        query=query,
        hits=found.hits,
        split=split,
        embedded=vectors,
    )


def split_passages(question: str, hits: list[Hit]) -> dict:
    """Every retrieved passage's sentences, to embed in one call. The question comes
    last so the batch is never empty."""
    texts, owner = [], []
    for i, hit in enumerate(hits):
        for sentence in evidence.sentences(hit.text) or [hit.text[: evidence.MAX_SENTENCE_CHARS]]:
            texts.append(sentence)
            owner.append(i)
    return {"texts": [*texts, question], "owner": owner}


def rank(
    question: str, query: Embedding, hits: list[Hit], split: dict, embedded: EmbedResponse
) -> Ranked:
    """Passages best first by their sentence closest to the question, numbered from 1;
    the relevant ones (see RELEVANCE_BAR) and their sentences, closest first."""
    owner: list[int] = split["owner"]
    sentence_texts: list[str] = split["texts"][: len(owner)]
    scores = evidence.ranked(query.vector, embedded.vectors[: len(owner)])
    best = [-1.0] * len(hits)
    for score, i in zip(scores, owner, strict=True):
        best[i] = max(best[i], score)
    order = sorted(range(len(hits)), key=lambda i: (-best[i], i))
    numbered = [
        Passage(
            n=n,
            id=hits[i].id,
            doc_id=str(hits[i].metadata.get("doc_id", hits[i].id)),
            title=str(hits[i].metadata.get("title", "")),
            text=hits[i].text,
            score=hits[i].score,
            relevance=round(best[i], 4),
        )
        for n, i in enumerate(order, start=1)
    ]
    top = best[order[0]] if order else 0.0
    relevant = [
        p.n for p in numbered if p.n == 1 or p.relevance >= max(RELEVANCE_BAR, top - MARGIN)
    ]
    n_of = {i: n for n, i in enumerate(order, start=1)}
    sentences = sorted(
        (
            (score, n_of[i], text)
            for score, i, text in zip(scores, owner, sentence_texts, strict=True)
            if n_of[i] in relevant
        ),
        key=lambda t: -t[0],
    )
    return Ranked(
        question=question,
        passages=numbered,
        relevant=relevant,
        sentences=[Sentence(n=n, text=text, score=round(s, 4)) for s, n, text in sentences],
    )


# Tokens of the reply that are not the answer's text: `{"answer":"`, `","sources":[1,2,3]}`.
_JSON_TOKENS = 20
# Characters per token, low for English (about 4) so that odd text (numbers, URLs) fits too.
_CHARS_PER_TOKEN = 2.5


def answer_chars(max_tokens: int) -> int:
    """The longest answer that leaves room to close the JSON and cite within
    `max_tokens`: the grammar then ends the answer in time instead of being cut off."""
    return max(40, int((max_tokens - _JSON_TOKENS) * _CHARS_PER_TOKEN))


def build_prompt(
    question: str, ranked: Ranked, max_tokens: int = 160, max_passages: int = 0
) -> dict:
    """Messages with the relevant passages, best first (at most `max_passages` when > 0),
    and the JSON schema the reply must follow: the answer, bounded, then citations of
    those passages only."""
    shown = [p for p in ranked.passages if p.n in ranked.relevant]
    if max_passages > 0:
        shown = shown[:max_passages]
    sources = "\n\n".join(f"[{p.n}] {p.title}\n{p.text}" for p in shown) or "(none)"
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": answer_chars(max_tokens)},
            "sources": {
                "type": "array",
                "items": {"type": "integer", "enum": [p.n for p in shown] or [0]},
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


def make_answer(reply: ChatResponse, ranked: Ranked) -> RagAnswer:
    """The generated answer, cut down to what the relevant passages support, or else the
    extractive answer (see the module docstring). Never the model's raw JSON: a reply
    cut off at max_tokens is read as far as it goes."""
    try:
        data = from_json(reply.text, allow_partial="trailing-strings")
        answer, cited = str(data.get("answer", "")), [int(n) for n in data.get("sources", [])]
    except (ValueError, TypeError, AttributeError):  # not JSON at all: the text as written
        answer, cited = reply.text, []
    truncated = reply.finish_reason == "length"
    if not ranked.sentences:
        return _answer(NOTHING_FOUND, [], ranked, "no_sources", truncated, reply)
    relevant = [p for p in ranked.passages if p.n in ranked.relevant]
    kept = evidence.supported_sentences(
        answer, ranked.question, " ".join(p.text for p in relevant), MIN_SUPPORT, MAX_SENTENCES
    )
    if kept:  # each sentence cites the relevant passage that supports it best
        citations = {
            max(relevant, key=lambda p: (evidence.support(s, p.text), p.n in cited, -p.n)).n
            for s in kept
        }
        return _answer(" ".join(kept), sorted(citations), ranked, "generated", truncated, reply)
    picked = extract(ranked)
    return _answer(
        " ".join(s.text for s in picked),
        sorted({s.n for s in picked}),
        ranked,
        "extractive",
        truncated,
        reply,
    )


def extract(ranked: Ranked) -> list[Sentence]:
    """The extractive answer: the finished sentence closest to the question (a fragment
    only when there is nothing else) and the next closest of the same article, if nearly
    as close."""
    doc_of = {p.n: p.doc_id for p in ranked.passages}
    finished = [s for s in ranked.sentences if s.text.endswith((".", "!", "?", ":"))]
    best = (finished or ranked.sentences)[0]
    picked = [best]
    for sentence in ranked.sentences:
        if len(picked) == EXTRACTIVE_SENTENCES or sentence.score < best.score - 0.1:
            break
        if (
            doc_of[sentence.n] == doc_of[best.n]
            and evidence.overlap(sentence.text, best.text) < 0.6
        ):
            picked.append(sentence)
    return picked


def _answer(
    text: str,
    citations: list[int],
    ranked: Ranked,
    method: str,
    truncated: bool,
    reply: ChatResponse,
) -> RagAnswer:
    by_n = {p.n: p for p in ranked.passages}
    return RagAnswer(
        answer=text,
        citations=citations,
        cited=[by_n[n] for n in citations],
        passages=ranked.passages,
        method=method,
        truncated=truncated,
        usage=reply.usage,
    )
