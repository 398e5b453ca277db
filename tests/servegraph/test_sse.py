"""The streamed route's hold-back rule (`servegraph.serving.sse.hold_until_progress`): events
are kept back until the run makes progress, so a run that fails at once is answered
with its own status instead of a 200 stream holding an error."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from servegraph.engine.runtime import RunEvent
from servegraph.errors import OverloadedError
from servegraph.serving.sse import encode, hold_until_progress


def attempt(status: str) -> RunEvent:
    return RunEvent("node", "embed", SimpleNamespace(status=status))


CHUNK = RunEvent("chunk", "generate", {"text": "Hi"})


async def run(*events: RunEvent, then: Exception | None = None) -> AsyncIterator[RunEvent]:
    for event in events:
        yield event
    if then is not None:
        raise then
    yield RunEvent("result", None, SimpleNamespace(output={}))


async def test_a_first_event_that_is_progress_is_sent_at_once() -> None:
    assert await hold_until_progress(run(CHUNK)) == [CHUNK]
    ok = attempt("ok")
    assert await hold_until_progress(run(ok, CHUNK)) == [ok]


async def test_failed_attempts_are_held_until_one_succeeds() -> None:
    failed, retried = attempt("error"), attempt("timeout")
    ok = attempt("ok")
    assert await hold_until_progress(run(failed, retried, ok)) == [failed, retried, ok]


async def test_a_run_that_fails_before_any_progress_raises_for_its_own_status() -> None:
    overloaded = OverloadedError("embed", "queue full", 2.0)
    with pytest.raises(OverloadedError):
        await hold_until_progress(run(attempt("error"), then=overloaded))


def test_events_are_compact_json_server_sent_events() -> None:
    assert encode("chunk", {"text": "a b"}) == b'event: chunk\ndata: {"text":"a b"}\n\n'
