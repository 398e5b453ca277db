"""The ticket classifier model server: MiniLM sentence encoder + logistic-regression head,
trained at set-up (`deployments.prepare`), with dynamic batching."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.encoders import SentenceEncoder, TicketClassifier
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
        self._model = TicketClassifier(model_dir, SentenceEncoder(encoder_dir))
        self.labels = self._model.labels
        self._batches = Batcher(
            self._classify_batch,
            max_batch_size=max_batch_size,
            wait_s=batch_wait_timeout_s,
            name="classifier",
        )

    async def _classify_batch(self, texts: list[str]) -> list[Classification]:
        # In a thread, so requests keep queueing (and form the next batch) meanwhile.
        return await asyncio.to_thread(self._model.classify, texts)

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

    async def classify(self, request: ClassifyRequest) -> Classification:
        (result,) = await self._classify([request.text])
        return result

    async def classify_batch(self, request: ClassifyBatchRequest) -> ClassifyBatchResponse:
        return ClassifyBatchResponse(results=await self._classify(request.texts))

    async def info(self) -> ClassifierInfo:
        return self._model.info()

    async def batch_stats(self) -> BatchStats:
        return self._batches.stats()

    async def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("classifier head is not loaded")
