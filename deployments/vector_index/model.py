"""The vector index's logic, no Ray: its contract's methods on a durable `VectorStore`.

`VectorIndex` is what the in-process runtime serves; the Serve deployment
(`deployments.vector_index.server`) is the same class, held to one replica.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.settings import ModelSettings
from deployments.vector_index.contract import (
    AddRequest,
    AddResponse,
    AnswersGetRequest,
    AnswersGetResponse,
    AnswersPutRequest,
    AnswersPutResponse,
    CachedAnswer,
    CountRequest,
    CountResponse,
    DeleteRequest,
    DeleteResponse,
    Hit,
    IndexStats,
    SearchRequest,
    SearchResponse,
)
from deployments.vector_index.store import IndexType, TenantLimits, VectorStore
from servegraph import check_tenant
from servegraph.server import annotate


class TenantLimitsModel(BaseModel):
    """One tenant's limits (`TenantLimits`), as settings give them; a limit left out is
    the default's."""

    model_config = ConfigDict(extra="forbid")

    max_vectors: int | None = Field(None, ge=0)
    max_documents: int | None = Field(None, ge=0)


class IndexSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_INDEX_", extra="ignore")

    path: Path | None = Field(None, description="Vector index folder (default home/index).")
    max_vectors_per_tenant: int | None = Field(
        None, ge=0, description="The most items (vectors) a tenant may hold; None: no limit."
    )
    max_documents_per_tenant: int | None = Field(
        None, ge=0, description="The most documents (distinct doc_ids) a tenant may hold."
    )
    max_answers: int = Field(
        10_000,
        ge=1,
        description="Answers the answer cache keeps per tenant (its least recently used "
        "go first: one tenant's questions never push out another's).",
    )
    tenant_limits: dict[str, TenantLimitsModel] = Field(
        default_factory=dict,
        description="Limits of named tenants, over the two above (JSON in the environment: "
        '{"acme": {"max_vectors": 20000, "max_documents": 500}}).',
    )

    def limits(self) -> tuple[dict[str, TenantLimits], TenantLimits]:
        """(each named tenant's limits, every other tenant's)."""
        default = TenantLimits(self.max_vectors_per_tenant, self.max_documents_per_tenant)
        named = {
            check_tenant(name, "tenant_limits"): TenantLimits(
                limits.max_vectors
                if "max_vectors" in limits.model_fields_set
                else default.max_vectors,
                limits.max_documents
                if "max_documents" in limits.model_fields_set
                else default.max_documents,
            )
            for name, limits in self.tenant_limits.items()
        }
        return named, default

    @property
    def dir(self) -> Path:
        return self.path or ModelSettings().home / "index"


class VectorIndex:
    """Add with ids, text and metadata; search top-k with a metadata filter; delete;
    each call within one tenant's items (its request's `tenant`, set by the platform).

    Methods are synchronous: Serve runs them on its thread pool, and the store
    serialises writes and lets searches run in parallel (see `VectorStore`).

    Args:
        path: the store's folder (default: `IndexSettings`).
        index_type: the FAISS structure searches use.
        The tenants' limits are `IndexSettings`' (`SERVEGRAPH_INDEX_*`).
    """

    def __init__(
        self, path: str | Path | None = None, index_type: IndexType = "flat", **index_options: int
    ) -> None:
        settings = IndexSettings()
        limits, default = settings.limits()
        self._store = VectorStore(
            path or settings.dir,
            index_type,
            limits=limits,
            default_limits=default,
            max_answers=settings.max_answers,
            **index_options,
        )

    def add(self, request: AddRequest) -> AddResponse:
        ids, replaced, count = self._store.add(
            [item.model_dump() for item in request.items], request.replace, request.tenant
        )
        return AddResponse(ids=ids, replaced=replaced, count=count)

    def search(self, request: SearchRequest) -> SearchResponse:
        hits = self._store.search(request.vector, request.k, request.filter, request.tenant)
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
        deleted, count = self._store.delete(
            request.ids, request.filter, request.any_of, request.tenant
        )
        return DeleteResponse(deleted=deleted, count=count)

    def count(self, request: CountRequest) -> CountResponse:
        return CountResponse(count=self._store.count(request.filter, request.tenant))

    def answers_get(self, request: AnswersGetRequest) -> AnswersGetResponse:
        found, since = self._store.cached(
            request.vector,
            request.scope,
            request.threshold,
            request.tenant,
            request.max_age_s,
            request.exact,
        )
        if found is None:
            return AnswersGetResponse(hit=None, since=since)
        hit = CachedAnswer(
            question=found.question,
            answer=found.answer,
            similarity=found.similarity,
            cost_usd=found.cost_usd,
            created=found.created,
        )
        return AnswersGetResponse(hit=hit, since=since)

    def answers_put(self, request: AnswersPutRequest) -> AnswersPutResponse:
        entry, why = self._store.cache(
            request.vector,
            request.scope,
            request.question,
            request.answer,
            request.cost_usd,
            request.sources,
            request.since,
            request.tenant,
            request.exact,
        )
        return AnswersPutResponse(
            stored=entry is not None, reason=why, entries=len(self._store.answers)
        )

    def stats(self) -> IndexStats:
        tenants = self._store.tenants()
        return IndexStats(
            count=sum(tenants.values()),
            tenants=tenants,
            answers=len(self._store.answers),
            dim=self._store.dim,
            index_type=self._store.index_type,
            path=str(self._store.path),
        )
