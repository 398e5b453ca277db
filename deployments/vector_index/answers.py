"""The semantic answer cache, kept in the vector index's own store, beside the chunks its
answers were built from: that is what makes it never stale.

An entry is one pipeline answer: the question's embedding, the answer, what it cost, the
`scope` it is valid for (pipeline, version, model fingerprints: an answer is reused
only by the same) and the ids of the chunks it was built from. A question is answered
from an entry of its tenant and scope whose question is at least `threshold` similar
(inner product of normalised embeddings), or, before anything is embedded, from one
whose question has the same `exact` key (its words, as the caller normalises them:
the same question retyped costs one lookup, no embedding).

Never stale, by construction, because both sides are the store's own transactions:

- a write (add, replace, delete) removes every entry built from a chunk it touches in
  the same SQLite transaction that commits the write, and from memory before the write
  is acknowledged (under the store's write lock, which every lookup's read side waits
  for): no lookup that starts after the acknowledgement can find it;
- an answer is stored only if none of its chunks changed since its run began: a lookup
  that misses returns the store's write sequence, the run's answer comes back with it
  (`since`), and `put` refuses an answer one of whose chunks is gone or was written
  after `since`. So a write racing the run either removed the entry (it was stored
  first) or kept it from being stored.

What it does not do: forget an answer when a document it did not use is added, though a
fresh run might now retrieve it. A lookup's `max_age_s` bounds how long that can last.

Bounded: at most `max_entries` per tenant; a tenant's new entry past it replaces that
tenant's least recently used, so one tenant's questions never push out another's.
Every entry survives a restart (SQLite); which were used recently does not (they start
again from their creation times).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    entry INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    scope TEXT NOT NULL,
    question TEXT NOT NULL,
    vector BLOB NOT NULL,
    answer TEXT NOT NULL,
    cost_usd REAL NOT NULL,
    created REAL NOT NULL,
    exact TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS answers_by_exact ON answers (tenant, scope, exact);
CREATE TABLE IF NOT EXISTS answer_sources (
    entry INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (entry, item)
);
CREATE INDEX IF NOT EXISTS answer_sources_by_item ON answer_sources (tenant, item);
"""


@dataclass
class Found:
    """A cached answer that matched a question."""

    entry: int
    question: str
    answer: Any
    similarity: float
    cost_usd: float
    created: float


@dataclass
class _Group:
    """One tenant's entries for one scope, in memory: their ids and question vectors."""

    entries: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    matrix: np.ndarray | None = None  # `vectors` stacked, made on the next lookup

    def add(self, entry: int, vector: np.ndarray) -> None:
        self.entries.append(entry)
        self.vectors.append(vector)
        self.matrix = None

    def drop(self, gone: set[int]) -> None:
        kept = [(e, v) for e, v in zip(self.entries, self.vectors, strict=True) if e not in gone]
        self.entries = [e for e, _ in kept]
        self.vectors = [v for _, v in kept]
        self.matrix = None

    def best(self, vector: np.ndarray) -> tuple[int, float] | None:
        if not self.entries:
            return None
        if self.matrix is None:
            self.matrix = np.vstack(self.vectors)
        scores = self.matrix @ vector
        i = int(np.argmax(scores))
        return self.entries[i], float(scores[i])


class Answers:
    """The cache's entries on the store's connection (`db`, used under its write lock)
    and in memory (read under its read lock). The store calls `forget` inside each of
    its write transactions and `dropped` after the commit."""

    def __init__(self, db: sqlite3.Connection, max_entries: int) -> None:
        self.max_entries = max_entries
        columns = {c[1] for c in db.execute("PRAGMA table_info(answers)")}
        if columns and "exact" not in columns:  # kept before exact keys: none have one
            db.execute("ALTER TABLE answers ADD COLUMN exact TEXT NOT NULL DEFAULT ''")
        db.executescript(SCHEMA)
        self._groups: dict[tuple[str, str], _Group] = {}
        self._where: dict[int, tuple[str, str]] = {}  # entry -> its group
        self._used: dict[int, float] = {}  # entry -> last hit (creation until one)
        for entry, tenant, scope, blob, created in db.execute(
            "SELECT entry, tenant, scope, vector, created FROM answers ORDER BY entry"
        ):
            self._remember(entry, tenant, scope, np.frombuffer(blob, dtype=np.float32), created)

    def __len__(self) -> int:
        return len(self._where)

    # -- under the read lock ---------------------------------------------------

    def find_exact(
        self,
        db: sqlite3.Connection,
        tenant: str,
        scope: str,
        exact: str,
        max_age_s: float | None = None,
    ) -> Found | None:
        """The newest entry of `tenant` and `scope` whose question's key is `exact`."""
        row = db.execute(
            "SELECT entry, question, answer, cost_usd, created FROM answers "
            "WHERE tenant = ? AND scope = ? AND exact = ? ORDER BY entry DESC LIMIT 1",
            (tenant, scope, exact),
        ).fetchone()
        if row is None or (max_age_s is not None and row[4] < time.time() - max_age_s):
            return None
        entry, question, answer, cost_usd, created = row
        self._used[entry] = time.time()
        return Found(entry, question, json.loads(answer), 1.0, cost_usd, created)

    def find(
        self,
        db: sqlite3.Connection,
        tenant: str,
        scope: str,
        vector: np.ndarray,
        threshold: float,
        max_age_s: float | None = None,
    ) -> Found | None:
        """The entry of `tenant` and `scope` whose question is most similar to
        `vector`, if at least `threshold` (and made less than `max_age_s` ago)."""
        group = self._groups.get((tenant, scope))
        best = group.best(vector) if group is not None else None
        if best is None or best[1] < threshold:
            return None
        entry, similarity = best
        row = db.execute(
            "SELECT question, answer, cost_usd, created FROM answers WHERE entry = ?", (entry,)
        ).fetchone()
        if row is None:  # gone between the two reads (cannot under the read lock)
            return None
        if max_age_s is not None and row[3] < time.time() - max_age_s:
            return None  # made anew, and kept in its place
        self._used[entry] = time.time()
        question, answer, cost_usd, created = row
        return Found(entry, question, json.loads(answer), similarity, cost_usd, created)

    # -- in a write transaction, then `dropped` after its commit ---------------

    def forget(self, db: sqlite3.Connection, tenant: str, items: Iterable[str]) -> set[int]:
        """Delete every entry of `tenant` built from one of `items` (chunk ids); the
        entries deleted, for `dropped` once the transaction commits."""
        items = list(dict.fromkeys(items))
        gone: set[int] = set()
        for start in range(0, len(items), 500):
            chunk = items[start : start + 500]
            marks = ",".join("?" * len(chunk))
            gone |= {
                entry
                for (entry,) in db.execute(
                    "SELECT DISTINCT entry FROM answer_sources "
                    f"WHERE tenant = ? AND item IN ({marks})",
                    [tenant, *chunk],
                )
            }
        self._delete(db, gone)
        return gone

    def put(
        self,
        db: sqlite3.Connection,
        tenant: str,
        scope: str,
        question: str,
        vector: np.ndarray,
        answer: Any,
        cost_usd: float,
        sources: Sequence[str],
        since: int,
        exact: str = "",
    ) -> tuple[int | None, str, set[int]]:
        """Store an answer built from `sources` by a run that began at write sequence
        `since`: (its entry, "stored", entries evicted for room), or (None, why not,
        nothing) when a source is gone or was written since."""
        sources = list(dict.fromkeys(sources))
        unchanged = 0
        for start in range(0, len(sources), 500):
            chunk = sources[start : start + 500]
            marks = ",".join("?" * len(chunk))
            unchanged += db.execute(
                f"SELECT COUNT(*) FROM items WHERE tenant = ? AND seq <= ? AND id IN ({marks})",
                [tenant, since, *chunk],
            ).fetchone()[0]
        if unchanged != len(sources):
            return None, "a chunk it was built from changed or went while it ran", set()
        evicted = set()
        held = sum(len(g.entries) for (t, _), g in self._groups.items() if t == tenant)
        if held >= self.max_entries:  # the tenant's entries are listed only then
            own = [e for (t, _), g in self._groups.items() if t == tenant for e in g.entries]
            by_use = sorted(own, key=self._used.__getitem__)
            evicted = set(by_use[: held - self.max_entries + 1])
            self._delete(db, evicted)
        entry = db.execute(
            "INSERT INTO answers "
            "(tenant, scope, question, vector, answer, cost_usd, created, exact) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                tenant,
                scope,
                question,
                vector.astype(np.float32).tobytes(),
                json.dumps(answer),
                cost_usd,
                time.time(),
                exact,
            ),
        ).lastrowid
        assert entry is not None
        db.executemany(
            "INSERT INTO answer_sources (entry, tenant, item) VALUES (?, ?, ?)",
            [(entry, tenant, item) for item in sources],
        )
        return entry, "stored", evicted

    def stored(self, entry: int, tenant: str, scope: str, vector: np.ndarray) -> None:
        """After `put`'s transaction committed: the entry in memory."""
        self._remember(entry, tenant, scope, vector.astype(np.float32), time.time())

    def dropped(self, entries: set[int]) -> None:
        """After `forget`'s (or `put`'s evictions') transaction committed: the entries
        gone from memory, so no lookup finds them."""
        by_group: dict[tuple[str, str], set[int]] = {}
        for entry in entries:
            where = self._where.pop(entry, None)
            self._used.pop(entry, None)
            if where is not None:
                by_group.setdefault(where, set()).add(entry)
        for where, gone in by_group.items():
            self._groups[where].drop(gone)
            if not self._groups[where].entries:
                del self._groups[where]

    def _remember(
        self, entry: int, tenant: str, scope: str, vector: np.ndarray, used: float
    ) -> None:
        self._groups.setdefault((tenant, scope), _Group()).add(entry, vector)
        self._where[entry] = (tenant, scope)
        self._used[entry] = used

    @staticmethod
    def _delete(db: sqlite3.Connection, entries: set[int]) -> None:
        db.executemany("DELETE FROM answers WHERE entry = ?", [(e,) for e in entries])
        db.executemany("DELETE FROM answer_sources WHERE entry = ?", [(e,) for e in entries])
