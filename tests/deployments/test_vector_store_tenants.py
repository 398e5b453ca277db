"""Tenants in the durable FAISS store, on real FAISS and SQLite: ids unique per tenant,
every read and write scoped to one tenant's rows and its own FAISS index, a store
written before tenants carried over as the default tenant's, the tenants kept apart
under concurrent writers and readers, and each tenant's limits."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from deployments.vector_index.store import DEFAULT_TENANT, TenantLimits, VectorStore
from servegraph.errors import InvalidInputError, QuotaExceededError
from tests.deployments.test_vector_store import doc, vec


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_two_tenants_with_the_same_ids_never_see_each_others_items(
    tmp_path: Path, index_type: str
) -> None:
    store = VectorStore(tmp_path, index_type)  # type: ignore[arg-type]
    store.add(doc("refunds", 1, 3), tenant="acme")
    store.add(doc("refunds", 2, 2), tenant="globex")  # the same ids, another tenant
    assert store.count(tenant="acme") == 3 and store.count(tenant="globex") == 2
    assert store.tenants() == {"acme": 3, "globex": 2}
    for tenant, version in (("acme", 1), ("globex", 2)):
        hits = store.search(vec(7), k=10, tenant=tenant)
        assert hits and {h["metadata"]["version"] for h in hits} == {version}
        filtered = store.search(vec(7), k=10, where={"doc_id": "refunds"}, tenant=tenant)
        assert {h["metadata"]["version"] for h in filtered} == {version}
    # Each tenant's index holds its own vectors only: a search never scores another's.
    assert {t: i.ntotal for t, i in store._indexes.items()} == {"acme": 3, "globex": 2}
    # Deletes, replaces and counts by filter stay inside the tenant.
    assert store.delete(where={"doc_id": "refunds"}, tenant="globex") == (2, 0)
    assert store.count(tenant="acme") == 3
    _, replaced, count = store.add(doc("refunds", 3, 1), [{"doc_id": "refunds"}], tenant="acme")
    assert (replaced, count) == (3, 1) and store.count(tenant="globex") == 0
    assert (
        store.search(vec(7), tenant="globex") == [] and store.search(vec(7), tenant="nobody") == []
    )


def test_the_tenants_survive_a_reopen_each_with_its_own_index(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("a", 1, 4), tenant="acme")
    store.add(doc("a", 1, 2))
    store.close()
    again = VectorStore(tmp_path)
    assert again.tenants() == {"acme": 4, DEFAULT_TENANT: 2}
    assert {t: i.ntotal for t, i in again._indexes.items()} == {"acme": 4, DEFAULT_TENANT: 2}


def test_a_store_written_before_tenants_becomes_the_default_tenants(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "store.sqlite3")
    old.executescript(
        """
        CREATE TABLE items (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, text TEXT NOT NULL,
            metadata TEXT NOT NULL, vector BLOB NOT NULL);
        CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO settings VALUES ('dim', '16');
        """
    )
    for n in range(3):
        vector = np.asarray(vec(n), dtype=np.float32).tobytes()
        old.execute(
            "INSERT INTO items (row, id, text, metadata, vector) VALUES (?, ?, ?, '{}', ?)",
            (10 + n, f"old#{n}", f"old {n}", vector),
        )
    old.commit()
    old.close()
    store = VectorStore(tmp_path)
    assert store.tenants() == {DEFAULT_TENANT: 3}
    assert store.search(vec(1), k=1)[0]["id"] == "old#1"
    store.add(doc("old", 1, 1), tenant="acme")  # the same id as before, another tenant
    assert store.count() == 3 and store.count(tenant="acme") == 1


def test_a_tenant_name_out_of_bounds_is_refused_naming_the_field(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    for wrong in ("", "Acme", "a" * 64, "acme corp", "../acme"):
        with pytest.raises(InvalidInputError) as refused:
            store.count(tenant=wrong)
        assert refused.value.field == "tenant"


def test_tenants_stay_apart_under_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    tenants = [f"t{n}" for n in range(4)]
    crossed: list[tuple[str, str]] = []
    stop = threading.Event()

    def write(tenant: str) -> None:
        """Re-ingest one document (ids the other tenants use too) and one of its own."""
        for version in range(20):
            store.add(doc("shared", version, 3), [{"doc_id": "shared"}], tenant=tenant)
            own = [
                {**item, "id": f"{tenant}-{item['id']}", "metadata": {"owner": tenant}}
                for item in doc("x", version, 2)
            ]
            store.add(own, [{"owner": tenant}], tenant=tenant)

    def read(tenant: str) -> None:
        while not stop.is_set():
            for hit in store.search(vec(3), k=20, tenant=tenant):
                owner = hit["metadata"].get("owner")
                if owner is not None and owner != tenant:
                    crossed.append((tenant, owner))

    with ThreadPoolExecutor(max_workers=8) as pool:
        readers = [pool.submit(read, t) for t in tenants]
        writers = [pool.submit(write, t) for t in tenants]
        for w in writers:
            w.result()
        stop.set()
        for r in readers:
            r.result()
    assert not crossed
    assert store.tenants() == dict.fromkeys(tenants, 5)


def test_a_write_past_a_tenants_limit_is_refused_whole_and_others_are_not_held(
    tmp_path: Path,
) -> None:
    store = VectorStore(
        tmp_path,
        limits={"acme": TenantLimits(max_vectors=5, max_documents=2)},
        default_limits=TenantLimits(max_documents=1),
    )
    store.add(doc("a", 1, 2), tenant="acme")
    store.add(doc("b", 1, 2), tenant="acme")
    with pytest.raises(QuotaExceededError) as refused:  # a third document
        store.add(doc("c", 1, 1), tenant="acme")
    assert (refused.value.limit, refused.value.allowed, refused.value.after) == (
        "max_documents",
        2,
        3,
    )
    assert "max_documents = 2" in str(refused.value) and "Nothing was written" in str(refused.value)
    # Replacing a document in place stays within the documents; six vectors do not.
    store.add(doc("b", 2, 3), [{"doc_id": "b"}], tenant="acme")
    with pytest.raises(QuotaExceededError, match="max_vectors"):
        store.add(doc("b", 3, 4), [{"doc_id": "b"}], tenant="acme")
    assert store.count(tenant="acme") == 5 and store.documents("acme") == 2
    assert {h["metadata"]["version"] for h in store.search(vec(1), k=9, tenant="acme")} == {1, 2}
    # Every other tenant has the default limit: one document each, its own.
    store.add(doc("a", 1, 3), tenant="globex")
    with pytest.raises(QuotaExceededError, match="'globex'"):
        store.add([{**doc("z", 1, 1)[0], "metadata": {}}], tenant="globex")  # no doc_id: one
    assert store.tenants() == {"acme": 5, "globex": 3}


def test_a_first_write_refused_by_a_limit_leaves_the_store_empty(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, default_limits=TenantLimits(max_vectors=0))
    with pytest.raises(QuotaExceededError):
        store.add(doc("a", 1, 1))
    assert store.dim is None and store.tenants() == {}
    store.close()
    assert VectorStore(tmp_path).dim is None  # nothing of it on disk either
