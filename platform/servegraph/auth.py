"""API keys with scopes, per-key rate limits and usage: the one check every HTTP surface
of the platform applies (the pipeline ingress, each model server's gateway, the LLM's
OpenAI routes).

Ray Serve ships no authentication for the data plane, so this is ours:

- **Keys** look like ``sg_<id>_<secret>``: a 12-hex-digit id to find the record, and 32
  random bytes (`secrets.token_urlsafe`) that only the caller holds. The store keeps the
  SHA-256 of the secret, never the key; 256 random bits need no slow password hash
  (nothing to brute-force), and the comparison is constant-time (`hmac.compare_digest`),
  made against a dummy hash too when the id is unknown.
- **The store** is one SQLite file (`AuthSettings.keys`, default
  ``$SERVEGRAPH_HOME/auth/keys.sqlite3``). Every replica keeps what it read, and re-reads
  it when the file changed (a `stat` per request) and at least every
  `AuthSettings.cache_s` (2 s, for filesystems whose modification times lag): a revoked
  key stops working at the next request on local disk, within 2 s anywhere. On a
  cluster the file must be on storage every node mounts (see cluster.yaml).
- **Scopes**: ``invoke:<pipeline>`` or ``invoke:*``; ``write:<pipeline>`` or ``write:*``
  for a pipeline that writes (one that calls a method its contract marks `writes`, e.g.
  ``rag_ingest``); ``llm`` for the OpenAI routes; ``admin`` for everything, including
  the model servers' own REST surfaces.
- **Answers**: no key, a malformed, unknown or revoked one: 401 with
  ``WWW-Authenticate: Bearer``, the same body whichever it was; a valid key without the
  scope: 403 naming the scope; over a limit: 429 with ``Retry-After``. No body, log,
  span or metric carries the key: metrics and spans name the key's *name*.
- **Limits** (requests per second, LLM tokens per minute, set per key) are token
  buckets in one shared actor (`servegraph.limits`), so they hold across every ingress
  replica, not per replica. Keys without limits never call it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import inspect
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.datastructures import Headers
from starlette.routing import Match

from servegraph.errors import ServegraphError

_log = logging.getLogger(__name__)
KEY_PATTERN = re.compile(r"^sg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
SCOPE_PATTERN = re.compile(r"^(admin|llm|(invoke|write):(\*|[A-Za-z0-9_.-]+))$")
LOCAL_ADMIN = "local-admin"
_DUMMY_HASH = hashlib.sha256(b"servegraph: no such key").hexdigest()
_LAST_USED_EVERY_S = 60.0  # how often one replica records a key's last use
_BEARER = HTTPBearer(
    auto_error=False, description="An API key (`servegraph keys create`), sent as a Bearer token"
)


class AuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_AUTH_", extra="ignore")

    unsafe_disabled: bool = Field(
        False,
        description="UNSAFE: serve every route to anyone who can reach the port, no key "
        "asked. Only for a machine nobody else can reach.",
    )
    keys: Path | None = Field(
        None, description="The key store (SQLite); default $SERVEGRAPH_HOME/auth/keys.sqlite3."
    )
    cache_s: float = Field(2.0, ge=0, le=60, description="How stale a replica's keys may be.")
    open_docs: bool = Field(
        True, description="Serve /docs and /openapi.json without a key (false: not at all)."
    )

    @property
    def store_path(self) -> Path:
        if self.keys:
            return self.keys
        home = Path(os.environ.get("SERVEGRAPH_HOME", "var")).resolve()
        return home / "auth" / "keys.sqlite3"

    @property
    def local_key_file(self) -> Path:
        """Where `make run` keeps the local user's admin key (mode 0600)."""
        return self.store_path.parent / f"{LOCAL_ADMIN}.key"


# What every route behind `require` may answer, for its OpenAPI `responses`.
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API key: send `Authorization: Bearer <key>`"},
    403: {"description": "The key lacks the route's scope (the body names it)"},
    429: {"description": "The key is over its limit; retry after the Retry-After header"},
}


class AuthError(ServegraphError):
    """401, 403 or 429: the HTTP layer turns it into that answer (`servegraph.http`)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        kinds = {401: "unauthorized", 403: "forbidden", 429: "rate limited"}
        return {"error": kinds.get(self.status, "error"), "detail": self.detail}


UNAUTHORIZED = (
    "send a valid API key as `Authorization: Bearer <key>` "
    "(create one with `servegraph keys create`)"
)


def unauthorized() -> AuthError:
    return AuthError(401, UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="servegraph"'})


class KeySpec(BaseModel):
    """A key's record, as stored (the secret only as its hash)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    scopes: list[str] = Field(min_length=1)
    requests_per_s: float | None = Field(None, gt=0, description="None: no limit.")
    tokens_per_min: int | None = Field(None, gt=0, description="LLM tokens; None: no limit.")
    created: float = Field(default_factory=time.time)
    last_used: float | None = None

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:
            if not SCOPE_PATTERN.match(scope):
                raise ValueError(
                    f"unknown scope {scope!r}: use admin, llm, invoke:<pipeline>, "
                    "invoke:*, write:<pipeline> or write:*"
                )
        return scopes


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's name (never the key), its scopes and limits."""

    name: str
    scopes: frozenset[str]
    requests_per_s: float | None = None
    tokens_per_min: int | None = None

    def allows(self, scope: str) -> bool:
        if "admin" in self.scopes or scope in self.scopes:
            return True
        kind, _, _ = scope.partition(":")
        return f"{kind}:*" in self.scopes

    @property
    def limited(self) -> bool:
        return self.requests_per_s is not None or self.tokens_per_min is not None


ANONYMOUS = Caller("anonymous", frozenset({"admin"}))  # only when auth is unsafe_disabled


class KeyStore:
    """The durable key store: create, list, revoke; and `verify` for the replicas."""

    def __init__(self, path: Path, cache_s: float = 2.0) -> None:
        self.path = Path(path)
        self.cache_s = cache_s
        # The files `_version` stats on every request, as strings (`os.stat` on a str
        # skips pathlib's per-call conversion).
        self._watched = (str(self.path), str(self.path) + "-wal")
        self._lock = threading.Lock()
        self._loaded_at = -1e9
        self._records: dict[str, tuple[str, Caller]] = {}  # key id -> (secret hash, caller)
        self._seen: tuple[tuple[int, int], ...] = ()
        self._last_used: dict[str, float] = {}

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self._private_files()
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, name TEXT NOT NULL "
                "UNIQUE, secret_sha256 TEXT NOT NULL, spec TEXT NOT NULL)"
            )
            yield db
        finally:
            db.close()

    def create(
        self,
        name: str,
        scopes: list[str],
        requests_per_s: float | None = None,
        tokens_per_min: int | None = None,
    ) -> str:
        """A new key; returned once, stored only as a hash. Raises if `name` is taken."""
        spec = KeySpec(
            name=name, scopes=scopes, requests_per_s=requests_per_s, tokens_per_min=tokens_per_min
        )
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with self._db() as db:
            try:
                db.execute(
                    "INSERT INTO keys VALUES (?, ?, ?, ?)",
                    (key_id, name, _sha256(secret), spec.model_dump_json()),
                )
            except sqlite3.IntegrityError:
                raise ValueError(
                    f"a key named {name!r} exists: revoke it first, or pick another name"
                ) from None
        return f"sg_{key_id}_{secret}"

    def _private_files(self) -> None:
        """The store readable by its owner only, before SQLite opens it: its directory
        0700 where this creates it, the database created 0600 (SQLite gives the `-wal`
        and `-shm` files it creates the database's own mode), and a database, `-wal` or
        `-shm` left readable by others (an earlier version, a copy) tightened to 0600."""
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # empty: a database
        for path in (self.path, *(self.path.with_name(self.path.name + s) for s in _SIDE_FILES)):
            _owner_only(path)

    def list(self) -> list[KeySpec]:
        with self._db() as db:
            rows = db.execute("SELECT spec FROM keys ORDER BY name").fetchall()
        return [KeySpec.model_validate_json(spec) for (spec,) in rows]

    def revoke(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM keys WHERE name = ?", (name,)).rowcount > 0

    def verify(self, key: str) -> Caller | None:
        """The caller a key belongs to, or None (malformed, unknown or revoked)."""
        match = KEY_PATTERN.match(key)
        key_id, secret = match.groups() if match else ("", key)
        self._refresh()
        stored, caller = self._records.get(key_id, (_DUMMY_HASH, None))
        if not hmac.compare_digest(_sha256(secret), stored) or caller is None:
            return None
        self._touch(key_id)
        return caller

    def _version(self) -> tuple[tuple[int, int], ...]:
        """What changes when any process commits to the store: the database and its
        write-ahead log's modification times and sizes (one `stat` each, microseconds)."""
        stats = []
        for path in self._watched:
            try:
                st = os.stat(path)
                stats.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stats.append((0, 0))
        return tuple(stats)

    def _refresh(self) -> None:
        """Re-read the keys when the store changed (a key created or revoked by any
        process is seen by the next request), and at least every `cache_s`, for
        filesystems whose modification times lag (NFS)."""
        now = time.monotonic()
        version = self._version()
        if version == self._seen and now - self._loaded_at < self.cache_s:
            return
        with self._lock:
            version = self._version()
            if version == self._seen and now - self._loaded_at < self.cache_s:
                return
            if not self.path.exists():
                records: dict[str, tuple[str, Caller]] = {}
            else:
                with self._db() as db:
                    rows = db.execute("SELECT id, secret_sha256, spec FROM keys").fetchall()
                records = {}
                for key_id, digest, text in rows:
                    spec = KeySpec.model_validate_json(text)
                    records[key_id] = (
                        digest,
                        Caller(
                            spec.name,
                            frozenset(spec.scopes),
                            spec.requests_per_s,
                            spec.tokens_per_min,
                        ),
                    )
            self._records, self._loaded_at, self._seen = records, time.monotonic(), version

    def _touch(self, key_id: str) -> None:
        """Record the key's last use, at most once a minute per replica (a write per
        request from every replica would serialise them all on the file)."""
        now = time.time()
        if now - self._last_used.get(key_id, 0.0) < _LAST_USED_EVERY_S:
            return
        self._last_used[key_id] = now
        try:
            with self._db() as db:
                row = db.execute("SELECT spec FROM keys WHERE id = ?", (key_id,)).fetchone()
                if row:
                    spec = json.loads(row[0]) | {"last_used": now}
                    db.execute("UPDATE keys SET spec = ? WHERE id = ?", (json.dumps(spec), key_id))
        except sqlite3.Error:
            pass  # last-used is informational; never fail a request on it

    def ensure_local_admin(self, key_file: Path) -> tuple[str, bool]:
        """The local user's admin key, created once: (key, created now). A lost key file
        means a new key (the old record is revoked: the store cannot give a key back)."""
        if key_file.exists():
            _owner_only(key_file)  # one left readable by others (0644) is tightened
            key = key_file.read_text().strip()
            if self.verify(key) is not None:
                return key, False
        self.revoke(LOCAL_ADMIN)
        key = self.create(LOCAL_ADMIN, ["admin"])
        if not key_file.parent.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through os.open: 0600 first
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        return key, True


_SIDE_FILES = ("-wal", "-shm")  # what SQLite keeps next to a database in WAL mode


def _owner_only(path: Path) -> None:
    """`path` at mode 0600 if others (group, world) may read or write it; nothing if it
    does not exist. A file this process may not change (another user's) is left as it
    is, with a warning naming it."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.warning("could not make %s readable by its owner only: %s", path, exc)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Guard:
    """What a replica checks a request with: the key store, the limits, the usage
    metrics. One per replica (`Guard.here()`)."""

    _here: Guard | None = None

    def __init__(
        self,
        settings: AuthSettings | None = None,
        limiter: Any = None,
        usage: Any = None,
    ) -> None:
        self.settings = settings or AuthSettings()
        self.store = KeyStore(self.settings.store_path, self.settings.cache_s)
        self._limiter = limiter
        self._usage = usage

    @classmethod
    def here(cls) -> Guard:
        if cls._here is None:
            cls._here = Guard()
        return cls._here

    @property
    def limiter(self) -> Any:
        if self._limiter is None:
            from servegraph.limits import shared_limiter

            self._limiter = shared_limiter()
        return self._limiter

    @property
    def usage(self) -> Any:
        if self._usage is None:
            from servegraph.metrics import KeyUsageMetrics

            self._usage = KeyUsageMetrics.create()
        return self._usage

    async def check(
        self,
        key: str | None,
        scope: str | None,
        *,
        llm: bool = False,
        verified: tuple[str | None, Caller] | None = None,
    ) -> Caller:
        """The caller, if its key (None: none was sent) is valid, has `scope` (None: any
        key will do) and is within its limits (for a request that will use the LLM,
        `llm`: its token budget too); else AuthError. `verified`: the key and caller
        `KeyBeforeBody` found for this request, used when it is the same key and allows
        `scope` (one look-up per request, not two)."""
        if (
            verified is not None
            and verified[0] == key
            and (scope is None or verified[1].allows(scope))
        ):
            caller = verified[1]
        else:
            caller = self.authenticate(key, scope)
        if caller.limited:
            wait_s = await self._limit(
                "admit", caller.name, caller.requests_per_s, caller.tokens_per_min if llm else None
            )
            if wait_s > 0:
                raise self._over_limit(caller, "its limit", wait_s)
        return caller

    def authenticate(self, key: str | None, scope: str | None) -> Caller:
        """The caller, if its key is valid and has `scope` (None: any key will do); else
        AuthError (401, or 403 recorded on the key's usage). `check` without the limits:
        no await, nothing counted, so `KeyBeforeBody` asks it too, before the body."""
        if self.settings.unsafe_disabled:
            return ANONYMOUS
        caller = self.store.verify(key) if key else None
        if caller is None:
            raise unauthorized()
        if scope is not None and not caller.allows(scope):
            self.usage.record(caller.name, 403)
            raise AuthError(403, f"this key lacks the scope {scope!r}; create a key that has it")
        return caller

    async def reserve(self, caller: Caller, tokens: int) -> int:
        """Before a request uses the LLM: the most it may spend, `tokens` (its prompt's
        estimate plus its max_tokens), set aside from the key's token budget, so that
        requests running at once see each other's; the tokens reserved, which `charge`
        settles (0 for a key without a token limit). AuthError 429 when the budget is
        spent, by requests still running too (`servegraph.limits.Limiter.reserve`)."""
        if caller is ANONYMOUS or caller.tokens_per_min is None:
            return 0
        tokens = max(int(tokens), 0)
        wait_s = await self._limit("reserve", caller.name, tokens, caller.tokens_per_min)
        if wait_s > 0:
            raise self._over_limit(
                caller, "its LLM token limit (its requests running now included)", wait_s
            )
        return tokens

    def _over_limit(self, caller: Caller, limit: str, wait_s: float) -> AuthError:
        """A 429 for `caller`, over `limit` for `wait_s` more seconds (counted on its
        usage)."""
        self.usage.record(caller.name, 429)
        return AuthError(
            429,
            f"key {caller.name!r} is over {limit}; retry after the Retry-After header's seconds",
            {"Retry-After": str(max(1, int(wait_s + 0.999)))},
        )

    async def charge(
        self,
        caller: Caller,
        status: int,
        tokens: dict[str, int],
        usd: float = 0.0,
        reserved: int = 0,
    ) -> None:
        """When a request ends, however it ended: its usage (and cost) on the key's
        metrics, and its LLM tokens on the key's token budget in place of the tokens it
        `reserve`d (a refund of what it did not use, or a charge for what it used
        beyond them).

        Safe in the `finally` of a request being cancelled (a client that hung up): the
        budget's update runs to its end in a task of its own, as an ASGI server keeps
        cancelling every await of a response whose client is gone."""
        if caller is ANONYMOUS:
            return
        self.usage.record(caller.name, status, tokens, usd)
        spent = sum(tokens.values())
        if caller.tokens_per_min is not None and (spent or reserved):
            await _outliving(
                self._limit("settle", caller.name, reserved, spent, caller.tokens_per_min)
            )

    async def _limit(self, method: str, *args: Any) -> float:
        """A limiter call: the shared actor's answer (awaited), or an in-process one.

        If the actor cannot answer (it is restarting after a death), the request is
        admitted: a limit is a fairness control, and refusing every limited key's
        requests, or answering 500, while it restarts would be worse than letting a few
        through. The actor restarts on its own (`max_restarts=-1`)."""
        try:
            result = getattr(self.limiter, method)(*args)
            return float(await result if isinstance(result, Awaitable) else result)
        except Exception as exc:
            self._limiter = None  # find (or create) the actor again next time
            _log.warning("rate limiter unavailable (%s); admitting", type(exc).__name__)
            return 0.0


_OUTLIVING: set[asyncio.Future[Any]] = set()  # held until done: asyncio keeps weak refs


async def _outliving(work: Awaitable[Any]) -> Any:
    """`work`'s result; if the awaiting task is cancelled, `work` still runs to its end
    (in a task of its own, held until then)."""
    task = asyncio.ensure_future(work)
    _OUTLIVING.add(task)
    task.add_done_callback(_OUTLIVING.discard)
    return await asyncio.shield(task)


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
                raise  # our apps render it (servegraph.http)
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
    nothing before it counts or reads a request without a key (`servegraph.http.
    install_request_checks`)."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app = app
        self.router = router  # the app's router: its routes are read per request
        self._requires: dict[int, tuple[Any, list[tuple[str | None, bool]]]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            requires = self._route_requires(scope)
            if requires:
                key = _bearer_key(scope)
                for needed, http_exception in requires:
                    try:
                        caller = Guard.here().authenticate(key, needed)
                    except AuthError as exc:
                        body = {"detail": exc.body()} if http_exception else exc.body()
                        await _answer(send, exc.status, body, exc.headers)
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


def _bearer_key(scope: dict[str, Any]) -> str | None:
    """The key an Authorization header carries, read as `HTTPBearer` reads it."""
    authorization = Headers(scope=scope).get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        return None
    return credentials


async def _answer(send: Any, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
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
            guard.usage.record(caller.name, 403)
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


def ensure_local_admin_key() -> tuple[Path, bool] | None:
    """`servegraph run`'s step: the local user's admin key, created once, in its file
    (mode 0600): (the file, created now). None when auth is off."""
    settings = AuthSettings()
    if settings.unsafe_disabled:
        return None
    store = KeyStore(settings.store_path)
    _, created = store.ensure_local_admin(settings.local_key_file)
    return settings.local_key_file, created


def client_headers() -> dict[str, str]:
    """What a local client (the start-up hooks, benchmarks, examples, tests) sends: the
    key in `SERVEGRAPH_API_KEY`, else the local user's admin key that `servegraph run`
    stored (`AuthSettings.local_key_file`); none if neither exists."""
    key = os.environ.get("SERVEGRAPH_API_KEY")
    if not key:
        path = AuthSettings().local_key_file
        key = path.read_text().strip() if path.exists() else None
    return {"authorization": f"Bearer {key}"} if key else {}
