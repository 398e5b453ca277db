"""What a replica checks each request with (`Guard`): the key and its scope against the
store, the key's limits in the shared limiter, its usage in the metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from servegraph.security.keys import (
    ANONYMOUS,
    AuthError,
    AuthSettings,
    Caller,
    KeyStore,
    unauthorized,
)

_log = logging.getLogger(__name__)


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
            from servegraph.security.limits import shared_limiter

            self._limiter = shared_limiter()
        return self._limiter

    @property
    def usage(self) -> Any:
        if self._usage is None:
            from servegraph.telemetry.metrics import KeyUsageMetrics

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
            self.usage.record(caller.name, 403, tenant=caller.tenant)
            raise AuthError(403, f"this key lacks the scope {scope!r}; create a key that has it")
        return caller

    async def reserve(self, caller: Caller, tokens: int) -> int:
        """Before a request uses the LLM: the most it may spend, `tokens` (its prompt's
        estimate plus its max_tokens), set aside from the key's token budget, so that
        requests running at once see each other's; the tokens reserved, which `charge`
        settles (0 for a key without a token limit). AuthError 429 when the budget is
        spent, by requests still running too (`servegraph.security.limits.Limiter.reserve`)."""
        if caller is ANONYMOUS or caller.tokens_per_min is None:
            return 0
        tokens = max(int(tokens), 0)
        name, per_min = caller.name, caller.tokens_per_min
        asking = _hold(self._limit("reserve", name, tokens, per_min))
        try:
            wait_s = await asyncio.shield(asking)
        except asyncio.CancelledError:
            # The client hung up while the limiter answered. The limiter may take the
            # tokens all the same, and the request will never settle them (it holds no
            # reservation): once it has answered, what it took goes back.
            def give_back(done: asyncio.Future[float]) -> None:
                if not done.cancelled() and done.exception() is None and done.result() <= 0:
                    _hold(self._limit("settle", name, tokens, 0, per_min))

            asking.add_done_callback(give_back)
            raise
        if wait_s > 0:
            raise self._over_limit(
                caller, "its LLM token limit (its requests running now included)", wait_s
            )
        return tokens

    def _over_limit(self, caller: Caller, limit: str, wait_s: float) -> AuthError:
        """A 429 for `caller`, over `limit` for `wait_s` more seconds (counted on its
        usage)."""
        self.usage.record(caller.name, 429, tenant=caller.tenant)
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
        tenant: str | None = None,
    ) -> None:
        """When a request ends, however it ended: its usage (and cost) on the key's
        metrics, and its LLM tokens on the key's token budget in place of the tokens it
        `reserve`d (a refund of what it did not use, or a charge for what it used
        beyond them). `tenant`: the one the request ran for (default: the key's).

        Safe in the `finally` of a request being cancelled (a client that hung up): the
        budget's update runs to its end in a task of its own, as an ASGI server keeps
        cancelling every await of a response whose client is gone."""
        if caller is ANONYMOUS:
            return
        self.usage.record(caller.name, status, tokens, usd, tenant=tenant or caller.tenant)
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


def _hold(work: Awaitable[Any]) -> asyncio.Future[Any]:
    """`work` in a task of its own, held until it is done."""
    task = asyncio.ensure_future(work)
    _OUTLIVING.add(task)
    task.add_done_callback(_OUTLIVING.discard)
    return task


async def _outliving(work: Awaitable[Any]) -> Any:
    """`work`'s result; if the awaiting task is cancelled, `work` still runs to its end
    (in a task of its own, held until then)."""
    return await asyncio.shield(_hold(work))
