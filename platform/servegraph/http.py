"""HTTP error shapes shared by every FastAPI surface: model servers and the ingress.

Bad input answers 4xx with the field and the fix; overload 503; timeouts 504; each
body is ``{"error": ..., ...}`` with what a caller needs to act on it.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from servegraph.errors import InvalidInputError, OverloadedError, PipelineRuntimeError

_FIXES = {
    "missing": "add the field",
    "string_too_short": "send a non-empty value",
    "string_too_long": "send at most {max_length} characters",
    "too_short": "send at least {min_length} item(s)",
    "too_long": "send at most {max_length} item(s); split larger batches",
    "greater_than_equal": "use a value >= {ge}",
    "less_than_equal": "use a value <= {le}",
    "greater_than": "use a value > {gt}",
    "literal_error": "use one of {expected}",
    "extra_forbidden": "remove the field",
    "json_invalid": "send a valid JSON body",
    "value_error": "change the value as the error says",
}


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Pydantic errors -> [{field, error, fix}], dropping FastAPI's 'body' prefix."""
    out = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        ctx = {k: v for k, v in (err.get("ctx") or {}).items()}
        template = _FIXES.get(err.get("type", ""), "send a value of type {type}")
        try:
            fix = template.format(type=err.get("type", "?").split("_")[0], **ctx)
        except (KeyError, IndexError):
            fix = template
        out.append({"field": ".".join(loc) or "(body)", "error": err.get("msg", ""), "fix": fix})
    return out


def install_error_handlers(app: FastAPI) -> None:
    """Map request and runtime errors onto 4xx/5xx bodies that name the field or node."""

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": "invalid request", "detail": field_errors(exc.errors())}, status_code=422
        )

    @app.exception_handler(InvalidInputError)
    async def _invalid_input(_: Request, exc: InvalidInputError) -> JSONResponse:
        return JSONResponse(
            {"error": "invalid request", "detail": [exc.to_detail()]}, status_code=422
        )

    @app.exception_handler(PipelineRuntimeError)
    async def _runtime(_: Request, exc: PipelineRuntimeError) -> JSONResponse:
        return JSONResponse(
            runtime_error_body(exc),
            status_code=exc.status_code,
            headers=retry_after(exc),
        )


def retry_after(exc: PipelineRuntimeError) -> dict[str, str] | None:
    """A 503 says when to come back (RFC 9110 delay-seconds, rounded up)."""
    if not isinstance(exc, OverloadedError):
        return None
    return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}


def runtime_error_body(exc: PipelineRuntimeError) -> dict[str, Any]:
    """The body of a failed run: the error's kind, the node it happened in, and why."""
    return {"error": type(exc).__name__, "node": exc.node, "detail": exc.detail}
