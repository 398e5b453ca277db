"""Reading a Server-Sent Events body in tests."""

from __future__ import annotations

import json
from typing import Any


def sse_events(body: str) -> list[tuple[str, Any]]:
    """(event name, JSON data) for each event of an SSE body; comments are skipped."""
    parsed = []
    for block in body.replace("\r\n", "\n").strip().split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").removeprefix(" "))
        if data:
            parsed.append((name, json.loads("\n".join(data))))
    return parsed
