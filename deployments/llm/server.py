"""The LLM on Ray Serve: vLLM through `ray.serve.llm` (continuous batching, streaming,
the OpenAI routes /v1/chat/completions, /v1/completions, /v1/models), its CPU and GPU
profile defaults, and its application builder.

Nothing here wraps the engine by hand: `app` only configures `ray.serve.llm`. Pipelines
call the engine deployment through `deployments.llm.client.LLMClient`.
"""

from __future__ import annotations

from typing import Any

from deployments.llm.settings import LLMSettings
from deployments.serve_options import SHED, ServerAppArgs, options_for
from deployments.settings import ModelSettings
from servegraph.server import SIMULATED_MODELS_ENV, expected_model_env, simulated_curves

# vLLM batches continuously up to max_num_seqs=64; a bounded queue beyond that. A death
# costs an engine restart (about a minute here): calls retried within their deadline
# wait for it, later ones are answered 503.
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "max_ongoing_requests": 64,
        "max_queued_requests": 64,
        **SHED,
    },
    "gpu": {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
        "max_ongoing_requests": 256,
        "max_queued_requests": 256,
        **SHED,
    },
}

# vLLM's own GPU share on the GPU profile: the engine reserves this fraction of memory,
# and the placement group asks Ray for the same fraction of the device.
GPU_FRACTION = 0.6


def deployment_name(model_id: str) -> str:
    """The name `ray.serve.llm` gives the engine deployment of `model_id`."""
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


# Guided JSON without free whitespace between fields. By default the grammar lets the
# model write newlines and spaces between JSON fields; SmolLM2 does, runs into max_tokens
# inside the JSON, and the reply is unusable. The shipped RAG prompt's six questions of
# issue 11 at 160 tokens: 6 of 6 replies cut off with the default, 3 of 6 with this.
STRUCTURED_OUTPUTS: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}


def configured_deployment_name() -> str:
    """The engine deployment's name for the configured model (the catalog's `deployment`)."""
    return deployment_name(LLMSettings().model_id)


def engine_kwargs(settings: LLMSettings, *, gpu: bool = False) -> dict[str, Any]:
    """vLLM engine arguments (all but the model) of the Serve deployment, and of the
    in-process engines that stand in for it (`deployments.llm.in_process.InProcessLLM`,
    the benchmarks' monolith), so that all of them generate alike."""
    return {
        "max_model_len": settings.max_model_len,
        "max_num_seqs": 64,
        "dtype": "auto" if gpu else settings.dtype,
        "enforce_eager": settings.enforce_eager and not gpu,
        "structured_outputs_config": dict(STRUCTURED_OUTPUTS),
    }


def simulated_engine_env() -> dict[str, str]:
    """Under a benchmark's simulated models (`servegraph.deploy.simulated`), the environment that
    makes `ray.serve.llm` run the simulated engine in place of vLLM; else nothing."""
    import os

    curves = simulated_curves()
    if curves is None or curves.llm is None:
        return {}
    return {
        "RAYLLM_VLLM_ENGINE_CLS": "deployments.llm.simulated:SimulatedEngine",
        SIMULATED_MODELS_ENV: os.environ[SIMULATED_MODELS_ENV],
    }


def engine_forkserver_env(settings: LLMSettings, *, gpu_engine: bool) -> dict[str, str]:
    """The replica's ask for its engine core forked from a preloaded server
    (`deployments.llm.forkserver`), and its model worker from the same server
    (`deployments.llm.worker_server`) where `worker_forkserver` asks: a real engine on
    CPU only. A GPU engine keeps ray.serve.llm's start (untested here), and a simulated
    one starts no engine core."""
    if gpu_engine or not settings.engine_forkserver or simulated_engine_env():
        return {}
    from deployments.llm.forkserver import ENV

    return {ENV: "worker" if settings.worker_forkserver else "1"}


def llm_config(settings: LLMSettings | None = None, overrides: dict[str, Any] | None = None) -> Any:
    from ray.serve.llm import LLMConfig

    settings = settings or LLMSettings()
    profile = ModelSettings().profile
    gpu_placement = profile == "gpu"
    gpu_engine = gpu_placement and settings.engine_device == "profile"
    engine = engine_kwargs(settings, gpu=gpu_engine)
    extra: dict[str, Any] = {"accelerator_config": {"kind": "gpu" if gpu_engine else "cpu"}}
    if gpu_engine:
        engine["gpu_memory_utilization"] = GPU_FRACTION
    if gpu_placement:
        # The GPU share is the placement group's, so Ray places the engine on a GPU node
        # whichever device the engine then runs on (a CPU engine keeps the same ask).
        extra["placement_group_config"] = {"bundles": [{"GPU": GPU_FRACTION, "CPU": 1}]}
    # A GPU engine's CPU work is its scheduler, which keeps the GPU fed: not lowered.
    nice_offset = 0 if gpu_engine else settings.cpu_nice_offset
    # Only a vLLM engine on CPU binds a model worker to cores of its own
    partition = "off" if gpu_engine or simulated_engine_env() else settings.cpu_partition
    from deployments.llm.engine import LLMServer
    from deployments.llm.partition import ENV as PARTITION_ENV

    return LLMConfig(
        model_loading_config={"model_id": settings.model_id, "model_source": settings.path},
        server_cls=LLMServer,
        # Skips the per-node download task for a model folder already on the node.
        callback_config={"callback_class": "deployments.llm.engine:PreparedWeights"},
        engine_kwargs=engine,
        deployment_config=options_for(PROFILES, profile, overrides),
        runtime_env={
            "env_vars": {
                "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
                "SERVEGRAPH_LLM_CPU_NICE_OFFSET": str(nice_offset),
                PARTITION_ENV: partition,
                "HF_HUB_OFFLINE": "1",
                # vLLM's own usage report (sent from a GPU worker to vLLM's makers):
                # nothing leaves an air-gapped site
                "VLLM_NO_USAGE_STATS": "1",
                "TRANSFORMERS_OFFLINE": "1",
                **expected_model_env(settings.path),
                **simulated_engine_env(),
                **engine_forkserver_env(settings, gpu_engine=gpu_engine),
            }
        },
        **extra,
    )


def app(args: ServerAppArgs | dict[str, Any] | None = None) -> Any:
    """The OpenAI-compatible Serve application for the configured LLM (Serve calls it
    with its config entry's args)."""
    from ray.serve.llm import build_openai_app

    from deployments.llm.ingress import GuardedIngress, offline_docs_during_build
    from servegraph.server import router_actor_options

    overrides = ServerAppArgs.of(args).overrides
    routed = router_actor_options()
    with offline_docs_during_build():
        return build_openai_app(
            {
                "llm_configs": [llm_config(overrides=overrides)],
                "ingress_cls_config": {"ingress_cls": GuardedIngress},
                "ingress_deployment_config": {"ray_actor_options": routed} if routed else {},
            }
        )
