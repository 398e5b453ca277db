"""`rag` at version v2, served beside v1 (see the README's "Changing a pipeline"): the
LLM's prompt holds the two most relevant passages only, not every relevant one. A
shorter prompt is a cheaper, faster prefill; whether the answers stay as good is what
its shadow, its canary and its rollout's gates (`generated`, `citations`) say."""

from __future__ import annotations

from pipelines.rag import qa
from servegraph import Pipeline


def build_pipeline() -> Pipeline:
    return qa.build_pipeline(version="v2", prompt_passages=2)
