"""The vector index's contract: requests and responses of its methods."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from deployments.fields import MAX_BATCH, MAX_TEXT_CHARS, Metadata, MetadataValue, Vector


class IndexItem(BaseModel):
    id: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    text: str = Field(max_length=MAX_TEXT_CHARS * 4)
    vector: Vector
    metadata: Metadata = Field(default_factory=dict)


class AddRequest(BaseModel):
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
    filter: Metadata | None = Field(
        None, description="Count only items whose metadata has every one of these key/values."
    )


class CountResponse(BaseModel):
    count: int


class IndexStats(BaseModel):
    count: int
    dim: int | None
    index_type: Literal["flat", "ivf", "hnsw"]
    path: str
