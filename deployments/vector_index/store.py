"""A durable FAISS vector store: SQLite holds the truth, FAISS the search structure.

Why SQLite under FAISS: a write is acknowledged only after its SQLite transaction
commits (WAL journal, synchronous=FULL), which gives atomic, crash-safe writes without
a hand-rolled log; FAISS is rebuilt from SQLite when the store opens, so an index file
can never be half-written or disagree with the data.

Tenants: every item belongs to one tenant (`DEFAULT_TENANT` unless told), ids are unique
per tenant, and each tenant has a FAISS index of its own, as Weaviate keeps a shard per
tenant: every method takes the tenant and touches only its rows and its index, so a
search for one tenant never scores another's vectors, and its cost does not grow with
the other tenants' data. A tenant may be held to limits (`TenantLimits`: vectors,
documents): a write that would take it past one is refused whole, in its transaction
(`QuotaExceededError`, 429).

Concurrency: Ray Serve runs a deployment's sync methods in a thread pool, so calls do
interleave. Writes are serialised under the write side of a readers-writer lock, which
also covers the FAISS update that follows the commit; searches share the read side and
run in parallel (FAISS searches are const, and each reading thread has its own SQLite
connection, which in WAL mode sees the last committed state).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deployments.vector_index._rwlock import ReadWriteLock
from deployments.vector_index.answers import Answers, Found
from servegraph import DEFAULT_TENANT, InvalidInputError, QuotaExceededError, check_tenant

IndexType = Literal["flat", "ivf", "hnsw"]
_ITEMS = """
CREATE TABLE IF NOT EXISTS {name} (
    row INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL DEFAULT 'default',
    id TEXT NOT NULL,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, id)
);
"""
_SCHEMA = (
    _ITEMS.format(name="items")
    + """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
)


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may hold; None: no limit. A document is the items sharing a
    `doc_id` in their metadata (an item without one is a document of its own)."""

    max_vectors: int | None = None
    max_documents: int | None = None


def _as_matrix(vectors: list[Any], field: str) -> np.ndarray:
    """Float32 rows of one length, or a 422 naming the first row that differs."""
    lengths = {len(v) for v in vectors}
    if len(lengths) > 1:
        first = len(vectors[0])
        n = next(i for i, v in enumerate(vectors) if len(v) != first)
        where = f"{field}.{n}.vector" if field == "items" else field
        raise InvalidInputError(
            where,
            f"has {len(vectors[n])} dimensions, the first vector has {first}",
            "send vectors of one length, from the same embedder",
        )
    matrix = np.asarray(vectors, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise InvalidInputError(field, "contains a non-finite number", "send finite floats")
    return matrix


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - install hint
        raise ImportError("faiss is missing: run `make install` (faiss-cpu)") from exc
    return faiss


class VectorStore:
    """Add, search (top-k, metadata filter), delete; every acknowledged write on disk.

    Args:
        path: folder for ``store.sqlite3``.
        index_type: "flat" (exact inner product), "ivf" (inverted lists, trained on
            the data when it opens) or "hnsw" (graph; deletes rebuild it).
        nlist: IVF lists; nprobe: IVF lists probed per search; hnsw_m: HNSW degree.
        limits: each tenant's limits, by name; a tenant not named has `default_limits`.
        max_answers: the answer cache's bound per tenant (`deployments.vector_index.answers`).
    """

    def __init__(
        self,
        path: str | Path,
        index_type: IndexType = "flat",
        nlist: int = 64,
        nprobe: int = 8,
        hnsw_m: int = 32,
        limits: Mapping[str, TenantLimits] | None = None,
        default_limits: TenantLimits | None = None,
        max_answers: int = 10_000,
    ) -> None:
        self.path = Path(path)
        self.limits = dict(limits or {})
        self.default_limits = default_limits or TenantLimits()
        self.path.mkdir(parents=True, exist_ok=True)
        self.index_type = index_type
        self._nlist, self._nprobe, self._hnsw_m = nlist, nprobe, hnsw_m
        self._file = self.path / "store.sqlite3"
        self._lock = ReadWriteLock()
        self._readers = threading.local()
        self._reader_dbs: list[sqlite3.Connection] = []
        # The writer's connection, used only under the write lock.
        self._db = sqlite3.connect(self._file, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM settings WHERE key='dim'").fetchone()
        self.dim: int | None = int(row[0]) if row else None
        row = self._db.execute("SELECT value FROM settings WHERE key='seq'").fetchone()
        self.seq = int(row[0]) if row else 0  # the last write's number; items keep theirs
        self._indexes: dict[str, Any] = {}  # tenant -> its FAISS index
        self._rebuild()
        self.answers = Answers(self._db, max_answers)

    # -- writes ----------------------------------------------------------------

    def add(
        self,
        items: Sequence[dict[str, Any]],
        replace: Sequence[dict[str, Any]] = (),
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[list[str], int, int]:
        """Insert or replace `tenant`'s items ({id, text, vector, metadata}) in one
        transaction.

        Args:
            items: the items; an existing id of the tenant is replaced.
            replace: metadata filters; every item of the tenant matching any of them is
                deleted in the same transaction (e.g. ``[{"doc_id": "a"}]`` to replace a
                document's chunks: readers see the old version or the new one, never a
                mix, and a failed write leaves the old version whole).

        Returns:
            The ids written, how many existing items were removed, and the tenant's new
            count.
        """
        check_tenant(tenant)
        vectors = _as_matrix([item["vector"] for item in items], "items")
        ids = [item["id"] for item in items]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("items.id", "duplicate ids in one request", "send each id once")
        with self._lock.writing():
            self._check_dim(vectors.shape[1], "items.vector")
            dim, seq = int(vectors.shape[1]), self.seq + 1
            with self._transaction():
                if self.dim is None:
                    self._db.execute("INSERT INTO settings VALUES ('dim', ?)", (str(dim),))
                removed = set(self._rows_for_ids(self._db, ids, tenant))
                for match in replace:
                    if match:
                        removed |= set(self._rows_matching(self._db, match, tenant))
                touched = [*ids, *self._ids_of(removed)]
                self._db.executemany("DELETE FROM items WHERE row = ?", [(r,) for r in removed])
                rows = []
                for item, vector in zip(items, vectors, strict=True):
                    cursor = self._db.execute(
                        "INSERT INTO items (tenant, id, text, metadata, vector, seq) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            tenant,
                            item["id"],
                            item["text"],
                            json.dumps(item.get("metadata") or {}),
                            vector.tobytes(),
                            seq,
                        ),
                    )
                    rows.append(cursor.lastrowid)
                self._within_limits(tenant)  # else rolled back: nothing of it written
                stale = self._written(seq, tenant, touched)
            self.dim = dim
            self._committed(seq, stale)

            # Committed, so acknowledged; FAISS follows (and is rebuilt from SQLite on open).
            def update() -> None:
                self._remove_from_index(tenant, sorted(removed))
                self._add_to_index(tenant, np.asarray(rows, dtype=np.int64), vectors)

            self._follow(update)
            count = self._count(self._db, tenant)
        return ids, len(removed), count

    def delete(
        self,
        ids: Iterable[str] = (),
        where: dict[str, Any] | None = None,
        any_of: Sequence[dict[str, Any]] = (),
        tenant: str = DEFAULT_TENANT,
    ) -> tuple[int, int]:
        """Delete `tenant`'s items by id, by metadata match, or by any of several
        matches.

        Returns:
            How many items were deleted, and the tenant's count after.
        """
        check_tenant(tenant)
        with self._lock.writing():
            rows = set(self._rows_for_ids(self._db, list(ids), tenant))
            for match in [where, *any_of]:
                if match:
                    rows |= set(self._rows_matching(self._db, match, tenant))
            if rows:
                seq = self.seq + 1
                with self._transaction():
                    touched = self._ids_of(rows)
                    self._db.executemany("DELETE FROM items WHERE row = ?", [(r,) for r in rows])
                    stale = self._written(seq, tenant, touched)
                self._committed(seq, stale)
                self._follow(lambda: self._remove_from_index(tenant, sorted(rows)))
            return len(rows), self._count(self._db, tenant)

    # -- reads -----------------------------------------------------------------

    def search(
        self,
        vector: Sequence[float] | np.ndarray,
        k: int = 5,
        where: dict[str, Any] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> list[dict[str, Any]]:
        """`tenant`'s top-k items by inner product, optionally only those whose metadata
        matches; only the tenant's own index is searched."""
        check_tenant(tenant)
        query = _as_matrix([vector], "vector")
        with self._lock.reading():
            self._check_dim(query.shape[1], "vector")
            index = self._indexes.get(tenant)
            if index is None or index.ntotal == 0:
                return []
            db = self._reader()
            faiss = _faiss()
            params = None
            if where:
                allowed = self._rows_matching(db, where, tenant)
                if not allowed:
                    return []
                selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
                params = self._search_params(index, selector)
                k = min(k, len(allowed))
            scores, rows = index.search(query, min(k, index.ntotal), params=params)
            found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
            if not found:
                return []
            marks = ",".join("?" * len(found))
            records = {
                row: (item_id, text, metadata)
                for row, item_id, text, metadata in db.execute(
                    "SELECT row, id, text, metadata FROM items "
                    f"WHERE tenant = ? AND row IN ({marks})",
                    [tenant, *(r for r, _ in found)],
                )
            }
        return [
            {
                "id": records[r][0],
                "text": records[r][1],
                "score": score,
                "metadata": json.loads(records[r][2]),
            }
            for r, score in found
            if r in records
        ]

    def count(self, where: dict[str, Any] | None = None, tenant: str = DEFAULT_TENANT) -> int:
        """How many items `tenant` has, or how many whose metadata matches `where`."""
        check_tenant(tenant)
        with self._lock.reading():
            db = self._reader()
            if where:
                return len(self._rows_matching(db, where, tenant))
            return self._count(db, tenant)

    # -- the answer cache (`deployments.vector_index.answers`) ------------------

    def cached(
        self,
        vector: Sequence[float] | np.ndarray | None,
        scope: str,
        threshold: float,
        tenant: str,
        max_age_s: float | None = None,
        exact: str | None = None,
    ) -> tuple[Found | None, int]:
        """`tenant`'s cached answer for `scope` whose question has the key `exact`, or
        else is closest to the question `vector` and at least `threshold` similar (and
        younger than `max_age_s`); and the store's write number now, which a run
        answering the question instead gives back to `cache` (`since`)."""
        check_tenant(tenant)
        query = None if vector is None else _as_matrix([vector], "vector")[0]
        with self._lock.reading():
            db, found = self._reader(), None
            if exact:
                found = self.answers.find_exact(db, tenant, scope, exact, max_age_s)
            if found is None and query is not None:
                self._check_dim(query.shape[0], "vector")
                found = self.answers.find(db, tenant, scope, query, threshold, max_age_s)
            return found, self.seq

    def cache(
        self,
        vector: Sequence[float] | np.ndarray,
        scope: str,
        question: str,
        answer: Any,
        cost_usd: float,
        sources: Sequence[str],
        since: int,
        tenant: str,
        exact: str = "",
    ) -> tuple[int | None, str]:
        """Cache `tenant`'s `answer` to `question` for `scope`, built from the chunks
        `sources` by a run that began at write number `since` (`cached`'s): (its entry,
        "stored"), or (None, why not) when one of the chunks changed since."""
        check_tenant(tenant)
        query = _as_matrix([vector], "vector")[0]
        if not sources:
            raise InvalidInputError(
                "sources",
                "an answer built from no chunk could never be forgotten by a write",
                "send the ids of the chunks the answer was built from; keep no answer "
                "that found nothing",
            )
        with self._lock.writing():
            self._check_dim(query.shape[0], "vector")
            with self._transaction():
                entry, why, evicted = self.answers.put(
                    self._db,
                    tenant,
                    scope,
                    question,
                    query,
                    answer,
                    cost_usd,
                    sources,
                    since,
                    exact,
                )
            self.answers.dropped(evicted)
            if entry is not None:
                self.answers.stored(entry, tenant, scope, query)
        return entry, why

    def limits_of(self, tenant: str) -> TenantLimits:
        return self.limits.get(tenant, self.default_limits)

    def documents(self, tenant: str = DEFAULT_TENANT) -> int:
        """How many documents `tenant` has (`TenantLimits`)."""
        check_tenant(tenant)
        with self._lock.reading():
            return self._documents(self._reader(), tenant)

    def tenants(self) -> dict[str, int]:
        """Every tenant with items, and how many each has."""
        with self._lock.reading():
            found = self._reader().execute("SELECT tenant, COUNT(*) FROM items GROUP BY tenant")
            return {tenant: int(n) for tenant, n in found}

    def close(self) -> None:
        with self._lock.writing():
            for db in [self._db, *self._reader_dbs]:
                db.close()

    # -- internals -------------------------------------------------------------

    def _transaction(self) -> Any:
        db = self._db

        class _Tx:
            def __enter__(self) -> None:
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type: Any, *_: Any) -> None:
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (WAL: it sees the last committed state)."""
        db = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(self._file, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA query_only=ON")
            self._readers.db = db
            self._reader_dbs.append(db)
        return db

    def _ids_of(self, rows: Iterable[int]) -> list[str]:
        """The ids of the writer's `rows` (before they are deleted)."""
        rows = list(rows)
        ids: list[str] = []
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            marks = ",".join("?" * len(chunk))
            ids += [
                i
                for (i,) in self._db.execute(f"SELECT id FROM items WHERE row IN ({marks})", chunk)
            ]
        return ids

    def _written(self, seq: int, tenant: str, touched: Sequence[str]) -> set[int]:
        """In a write's transaction: its number recorded, and the cached answers built
        from a chunk it `touched` deleted (`Answers.forget`): those, for `_committed`."""
        self._db.execute("INSERT OR REPLACE INTO settings VALUES ('seq', ?)", (str(seq),))
        return self.answers.forget(self._db, tenant, touched)

    def _committed(self, seq: int, stale: set[int]) -> None:
        """After a write's commit, before it is acknowledged (under the write lock): its
        number is the store's, and its stale answers are gone from memory."""
        self.seq = seq
        self.answers.dropped(stale)

    def _within_limits(self, tenant: str) -> None:
        """Raise QuotaExceededError if `tenant` now holds more than its limits allow
        (inside the write's transaction, which the raise rolls back)."""
        limits = self.limits_of(tenant)
        if limits.max_vectors is not None:
            vectors = self._count(self._db, tenant)
            if vectors > limits.max_vectors:
                raise QuotaExceededError("max_vectors", tenant, limits.max_vectors, vectors)
        if limits.max_documents is not None:
            documents = self._documents(self._db, tenant)
            if documents > limits.max_documents:
                raise QuotaExceededError("max_documents", tenant, limits.max_documents, documents)

    @staticmethod
    def _documents(db: sqlite3.Connection, tenant: str) -> int:
        found = db.execute(
            "SELECT COUNT(DISTINCT COALESCE(json_extract(metadata, '$.doc_id'), "
            "'item:' || id)) FROM items WHERE tenant = ?",
            (tenant,),
        )
        return int(found.fetchone()[0])

    @staticmethod
    def _count(db: sqlite3.Connection, tenant: str) -> int:
        found = db.execute("SELECT COUNT(*) FROM items WHERE tenant = ?", (tenant,))
        return int(found.fetchone()[0])

    def _migrate(self) -> None:
        """A store written before tenants (`id` unique across all): its items become the
        default tenant's, their rows (FAISS ids) kept, in one transaction. One written
        before write numbers: its items get number 0 (older than any answer's run)."""
        columns = [c[1] for c in self._db.execute("PRAGMA table_info(items)")]
        if "tenant" in columns and "seq" not in columns:
            self._db.execute("ALTER TABLE items ADD COLUMN seq INTEGER NOT NULL DEFAULT 0")
        if not columns or "tenant" in columns:
            return
        with self._transaction():
            self._db.execute(_ITEMS.format(name="items_tenanted"))
            self._db.execute(
                "INSERT INTO items_tenanted (row, tenant, id, text, metadata, vector) "
                "SELECT row, ?, id, text, metadata, vector FROM items",
                (DEFAULT_TENANT,),
            )
            self._db.execute("DROP TABLE items")
            self._db.execute("ALTER TABLE items_tenanted RENAME TO items")

    def _check_dim(self, dim: int, field: str) -> None:
        if self.dim is not None and dim != self.dim:
            raise InvalidInputError(
                field,
                f"has dimension {dim}, the index holds {self.dim}",
                f"send {self.dim}-dimensional vectors from the same embedder",
            )

    @staticmethod
    def _rows_for_ids(db: sqlite3.Connection, ids: list[str], tenant: str) -> list[int]:
        rows: list[int] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += [
                r
                for (r,) in db.execute(
                    f"SELECT row FROM items WHERE tenant = ? AND id IN ({marks})", [tenant, *chunk]
                )
            ]
        return rows

    @staticmethod
    def _rows_matching(db: sqlite3.Connection, where: dict[str, Any], tenant: str) -> list[int]:
        clauses, args = ["tenant = ?"], list[Any]([tenant])
        for key, value in where.items():
            clauses.append("json_extract(metadata, ?) = ?")
            args += [f'$."{key}"', int(value) if isinstance(value, bool) else value]
        sql = "SELECT row FROM items WHERE " + " AND ".join(clauses)
        return [r for (r,) in db.execute(sql, args)]

    def _new_index(self, vectors: np.ndarray) -> Any:
        faiss = _faiss()
        assert self.dim is not None
        if self.index_type == "ivf" and len(vectors) >= self._nlist * 4:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self._nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = self._nprobe
            return index
        if self.index_type == "hnsw":
            return faiss.IndexIDMap2(
                faiss.IndexHNSWFlat(self.dim, self._hnsw_m, faiss.METRIC_INNER_PRODUCT)
            )
        # flat, and IVF until there is enough data to train its lists on
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _follow(self, update: Callable[[], None]) -> None:
        """Apply a committed write to FAISS; should that fail, rebuild FAISS from SQLite,
        the truth, so the index never disagrees with what was acknowledged."""
        try:
            update()
        except Exception:
            self._rebuild()

    def _rebuild(self, only: str | None = None) -> None:
        """Every tenant's FAISS index (or `only` that tenant's) from SQLite, the truth."""
        if self.dim is None:
            self._indexes = {}
            return
        found: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        sql = "SELECT tenant, row, vector FROM items"
        args: tuple[str, ...] = ()
        if only is not None:
            sql, args = sql + " WHERE tenant = ?", (only,)
        for tenant, row, blob in self._db.execute(sql + " ORDER BY row", args):
            rows, blobs = found.setdefault(tenant, ([], []))
            rows.append(row)
            blobs.append(np.frombuffer(blob, dtype=np.float32))
        if only is None:
            self._indexes = {}
        else:
            self._indexes.pop(only, None)
        for tenant, (rows, blobs) in found.items():
            vectors = np.vstack(blobs)
            index = self._new_index(vectors)
            index.add_with_ids(vectors, np.asarray(rows, dtype=np.int64))
            self._indexes[tenant] = index

    def _add_to_index(self, tenant: str, rows: np.ndarray, vectors: np.ndarray) -> None:
        if tenant not in self._indexes:
            self._indexes[tenant] = self._new_index(vectors)
        self._indexes[tenant].add_with_ids(vectors, rows)

    def _remove_from_index(self, tenant: str, rows: Sequence[int]) -> None:
        if not rows or tenant not in self._indexes:
            return
        if self.index_type == "hnsw":  # HNSW cannot remove vectors: rebuild from SQLite
            self._rebuild(tenant)
        else:
            self._indexes[tenant].remove_ids(np.asarray(rows, dtype=np.int64))

    def _search_params(self, index: Any, selector: Any) -> Any:
        faiss = _faiss()
        if self.index_type == "ivf" and isinstance(index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self._nprobe)
        if self.index_type == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector)
        return faiss.SearchParameters(sel=selector)
