"""The public facade is complete and sorted (as httpx tests its own; constants first, as
ruff's isort-style order keeps it)."""

from __future__ import annotations

import inspect

import servegraph


def test_all_is_sorted_and_complete() -> None:
    assert servegraph.__all__ == sorted(servegraph.__all__, key=lambda n: (not n.isupper(), n))
    public = {
        n for n, v in vars(servegraph).items() if not n.startswith("_") and not inspect.ismodule(v)
    }
    assert public == set(servegraph.__all__)


def test_importing_the_facade_loads_neither_ray_nor_a_model() -> None:
    import subprocess
    import sys

    code = (
        "import sys, servegraph; "
        "assert not {'ray', 'torch', 'vllm', 'faiss'} & set(sys.modules), sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=None)
