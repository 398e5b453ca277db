"""The classifier's contract: requests and responses of its methods."""

from __future__ import annotations

from pydantic import BaseModel, Field

from deployments.fields import MAX_BATCH, NonEmptyText


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
