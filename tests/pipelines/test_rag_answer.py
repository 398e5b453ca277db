"""RAG replies read into answers: ranked passages, never the model's raw JSON, only
sentences the passages support, citations of relevant passages, and an extractive
answer when the generated one fails its checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deployments.embedder.contract import Embedding, EmbedResponse
from deployments.llm.contract import ChatResponse, Usage
from deployments.vector_index.contract import Hit
from pipelines.rag.models import Ranked
from pipelines.rag.qa import answer_chars, build_prompt, make_answer, rank, split_passages

REFUNDS = (
    "Refunds for returned items are issued within 7 business days. "
    "The refund goes to the original payment method."
)
SHIPPING = "Return shipping is free with the prepaid label. Labels are printed at home."
WARRANTY = "Every product has a 2-year warranty from the day of delivery."
QUESTION = "How long do refunds take?"


def ranked(texts: list[str], closeness: list[list[float]]) -> Ranked:
    """The `rank` node's output for passages whose sentences have the given cosine
    similarity to the question (one list per passage, one number per sentence)."""
    hits = [
        Hit(id=f"kb/d{i}#0", text=t, score=0.5, metadata={"doc_id": f"kb/d{i}", "title": f"T{i}"})
        for i, t in enumerate(texts)
    ]
    split = split_passages(QUESTION, hits)
    flat = [s for per_passage in closeness for s in per_passage]
    assert len(flat) == len(split["owner"]), split  # one number per sentence
    vectors = [[s, math.sqrt(1 - s * s)] for s in [*flat, 1.0]]
    return rank(
        QUESTION,
        Embedding(vector=np.array([1.0, 0.0], dtype=np.float32), dim=2),
        hits,
        split,
        EmbedResponse(vectors=np.array(vectors, dtype=np.float32), dim=2, model="m"),
    )


RANKED = ranked([SHIPPING, REFUNDS, WARRANTY], [[0.5, 0.2], [0.8, 0.6], [0.1]])


def reply(text: str, finish: str = "stop") -> ChatResponse:
    return ChatResponse(
        text=text, finish_reason=finish, model="m", usage=Usage(input_tokens=1, output_tokens=1)
    )


def test_passages_are_ranked_by_their_closest_sentence_and_the_far_ones_left_out() -> None:
    assert [p.text for p in RANKED.passages] == [REFUNDS, SHIPPING, WARRANTY]
    assert [p.n for p in RANKED.passages] == [1, 2, 3]
    assert RANKED.relevant == [1]  # 0.5 is more than 0.15 below the best (0.8)
    assert RANKED.sentences[0].text.startswith("Refunds for returned items")
    prompt = build_prompt(QUESTION, RANKED)
    assert WARRANTY not in prompt["messages"][1]["content"]
    assert prompt["schema"]["properties"]["sources"]["items"]["enum"] == [1]
    assert list(prompt["schema"]["properties"]) == ["answer", "sources"]


def test_a_supported_answer_is_used_and_cites_the_passage_that_supports_it() -> None:
    answer = make_answer(
        reply('{"answer":"Refunds are issued within 7 business days.","sources":[1]}'), RANKED
    )
    assert answer.method == "generated" and not answer.truncated
    assert answer.answer == "Refunds are issued within 7 business days."
    assert answer.citations == [1] and answer.cited[0].text == REFUNDS


@pytest.mark.parametrize(
    "text",
    [
        '{"answer":"Refunds take 3 business days.","sources":[1]}',  # a number not in it
        '{"answer":"Refunds are not issued for returned items.","sources":[1]}',  # negated
        '{"answer":"2023-01-22T12:30:52","sources":[1]}',  # nothing the passages say
        '{"answer":"' + "refund refund refund " * 10 + '","sources":[1]}',  # a loop
        "{\n\n\n",  # nothing at all
    ],
)
def test_an_unsupported_answer_is_replaced_by_the_closest_sentences_cited(text: str) -> None:
    answer = make_answer(reply(text), RANKED)
    assert answer.method == "extractive"
    assert answer.answer == "Refunds for returned items are issued within 7 business days."
    assert answer.citations == [1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"answer":"Refunds are issued within 7 business days. The refund goes to the orig',
            "Refunds are issued within 7 business days.",
        ),
        (
            '{\n  "answer": "Refunds are issued within 7 business days."  ,\n\n  "sources": [1,',
            "Refunds are issued within 7 business days.",
        ),
    ],
)
def test_a_reply_cut_off_at_max_tokens_keeps_its_finished_sentences_never_raw_json(
    text: str, expected: str
) -> None:
    answer = make_answer(reply(text, finish="length"), RANKED)
    assert answer.answer == expected and answer.method == "generated" and answer.truncated
    assert not answer.answer.startswith("{")


def test_nothing_retrieved_says_so() -> None:
    empty = Ranked(question=QUESTION, passages=[], relevant=[], sentences=[])
    answer = make_answer(reply('{"answer":"Yes.","sources":[0]}'), empty)
    assert answer.method == "no_sources" and answer.citations == []


def test_the_answer_is_bounded_to_leave_room_for_closing_the_json() -> None:
    for max_tokens in (16, 160, 512):
        schema = build_prompt("Q?", RANKED, max_tokens)["schema"]
        assert schema["properties"]["answer"]["maxLength"] == answer_chars(max_tokens)
    assert answer_chars(160) < 160 * 4  # fewer characters than 160 tokens of English
    assert answer_chars(512) > answer_chars(160) >= answer_chars(16) == 40


def test_the_answer_signals_say_which_path_answered_and_how_much_it_cites() -> None:
    from pipelines.rag.models import Passage, RagAnswer
    from pipelines.rag.qa import answer_signals

    passage = Passage(
        n=1, id="kb/d0#0", doc_id="kb/d0", title="T0", text=REFUNDS, score=0.5, relevance=0.62
    )
    answer = RagAnswer(
        answer="Refunds are issued within 7 business days [1].",
        citations=[1],
        cited=[passage],
        passages=[passage],
        method="generated",
        usage=Usage(input_tokens=10, output_tokens=5),
    )
    assert answer_signals(answer) == {
        "generated": 1.0,
        "extractive": 0.0,
        "no_sources": 0.0,
        "citations": 1.0,
        "cited_relevance": 0.62,
        "truncated": 0.0,
    }
    nothing = answer.model_copy(update={"citations": [], "cited": [], "method": "no_sources"})
    assert answer_signals(nothing)["cited_relevance"] == 0.0
