"""Field types the model servers' contracts share (`deployments/<server>/contract.py`).

Pure pydantic, so graphs validate against the contracts without Ray or a model. Limits
live on the fields, so bad input is refused with a 422 that names the field before any
model work is done.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field, PlainSerializer, PlainValidator, StringConstraints
from pydantic.json_schema import WithJsonSchema

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
