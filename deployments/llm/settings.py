"""Which LLM is served and how its engine runs. From the environment with the
``SERVEGRAPH_LLM_`` prefix, e.g. ``SERVEGRAPH_LLM_SOURCE=/models/qwen`` (any local Hugging
Face folder, or a hub id where a network exists)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deployments.settings import ModelSettings


class LLMSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_LLM_", extra="ignore")

    model_id: str = Field("smollm2-135m-instruct", description="Name served on /v1.")
    source: str | None = Field(
        None, description="Local HF folder or hub id; default: the converted SmolLM2 folder."
    )
    max_model_len: int = Field(2048, description="Context length (prompt + output).")
    dtype: str = Field(
        "float32", description="float32 on CPU: SmolLM2-135M's answers are garbage in eager bf16."
    )
    enforce_eager: bool = Field(True, description="Skip torch.compile (a 60 s start).")
    kv_cache_gib: int = Field(2, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    cpu_nice_offset: int = Field(
        4,
        ge=0,
        le=19,
        description=(
            "How far below its replica's CPU priority a CPU engine's model worker runs, "
            "and its engine core where the node is not partitioned (`cpu_partition`) "
            "(Unix nice, capped at 19; 0: the same; a GPU engine keeps its replica's). "
            "The LLM's work is throughput work; the encoders' is latency work. Where "
            "they share cores, the kernel runs an encoder's forward pass first and the "
            "worker takes what is left. Ray starts its workers at nice 15 (its own "
            "control plane stays at 0), so the worker runs at 19 by default."
        ),
    )
    cpu_partition: Literal["off", "shared", "exclusive"] = Field(
        "off",
        description=(
            "A CPU engine's node, partitioned while the engine has requests "
            "(`deployments.llm.partition`; every process on every core again once it "
            "has had none for 5 s): `shared` moves the platform's own processes (Ray's, "
            "Serve's proxy and controller, ingress, gateways, the engine core) off the "
            "cores vLLM binds its model worker to and leaves the model servers' replicas "
            "on every core; `exclusive` moves those too; `off` (the default) moves "
            "nothing. The LLM's throughput against the encoders' latency: README, "
            "Benchmarks. A GPU or simulated engine is never partitioned."
        ),
    )
    engine_forkserver: bool = Field(
        True,
        description=(
            "Fork a CPU engine's core process from a server that imports vLLM while the "
            "replica does, rather than spawning it after (`deployments.llm.forkserver`): "
            "4.5 s off a replica's start here (the core's 9 s, less the replica's own "
            "imports slowed by the server's beside them). A GPU engine starts as "
            "ray.serve.llm starts it."
        ),
    )
    worker_forkserver: bool = Field(
        True,
        description=(
            "With the engine core forked, fork vLLM's model worker from the same server, "
            "which starts over with the worker's loader and OpenMP settings and imports "
            "the worker's modules while the replica imports its own "
            "(`deployments.llm.worker_server`), rather than the core spawning it after. "
            "Where vLLM gives the worker other settings than the server started with, "
            "the worker is spawned as before."
        ),
    )
    engine_device: Literal["profile", "cpu"] = Field(
        "profile",
        description=(
            "Where vLLM runs: the profile's device, or the CPU whatever the profile asks "
            "Ray for. `cpu` with SERVEGRAPH_PROFILE=gpu keeps the GPU profile's placement "
            "(a GPU share in the engine's placement group, so Ray places it on a GPU node) "
            "while the engine runs on the CPU: a simulated cluster's logical GPUs."
        ),
    )

    @property
    def converted_dir(self) -> Path:
        """Where set-up converts the shipped GGUF (`deployments.llm.prepare`)."""
        return ModelSettings().models_dir / self.model_id

    @property
    def path(self) -> str:
        return self.source or str(self.converted_dir)


def model_folders() -> list[str]:
    """The model files the LLM engine loads (`ServerSpec.models`)."""
    return [LLMSettings().path]
