"""Request and response models of the four model servers: their typed contracts.

Pure pydantic, so graphs validate against them without Ray or a model. Limits live on
the fields, so bad input is refused with a 422 that names the field before any model
work is done.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, PlainSerializer, PlainValidator, StringConstraints
from pydantic.json_schema import WithJsonSchema

from servegraph.batching import BatchStats as BatchStats  # the servers' /stats contract

# Items one request may carry. Not a model batch: dynamic batching feeds the model
# `max_batch_size` at a time whatever a request holds, so this only bounds a body.
# Large enough for the largest `rag_ingest` request (see pipelines/rag/models.py).
MAX_BATCH = 65_536
MAX_TEXT_CHARS = 8_000

NonEmptyText = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TEXT_CHARS)
]
# A metadata key is a JSON path step in the index's SQLite queries, and an integer is
# stored as SQLite's 64-bit INTEGER: both are bounded here, so bad metadata is a 422
# naming the field, not a failed query.
MetadataKey = Annotated[
    str,
    StringConstraints(min_length=1, max_length=100, pattern=r'^[^"\\\x00-\x1f]+$'),
]
MetadataValue = (
    str
    | Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[float, Field(allow_inf_nan=False)]
    | bool
)
Metadata = dict[MetadataKey, MetadataValue]


def _array(ndim: int) -> Any:
    def validate(value: Any) -> np.ndarray:
        shape = "a non-empty list of numbers" if ndim == 1 else "a list of vectors of one length"
        try:
            with np.errstate(over="ignore"):  # too large for float32: inf, refused below
                array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):  # text, null, objects, ragged rows
            raise ValueError(f"must be {shape}") from None
        if array.ndim != ndim or array.size == 0:
            raise ValueError(f"must be {shape}")
        if not np.isfinite(array).all():
            raise ValueError("must hold finite float32 numbers (no null, NaN or overflow)")
        return array

    return validate


def _to_lists(array: np.ndarray) -> list[Any]:
    return array.tolist()


_NUMBERS = {"type": "array", "items": {"type": "number"}, "minItems": 1}

# Vectors travel between deployments as float32 numpy arrays: Ray pickles them as one
# buffer, where a list of 384 Python floats is 384 objects to build, pickle and validate
# on each side. On the REST surface they are plain JSON lists of numbers (in and out).
Vector = Annotated[
    np.ndarray,
    PlainValidator(_array(1)),
    PlainSerializer(_to_lists, when_used="json"),
    WithJsonSchema(_NUMBERS),
]
Matrix = Annotated[
    np.ndarray,
    PlainValidator(_array(2)),
    PlainSerializer(_to_lists, when_used="json"),
    WithJsonSchema({"type": "array", "items": _NUMBERS}),
]


# --- embedder ----------------------------------------------------------------------


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


# --- classifier --------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    text: NonEmptyText


class Classification(BaseModel):
    label: str
    score: float = Field(description="Probability of `label`.")
    scores: dict[str, float] = Field(description="Every label's probability; sums to 1.")


class ClassifyBatchRequest(BaseModel):
    texts: list[NonEmptyText] = Field(min_length=1, max_length=MAX_BATCH)


class ClassifyBatchResponse(BaseModel):
    results: list[Classification]


class ClassifierInfo(BaseModel):
    labels: list[str]
    accuracy: float = Field(description="Held-out accuracy measured at training.")
    macro_f1: float


# --- vector index ------------------------------------------------------------------


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


# --- llm ---------------------------------------------------------------------------


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(BaseModel):
    """A chat call from a pipeline node (the OpenAI route serves API consumers)."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(256, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    json_schema: dict | None = Field(
        None, description="Constrain the output to this JSON schema (guided decoding)."
    )
    stop: list[str] | None = None
    stream_field: str | None = Field(
        None,
        description=(
            "With json_schema, when streamed: chunks carry only the text of this top-level "
            "string field of the reply (e.g. 'answer'), as it is generated."
        ),
    )


class ChatChunk(BaseModel):
    """New text of a streamed reply (or of its `stream_field`)."""

    text: str


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class ChatResponse(BaseModel):
    text: str
    finish_reason: str | None
    usage: Usage
    model: str
