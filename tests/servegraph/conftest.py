"""What the fast tier's key tests share as fixtures: a key store of the test's own, and
this process's `Guard` on it (`tests.auth_fakes.guard_on`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servegraph.security.guard import Guard
from servegraph.security.keys import KeyStore
from tests.auth_fakes import guard_on


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.sqlite3", cache_s=0)  # every check reads the file


@pytest.fixture
def guard(store: KeyStore) -> Iterator[Guard]:
    """This process's Guard, on its own store, limiter (fake clock) and usage record."""
    with guard_on(store.path) as guard:
        yield guard
