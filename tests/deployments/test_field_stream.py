"""FieldStream: a guided-JSON reply, token by token, becomes the text of one field."""

from __future__ import annotations

import json

from deployments.llm.client import FieldStream


def feed_all(field: str | None, deltas: list[str]) -> list[str]:
    stream = FieldStream(field)
    return [piece for delta in deltas if (piece := stream.feed(delta))]


def test_only_the_named_field_streams_and_escapes_are_decoded() -> None:
    reply = {"answer": 'Refunds take 5 "business" days.\nSee [1].', "sources": [1]}
    text = json.dumps(reply)
    deltas = [text[i : i + 3] for i in range(0, len(text), 3)]  # cuts through escapes
    pieces = feed_all("answer", deltas)
    assert "".join(pieces) == reply["answer"]
    assert len(pieces) > 5  # it streamed, rather than arriving at the end


def test_a_field_after_another_still_streams_and_a_missing_field_sends_nothing() -> None:
    text = json.dumps({"sources": [2], "answer": "Yes."})
    assert "".join(feed_all("answer", list(text))) == "Yes."
    assert feed_all("missing", list(text)) == []


def test_without_a_field_every_delta_passes_through() -> None:
    assert feed_all(None, ["Hel", "lo"]) == ["Hel", "lo"]
