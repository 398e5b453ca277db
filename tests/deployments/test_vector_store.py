"""The durable FAISS store under concurrency, on real FAISS and SQLite (no Ray):
writers and readers on many threads at once, as Serve's thread pool runs them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from deployments.vector_index.store import VectorStore
from servegraph.errors import InvalidInputError


def vec(seed: int, dim: int = 16) -> list[float]:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return (v / np.linalg.norm(v)).tolist()


def doc(doc_id: str, version: int, chunks: int) -> list[dict]:
    return [
        {
            "id": f"{doc_id}#{n}",
            "text": f"{doc_id} v{version} chunk {n}",
            "vector": vec(hash((doc_id, n)) % 10_000),
            "metadata": {"doc_id": doc_id, "version": version},
        }
        for n in range(chunks)
    ]


def test_concurrent_writers_and_readers_never_fail_and_the_count_is_exact(
    tmp_path: Path,
) -> None:
    store = VectorStore(tmp_path)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        for i in range(30):
            chunks = 1 + (w + i) % 3
            store.add(doc(f"w{w}/d{i}", 1, chunks), replace=[{"doc_id": f"w{w}/d{i}"}])
            # and re-ingest it, replacing its chunks
            store.add(doc(f"w{w}/d{i}", 2, chunks), replace=[{"doc_id": f"w{w}/d{i}"}])

    def reader(r: int) -> None:
        n = 0
        while not stop.is_set() and n < 5_000:
            hits = store.search(vec(r * 7 + n), k=5)
            # a reader never sees a half-replaced document: one version per doc
            versions: dict[str, set[int]] = {}
            for hit in store.search(vec(n), k=50):
                versions.setdefault(hit["metadata"]["doc_id"], set()).add(
                    hit["metadata"]["version"]
                )
            assert all(len(v) == 1 for v in versions.values()), versions
            assert len(hits) <= 5
            n += 1

    def run(fn, arg) -> None:
        try:
            fn(arg)
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    with ThreadPoolExecutor(max_workers=12) as pool:
        readers = [pool.submit(run, reader, r) for r in range(4)]
        writers = [pool.submit(run, writer, w) for w in range(8)]
        for future in writers:
            future.result()
        stop.set()
        for future in readers:
            future.result()
    assert not errors, errors[:3]
    expected = sum(1 + (w + i) % 3 for w in range(8) for i in range(30))
    assert store.count() == expected
    store.close()
    assert VectorStore(tmp_path).count() == expected  # and on disk


def test_replace_is_atomic_a_failed_reingest_leaves_the_old_version_whole(
    tmp_path: Path,
) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("a", 1, 3), replace=[{"doc_id": "a"}])
    bad = doc("a", 2, 2)
    bad[1]["vector"] = vec(1, dim=8)  # a different dimension: the write must fail whole
    with pytest.raises(InvalidInputError) as info:
        store.add(bad, replace=[{"doc_id": "a"}])
    assert info.value.field == "items.1.vector"
    hits = store.search(vec(0), k=10, where={"doc_id": "a"})
    assert sorted(h["id"] for h in hits) == ["a#0", "a#1", "a#2"]
    assert {h["metadata"]["version"] for h in hits} == {1}
    ids, replaced, count = store.add(doc("a", 2, 1), replace=[{"doc_id": "a"}])
    assert (ids, replaced, count) == (["a#0"], 3, 1)


def test_vectors_of_another_dimension_are_refused_naming_the_field(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("a", 1, 1))
    with pytest.raises(InvalidInputError) as info:
        store.search(vec(0, dim=8))
    assert info.value.field == "vector" and "16" in info.value.fix
    with pytest.raises(InvalidInputError) as info:
        store.add([{**doc("b", 1, 1)[0], "vector": [float("nan")] * 16}])
    assert info.value.field == "items"


@pytest.mark.parametrize(
    ("metadata", "field"),
    [
        ({'a"b': 1}, 'filter.a"b.[key]'),  # would end the JSON path's quoted step
        ({"a\x07": 1}, "filter.a\x07.[key]"),  # a control character
        ({"": 1}, "filter..[key]"),
        ({"x": float("nan")}, "filter.x"),  # stored JSON could not hold it
    ],
)
def test_metadata_that_would_break_the_stores_queries_is_refused_by_the_contract(
    metadata: dict, field: str
) -> None:
    """Found by fuzzing: such a key made SQLite fail the query (a 502)."""
    from pydantic import ValidationError

    from deployments.vector_index.contract import DeleteRequest

    with pytest.raises(ValidationError) as error:
        DeleteRequest.model_validate({"filter": metadata})
    assert field in str(error.value)


def test_every_key_the_contract_allows_is_queried_safely(tmp_path: Path) -> None:
    from deployments.vector_index.contract import DeleteRequest

    store = VectorStore(tmp_path / "index")
    store.add(doc("kb/a", 1, 2), [])
    odd = {"Product Line": 1, "é/ü.ß": "x", "a'b": 2**70, "\x7f\u2028": True, "$.x[0]": 1.5}
    request = DeleteRequest.model_validate({"any_of": [{k: v} for k, v in odd.items()]})
    assert store.delete([], None, request.any_of) == (0, 2)
