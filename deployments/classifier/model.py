"""The classifier's model logic, no Ray: `TicketClassifier` (the sentence encoder plus
the head trained at set-up) and `Classifier` (its contract's methods on that model).

`Classifier` is what the in-process runtime serves; the Serve deployment
(`deployments.classifier.server`) is the same class with batching across callers added.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deployments.classifier.contract import (
    Classification,
    ClassifierInfo,
    ClassifyBatchRequest,
    ClassifyBatchResponse,
    ClassifyRequest,
)
from deployments.embedder.model import EmbedderSettings, SentenceEncoder
from deployments.settings import ModelSettings
from servegraph.server import annotate

HEAD_FILE = "head.pkl"


def trained_dir() -> Path:
    """Where set-up trains the head (`deployments.classifier.training`)."""
    return ModelSettings().models_dir / "ticket-classifier"


def model_folders() -> list[Path]:
    """The model files the classifier loads (`ServerSpec.models`): its head, its encoder."""
    return [trained_dir(), EmbedderSettings().model_dir]


class TicketClassifier:
    """The sentence encoder plus the logistic-regression head trained at set-up: a
    ticket's category and every category's probability."""

    def __init__(self, model_dir: str | Path, encoder: SentenceEncoder) -> None:
        folder = Path(model_dir)
        self.head = pickle.loads((folder / HEAD_FILE).read_bytes())
        self.metrics = json.loads((folder / "metrics.json").read_text())
        self.encoder = encoder
        self.labels = [str(label) for label in self.head.classes_]

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        rows = self.head.predict_proba(self.encoder.encode(texts))
        results = []
        for row in rows:
            best = int(np.argmax(row))
            scores = {label: float(p) for label, p in zip(self.labels, row, strict=True)}
            results.append(
                Classification(label=self.labels[best], score=float(row[best]), scores=scores)
            )
        return results

    def info(self) -> ClassifierInfo:
        return ClassifierInfo(
            labels=self.labels,
            accuracy=self.metrics["accuracy"],
            macro_f1=self.metrics["macro_f1"],
        )


class Classifier:
    """Labels a support ticket with its category and every category's probability.

    Args:
        model_dir: the folder set-up trained into (default: `trained_dir()`).
        encoder_dir: the sentence encoder the head was trained on (default: the
            embedder's).
    """

    def __init__(self, model_dir: str | None = None, encoder_dir: str | None = None) -> None:
        self._model = TicketClassifier(model_dir or trained_dir(), SentenceEncoder(encoder_dir))
        self.labels = self._model.labels

    async def _run(self, texts: list[str]) -> list[Classification]:
        """One result per text. The Serve deployment batches concurrent callers here."""
        return self._model.classify(texts)

    async def _classify(self, texts: list[str]) -> list[Classification]:
        results = await self._run(texts)
        if len(results) == 1:
            annotate(
                **{
                    "servegraph.classifier.label": results[0].label,
                    "servegraph.classifier.score": results[0].score,
                }
            )
        return results

    async def classify(self, request: ClassifyRequest) -> Classification:
        (result,) = await self._classify([request.text])
        return result

    async def classify_batch(self, request: ClassifyBatchRequest) -> ClassifyBatchResponse:
        return ClassifyBatchResponse(results=await self._classify(request.texts))

    async def info(self) -> ClassifierInfo:
        return self._model.info()
