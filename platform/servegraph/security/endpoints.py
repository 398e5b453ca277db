"""The FastAPI side of the key check: `require` (a route's dependency, by scope),
`KeyBeforeBody` (the key checked before a body is read), `UsageMiddleware` and
`guard_endpoint` (the check for a route of an app the platform does not build)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.routing import Match

from servegraph.security.guard import Guard
from servegraph.security.keys import AuthError, Caller

_BEARER = HTTPBearer(
    auto_error=False, description="An API key (`servegraph keys create`), sent as a Bearer token"
)


# What every route behind `require` may answer, for its OpenAPI `responses`.
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API key: send `Authorization: Bearer <key>`"},
    403: {"description": "The key lacks the route's scope (the body names it)"},
    429: {"description": "The key is over its limit; retry after the Retry-After header"},
}


def require(scope: str | None, *, llm: bool = False, http_exception: bool = False) -> Any:
    """A FastAPI dependency that admits a request with `scope` (None: any valid key; for
    a request that will use the LLM, `llm`: within its key's token budget too) and
    returns its `Caller`. `http_exception`: refuse with FastAPI's HTTPException, for an
    app without our error handlers.

    The key is read with FastAPI's `HTTPBearer`, so the OpenAPI page documents it and
    its "Authorize" button works."""

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> Caller:
        try:
            caller = await Guard.here().check(
                credentials.credentials if credentials else None,
                scope,
                llm=llm,
                verified=getattr(request.state, _VERIFIED, None),
            )
        except AuthError as exc:
            if not http_exception:
                raise  # our apps render it (servegraph.serving.http)
            raise HTTPException(exc.status, exc.body(), exc.headers) from None
        request.state.caller = caller
        return caller

    # What `KeyBeforeBody` finds on a route to check its key before the body is read.
    setattr(dependency, _REQUIRES, (scope, http_exception))
    return dependency


_REQUIRES = "servegraph_requires"  # on a `require` dependency: (its scope, http_exception)
# On a request's state (the ASGI scope's "state", which Starlette's `request.state`
# reads): the key and caller `KeyBeforeBody` verified, for `require` to reuse.
_VERIFIED = "servegraph_verified"


class KeyBeforeBody:
    """The key checked before a byte of the request's body is read.

    FastAPI reads and parses the whole body before any dependency runs, so `require`
    alone would let a caller with no key make a replica buffer gigabytes, or hold the
    pipelines' admission places with bodies trickled slowly. This pure ASGI middleware
    finds the route a request matches (as the router will), and when that route
    `require`s a key it asks the same `Guard.authenticate`, from the Authorization
    header read as `HTTPBearer` reads it: a missing, malformed, unknown or revoked key
    is answered 401 with `WWW-Authenticate: Bearer` and the body `require` answers, a
    key without the route's scope 403, and `receive` is never called. Routes without
    `require` (the docs pages, when open) and unknown paths pass untouched.

    `require` still runs after it, on the admitted request: the limits (429), the
    caller on `request.state`, the OpenAPI's security scheme. Install it outermost, so
    nothing before it counts or reads a request without a key (`servegraph.serving.http.
    install_request_checks`)."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app = app
        self.router = router  # the app's router: its routes are read per request
        self._requires: dict[int, tuple[Any, list[tuple[str | None, bool]]]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            requires = self._route_requires(scope)
            if requires:
                key = bearer_key(scope)
                for needed, http_exception in requires:
                    try:
                        caller = Guard.here().authenticate(key, needed)
                    except AuthError as exc:
                        body = {"detail": exc.body()} if http_exception else exc.body()
                        await json_answer(send, exc.status, body, exc.headers)
                        return
                scope.setdefault("state", {})[_VERIFIED] = (key, caller)
        await self.app(scope, receive, send)

    def _route_requires(self, scope: dict[str, Any]) -> list[tuple[str | None, bool]]:
        """What the route the request matches `require`s (its dependencies', at any
        depth); nothing for no route (FastAPI answers 404 or 405 without the body)."""
        for route in self.router.routes:
            match, _ = route.matches(scope)
            if match is not Match.FULL:
                continue
            known = self._requires.get(id(route))  # routes are not hashable
            if known is None or known[0] is not route:
                found: list[tuple[str | None, bool]] = []
                stack = [getattr(route, "dependant", None)]
                while stack:
                    dependant = stack.pop()
                    if dependant is None:
                        continue
                    marked = getattr(dependant.call, _REQUIRES, None)
                    if marked is not None and marked not in found:
                        found.append(marked)
                    stack.extend(dependant.dependencies)
                known = self._requires[id(route)] = (route, found)
            return known[1]
        return []


def bearer_key(scope: dict[str, Any]) -> str | None:
    """The key an Authorization header carries, read as `HTTPBearer` reads it."""
    authorization = Headers(scope=scope).get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        return None
    return credentials


async def json_answer(
    send: Any, status: int, body: dict[str, Any], headers: dict[str, str]
) -> None:
    """A JSON answer sent straight from an ASGI middleware."""
    content = json.dumps(body, separators=(",", ":")).encode()
    raw = [
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
    ]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


class UsageMiddleware:
    """Records each answered request on its key's usage metrics (requests, errors), for
    every route that `require`d a key and did not charge it itself (`request.state.
    charged`: the pipeline routes do, with their LLM tokens). Pure ASGI, so streamed
    answers pass through untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            state = scope.get("state") or {}
            caller = state.get("caller")
            if caller is not None and not state.get("charged"):
                await Guard.here().charge(caller, status, {})


class TokenMeter(Protocol):
    """One request to an LLM route of an app we do not build, metered for its key's
    token budget (`guard_endpoint`'s `meter` makes it from the endpoint's arguments,
    and may rewrite the request on the way, e.g. to have the engine report its usage)."""

    reserve: dict[str, int]
    """Tokens to set aside before the call, by direction: the most it may spend."""

    def whole(self, body: bytes, status: int) -> None:
        """A whole answer's body: count its tokens."""

    def stream(self, piece: str) -> str:
        """A piece of a streamed answer: count its tokens; what the caller gets of it."""

    def end(self) -> str:
        """A streamed answer ended: what the caller still gets."""

    def used(self) -> dict[str, int]:
        """The tokens counted so far: {"input": n, "output": m}."""


def guard_endpoint(
    endpoint: Callable[..., Awaitable[Any]],
    scope: str,
    *,
    llm: bool = False,
    meter: Callable[..., TokenMeter] | None = None,
    refuse_token_limited: bool = False,
) -> Any:
    """`endpoint` (a FastAPI route function or method) behind `require(scope)`, for an
    app whose FastAPI object we do not build (`ray.serve.llm`'s OpenAI ingress): the
    check is added to the route's signature as a dependency, so FastAPI runs it before
    it validates the body, as on our own routes; a 401/403/429 is raised as FastAPI's
    HTTPException, which any app renders. The answer is recorded on the key's usage.

    With a `meter` (called with the endpoint's arguments), the request's LLM tokens are
    held to its key's token budget: its `reserve` is set aside before the call
    (`Guard.reserve`; 429 when the budget is spent) and replaced, when the answer ends,
    by the tokens the meter counted in it, however it ended: a stream the caller left
    early is charged what was counted up to then. A call that fails without an answer
    is charged nothing if it was refused (4xx), else its reservation (cancelled, or
    failed part-way: the engine's count is not known). `refuse_token_limited`: the
    route is refused (403) to keys with a token limit, for a route whose tokens can be
    neither sized before the call nor counted after it."""
    signature = inspect.signature(endpoint, eval_str=True)  # real types, for FastAPI
    caller_parameter = inspect.Parameter(
        "servegraph_caller",
        inspect.Parameter.KEYWORD_ONLY,
        default=Depends(require(scope, llm=llm, http_exception=True)),
        annotation=Caller,
    )

    @functools.wraps(endpoint)
    async def guarded(*args: Any, servegraph_caller: Caller, **kwargs: Any) -> Any:
        guard, caller = Guard.here(), servegraph_caller
        if refuse_token_limited and caller.tokens_per_min is not None:
            guard.usage.record(caller.name, 403, tenant=caller.tenant)
            detail = (
                "this route's LLM tokens cannot be counted, so it is not open to keys with "
                "an LLM token limit; use a key without one"
            )
            raise HTTPException(403, {"error": "forbidden", "detail": detail})
        metered = meter(*args, **kwargs) if meter is not None else None
        try:
            reserved = await guard.reserve(caller, sum(metered.reserve.values())) if metered else 0
        except AuthError as exc:
            raise HTTPException(exc.status, exc.body(), exc.headers) from None
        response, status = None, 500
        try:
            response = await endpoint(*args, **kwargs)
            return await _charged(response, guard, caller, metered, reserved)
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except Exception as exc:
            status = int(getattr(exc, "status_code", 500))
            raise
        finally:
            if response is None:
                refused = 400 <= status < 500 and status != 499
                # Not refused: the engine may have done all it was asked (its count is lost).
                tokens = dict(metered.reserve) if metered is not None and not refused else {}
                await guard.charge(caller, status, tokens, reserved=reserved)

    parameters = [*signature.parameters.values(), caller_parameter]
    guarded.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return guarded


async def _charged(
    response: Any, guard: Guard, caller: Caller, metered: TokenMeter | None, reserved: int
) -> Any:
    """The response, its tokens charged now (a whole body) or when its stream ends,
    however it ends."""
    status = getattr(response, "status_code", 200)
    body_iterator = getattr(response, "body_iterator", None)
    if body_iterator is None:
        if metered is not None:
            metered.whole(getattr(response, "body", b""), status)
        tokens = metered.used() if metered is not None else {}
        await guard.charge(caller, status, tokens, reserved=reserved)
        return response

    async def counted() -> Any:
        try:
            async for chunk in body_iterator:
                if metered is None:
                    yield chunk
                    continue
                text = chunk.decode() if isinstance(chunk, bytes) else str(chunk)
                if kept := metered.stream(text):
                    yield kept
            if metered is not None and (rest := metered.end()):
                yield rest
        finally:
            tokens = metered.used() if metered is not None else {}
            await guard.charge(caller, status, tokens, reserved=reserved)

    response.body_iterator = counted()
    return response
