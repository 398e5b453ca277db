"""The ticket classifier model server: MiniLM sentence encoder + logistic-regression head,
trained at set-up (`deployments.prepare`), with dynamic batching."""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path

import numpy as np
from ray import serve

from deployments.classifier_training import HEAD_FILE, encode, load_encoder
from deployments.schemas import (
    BatchStats,
    Classification,
    ClassifierInfo,
    ClassifyBatchRequest,
    ClassifyBatchResponse,
    ClassifyRequest,
)
from servegraph.batching import Batcher
from servegraph.tracing import annotate


@serve.deployment(name="Classifier", health_check_period_s=10, health_check_timeout_s=30)
class Classifier:
    """Labels a support ticket with its category and every category's probability.

    Args:
        model_dir: the folder `deployments.prepare` trained into.
        encoder_dir: the sentence encoder the head was trained on.
    """

    def __init__(
        self,
        model_dir: str,
        encoder_dir: str,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.005,
    ) -> None:
        folder = Path(model_dir)
        self._head = pickle.loads((folder / HEAD_FILE).read_bytes())
        self._metrics = json.loads((folder / "metrics.json").read_text())
        self._encoder = load_encoder(Path(encoder_dir))
        self.labels = [str(label) for label in self._head.classes_]
        self._batches = Batcher(
            self._classify_batch,
            max_batch_size=max_batch_size,
            wait_s=batch_wait_timeout_s,
            name="classifier",
        )

    async def _classify_batch(self, texts: list[str]) -> list[Classification]:
        # In a thread, so requests keep queueing (and form the next batch) meanwhile.
        probabilities = await asyncio.to_thread(self._predict, texts)
        results = []
        for row in probabilities:
            best = int(np.argmax(row))
            scores = {label: float(p) for label, p in zip(self.labels, row, strict=True)}
            results.append(
                Classification(label=self.labels[best], score=float(row[best]), scores=scores)
            )
        return results

    async def _classify(self, texts: list[str]) -> list[Classification]:
        results = await self._batches.submit(texts)
        if len(results) == 1:
            annotate(
                **{
                    "servegraph.classifier.label": results[0].label,
                    "servegraph.classifier.score": results[0].score,
                }
            )
        return results

    def _predict(self, texts: list[str]) -> np.ndarray:
        return self._head.predict_proba(encode(self._encoder, texts))

    async def classify(self, request: ClassifyRequest) -> Classification:
        (result,) = await self._classify([request.text])
        return result

    async def classify_batch(self, request: ClassifyBatchRequest) -> ClassifyBatchResponse:
        return ClassifyBatchResponse(results=await self._classify(request.texts))

    async def info(self) -> ClassifierInfo:
        return ClassifierInfo(
            labels=self.labels,
            accuracy=self._metrics["accuracy"],
            macro_f1=self._metrics["macro_f1"],
        )

    async def batch_stats(self) -> BatchStats:
        return self._batches.stats()

    async def check_health(self) -> None:
        if self._head is None:
            raise RuntimeError("classifier head is not loaded")
