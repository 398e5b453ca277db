"""The ingress's side of pipeline versions (issue 28): which version runs a request
(a FastAPI dependency, before any work), shadow runs beside the primary, and the
routes that read and set a pipeline's traffic split.

The arithmetic of the choice is `servegraph.serving.traffic`; this module is its use
on one ingress replica.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' types.
import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from servegraph.engine import tokens
from servegraph.engine.runtime import NodeRecord, Runtime, default_deadline
from servegraph.errors import PipelineRuntimeError
from servegraph.lang.compiled import CompiledGraph
from servegraph.lang.discovery import version_order
from servegraph.security.endpoints import RESPONSES, require
from servegraph.security.keys import Caller
from servegraph.serving.traffic import (
    Board,
    Route,
    TrafficSplit,
    TrafficView,
    UnknownVersion,
    agreement,
    default_split,
    route,
)

logger = logging.getLogger("ray.serve")

# Shadow runs of one pipeline that one ingress replica keeps going at once: past it a
# request gets no shadow (and the count of skipped shadows says so), so the shadow's
# work never queues without bound behind the primaries it is meant to be measured
# against.
MAX_SHADOWS = 32
BOARD_TIMEOUT_S = 5.0  # a read or write of the traffic board, before it is given up
RECENT_SHADOWS = 200  # comparisons a replica keeps to show (GET /<name>/shadow)

PIN_DOC = (
    "Run this version of the pipeline (else the traffic split chooses); an unknown "
    "version is answered 404 naming the versions served. The answer's own "
    "X-Pipeline-Version says which version answered."
)
SESSION_DOC = "What the traffic split keeps a caller on one version by (else the key's name)."


def install_unknown_version_handler(app: FastAPI) -> None:
    @app.exception_handler(UnknownVersion)
    async def _unknown(_: Request, exc: UnknownVersion) -> JSONResponse:
        return JSONResponse(
            {"error": "unknown version", "detail": str(exc), "versions": exc.served},
            status_code=404,
        )


def version_picker(
    name: str, served: Mapping[str, CompiledGraph], traffic: TrafficView | None, guard: Any
) -> Callable[..., Awaitable[Route]]:
    """A FastAPI dependency: the version (and shadow) of one request of `name`."""
    versions = frozenset(served)

    async def pick_version(
        caller: Caller = Depends(guard),  # noqa: B008  # FastAPI's way
        x_pipeline_version: str | None = Header(None, max_length=200, description=PIN_DOC),
        x_session_id: str | None = Header(None, max_length=200, description=SESSION_DOC),
    ) -> Route:
        split = traffic.split(name) if traffic is not None else default_split(versions)
        return route(
            name, split, versions, caller=x_session_id or caller.name, pinned=x_pipeline_version
        )

    return pick_version


class Signals:
    """Each version's answer signals (`Graph.signals`), read from an answer and
    recorded per version and role. Reading them never fails a request: a signal
    function that raises is logged, and the answer goes out all the same."""

    def __init__(self, name: str, served: Mapping[str, CompiledGraph], metrics: Any) -> None:
        from servegraph.lang.graph import resolve, signal_names

        self.name, self.metrics = name, metrics
        self.readers: dict[str, Callable[[Any], Mapping[str, Any]]] = {
            v: resolve(c.graph.signals) for v, c in served.items() if c.graph.signals
        }
        # What each version declares (its TypedDict), for a rollout's gates to name.
        self.names = {v: list(signal_names(r) or ()) for v, r in self.readers.items()}

    def record(self, version: str, role: str, output: Any) -> dict[str, float]:
        reader = self.readers.get(version)
        if reader is None or self.metrics is None:
            return {}
        try:
            signals = {k: float(v) for k, v in reader(output).items()}
            self.metrics.record_signals(self.name, version, role, signals)
        except Exception:
            logger.exception("reading the answer signals of %s at %s failed", self.name, version)
            return {}
        return signals


@dataclass
class ShadowRecord:
    """One shadowed request, as `GET /<name>/shadow` shows it."""

    primary: str
    shadow: str
    primary_status: int
    shadow_status: int
    primary_ms: float
    shadow_ms: float
    agreement: float | None
    at: float = field(default_factory=time.time)


class Shadows:
    """One pipeline's shadow runs on this replica: started beside the primary, never
    awaited by the caller, each recorded (metrics by version with role "shadow", the
    agreement of the two answers, and the recent ones in memory)."""

    def __init__(
        self,
        name: str,
        runtime: Runtime,
        served: Mapping[str, CompiledGraph],
        metrics: Any,
        signals: Signals | None = None,
    ) -> None:
        self.name, self.runtime, self.served, self.metrics = name, runtime, served, metrics
        self.signals = signals
        self.running: set[asyncio.Task[None]] = set()
        self.recent: deque[ShadowRecord] = deque(maxlen=RECENT_SHADOWS)
        self.skipped = 0

    def start(
        self, chosen: Route, request: Any, execution: dict[str, Any]
    ) -> "asyncio.Future[tuple[int, float, Any]] | None":
        """Start `chosen.shadow` on `request`, if it has one and there is room, with the
        primary's deadline and for its tenant (`execution`: what the primary runs with);
        returns the future the primary's (status, ms, output) goes into when it ends."""
        if chosen.shadow is None:
            return None
        if len(self.running) >= MAX_SHADOWS:
            self.skipped += 1
            return None
        loop = asyncio.get_running_loop()
        primary: asyncio.Future[tuple[int, float, Any]] = loop.create_future()
        # Not the caller's context: the shadow is its own trace, and nothing of the
        # request's (its key's checks, its span) runs on in it.
        deadline_s = min(
            execution["deadline_s"], default_deadline(self.served[chosen.shadow].graph)
        )
        task = loop.create_task(
            self._run(chosen, request, deadline_s, execution["tenant"], primary),
            context=contextvars.Context(),
        )
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return primary

    async def _run(
        self,
        chosen: Route,
        request: Any,
        deadline_s: float,
        tenant: str,
        primary: "asyncio.Future[tuple[int, float, Any]]",
    ) -> None:
        assert chosen.shadow is not None
        records: list[NodeRecord] = []
        started, status, output = time.perf_counter(), 200, None
        try:
            result = await self.runtime.execute(
                self.served[chosen.shadow],
                request,
                deadline_s=deadline_s,
                records=records,
                tally=tokens.Tally(),
                tenant=tenant,
            )
            if self.signals is not None:
                self.signals.record(chosen.shadow, "shadow", result.output)
            output = jsonable_encoder(result.output)
        except PipelineRuntimeError as exc:
            status = exc.status_code
        except Exception:  # the shadow's failure is a figure, never the caller's
            status = 500
            logger.exception("shadow run of %s at %s failed", self.name, chosen.shadow)
        shadow_ms = (time.perf_counter() - started) * 1000
        if self.metrics is not None:
            self.metrics.record_version(
                self.name, chosen.shadow, "shadow", status, shadow_ms, records
            )
        try:
            primary_status, primary_ms, primary_output = await asyncio.wait_for(
                asyncio.shield(primary), timeout=deadline_s + 5
            )
        except TimeoutError:
            return
        alike = None
        if status == 200 and primary_status == 200:
            alike = agreement(jsonable_encoder(primary_output), output)
            if self.metrics is not None:
                self.metrics.record_agreement(self.name, chosen.shadow, alike)
        self.recent.append(
            ShadowRecord(
                chosen.version, chosen.shadow, primary_status, status, primary_ms, shadow_ms, alike
            )
        )


def primary_ended(
    future: "asyncio.Future[tuple[int, float, Any]] | None", status: int, ms: float, output: Any
) -> None:
    """Hand the primary's outcome to its shadow, if it has one still waiting."""
    if future is not None and not future.done():
        future.set_result((status, ms, output if status == 200 else None))  # encoded there


class LocalBoard:
    """A `Board` in this process, with the actor's async face (tests; one process)."""

    def __init__(self, board: Board) -> None:
        self.board = board

    async def table(self, known: int) -> tuple[int, dict[str, dict[str, Any]] | None]:
        return self.board.table(known)

    async def set(self, pipeline: str, split: dict[str, Any] | None) -> int:
        return self.board.set(pipeline, split)


class ActorBoard:
    """The cluster's `Board` actor, with async methods (found when first needed)."""

    def __init__(self) -> None:
        self._handle: Any = None

    def _board(self) -> Any:
        if self._handle is None:
            from servegraph.serving.traffic import board

            self._handle = board()
        return self._handle

    async def table(self, known: int) -> tuple[int, dict[str, dict[str, Any]] | None]:
        call = self._board().table.remote(known)
        revision, table = await asyncio.wait_for(call, BOARD_TIMEOUT_S)
        return revision, table

    async def set(self, pipeline: str, split: dict[str, Any] | None) -> int:
        call = self._board().set.remote(pipeline, split)
        revision: int = await asyncio.wait_for(call, BOARD_TIMEOUT_S)
        return revision


def traffic_router(
    name: str,
    scope: str,
    versions: list[str],
    view: TrafficView,
    board: Any,
    shadows: Shadows,
    writers: Mapping[str, str] | None = None,
    signals: Mapping[str, list[str]] | None = None,
) -> APIRouter:
    """GET /<name>/traffic (the pipeline's scope), PUT and DELETE /<name>/traffic
    (admin): the split between its versions, as every ingress replica applies it; and
    GET /<name>/shadow: this replica's recent shadow comparisons. `writers`: the
    versions whose runs write (version -> the node that does), which may not be a
    shadow: a shadow would do each write again. `signals`: the answer signals each version
    declares, shown with the split (what a rollout's gates may name)."""
    router = APIRouter()
    ordered = sorted(versions, key=version_order)
    writers = writers or {}

    def refused(problems: list[tuple[str, str, str]]) -> JSONResponse:
        detail = [{"field": f, "error": e, "fix": fix} for f, e, fix in problems]
        return JSONResponse({"error": "invalid request", "detail": detail}, status_code=422)

    async def changed(split: dict[str, Any] | None) -> Any:
        """Write to the board, then read back here; 503 when the board does not answer."""
        try:
            revision = await board.set(name, split)
        except Exception as exc:  # unreachable or restarting: nothing was changed here
            logger.warning("the traffic board did not take %s's split: %r", name, exc)
            return JSONResponse(
                {"error": "the traffic board did not answer; nothing changed", "detail": repr(exc)},
                status_code=503,
                headers={"retry-after": "1"},
            )
        try:
            await view.refresh()
        except Exception:  # taken all the same: `keep` reads it within REFRESH_S
            logger.warning("reading the traffic board back failed", exc_info=True)
        return shown(revision)

    def shown(revision: int) -> dict[str, Any]:
        split = view.split(name)
        return {
            "pipeline": name,
            "versions": ordered,
            "split": split.model_dump(),
            "revision": revision,
            "signals": {v: list((signals or {}).get(v, [])) for v in ordered},
        }

    async def read(_: Caller = Depends(require(scope))) -> dict[str, Any]:  # noqa: B008
        try:
            await view.refresh()
        except Exception:  # this replica's copy, as it serves
            logger.warning("reading the traffic board failed", exc_info=True)
        return shown(view.revision)

    async def write(split: TrafficSplit, _: Caller = Depends(require("admin"))) -> Any:  # noqa: B008
        served = ", ".join(ordered)
        problems = [
            (p.split(": ", 1)[0], p.split(": ", 1)[1], f"name a version served: {served}")
            for p in split.problems(versions)
        ]
        if split.shadow is not None and split.shadow in writers and split.shadow_percent > 0:
            problems.append(
                (
                    "shadow",
                    f"version {split.shadow!r} writes ({writers[split.shadow]}): a shadow "
                    "would do each of its writes again",
                    "send it a weight instead, or shadow a version that only reads",
                )
            )
        if problems:
            return refused(problems)
        return await changed(split.model_dump())

    async def clear(_: Caller = Depends(require("admin"))) -> Any:  # noqa: B008
        return await changed(None)

    async def recent(_: Caller = Depends(require(scope))) -> dict[str, Any]:  # noqa: B008
        return {
            "pipeline": name,
            "running": len(shadows.running),
            "skipped": shadows.skipped,
            "recent": [vars(r) for r in shadows.recent],
        }

    summary = f"The {name} pipeline's traffic split between its versions"
    router.add_api_route(
        f"/{name}/traffic", read, methods=["GET"], summary=summary, responses=RESPONSES
    )
    router.add_api_route(
        f"/{name}/traffic",
        write,
        methods=["PUT"],
        summary=f"Set the {name} pipeline's traffic split (admin; every replica within 1 s)",
        responses=RESPONSES,
    )
    router.add_api_route(
        f"/{name}/traffic",
        clear,
        methods=["DELETE"],
        summary=f"Send all of {name}'s traffic to its default version (admin)",
        responses=RESPONSES,
    )
    router.add_api_route(
        f"/{name}/shadow",
        recent,
        methods=["GET"],
        summary=f"This replica's recent shadow runs of {name}, compared with the primary",
        responses=RESPONSES,
    )
    return router
