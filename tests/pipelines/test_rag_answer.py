"""RAG replies read into answers: never the model's raw JSON, citations only of sources
that were retrieved, and an answer short enough to finish within the token budget."""

from __future__ import annotations

import pytest

from deployments.schemas import ChatResponse, Hit, Usage
from pipelines.rag.qa import answer_chars, build_prompt, make_answer

HITS = [
    Hit(id=f"kb/doc#{n}", text=f"passage {n}", score=1 - n / 10, metadata={"doc_id": "kb/doc"})
    for n in range(3)
]


def reply(text: str) -> ChatResponse:
    return ChatResponse(
        text=text, finish_reason="length", model="m", usage=Usage(input_tokens=1, output_tokens=1)
    )


def test_a_complete_reply_gives_the_answer_and_its_citations() -> None:
    answer = make_answer(reply('{"answer":"Within 5 days.","sources":[2,9]}'), HITS)
    assert answer.answer == "Within 5 days."
    assert answer.citations == [2]  # 9 was not retrieved
    assert [p.n for p in answer.cited] == [2]


@pytest.mark.parametrize(
    ("text", "expected", "citations"),
    [
        ('{"answer":"To exchange an item, open the ', "To exchange an item, open the", []),
        ('{\n  "answer": "10 days"  ,\n\n  "sources": [1,', "10 days", [1]),
        ('{"answer":"caf\\u00', "caf", []),
    ],
)
def test_a_reply_cut_off_at_max_tokens_gives_the_text_so_far_never_raw_json(
    text: str, expected: str, citations: list[int]
) -> None:
    answer = make_answer(reply(text), HITS)
    assert answer.answer == expected
    assert answer.citations == citations


def test_the_answer_is_bounded_to_leave_room_for_closing_the_json() -> None:
    for max_tokens in (16, 160, 512):
        schema = build_prompt("Q?", HITS, max_tokens)["schema"]
        assert schema["properties"]["answer"]["maxLength"] == answer_chars(max_tokens)
    assert answer_chars(160) < 160 * 4  # fewer characters than 160 tokens of English
    assert answer_chars(512) > answer_chars(160) >= answer_chars(16) == 40
