"""Small file helpers shared by the platform's own state files (the traffic board, the
rollouts)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a temporary file beside it, flushed to
    disk, then renamed into place (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}-", delete=False
    ) as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())  # whole on disk before it takes the name
    os.replace(out.name, path)
