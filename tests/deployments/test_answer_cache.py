"""The semantic answer cache in the vector store (`deployments.vector_index.answers`), on
real SQLite: a similar enough question of the same tenant and scope gets the answer;
a write to a chunk an answer was built from removes it before the write returns; an
answer whose chunks changed while it ran is not stored; the bound; a reopen; and no
stale answer under concurrent writers and readers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from deployments.vector_index.store import VectorStore
from tests.deployments.test_vector_store import doc, vec

SCOPE = "rag/v1/models-abc"


def near(seed: int, similarity: float) -> np.ndarray:
    """A unit vector whose inner product with vec(seed) is `similarity`."""
    base = np.asarray(vec(seed), dtype=np.float32)
    other = np.asarray(vec(seed + 5000), dtype=np.float32)
    other -= base * float(base @ other)
    other /= np.linalg.norm(other)
    return similarity * base + np.sqrt(1 - similarity**2) * other


def answer(store: VectorStore, seed: int, sources: list[str], tenant: str = "acme") -> int:
    _, since = store.cached(vec(seed), SCOPE, 0.9, tenant)
    entry, why = store.cache(
        vec(seed), SCOPE, f"question {seed}", {"answer": seed}, 0.01, sources, since, tenant
    )
    assert entry is not None, why
    return entry


def test_a_close_enough_question_of_the_same_tenant_and_scope_gets_the_answer(
    tmp_path: Path,
) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("refunds", 1, 2), tenant="acme")
    answer(store, 1, ["refunds#0"])
    hit, _ = store.cached(near(1, 0.95), SCOPE, 0.93, "acme")
    assert hit is not None and hit.answer == {"answer": 1} and hit.similarity == pytest.approx(0.95)
    assert hit.question == "question 1" and hit.cost_usd == 0.01
    assert store.cached(near(1, 0.90), SCOPE, 0.93, "acme")[0] is None  # below the threshold
    assert store.cached(vec(1), "rag/v2/models-abc", 0.93, "acme")[0] is None  # another version
    assert store.cached(vec(1), SCOPE, 0.93, "globex")[0] is None  # another tenant


def test_a_write_to_a_chunk_an_answer_was_built_from_removes_it_and_no_other(
    tmp_path: Path,
) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("refunds", 1, 2), tenant="acme")
    store.add(doc("delivery", 1, 2), tenant="acme")
    store.add(doc("refunds", 1, 2), tenant="globex")  # the same ids, another tenant
    answer(store, 1, ["refunds#0", "delivery#1"])
    answer(store, 2, ["delivery#0"])
    answer(store, 3, ["refunds#1"], tenant="globex")
    store.add(doc("news", 1, 1), tenant="acme")  # cited by nothing
    store.add(doc("refunds", 2, 2), [{"doc_id": "refunds"}], tenant="globex")
    assert store.cached(vec(1), SCOPE, 0.99, "acme")[0] is not None  # globex's write
    assert store.cached(vec(3), SCOPE, 0.99, "globex")[0] is None  # its own chunk replaced
    store.add(doc("refunds", 2, 1), [{"doc_id": "refunds"}], tenant="acme")  # re-ingested
    assert store.cached(vec(1), SCOPE, 0.99, "acme")[0] is None
    assert store.cached(vec(2), SCOPE, 0.99, "acme")[0] is not None
    store.delete(ids=["delivery#0"], tenant="acme")
    assert store.cached(vec(2), SCOPE, 0.99, "acme")[0] is None
    assert len(store.answers) == 0
    assert store._db.execute("SELECT COUNT(*) FROM answer_sources").fetchone() == (0,)


def test_an_answer_whose_chunks_changed_while_it_ran_is_not_stored(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("refunds", 1, 2))
    _, since = store.cached(vec(1), SCOPE, 0.9, "default")  # a miss: the run begins
    store.add(doc("refunds", 2, 2), [{"doc_id": "refunds"}])  # a write while it runs
    entry, why = store.cache(vec(1), SCOPE, "q", {}, 0.0, ["refunds#0"], since, "default")
    assert entry is None and "changed" in why
    store.delete(ids=["refunds#1"])
    _, since = store.cached(vec(1), SCOPE, 0.9, "default")
    entry, why = store.cache(vec(1), SCOPE, "q", {}, 0.0, ["refunds#1"], since, "default")
    assert entry is None  # gone
    entry, _ = store.cache(vec(1), SCOPE, "q", {}, 0.0, ["refunds#0"], since, "default")
    assert entry is not None  # written before the run began: fine


def test_the_cache_keeps_its_bound_dropping_the_least_recently_used(tmp_path: Path) -> None:
    store = VectorStore(tmp_path, max_answers=3)
    store.add(doc("a", 1, 1))
    for seed in range(3):
        answer(store, seed, ["a#0"], tenant="default")
    assert store.cached(vec(0), SCOPE, 0.99, "default")[0] is not None  # 0 used: 1 is oldest
    answer(store, 3, ["a#0"], tenant="default")
    answer(store, 4, ["a#0"], tenant="default")
    found = {s for s in range(5) if store.cached(vec(s), SCOPE, 0.99, "default")[0] is not None}
    assert found == {0, 3, 4} and len(store.answers) == 3
    assert store._db.execute("SELECT COUNT(*) FROM answers").fetchone() == (3,)


def test_the_entries_survive_a_reopen_and_stay_invalidated_by_writes(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("a", 1, 1), tenant="acme")
    answer(store, 1, ["a#0"])
    store.close()
    again = VectorStore(tmp_path)
    hit, since = again.cached(vec(1), SCOPE, 0.99, "acme")
    assert hit is not None and since == store.seq
    again.add(doc("a", 2, 1), tenant="acme")
    assert again.cached(vec(1), SCOPE, 0.99, "acme")[0] is None


def test_no_answer_built_on_an_old_version_is_served_after_the_write_returned(
    tmp_path: Path,
) -> None:
    """8 writers re-ingest 4 documents while 32 readers ask about them: a reader that
    misses builds its answer from what it finds (the chunks' version) and caches it; a
    hit must never carry a version older than one whose write had returned before the
    lookup began."""
    store = VectorStore(tmp_path)
    docs = [f"d{n}" for n in range(4)]
    acknowledged = dict.fromkeys(docs, 1)
    lock = threading.Lock()
    for d in docs:
        store.add(doc(d, 1, 1))
    stale: list[str] = []
    hits = [0]

    def write(n: int) -> None:
        for round_ in range(15):
            d = docs[(n + round_) % len(docs)]
            with lock:
                version = acknowledged[d] + 1
                store.add(doc(d, version, 1), [{"doc_id": d}])
                acknowledged[d] = version  # the write has returned

    def read(n: int) -> None:
        for round_ in range(40):
            d = docs[(n + round_) % len(docs)]
            question = vec(100 + docs.index(d))
            with lock:
                floor = acknowledged[d]
            hit, since = store.cached(question, SCOPE, 0.99, "default")
            if hit is not None:
                hits[0] += 1
                if hit.answer["version"] < floor:
                    stale.append(f"{d}: v{hit.answer['version']} after v{floor} was acknowledged")
                continue
            (found,) = store.search(vec(hash((d, 0)) % 10_000), k=1, where={"doc_id": d})
            built = {"version": found["metadata"]["version"]}
            store.cache(question, SCOPE, d, built, 0.0, [found["id"]], since, "default")

    with ThreadPoolExecutor(max_workers=40) as pool:
        futures = [pool.submit(write, n) for n in range(8)]
        futures += [pool.submit(read, n) for n in range(32)]
        for future in futures:
            future.result()
    assert not stale, stale[:5]
    assert hits[0] > 0  # the cache answered some: the race was run, not avoided


def test_a_vector_of_another_size_or_an_answer_of_no_chunk_is_refused(tmp_path: Path) -> None:
    from servegraph.errors import InvalidInputError

    store = VectorStore(tmp_path)
    store.add(doc("a", 1, 1))
    _, since = store.cached(vec(1), SCOPE, 0.9, "default")
    with pytest.raises(InvalidInputError) as refused:
        store.cached(vec(1, dim=8), SCOPE, 0.9, "default")
    assert refused.value.field == "vector"
    with pytest.raises(InvalidInputError, match="sources"):
        store.cache(vec(1), SCOPE, "q", {}, 0.0, [], since, "default")
    with pytest.raises(InvalidInputError):
        store.cache(vec(1, dim=8), SCOPE, "q", {}, 0.0, ["a#0"], since, "default")
    assert len(store.answers) == 0


def test_an_exact_key_finds_the_answer_without_a_vector_and_a_write_forgets_it(
    tmp_path: Path,
) -> None:
    store = VectorStore(tmp_path)
    store.add(doc("a", 1, 1))
    _, since = store.cached(vec(1), SCOPE, 0.9, "default")
    store.cache(vec(1), SCOPE, "q", {"n": 1}, 0.0, ["a#0"], since, "default", exact="k1")
    hit, _ = store.cached(None, SCOPE, 0.99, "default", exact="k1")
    assert hit is not None and hit.answer == {"n": 1} and hit.similarity == 1.0
    assert store.cached(None, SCOPE, 0.99, "default", exact="k2")[0] is None
    assert store.cached(None, SCOPE, 0.99, "acme", exact="k1")[0] is None
    store.add(doc("a", 2, 1))
    assert store.cached(None, SCOPE, 0.99, "default", exact="k1")[0] is None
