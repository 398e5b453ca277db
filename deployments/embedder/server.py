"""The embedder on Ray Serve: the model logic (`deployments.embedder.model.Embedder`)
with dynamic batching across callers (`servegraph.server.Batcher`), its CPU and GPU
profile defaults, and its application builder.

Single texts from many concurrent callers are gathered into one forward pass, and a
request with many texts is fed to the model `max_batch_size` at a time: on this CPU
that is the difference between ~13 and ~370 sentences per second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from deployments.embedder import SERVER
from deployments.embedder.model import Embedder, EmbedderSettings
from deployments.serve_options import ServerAppArgs, encoder_profiles, server_app
from servegraph.server import Batcher, BatchStats, SameModel, accepts_merged_calls, metered

# On the GPU profile, a call costs a replica 0.6 ms at full load: the raw model at batch
# 64 ran 6,543 items/s on an H200 (issue 22), and a pipeline's call carries 1 (a
# question) to ~20 (a passage's sentences) texts: 4 on average, an estimate.
PROFILES = encoder_profiles("embedder", gpu_service_time_s=0.0006)


@serve.deployment(name="Embedder", health_check_period_s=10, health_check_timeout_s=30)
@metered(SERVER.methods)
@accepts_merged_calls(SERVER.methods)
class EmbedderDeployment(Embedder):
    """`Embedder`, batched across callers.

    Args:
        model_path: a SentenceTransformer folder.
        max_batch_size: the largest batch one forward pass takes.
        batch_wait_timeout_s: how long the first request of a batch waits for company.
    """

    def __init__(
        self,
        model_path: str | None = None,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.005,
    ) -> None:
        super().__init__(model_path)
        self._same_model = SameModel(self.model_path)
        self._batches = Batcher(
            self._encode_batch,
            max_batch_size=max_batch_size,
            wait_s=batch_wait_timeout_s,
            name="embedder",
        )

    async def _encode(self, texts: list[str]) -> Sequence[np.ndarray]:
        return await self._batches.submit(texts)

    async def _encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # In a thread, so requests keep queueing (and form the next batch) meanwhile.
        vectors = await asyncio.to_thread(self._model.encode, texts, batch_size=len(texts))
        return list(vectors)

    async def batch_stats(self) -> BatchStats:
        return self._batches.stats()

    async def check_health(self) -> None:
        if self._model is None:
            raise RuntimeError("embedder model is not loaded")
        self._same_model.check()


def app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    """The embedder's Serve application (Serve calls it with its config entry's args)."""
    model = ServerAppArgs.of(args).init.get("model_path") or EmbedderSettings().model_dir
    return server_app("embedder", EmbedderDeployment, PROFILES, args, models=[model])
