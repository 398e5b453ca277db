"""`ray.serve.llm`'s OpenAI ingress with the platform's API-key check on every route
(the `llm` scope; `servegraph.auth`): its FastAPI app is built inside `ray.serve.llm`,
so each route is wrapped (`guard_endpoint`) instead of the app getting a dependency.
The wrapped routes take the same bodies, so the official `openai` client works with its
`api_key` unchanged."""

from __future__ import annotations

from ray.serve.llm.ingress import OpenAiIngress

from servegraph.server import guard_endpoint

# OpenAiIngress's routes (ray.serve.llm's DEFAULT_ENDPOINTS); the generating ones
# spend LLM tokens, so they are held to the key's token budget too.
ROUTES = ("models", "model_data", "embeddings", "transcriptions", "score", "tokenize", "detokenize")
GENERATING = ("completions", "chat")


class GuardedIngress(OpenAiIngress):
    """The OpenAI routes, each open only to a key with the `llm` scope."""


for _route in ROUTES + GENERATING:
    setattr(
        GuardedIngress,
        _route,
        guard_endpoint(getattr(OpenAiIngress, _route), "llm", llm=_route in GENERATING),
    )
