"""Train the support-ticket classifier: a frozen all-MiniLM-L6-v2 sentence encoder with a
logistic-regression head (scikit-learn).

Set-up runs `prepare()` (`python -m deployments.prepare`).

Sentence embeddings carry meaning across phrasings the training set never used: on the
template-disjoint held-out split this scores ~0.89 accuracy where TF-IDF n-grams scored
~0.79. Training the head takes seconds; the head gives calibrated per-label
probabilities that sum to 1.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

from deployments.classifier.model import HEAD_FILE, trained_dir
from deployments.embedder.model import EmbedderSettings, SentenceEncoder
from deployments.prepare import atomic_dir, console, digest

DATA_FILE = Path(__file__).parent / "data" / "tickets.jsonl"
REGULARISATION_C = 16.0


def load_tickets(path: Path = DATA_FILE) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare() -> None:
    """Train the head unless it was trained on this very data: idempotent set-up."""
    target = trained_dir()
    data_hash = digest(DATA_FILE)
    metrics_file = target / "metrics.json"
    if metrics_file.exists() and json.loads(metrics_file.read_text()).get("data") == data_hash:
        metrics = json.loads(metrics_file.read_text())
        console.print(
            f"prepare: classifier: ready (held-out accuracy "
            f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f})"
        )
        return
    encoder_dir = EmbedderSettings().model_dir
    with console.status("prepare: classifier: training on the shipped ticket data"):
        metrics = atomic_dir(target, lambda tmp: train(tmp, data_hash, encoder_dir))
    console.print(
        f"prepare: classifier: trained in {metrics['train_seconds']:.1f}s; held-out "
        f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    )


def train(out_dir: Path, data_hash: str, encoder_dir: Path) -> dict[str, Any]:
    """Fit the head on the train split, score on held-out, write head and metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    tickets = load_tickets()
    train_set = [t for t in tickets if t["split"] == "train"]
    test_set = [t for t in tickets if t["split"] == "test"]
    started = time.perf_counter()
    encoder = SentenceEncoder(encoder_dir)
    head = LogisticRegression(C=REGULARISATION_C, max_iter=3000).fit(
        encoder.encode([t["text"] for t in train_set]), [t["label"] for t in train_set]
    )
    seconds = time.perf_counter() - started
    truth = [t["label"] for t in test_set]
    predicted = list(head.predict(encoder.encode([t["text"] for t in test_set])))
    metrics = {
        "data": data_hash,
        "encoder": str(encoder_dir),
        "train_examples": len(train_set),
        "held_out_examples": len(test_set),
        "held_out_split": "whole templates never used in training",
        "labels": [str(label) for label in head.classes_],
        "accuracy": accuracy_score(truth, predicted),
        "macro_f1": f1_score(truth, predicted, average="macro"),
        "train_seconds": seconds,
        "report": classification_report(truth, predicted, output_dict=True),
    }
    (out_dir / HEAD_FILE).write_bytes(pickle.dumps(head))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
