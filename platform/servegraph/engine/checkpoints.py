"""Where a run's finished nodes are kept, so that a run stopped (for a person's
decision) or lost (its ingress replica died) resumes without running them again
(`Runtime.execute(checkpoints=...)`).

`MemoryCheckpoints` keeps them in this process; `SqliteCheckpoints` in a SQLite file
every ingress replica opens (on the head node's disk, like the key store, or on storage
every node mounts), so a run stopped on one replica resumes on any. Each value is
written as JSON of its node's output type and read back as that type.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pydantic import PydanticSchemaGenerationError, TypeAdapter


class Checkpoints(Protocol):
    """A run's finished nodes, by run id and qualified node name. `kind` is the
    node's output type (a durable store writes and reads the value as it)."""

    def get(self, run_id: str, node: str, kind: Any) -> tuple[bool, Any]: ...

    def put(self, run_id: str, node: str, value: Any, kind: Any) -> None: ...

    # A store may also offer `done(run_id) -> set[str]`, the run's checkpointed nodes
    # in one read: the runtime then reads only those (`SqliteCheckpoints` does).


class MemoryCheckpoints:
    """Checkpoints in this process's memory: for tests and in-process runs."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], Any] = {}

    def get(self, run_id: str, node: str, kind: Any = Any) -> tuple[bool, Any]:
        key = (run_id, node)
        return (True, self.values[key]) if key in self.values else (False, None)

    def put(self, run_id: str, node: str, value: Any, kind: Any = Any) -> None:
        self.values[(run_id, node)] = value

    def done(self, run_id: str) -> set[str]:
        return {node for run, node in list(self.values) if run == run_id}


class SqliteCheckpoints:
    """Checkpoints in a SQLite file (WAL, so readers never wait for the writer). A
    value is committed before the next node may read it; the first value written for
    a node stays (a node that ran twice, on two replicas resuming one run, keeps the
    output the run went on with).

    Each thread keeps its connection open (a connection per call cost about a third
    of a checkpoint), and commits are `synchronous=NORMAL`: WAL's mode in which a
    commit survives the process and the whole cluster dying (`kill -9`) but not the
    machine losing power, which could lose the last checkpoints: those nodes would run
    again, and an action again under its key, applied once."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with closing(sqlite3.connect(self.path, timeout=30)) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS checkpoints (run_id TEXT NOT NULL, "
                "node TEXT NOT NULL, value TEXT NOT NULL, at REAL NOT NULL, "
                "PRIMARY KEY (run_id, node))"
            )

    def get(self, run_id: str, node: str, kind: Any = Any) -> tuple[bool, Any]:
        row = (
            self._connect()
            .execute("SELECT value FROM checkpoints WHERE run_id = ? AND node = ?", (run_id, node))
            .fetchone()
        )
        return (True, _adapter(kind).validate_json(row[0])) if row else (False, None)

    def done(self, run_id: str) -> set[str]:
        """The run's checkpointed nodes, in one query: a run with none (a new one)
        then reads nothing more."""
        rows = self._connect().execute("SELECT node FROM checkpoints WHERE run_id = ?", (run_id,))
        return {row[0] for row in rows}

    def put(self, run_id: str, node: str, value: Any, kind: Any = Any) -> None:
        data = _adapter(kind).dump_json(value).decode()
        db = self._connect()
        with db:
            db.execute(
                "INSERT OR IGNORE INTO checkpoints VALUES (?, ?, ?, ?)",
                (run_id, node, data, time.time()),
            )

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection (`asyncio.to_thread` runs on a pool's threads)."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db


def _adapter(kind: Any) -> TypeAdapter[Any]:
    try:
        return _typed(kind)
    except (TypeError, PydanticSchemaGenerationError):  # not a type pydantic knows
        return _typed(Any)


@lru_cache(maxsize=256)
def _typed(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)
