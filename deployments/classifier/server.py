"""The classifier on Ray Serve: the model logic (`deployments.classifier.model.Classifier`)
with dynamic batching across callers, its CPU and GPU profile defaults, and its
application builder."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from ray import serve

from deployments.classifier import SERVER
from deployments.classifier.contract import Classification
from deployments.classifier.model import Classifier, trained_dir
from deployments.embedder.model import EmbedderSettings
from deployments.serve_options import ServerAppArgs, encoder_profiles, server_app
from servegraph.server import Batcher, BatchStats, SameModel, accepts_merged_calls, metered

# On the GPU profile, a call costs a replica 0.15 ms at full load: the embedder's figure
# (the raw embedder at batch 64 ran 6,543 items/s on an H200, issue 22), used until the
# classifier is measured on a GPU.
PROFILES = encoder_profiles("classifier", gpu_service_time_s=0.00015)


@serve.deployment(name="Classifier", health_check_period_s=10, health_check_timeout_s=30)
@metered(SERVER.methods)
@accepts_merged_calls(SERVER.methods)
class ClassifierDeployment(Classifier):
    """`Classifier`, batched across callers.

    Args:
        model_dir: the folder set-up trained into.
        encoder_dir: the sentence encoder the head was trained on.
        max_batch_size: the largest batch one forward pass takes.
        batch_wait_timeout_s: how long the first request of a batch waits for company.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        encoder_dir: str | None = None,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.005,
    ) -> None:
        super().__init__(model_dir, encoder_dir)
        self._same_model = SameModel(*models(model_dir, encoder_dir))
        self._batches = Batcher(
            self._classify_batch,
            max_batch_size=max_batch_size,
            wait_s=batch_wait_timeout_s,
            name="classifier",
        )

    async def _run(self, texts: list[str]) -> list[Classification]:
        return await self._batches.submit(texts)

    async def _classify_batch(self, texts: list[str]) -> list[Classification]:
        # In a thread, so requests keep queueing (and form the next batch) meanwhile.
        return await asyncio.to_thread(self._model.classify, texts)

    async def batch_stats(self) -> BatchStats:
        return self._batches.stats()

    async def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("classifier head is not loaded")
        self._same_model.check()


def app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    """The classifier's Serve application (Serve calls it with its config entry's args)."""
    init = ServerAppArgs.of(args).init
    loaded = models(init.get("model_dir"), init.get("encoder_dir"))
    return server_app("classifier", ClassifierDeployment, PROFILES, args, models=loaded)


def models(model_dir: str | None, encoder_dir: str | None) -> list[str | Path]:
    """The folders a classifier replica loads: its trained head and its encoder."""
    return [model_dir or trained_dir(), encoder_dir or EmbedderSettings().model_dir]
