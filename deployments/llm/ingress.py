"""`ray.serve.llm`'s OpenAI ingress with the platform's API-key check on every route
(the `llm` scope; `servegraph.security`): its FastAPI app is built inside `ray.serve.llm`,
so each route is wrapped (`guard_endpoint`) instead of the app getting a dependency.
The wrapped routes take the same bodies, so the official `openai` client works with its
`api_key` unchanged. The routes that run the model are metered for the key's LLM token
budget (`deployments.llm.metering`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI
from ray.serve.llm.ingress import OpenAiIngress

from deployments.llm.metering import meter
from deployments.llm.settings import LLMSettings
from servegraph.server import guard_endpoint, offline_docs

# OpenAiIngress's routes (ray.serve.llm's DEFAULT_ENDPOINTS). Those that run the model
# spend LLM tokens: each is held to the key's token budget, its tokens reserved before
# the call and charged after (`deployments.llm.metering`). A transcription's tokens can
# be neither sized before (audio) nor counted after: it is refused to keys with a token
# limit.
ROUTES = ("models", "model_data")
METERED = ("completions", "chat", "embeddings", "score", "tokenize", "detokenize")
UNMETERED = ("transcriptions",)


@functools.cache
def _context_tokens() -> int:
    return LLMSettings().max_model_len


class GuardedIngress(OpenAiIngress):
    """The OpenAI routes, each open only to a key with the `llm` scope."""


for _route in ROUTES + METERED + UNMETERED:
    setattr(
        GuardedIngress,
        _route,
        guard_endpoint(
            getattr(OpenAiIngress, _route),
            "llm",
            llm=_route in METERED,
            meter=meter(_route, _context_tokens) if _route in METERED else None,
            refuse_token_limited=_route in UNMETERED,
        ),
    )


def docs_as_configured(app: FastAPI) -> FastAPI:
    """The OpenAI app's docs pages as every other app of the platform has them
    (`servegraph.serving.http.make_app`): offline, or, with SERVEGRAPH_AUTH_OPEN_DOCS=false,
    none at all: no /docs, /redoc or /openapi.json (each a 404)."""
    from servegraph.server import AuthSettings

    if AuthSettings().open_docs:
        return offline_docs(app)
    docs = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url}
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in docs]
    app.openapi_url = app.docs_url = app.redoc_url = app.swagger_ui_oauth2_redirect_url = None
    return app


@contextmanager
def offline_docs_during_build() -> Iterator[None]:
    """While `build_openai_app` runs, its FastAPI app gets offline docs pages, or none
    with SERVEGRAPH_AUTH_OPEN_DOCS=false (`docs_as_configured`).

    Why by hand: `ray.serve.llm` creates the OpenAI app inside `build_openai_app` (its
    ingress module's `init()`) and offers no hook for the docs pages, which load from a
    CDN and render blank on an air-gapped network. Its app factory is wrapped for the
    duration of the build only; where a Ray version lacks it, the docs stay as Ray makes
    them (and the offline-docs test says so)."""
    try:
        from ray.llm._internal.serve.core.ingress import ingress as ray_ingress
    except ImportError:  # pragma: no cover - another Ray layout
        yield
        return
    original = getattr(ray_ingress, "init", None)
    if original is None:  # pragma: no cover - another Ray layout
        logging.getLogger(__name__).warning("ray.serve.llm's docs pages stay online-only")
        yield
        return
    ray_ingress.init = lambda: docs_as_configured(original())
    try:
        yield
    finally:
        ray_ingress.init = original
