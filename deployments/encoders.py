"""The encoder model servers' logic as plain classes, no Ray: the Serve deployments
(`deployments.embedder`, `deployments.classifier`) add batching across callers around
them, and the in-process twins (`deployments.in_process`), classifier training and the
benchmarks' raw baselines call them directly. One copy of the model code, so the twins
cannot drift from what is served.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from deployments.schemas import Classification, ClassifierInfo

HEAD_FILE = "head.pkl"


class SentenceEncoder:
    """all-MiniLM-L6-v2 (any SentenceTransformer folder): texts to L2-normalised float32
    vectors, on the GPU where this process was given one."""

    def __init__(self, path: str | Path) -> None:
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - install hint
            raise ImportError("sentence-transformers is missing: run `make install`") from exc
        self.path = str(path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(self.path, device=device)
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"{self.path}: the model does not say its embedding size")
        self.dim = int(dim)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """One row per text; `batch_size` texts per forward pass."""
        vectors = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


class TicketClassifier:
    """The sentence encoder plus the logistic-regression head trained at set-up
    (`deployments.prepare`): a ticket's category and every category's probability."""

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
