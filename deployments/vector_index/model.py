"""The vector index's logic, no Ray: its contract's methods on a durable `VectorStore`.

`VectorIndex` is what the in-process runtime serves; the Serve deployment
(`deployments.vector_index.server`) is the same class, held to one replica.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.settings import ModelSettings
from deployments.vector_index.contract import (
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
from deployments.vector_index.store import IndexType, VectorStore
from servegraph.server import annotate


class IndexSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_INDEX_", extra="ignore")

    path: Path | None = Field(None, description="Vector index folder (default home/index).")

    @property
    def dir(self) -> Path:
        return self.path or ModelSettings().home / "index"


class VectorIndex:
    """Add with ids, text and metadata; search top-k with a metadata filter; delete.

    Methods are synchronous: Serve runs them on its thread pool, and the store
    serialises writes and lets searches run in parallel (see `VectorStore`).

    Args:
        path: the store's folder (default: `IndexSettings`).
        index_type: the FAISS structure searches use.
    """

    def __init__(
        self, path: str | Path | None = None, index_type: IndexType = "flat", **index_options: int
    ) -> None:
        self._store = VectorStore(path or IndexSettings().dir, index_type, **index_options)

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
