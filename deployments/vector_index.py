"""The vector index model server: a durable FAISS store behind a small REST surface.

Held to ONE replica by configuration, on purpose: the FAISS structure lives in the
replica's memory, so a second replica would answer searches from its own copy and miss
writes the first acknowledged until it reopened the store. One replica makes "a search
after an acknowledged add sees it" true by construction; flat search on 100k x 384
vectors takes ~6 ms here, so one replica is not the bottleneck of any pipeline.
"""

from __future__ import annotations

from ray import serve

from deployments.schemas import (
    AddRequest,
    AddResponse,
    CountRequest,
    CountResponse,
    DeleteRequest,
    DeleteResponse,
    Hit,
    IndexStats,
    SearchRequest,
    SearchResponse,
)
from deployments.vector_store import IndexType, VectorStore
from servegraph.tracing import annotate


@serve.deployment(name="VectorIndex", num_replicas=1, health_check_period_s=10)
class VectorIndex:
    """Add with ids, text and metadata; search top-k with a metadata filter; delete.

    Methods are synchronous, so Serve runs them on its thread pool; the store
    serialises writes and lets searches run in parallel (see `VectorStore`).
    """

    def __init__(self, path: str, index_type: IndexType = "flat", **index_options: int) -> None:
        self._store = VectorStore(path, index_type, **index_options)

    def add(self, request: AddRequest) -> AddResponse:
        ids, replaced, count = self._store.add(
            [item.model_dump() for item in request.items], request.replace
        )
        return AddResponse(ids=ids, replaced=replaced, count=count)

    def search(self, request: SearchRequest) -> SearchResponse:
        hits = self._store.search(request.vector, request.k, request.filter)
        annotate(
            **{
                "servegraph.retrieval.k": request.k,
                "servegraph.retrieval.hits": len(hits),
                "servegraph.retrieval.filtered": bool(request.filter),
                "servegraph.retrieval.top_scores": [round(h["score"], 4) for h in hits[:3]],
            }
        )
        return SearchResponse(hits=[Hit(**hit) for hit in hits])

    def delete(self, request: DeleteRequest) -> DeleteResponse:
        deleted, count = self._store.delete(request.ids, request.filter, request.any_of)
        return DeleteResponse(deleted=deleted, count=count)

    def count(self, request: CountRequest) -> CountResponse:
        return CountResponse(count=self._store.count(request.filter))

    def stats(self) -> IndexStats:
        return IndexStats(
            count=self._store.count(),
            dim=self._store.dim,
            index_type=self._store.index_type,
            path=str(self._store.path),
        )

    def check_health(self) -> None:
        self._store.count()  # raises if the database is gone or locked
