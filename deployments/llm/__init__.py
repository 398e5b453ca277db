"""The LLM model server: vLLM through `ray.serve.llm`, OpenAI routes at /v1.

`SERVER` is its catalog entry. Importing this package imports only pydantic models.
"""

from deployments.llm import contract as c
from servegraph import Method, Server, ServerSpec


class LLMMethods(Server, name="llm"):
    """The llm's methods, typed: a pipeline calls ``llm.<method>(<fields>)``
    (`servegraph.lang.calls`); `SERVER` takes its contracts from here."""

    # No side effect: a chat whose replica died is asked again.
    chat = Method(
        c.ChatRequest,
        c.ChatResponse,
        chunk=c.ChatChunk,
        stream_method="chat_stream",
        usage="usage",
        budget_field="max_tokens",
        idempotent=True,
    )


llm = LLMMethods()

SERVER = ServerSpec(
    name=LLMMethods.name,
    methods=LLMMethods.contracts(),
    app_builder="deployments.llm.server:app",
    deployment="deployments.llm.server:configured_deployment_name",  # depends on the model
    client="deployments.llm.client:LLMClient",  # the engine takes OpenAI requests
    in_process="deployments.llm.in_process:InProcessLLM",
    models="deployments.llm.settings:model_folders",
    prepare="deployments.llm.prepare:prepare",
    route_prefix="/",
    # A replica's start on the 2-core machine (README, "A replica's cold start"): a call
    # to this server scaled to zero that cannot wait this long is refused at once.
    cold_start_s=43.7,  # measured 2026-12-05; 34.7 at rest since, kept as a margin (README)
    description="vLLM via ray.serve.llm; OpenAI routes at /v1",
)
