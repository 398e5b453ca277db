"""A tenant's search when the store holds other tenants' data too (issue 29): the vector
store (`deployments.vector_index.store`, real FAISS and SQLite, no Ray) with one tenant
of N vectors, then with ten tenants of N each; the same queries against one tenant's
data both ways, p50 and p99, in one run. Each tenant has a FAISS index of its own, so
the other nine should cost nothing but memory.

    .venv/bin/python -m benchmarks.tenants [--vectors 10000] [--queries 5000] [--index flat]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.load import percentile
from deployments.vector_index.store import VectorStore

DIM = 384  # all-MiniLM-L6-v2's


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.normal(size=(n, DIM)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def fill(store: VectorStore, tenant: str, vectors: np.ndarray) -> None:
    for start in range(0, len(vectors), 1_000):
        items = [
            {"id": f"{tenant}-{start + i}", "text": "x", "vector": v, "metadata": {"n": start + i}}
            for i, v in enumerate(vectors[start : start + 1_000])
        ]
        store.add(items, tenant=tenant)


def timed(store: VectorStore, queries: np.ndarray, tenant: str, k: int) -> list[float]:
    took = []
    for query in queries:
        began = time.perf_counter()
        store.search(query, k, tenant=tenant)
        took.append(time.perf_counter() - began)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=10_000, help="per tenant")
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--index", default="flat", choices=["flat", "ivf", "hnsw"])
    args = parser.parse_args()
    rng = np.random.default_rng(29)
    queries = unit_rows(rng, args.queries)
    data = [unit_rows(rng, args.vectors) for _ in range(args.tenants)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="sg-tenants-") as folder:
        for label, tenants in (("one tenant", 1), (f"{args.tenants} tenants", args.tenants)):
            store = VectorStore(Path(folder) / label.replace(" ", "-"), args.index)  # type: ignore[arg-type]
            for n in range(tenants):
                fill(store, f"t{n}", data[n])
            timed(store, queries[:200], "t0", 5)  # warm
            took = timed(store, queries, "t0", 5)
            results[label] = (percentile(took, 0.5) * 1e3, percentile(took, 0.99) * 1e3)
            print(
                f"{label}: {tenants * args.vectors} vectors; t0's search p50 "
                f"{results[label][0]:.3f} ms, p99 {results[label][1]:.3f} ms",
                flush=True,
            )
            store.close()
    one, many = results["one tenant"], results[f"{args.tenants} tenants"]
    report.save(
        "tenants",
        [
            report.Figure(
                f"search p50, {args.tenants} tenants x {args.vectors} vs 1 x {args.vectors}",
                many[0],
                one[0],
                "ms",
                "<= 1.2",
                higher_is_better=False,
            ),
            report.Figure(
                f"search p99, {args.tenants} tenants x {args.vectors} vs 1 x {args.vectors}",
                many[1],
                one[1],
                "ms",
                "<= 1.2",
                higher_is_better=False,
            ),
        ],
    )


if __name__ == "__main__":
    main()
