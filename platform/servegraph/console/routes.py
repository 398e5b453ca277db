"""The console's routes, on the ingress app (so under its prefix: `/pipelines/console`).

The page itself (`/console`, its script and style) is open: it holds nothing. What it
shows comes from `/console/api/...`, open to any valid key (an operator without
`invoke:<pipeline>` sees the pipeline's figures but cannot run it; the page says so
with the 403 the run route answers). The recent requests and the figures drawn from
them are an admin key's for every tenant, any other key's for its own tenant only.

The page asks for the key once and keeps it in the tab's `sessionStorage`, sending it
as the Authorization header: never in a URL, so never in a proxy's or the platform's
access logs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse, JSONResponse, Response

from servegraph.console.drawing import DrawingError, svg, walk
from servegraph.console.recent import RecentRequests, figures
from servegraph.console.servers import ModelServers
from servegraph.errors import InvalidInputError
from servegraph.lang.catalog import Catalog
from servegraph.lang.graph import CallNode, Graph
from servegraph.lang.render import to_text
from servegraph.security.endpoints import require
from servegraph.security.keys import Caller

STATIC = Path(__file__).parent / "static"
# The page runs only its own script, from this origin, and no other site may frame it
# (the key is in this origin's sessionStorage). Inline style attributes are allowed: the
# waterfall's bars are placed with them (every value in them a number the page made).
PAGE_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
# The windows the page offers (1, 5, 15 and 60 minutes), and the only ones taken: each
# has its cached answer of the model servers' history (`ModelServers`).
WINDOWS_S = (60, 300, 900, 3600)


def _window(
    window_s: Annotated[int, Query(description=f"seconds: one of {WINDOWS_S}")] = 300,
) -> int:
    if window_s not in WINDOWS_S:
        raise InvalidInputError("window_s", f"{window_s} is not a window", f"one of {WINDOWS_S}")
    return window_s


Window = Annotated[int, Depends(_window)]


def install_console(
    app: FastAPI,
    graphs: Mapping[str, Graph],
    catalog: Catalog,
    scopes: Mapping[str, str],
    inputs: Mapping[str, dict[str, Any]],
    recent: RecentRequests,
    prefix: str,
) -> None:
    """Add the console to the ingress `app` (mounted at `prefix`): the page, and the
    API it reads. `scopes`: the key scope each pipeline's run needs; `inputs`: each
    one's input JSON schema (the form is made from it)."""
    app.mount("/console/static", StaticFiles(directory=STATIC), name="console-static")
    router = APIRouter(prefix="/console", include_in_schema=False)
    calls = {
        name: {
            n: f"{node.server}/{_deployment(catalog, node.server)}"
            for n, node in walk(graph)
            if isinstance(node, CallNode)
        }
        for name, graph in graphs.items()
    }
    any_key = require(None)  # in defaults, not Annotated: a local name in a string annotation
    keyed = [Depends(any_key)]  # FastAPI runs a dependency a route and its parameter share once
    servers = ModelServers()

    def graph_of(name: str) -> Graph:
        graph = graphs.get(name)
        if graph is None:
            raise InvalidInputError("pipeline", f"no pipeline {name!r}", f"one of {sorted(graphs)}")
        return graph

    @router.get("")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "console.html", headers=PAGE_HEADERS)

    @router.get("/api/pipelines")
    async def pipelines(
        window_s: Window,
        caller: Caller = Depends(any_key),  # noqa: B008
    ) -> dict[str, Any]:
        now = time.time()
        covered = recent.covered(window_s, now)
        return {
            "window_s": window_s,
            "covered_s": round(covered, 3),
            "ring": recent.ring.maxlen,
            "tenants": seen(caller) or "every tenant",
            "pipelines": [
                {
                    "name": name,
                    "description": graph.description,
                    "version": graph.version,
                    "can_run": caller.allows(scopes[name]),
                    "scope": scopes[name],
                    "figures": figures(
                        recent.window(name, window_s, now, tenant=seen(caller)), covered
                    )["pipeline"],
                }
                for name, graph in graphs.items()
            ],
        }

    @router.get("/api/pipelines/{name}")
    async def pipeline(
        name: str,
        window_s: Window,
        caller: Caller = Depends(any_key),  # noqa: B008
        limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    ) -> dict[str, Any]:
        graph = graph_of(name)
        now = time.time()
        return {
            "name": name,
            "description": graph.description,
            "version": graph.version,
            "route": f"{prefix}/{name}",
            "can_run": caller.allows(scopes[name]),
            "scope": scopes[name],
            "input_schema": inputs[name],
            # Each call node's Serve deployment, "application/deployment" (by drawn
            # name): the page shows its replicas and queue on the node.
            "calls": calls[name],
            "tenants": seen(caller) or "every tenant",
            "figures": figures(
                recent.window(name, window_s, now, tenant=seen(caller)),
                recent.covered(window_s, now),
            ),
            "recent": [r.summary() for r in recent.latest(name, limit, seen(caller))],
        }

    @router.get("/api/pipelines/{name}/graph.svg", dependencies=keyed)
    async def drawing(name: str) -> Response:
        graph = graph_of(name)
        try:  # laid out once per graph (a cache), in a thread: dot is a process
            picture = await asyncio.to_thread(svg, graph)
        except DrawingError as exc:  # the page shows why, and the graph as text
            return JSONResponse({"error": str(exc), "text": to_text(graph)}, status_code=200)
        return Response(picture, media_type="image/svg+xml")

    @router.get("/api/requests/{request_id}")
    async def request_detail(
        request_id: str,
        caller: Caller = Depends(any_key),  # noqa: B008
    ) -> dict[str, Any]:
        found = recent.get(request_id, seen(caller))
        if found is None:
            raise InvalidInputError(
                "request_id",
                f"no request {request_id!r} among this replica's last {recent.ring.maxlen}",
                "pick one from /console/api/pipelines/<name>'s recent list",
            )
        return found.detail()

    @router.get("/api/servers", dependencies=keyed)
    async def model_servers(
        window_s: Window,
    ) -> dict[str, Any]:
        return await servers.get(window_s)

    app.include_router(router)


def _deployment(catalog: Catalog, server: str) -> str:
    """The server's Serve deployment, or its name where that cannot be worked out here
    (the console's loss: its node shows no replicas)."""
    try:
        return catalog[server].deployment_name()
    except Exception:
        return server


def seen(caller: Caller) -> str | None:
    """Whose requests `caller` sees: an admin key every tenant's (None), any other key its
    own tenant's, as it sees only its tenant's runs and documents."""
    return None if "admin" in caller.scopes else caller.tenant
