"""The vector index's contract: requests and responses of its methods."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, field_validator

from deployments.fields import MAX_BATCH, MAX_TEXT_CHARS, Metadata, MetadataValue, Vector
from servegraph import DEFAULT_TENANT, TENANT_PATTERN

# Whose items a call reads or writes: set by the platform on every call to the tenant of
# the request's key (`MethodContract.tenant_field`), never by a pipeline.
Tenant = Annotated[
    str,
    Field(
        pattern=TENANT_PATTERN,
        description="Whose items: set by the platform to the tenant of the request's key "
        "(an admin key acts for another with the X-Servegraph-Tenant header).",
    ),
]


class IndexItem(BaseModel):
    id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    text: str = Field(max_length=MAX_TEXT_CHARS * 4)
    vector: Vector
    metadata: Metadata = Field(default_factory=dict)


class AddRequest(BaseModel):
    tenant: Tenant = DEFAULT_TENANT
    items: list[IndexItem] = Field(min_length=1, max_length=MAX_BATCH)
    replace: list[Metadata] = Field(
        default_factory=list,
        max_length=1000,
        description=(
            "Delete every item matching any of these metadata filters in the same "
            "transaction as the add (e.g. one {'doc_id': ...} per re-ingested document): "
            "readers see the old items or the new ones, never a mix."
        ),
    )


class AddResponse(BaseModel):
    ids: list[str]
    replaced: int = Field(0, description="Existing items removed: same ids, or `replace`.")
    count: int = Field(description="Items in the index after the add.")


class SearchRequest(BaseModel):
    tenant: Tenant = DEFAULT_TENANT
    vector: Vector
    k: int = Field(5, ge=1, le=100)
    filter: Metadata | None = Field(
        None, description="Only items whose metadata has every one of these key/values."
    )


class Hit(BaseModel):
    id: str
    text: str
    score: float = Field(description="Inner product (cosine for normalised vectors).")
    metadata: dict[str, MetadataValue]


class SearchResponse(BaseModel):
    hits: list[Hit]


class DeleteRequest(BaseModel):
    tenant: Tenant = DEFAULT_TENANT
    ids: list[str] = Field(default_factory=list, max_length=100_000)
    filter: Metadata | None = Field(
        None, description="Also delete every item whose metadata matches."
    )
    any_of: list[Metadata] = Field(
        default_factory=list,
        max_length=1000,
        description="Also delete items matching any of these filters (e.g. one per doc_id).",
    )


class DeleteResponse(BaseModel):
    deleted: int
    count: int


class CountRequest(BaseModel):
    tenant: Tenant = DEFAULT_TENANT
    filter: Metadata | None = Field(
        None, description="Count only items whose metadata has every one of these key/values."
    )


class CountResponse(BaseModel):
    count: int


Scope = Annotated[str, StringConstraints(min_length=1, max_length=512)]
MAX_ANSWER_BYTES = 256 * 1024


class AnswersGetRequest(BaseModel):
    """Look a question up in the answer cache (`deployments.vector_index.answers`)."""

    tenant: Tenant = DEFAULT_TENANT
    vector: Vector | None = Field(
        None, description="The question's embedding; none: look the exact key up only."
    )
    exact: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        None, description="The question's key as retyped (its words): tried first."
    )
    scope: Scope = Field(
        description="What an answer must have been made by: pipeline, version, models."
    )
    threshold: float = Field(gt=0, le=1, description="The least similarity to reuse one.")
    max_age_s: float = Field(86_400, gt=0, description="The oldest answer to reuse, seconds.")


class CachedAnswer(BaseModel):
    question: str = Field(description="The question it answered.")
    answer: dict[str, Any]
    similarity: float
    cost_usd: float = Field(description="What making it cost.")
    created: float = Field(description="When it was made (epoch s).")


class AnswersGetResponse(BaseModel):
    hit: CachedAnswer | None
    since: int = Field(
        description="The store's write number now: an answer made instead "
        "is stored with it (`answers_put`), and refused if a chunk it used changed after."
    )


class AnswersPutRequest(BaseModel):
    tenant: Tenant = DEFAULT_TENANT
    vector: Vector
    scope: Scope
    question: str = Field(max_length=MAX_TEXT_CHARS)
    answer: dict[str, Any] = Field(description="The answer, as JSON: at most 256 KiB.")
    cost_usd: float = Field(0.0, ge=0)
    sources: list[Annotated[str, StringConstraints(min_length=1, max_length=512)]] = Field(
        min_length=1, max_length=1000, description="Ids of the chunks the answer was built from."
    )
    since: int = Field(ge=0, description="`answers_get`'s `since`, when the run began.")
    exact: Annotated[str, StringConstraints(max_length=128)] = ""

    @field_validator("answer")
    @classmethod
    def _bounded(cls, answer: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(answer)) > MAX_ANSWER_BYTES:
            raise ValueError(f"an answer is kept up to {MAX_ANSWER_BYTES} bytes of JSON")
        return answer


class AnswersPutResponse(BaseModel):
    stored: bool
    reason: str = Field(description="'stored', or why not.")
    entries: int = Field(description="Answers the cache holds now, every tenant's.")


class IndexStats(BaseModel):
    count: int = Field(description="Items, every tenant's.")
    tenants: dict[str, int] = Field(default_factory=dict, description="Items per tenant.")
    answers: int = Field(0, description="Answers in the answer cache, every tenant's.")
    dim: int | None
    index_type: Literal["flat", "ivf", "hnsw"]
    path: str
