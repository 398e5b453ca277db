"""The embedder's contract: requests and responses of its methods."""

from __future__ import annotations

from pydantic import BaseModel, Field

from deployments.fields import MAX_BATCH, Matrix, NonEmptyText, Vector


class EmbedRequest(BaseModel):
    texts: list[NonEmptyText] = Field(
        min_length=1, max_length=MAX_BATCH, description=f"1 to {MAX_BATCH} non-empty texts."
    )


class EmbedResponse(BaseModel):
    vectors: Matrix = Field(description="L2-normalised float32 vectors, one per text.")
    dim: int
    model: str


class EmbedOneRequest(BaseModel):
    text: NonEmptyText


class Embedding(BaseModel):
    vector: Vector
    dim: int


class EmbedderInfo(BaseModel):
    model: str
    dim: int
