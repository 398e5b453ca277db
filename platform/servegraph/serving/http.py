"""HTTP error shapes shared by every FastAPI surface: model servers and the ingress.

Bad input answers 4xx with the field and the fix; overload 503; timeouts 504; each
body is ``{"error": ..., ...}`` with what a caller needs to act on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from servegraph._fields import field_errors
from servegraph.errors import (
    BudgetExceededError,
    InvalidInputError,
    NodeInputError,
    OverloadedError,
    PipelineRuntimeError,
    ServerUnavailableError,
)
from servegraph.security.endpoints import KeyBeforeBody, UsageMiddleware
from servegraph.security.keys import AuthError


class FieldProblem(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. `texts.0`.")
    error: str = Field(description="What is wrong with it.")
    fix: str = Field(description="What to send instead.")


class InvalidRequestBody(BaseModel):
    """The body of every 422: the request's fields, or a node's input, rejected."""

    error: str
    detail: list[FieldProblem]
    node: str | None = Field(None, description="The node whose input was rejected, if any.")


class ErrorBody(BaseModel):
    """The body of a failed run: 502, 503, 504 (and 422 for a node's bad input)."""

    error: str = Field(description="The error's kind, e.g. NodeTimeoutError.")
    node: str = Field(description="The node it happened in, e.g. `embed`.")
    detail: str = Field(description="Why, in words.")


class BudgetReport(BaseModel):
    max_usd: float = Field(description="The request's maximum cost.")
    spent_usd: float = Field(description="What its finished calls had cost.")
    left_usd: float = Field(description="What was left for the node, after calls running.")
    estimate_usd: float = Field(description="The node's estimated cost (at one token, an LLM).")


class BudgetErrorBody(ErrorBody):
    """402: the request's maximum cost does not cover the node it stopped before."""

    budget: BudgetReport


OFFLINE_STATIC = "/static-offline-docs"


def make_app(**options: Any) -> FastAPI:
    """A FastAPI app for a platform surface, its docs pages offline (`offline_docs`);
    with SERVEGRAPH_AUTH_OPEN_DOCS=false there are no docs pages at all."""
    from servegraph.security.keys import AuthSettings

    if not AuthSettings().open_docs:
        return FastAPI(docs_url=None, redoc_url=None, openapi_url=None, **options)
    return offline_docs(FastAPI(**options))


def offline_docs(app: FastAPI) -> FastAPI:
    """`app` with its docs pages (Swagger UI, ReDoc) loading their JS and CSS from the
    files `fastapi-offline` installs, not from a CDN, so they render on an air-gapped
    network. Done on an existing app (rather than `FastAPIOffline()`) so it also serves
    the apps other libraries build (`ray.serve.llm`'s OpenAI app). Links are relative to
    the app's mount point (`root_path`: Serve's route prefix)."""
    import fastapi_offline
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from starlette.responses import HTMLResponse

    static_dir = Path(fastapi_offline.__file__).parent / "static"
    docs_url, redoc_url, openapi_url = app.docs_url, app.redoc_url, app.openapi_url
    if openapi_url is None:
        return app
    app.router.routes = [
        r for r in app.router.routes if getattr(r, "path", None) not in (docs_url, redoc_url)
    ]
    app.mount(OFFLINE_STATIC, StaticFiles(directory=static_dir), name="static-offline-docs")
    if docs_url:

        @app.get(docs_url, include_in_schema=False)
        async def swagger(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_swagger_ui_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{OFFLINE_STATIC}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{OFFLINE_STATIC}/swagger-ui.css",
                swagger_favicon_url=f"{root}{OFFLINE_STATIC}/favicon.png",
            )

    if redoc_url:

        @app.get(redoc_url, include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_redoc_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{OFFLINE_STATIC}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{OFFLINE_STATIC}/favicon.png",
                with_google_fonts=False,
            )

    return app


def _version(request: Request) -> dict[str, str]:
    """The pipeline version that ran a request which failed (none before it was chosen):
    a failed answer names its version as a successful one does."""
    version = getattr(request.state, "pipeline_version", None)
    return {"x-pipeline-version": version} if version else {}


def install_error_handlers(app: FastAPI) -> None:
    """Map request, auth and runtime errors onto 4xx/5xx bodies that name the field,
    scope or node, document the 422 body as it really is (FastAPI documents its own
    default), and record each answer on its API key's usage."""
    _document_422(app)
    app.add_middleware(UsageMiddleware)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": "invalid request", "detail": field_errors(list(exc.errors()))},
            status_code=422,
        )

    @app.exception_handler(InvalidInputError)
    async def _invalid_input(_: Request, exc: InvalidInputError) -> JSONResponse:
        return JSONResponse(
            {"error": "invalid request", "detail": [exc.to_detail()]}, status_code=422
        )

    @app.exception_handler(PipelineRuntimeError)
    async def _runtime(request: Request, exc: PipelineRuntimeError) -> JSONResponse:
        return JSONResponse(
            runtime_error_body(exc),
            status_code=exc.status_code,
            headers=(retry_after(exc) or {}) | _version(request),
        )

    @app.exception_handler(AuthError)
    async def _auth(_: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ServerUnavailableError)
    async def _unavailable(request: Request, exc: ServerUnavailableError) -> JSONResponse:
        return JSONResponse(
            _unavailable_body(exc),
            status_code=503,
            headers=_retry_after_header(exc.retry_after_s) | _version(request),
        )


def install_request_checks(
    app: FastAPI, max_body_bytes: int | None = None, routes: dict[str, int] | None = None
) -> None:
    """What is checked of a request before its body is read, outermost in `app`: the key
    (`servegraph.security.endpoints.KeyBeforeBody`: 401 or 403 without reading the body), then the
    body's size (`BodyLimit`: 413). Limits default to `AppSettings.max_body_bytes` and
    `max_body_bytes_routes` (SERVEGRAPH_MAX_BODY_BYTES, ..._ROUTES).

    Call it after every other middleware is added: Starlette runs the middleware added
    last first, and nothing may count or read a request before its key is checked (the
    ingress's admission gate must not count a request without a key)."""
    from servegraph.settings import AppSettings

    if max_body_bytes is None or routes is None:
        settings = AppSettings()
        max_body_bytes = settings.max_body_bytes if max_body_bytes is None else max_body_bytes
        routes = settings.max_body_bytes_routes if routes is None else routes
    app.add_middleware(BodyLimit, max_body_bytes=max_body_bytes, routes=routes)
    app.add_middleware(KeyBeforeBody, router=app.router)
    _document_413(app)


class BodyTooLargeError(Exception):
    """Raised from `receive` when a body passes its route's limit (`BodyLimit`)."""


class BodyLimit:
    """ASGI middleware bounding each request's body: a route's limit (`routes`: the
    path as the caller sends it, and the paths below it -> bytes; else
    `max_body_bytes`). A Content-Length past it is answered 413 before the body is
    read; a body without one (chunked) is counted as it arrives, and answered 413 as
    soon as it passes the limit, whatever the app would have answered to the body cut
    short. The 413's body names the limit and the fix."""

    def __init__(self, app: Any, max_body_bytes: int, routes: dict[str, int]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Longest first: the most particular route's limit wins.
        self.routes = sorted(
            ((path.rstrip("/") or "/", limit) for path, limit in routes.items()),
            key=lambda route: -len(route[0]),
        )

    def limit_of(self, scope: dict[str, Any]) -> int:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and not path.startswith(root):
            path = root + path  # the path as the caller sent it, the mount point included
        for prefix, limit in self.routes:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return limit
        return self.max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.strip().isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        received, over, started = 0, False, False

        async def receiving() -> dict[str, Any]:
            nonlocal received, over
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLargeError(f"the body passed {limit} bytes")
            return message

        async def sending(message: dict[str, Any]) -> None:
            nonlocal started
            if over:
                return  # what the app answers to a body cut short: the 413 replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receiving, sending)
        except Exception:
            if not over:
                raise
        if over and not started:
            await _too_large(send, limit)


async def _too_large(send: Any, limit: int) -> None:
    body = ErrorBody(
        error="BodyTooLargeError",
        node="(request)",
        detail=f"the request's body is larger than this route's limit of {limit} bytes "
        f"({limit / 2**20:.3g} MiB); fix: send less in one request (split a batch into "
        "several), or raise the limit (SERVEGRAPH_MAX_BODY_BYTES, or for one route "
        "SERVEGRAPH_MAX_BODY_BYTES_ROUTES)",
    )
    content = json.dumps(body.model_dump(), separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": content})


def _document_413(app: FastAPI) -> None:
    """Every operation that takes a body documents the 413 `BodyLimit` answers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if "requestBody" not in operation:
                    continue
                components.setdefault("ErrorBody", ErrorBody.model_json_schema())
                operation.setdefault("responses", {}).setdefault(
                    "413",
                    {
                        "description": "The body is larger than the route's limit (the body "
                        "names it and the fix)",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorBody"}
                            }
                        },
                    },
                )
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_422(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            if "HTTPValidationError" in schemas:
                # Every route's 422 refers to this component: make it our body.
                body = InvalidRequestBody.model_json_schema(
                    ref_template="#/components/schemas/{model}"
                )
                schemas.update(body.pop("$defs", {}))
                schemas["HTTPValidationError"] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def retry_after(exc: PipelineRuntimeError) -> dict[str, str] | None:
    """A 503 says when to come back (RFC 9110 delay-seconds, rounded up)."""
    if not isinstance(exc, OverloadedError):
        return None
    return _retry_after_header(exc.retry_after_s)


def _retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _unavailable_body(exc: ServerUnavailableError) -> dict[str, Any]:
    return {"error": "ServerUnavailableError", "node": exc.server, "detail": str(exc)}


def runtime_error_body(exc: PipelineRuntimeError) -> dict[str, Any]:
    """The body of a failed run: the error's kind, the node it happened in, and why; a
    node's rejected input has the 422 shape, each field with its fix."""
    if isinstance(exc, NodeInputError):
        problems = exc.problems or [{"field": "(input)", "error": exc.detail, "fix": ""}]
        return {"error": "invalid request", "node": exc.node, "detail": problems}
    if isinstance(exc, BudgetExceededError):
        report = BudgetReport(
            max_usd=exc.max_usd,
            spent_usd=exc.spent_usd,
            left_usd=exc.left_usd,
            estimate_usd=exc.estimate_usd,
        )
        body = BudgetErrorBody(
            error=type(exc).__name__, node=exc.node, detail=exc.detail, budget=report
        )
        return body.model_dump()
    return {"error": type(exc).__name__, "node": exc.node, "detail": exc.detail}
