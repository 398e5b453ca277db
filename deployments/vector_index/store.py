"""A durable FAISS vector store: SQLite holds the truth, FAISS the search structure.

Why SQLite under FAISS: a write is acknowledged only after its SQLite transaction
commits (WAL journal, synchronous=FULL), which gives atomic, crash-safe writes without
a hand-rolled log; FAISS is rebuilt from SQLite when the store opens, so an index file
can never be half-written or disagree with the data.

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deployments.vector_index._rwlock import ReadWriteLock
from servegraph import InvalidInputError

IndexType = Literal["flat", "ivf", "hnsw"]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


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
    """

    def __init__(
        self,
        path: str | Path,
        index_type: IndexType = "flat",
        nlist: int = 64,
        nprobe: int = 8,
        hnsw_m: int = 32,
    ) -> None:
        self.path = Path(path)
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
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM settings WHERE key='dim'").fetchone()
        self.dim: int | None = int(row[0]) if row else None
        self._index: Any = None
        self._rebuild()

    # -- writes ----------------------------------------------------------------

    def add(
        self, items: Sequence[dict[str, Any]], replace: Sequence[dict[str, Any]] = ()
    ) -> tuple[list[str], int, int]:
        """Insert or replace items ({id, text, vector, metadata}) in one transaction.

        Args:
            items: the items; an existing id is replaced.
            replace: metadata filters; every item matching any of them is deleted in the
                same transaction (e.g. ``[{"doc_id": "a"}]`` to replace a document's
                chunks: readers see the old version or the new one, never a mix, and a
                failed write leaves the old version whole).

        Returns:
            The ids written, how many existing items were removed, and the new count.
        """
        vectors = _as_matrix([item["vector"] for item in items], "items")
        ids = [item["id"] for item in items]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("items.id", "duplicate ids in one request", "send each id once")
        with self._lock.writing():
            self._check_dim(vectors.shape[1], "items.vector")
            with self._transaction():
                if self.dim is None:
                    self.dim = int(vectors.shape[1])
                    self._db.execute("INSERT INTO settings VALUES ('dim', ?)", (str(self.dim),))
                removed = set(self._rows_for_ids(self._db, ids))
                for match in replace:
                    if match:
                        removed |= set(self._rows_matching(self._db, match))
                self._db.executemany("DELETE FROM items WHERE row = ?", [(r,) for r in removed])
                rows = []
                for item, vector in zip(items, vectors, strict=True):
                    cursor = self._db.execute(
                        "INSERT INTO items (id, text, metadata, vector) VALUES (?, ?, ?, ?)",
                        (
                            item["id"],
                            item["text"],
                            json.dumps(item.get("metadata") or {}),
                            vector.tobytes(),
                        ),
                    )
                    rows.append(cursor.lastrowid)

            # Committed, so acknowledged; FAISS follows (and is rebuilt from SQLite on open).
            def update() -> None:
                self._remove_from_index(sorted(removed))
                self._add_to_index(np.asarray(rows, dtype=np.int64), vectors)

            self._follow(update)
            count = self._count(self._db)
        return ids, len(removed), count

    def delete(
        self,
        ids: Iterable[str] = (),
        where: dict[str, Any] | None = None,
        any_of: Sequence[dict[str, Any]] = (),
    ) -> tuple[int, int]:
        """Delete by id, by metadata match, or by any of several matches.

        Returns:
            How many items were deleted, and the count after.
        """
        with self._lock.writing():
            rows = set(self._rows_for_ids(self._db, list(ids)))
            for match in [where, *any_of]:
                if match:
                    rows |= set(self._rows_matching(self._db, match))
            if rows:
                with self._transaction():
                    self._db.executemany("DELETE FROM items WHERE row = ?", [(r,) for r in rows])
                self._follow(lambda: self._remove_from_index(sorted(rows)))
            return len(rows), self._count(self._db)

    # -- reads -----------------------------------------------------------------

    def search(
        self, vector: Sequence[float] | np.ndarray, k: int = 5, where: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Top-k items by inner product, optionally only those whose metadata matches."""
        query = _as_matrix([vector], "vector")
        with self._lock.reading():
            self._check_dim(query.shape[1], "vector")
            if self._index is None or self._index.ntotal == 0:
                return []
            db = self._reader()
            faiss = _faiss()
            params = None
            if where:
                allowed = self._rows_matching(db, where)
                if not allowed:
                    return []
                selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
                params = self._search_params(selector)
                k = min(k, len(allowed))
            scores, rows = self._index.search(query, min(k, self._index.ntotal), params=params)
            found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0]
            if not found:
                return []
            marks = ",".join("?" * len(found))
            records = {
                row: (item_id, text, metadata)
                for row, item_id, text, metadata in db.execute(
                    f"SELECT row, id, text, metadata FROM items WHERE row IN ({marks})",
                    [r for r, _ in found],
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

    def count(self, where: dict[str, Any] | None = None) -> int:
        """How many items, or how many whose metadata matches `where`."""
        with self._lock.reading():
            db = self._reader()
            return len(self._rows_matching(db, where)) if where else self._count(db)

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

    @staticmethod
    def _count(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def _check_dim(self, dim: int, field: str) -> None:
        if self.dim is not None and dim != self.dim:
            raise InvalidInputError(
                field,
                f"has dimension {dim}, the index holds {self.dim}",
                f"send {self.dim}-dimensional vectors from the same embedder",
            )

    @staticmethod
    def _rows_for_ids(db: sqlite3.Connection, ids: list[str]) -> list[int]:
        rows: list[int] = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows += [
                r for (r,) in db.execute(f"SELECT row FROM items WHERE id IN ({marks})", chunk)
            ]
        return rows

    @staticmethod
    def _rows_matching(db: sqlite3.Connection, where: dict[str, Any]) -> list[int]:
        clauses, args = [], []
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

    def _rebuild(self) -> None:
        if self.dim is None:
            self._index = None
            return
        rows, blobs = [], []
        for row, blob in self._db.execute("SELECT row, vector FROM items ORDER BY row"):
            rows.append(row)
            blobs.append(np.frombuffer(blob, dtype=np.float32))
        vectors = np.vstack(blobs) if blobs else np.zeros((0, self.dim), dtype=np.float32)
        self._index = self._new_index(vectors)
        if rows:
            self._index.add_with_ids(vectors, np.asarray(rows, dtype=np.int64))

    def _add_to_index(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        if self._index is None:
            self._index = self._new_index(vectors)
        self._index.add_with_ids(vectors, rows)

    def _remove_from_index(self, rows: Sequence[int]) -> None:
        if not rows or self._index is None:
            return
        if self.index_type == "hnsw":  # HNSW cannot remove vectors: rebuild from SQLite
            self._rebuild()
        else:
            self._index.remove_ids(np.asarray(rows, dtype=np.int64))

    def _search_params(self, selector: Any) -> Any:
        faiss = _faiss()
        if self.index_type == "ivf" and isinstance(self._index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self._nprobe)
        if self.index_type == "hnsw":
            return faiss.SearchParametersHNSW(sel=selector)
        return faiss.SearchParameters(sel=selector)
