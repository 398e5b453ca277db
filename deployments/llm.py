"""The LLM model server: vLLM through `ray.serve.llm` (continuous batching, streaming,
the OpenAI routes /v1/chat/completions, /v1/completions, /v1/models).

Nothing here wraps the engine by hand: `build` only configures `ray.serve.llm`.
`LLMClient` is the pipelines' side: it turns a node's typed `ChatRequest` into the
OpenAI request the `LLMServer` deployment takes, through its handle (one hop, no HTTP),
and adds what pipelines need that the OpenAI schema spreads around: guided JSON from a
plain JSON schema, token usage, and 4xx errors that name the field.
"""

from __future__ import annotations

from typing import Any

from deployments.profiles import LLM_GPU_FRACTION, options_for
from deployments.schemas import ChatRequest, ChatResponse, Usage
from deployments.settings import ModelSettings
from servegraph.errors import InvalidInputError
from servegraph.tracing import annotate


def deployment_name(model_id: str) -> str:
    """The name `ray.serve.llm` gives the engine deployment of `model_id`."""
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


def llm_config(
    settings: ModelSettings | None = None, overrides: dict[str, Any] | None = None
) -> Any:
    from ray.serve.llm import LLMConfig

    settings = settings or ModelSettings()
    gpu = settings.profile == "gpu"
    engine_kwargs: dict[str, Any] = {
        "max_model_len": settings.llm_max_model_len,
        "max_num_seqs": 64,
        "dtype": "auto" if gpu else settings.llm_dtype,
        "enforce_eager": settings.llm_enforce_eager and not gpu,
    }
    extra: dict[str, Any] = {}
    if gpu:
        engine_kwargs["gpu_memory_utilization"] = LLM_GPU_FRACTION
        extra["accelerator_config"] = {"kind": "gpu"}
        extra["placement_group_config"] = {"bundles": [{"GPU": LLM_GPU_FRACTION, "CPU": 1}]}
    else:
        extra["accelerator_config"] = {"kind": "cpu"}
    return LLMConfig(
        model_loading_config={"model_id": settings.llm_model_id, "model_source": settings.llm_path},
        engine_kwargs=engine_kwargs,
        deployment_config=options_for("llm", settings.profile, overrides),
        runtime_env={
            "env_vars": {
                "VLLM_CPU_KVCACHE_SPACE": str(settings.llm_kv_cache_gib),
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        },
        **extra,
    )


def build(overrides: dict[str, Any] | None = None) -> Any:
    """The OpenAI-compatible Serve application for the configured LLM."""
    from ray.serve.llm import build_openai_app

    return build_openai_app({"llm_configs": [llm_config(overrides=overrides)]})


class LLMClient:
    """Calls the `LLMServer` deployment with a pipeline node's typed `ChatRequest`."""

    def __init__(self, handle: Any, model_id: str | None = None) -> None:
        self.model_id = model_id or ModelSettings().llm_model_id
        # LLMServer.chat is an async generator: the handle must be a streaming one.
        self._handle = handle.options(stream=True)

    async def chat(self, request: ChatRequest) -> ChatResponse:
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [m.model_dump() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "stream": False,
        }
        if request.stop:
            body["stop"] = request.stop
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        annotate(
            **{
                "gen_ai.operation.name": "chat",
                "gen_ai.system": "vllm",
                "gen_ai.request.model": self.model_id,
                "gen_ai.request.max_tokens": request.max_tokens,
                "gen_ai.request.temperature": request.temperature,
                "servegraph.llm.guided_json": request.json_schema is not None,
            }
        )
        response = None
        async for item in self._handle.chat.remote(ChatCompletionRequest(**body), None):
            response = item
        reply = _to_chat_response(response, self.model_id)
        annotate(
            **{
                "gen_ai.usage.input_tokens": reply.usage.input_tokens,
                "gen_ai.usage.output_tokens": reply.usage.output_tokens,
                "gen_ai.response.finish_reasons": [reply.finish_reason or "unknown"],
            }
        )
        return reply


def _to_chat_response(response: Any, model_id: str) -> ChatResponse:
    error = getattr(response, "error", None)
    if error is not None:
        message = getattr(error, "message", str(error))
        code = int(getattr(error, "code", 500) or 500)
        if 400 <= code < 500:
            raise InvalidInputError("messages", message, "shorten the prompt or lower max_tokens")
        raise RuntimeError(f"LLM engine error {code}: {message}")
    choice = response.choices[0]
    usage = response.usage
    return ChatResponse(
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        model=model_id,
    )
