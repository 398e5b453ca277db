"""The streamed route's protocol (Server-Sent Events) and its one subtle rule.

A streamed response's status line goes out with its first event, so an error after
that can only be an `error` event in a 200 stream. `hold_until_progress` keeps events
back until the run has made progress (a chunk, or a node that succeeded): a request that
fails at once (overloaded, bad input to its first node) then gets its real status and
body instead of a 200 stream holding an error.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.sse import format_sse_event

from servegraph.engine.runtime import RunEvent


def is_failure(event: RunEvent) -> bool:
    """A node attempt that failed (it may be retried or fall back; no progress yet)."""
    return event.kind == "node" and event.data.status in ("error", "timeout", "budget")


async def hold_until_progress(events: AsyncIterator[RunEvent]) -> list[RunEvent]:
    """The events up to and including the first that is not a failed attempt. An
    exception the run raises before then propagates: the caller answers it with its
    status, since nothing has been sent."""
    held: list[RunEvent] = []
    while not held or is_failure(held[-1]):
        held.append(await anext(events))
    return held


def encode(event: str, data: Any) -> bytes:
    return format_sse_event(event=event, data_str=json.dumps(data, separators=(",", ":")))


def event_data(event: RunEvent) -> dict[str, Any]:
    if event.kind == "node":
        return dataclasses.asdict(event.data)
    return {"node": event.node, **jsonable_encoder(event.data)}
