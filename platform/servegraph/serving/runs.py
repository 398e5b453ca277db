"""Runs as resources, for pipelines with an approval node: where each run is, what it
awaits, and the decisions that resume it, on any ingress replica.

A run of such a pipeline is recorded in a SQLite file every ingress replica opens (the
same place as its checkpoints, `servegraph.engine.checkpoints.SqliteCheckpoints`):
created when it starts, `waiting` when it stops at an approval (the proposed action,
the summary, who may decide, until when), `running` again once a decision is claimed,
then `finished`, `rejected`, `expired` or `failed`. A decision is claimed in one
transaction that moves the run from `waiting` to `running`, so of any number of
decisions sent at once on one run exactly one is carried out; the others get 409
naming the run's state. An expired approval is resolved when the run is next read or
decided: the run resumes with the expiry and finishes with whatever the pipeline does
then (a hand-off reply).

A run that is `running` belongs to the ingress replica executing it, which renews its
lease every few seconds (`Keeper`). A run whose lease lapses (its replica died, or its
caller hung up and the run was cancelled with the request) is adopted by a replica's
`Keeper` and resumed from its checkpoints: the nodes done are not run again, and its
actions, keyed by the run and the node, apply once however often they are sent.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from servegraph._fields import field_errors
from servegraph.engine.checkpoints import SqliteCheckpoints
from servegraph.engine.runtime import Pending, RunResult, Runtime, RunWaiting, Verdict
from servegraph.errors import PipelineRuntimeError
from servegraph.lang.compiled import CompiledGraph
from servegraph.lang.graph import ApprovalNode, Graph
from servegraph.security.endpoints import RESPONSES, require
from servegraph.security.keys import AuthError, Caller
from servegraph.serving.http import runtime_error_body
from servegraph.tenants import DEFAULT_TENANT

log = logging.getLogger(__name__)

Status = Literal["running", "waiting", "finished", "rejected", "expired", "failed"]


def approvals(graph: Graph) -> Iterator[ApprovalNode]:
    """Every approval node of `graph` and of its sub-graphs."""
    for node in graph.nodes:
        if isinstance(node, ApprovalNode):
            yield node
        for _, sub in node.children():
            yield from approvals(sub)


def has_approval(graph: Graph) -> bool:
    return any(approvals(graph))


# How long a `running` run stays its replica's without a renewal: the replica renews
# every third of it, so a run is adopted elsewhere this long (and at most a third more)
# after its replica died. Long enough that a replica whose event loop is busy for a
# few seconds keeps its runs.
LEASE_S = 10.0
# A run whose replicas keep dying on it (it crashes them, or cannot be resumed) is
# recorded failed after this many takeovers, not passed on forever.
MAX_ADOPTIONS = 3


class RunStore:
    """The runs of every pipeline, with their checkpoints, in one SQLite file; this
    process's view of it (`owner`: the id its runs are leased under; `active`: the runs
    it executes now, each with the task executing it: a lease is renewed only while
    that task runs, so a run whose request ended without releasing it, however it
    ended, is still adopted)."""

    def __init__(self, path: Path | str, lease_s: float = LEASE_S) -> None:
        self.checkpoints = SqliteCheckpoints(path)  # creates the file (WAL)
        self.path = Path(path)
        self.lease_s = lease_s
        self.owner = uuid.uuid4().hex
        self.active: dict[str, asyncio.Task[Any] | None] = {}
        with closing(self._connect()) as db, db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, "
                "pipeline TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL, "
                "awaiting TEXT, decisions TEXT NOT NULL DEFAULT '[]', output TEXT, "
                "error TEXT, started_by TEXT, created REAL NOT NULL, updated REAL NOT NULL, "
                "expires REAL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS runs_by_status ON runs (pipeline, status)")
            columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            for column in (
                "owner TEXT",
                "lease REAL",
                "adopted INTEGER NOT NULL DEFAULT 0",
                f"tenant TEXT NOT NULL DEFAULT '{DEFAULT_TENANT}'",
            ):  # files written before leases, or before tenants
                if column.split()[0] not in columns:
                    try:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {column}")
                    except sqlite3.OperationalError as exc:  # another replica added it
                        if "duplicate column" not in str(exc):
                            raise

    def create(
        self,
        run_id: str,
        pipeline: str,
        request: str,
        started_by: str | None,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        now = time.time()
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO runs (run_id, pipeline, status, request, started_by, created, "
                "updated, owner, lease, tenant) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    pipeline,
                    request,
                    started_by,
                    now,
                    now,
                    self.owner,
                    now + self.lease_s,
                    tenant,
                ),
            )

    def waiting(self, run_id: str, pending: Pending, again: bool = False) -> None:
        """The run waits for `pending`; `again`: once more, after its last decision's
        action failed for a passing reason (that decision is dropped; the expiry stays)."""
        if again:
            with closing(self._connect()) as db, db:
                row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                run = _run(row)
                db.execute(
                    "UPDATE runs SET status = 'waiting', awaiting = ?, decisions = ?, "
                    "updated = ? WHERE run_id = ? AND owner = ?",
                    (
                        json.dumps(asdict(pending)),
                        json.dumps(run["decisions"][:-1]),
                        time.time(),
                        run_id,
                        self.owner,
                    ),
                )
            return
        now = time.time()
        expires = now + pending.expires_s if pending.expires_s else None
        self._update(
            run_id, status="waiting", awaiting=json.dumps(asdict(pending)), expires=expires
        )

    def ended(self, run_id: str, status: Status, output: Any = None, error: Any = None) -> None:
        self._update(
            run_id,
            status=status,
            awaiting=None,
            expires=None,
            output=None if output is None else json.dumps(jsonable_encoder(output)),
            error=None if error is None else json.dumps(error),
        )

    def claim(self, run_id: str, node: str, verdict: Verdict) -> tuple[bool, dict[str, Any]]:
        """Move a run waiting at `node` to running with `verdict`, in one transaction:
        (True, the run) for the one claim that did, (False, the run as it is) else."""
        with closing(self._connect()) as db:
            db.isolation_level = None
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                run = _run(row)
                late = verdict.decision != "expire" and _expired(run)
                if run["status"] != "waiting" or run["awaiting"]["node"] != node or late:
                    db.execute("ROLLBACK")
                    return False, run
                decisions = [*run["decisions"], {"node": node, **asdict(verdict)}]
                now = time.time()
                db.execute(
                    "UPDATE runs SET status = 'running', awaiting = NULL, decisions = ?, "
                    "updated = ?, owner = ?, lease = ? WHERE run_id = ?",
                    (json.dumps(decisions), now, self.owner, now + self.lease_s, run_id),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return True, run | {"status": "running", "decisions": decisions}

    def get(self, run_id: str) -> dict[str, Any] | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return _run(row) if row else None

    def find(
        self, pipeline: str, status: str | None, limit: int, offset: int, tenant: str | None = None
    ) -> list[dict]:
        """A page of `pipeline`'s runs, in `status` and of `tenant` where given."""
        where, params = "pipeline = ?", [pipeline]
        if tenant is not None:
            where, params = f"{where} AND tenant = ?", [*params, tenant]
        if status:
            where, params = f"{where} AND status = ?", [*params, status]
        with closing(self._connect()) as db:
            rows = db.execute(
                f"SELECT * FROM runs WHERE {where} ORDER BY created LIMIT ? OFFSET ?",
                (*params, limit, offset),
            ).fetchall()
        return [_run(row) for row in rows]

    def hold(self, run_id: str) -> None:
        """This process executes the run, in the current task."""
        try:
            self.active[run_id] = asyncio.current_task()
        except RuntimeError:  # no running loop: held until released
            self.active[run_id] = None

    def renew(self) -> int:
        """Extend the leases of the runs this process executes; how many it holds. A
        run whose task ended is let go. Its busy timeout is a third of a lease, so a
        renewal stuck behind a writer is retried rather than outlived by the lease."""
        for run_id, task in list(self.active.items()):
            if task is not None and task.done():
                self.active.pop(run_id, None)
        ids = list(self.active)
        held = 0
        for start in range(0, len(ids), 500):  # SQLite's bound on a statement's values
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            with closing(self._connect(timeout=self.lease_s / 3)) as db, db:
                held += db.execute(
                    f"UPDATE runs SET lease = ? WHERE owner = ? AND status = 'running' "
                    f"AND run_id IN ({marks})",
                    (time.time() + self.lease_s, self.owner, *chunk),
                ).rowcount
        return held

    def adopt(self, pipelines: list[str], limit: int = 16) -> list[dict[str, Any]]:
        """Take over up to `limit` running runs of `pipelines` whose lease lapsed (their
        replica died, or stopped executing them), in one transaction: two replicas
        sweeping at once never adopt the same run."""
        if not pipelines:
            return []
        marks = ", ".join("?" * len(pipelines))
        # A row written before leases has none: its lease is taken to run from its
        # last update, so the runs an older replica still executes are not taken at once.
        lapsed = (
            f"pipeline IN ({marks}) AND status = 'running' AND COALESCE(lease, updated + ?) < ?"
        )
        given_up = json.dumps(
            {"error": "RunLost", "detail": f"taken over {MAX_ADOPTIONS} times, never ended"}
        )
        with closing(self._connect()) as db:
            db.isolation_level = None
            db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                db.execute(
                    f"UPDATE runs SET status = 'failed', error = ?, updated = ? WHERE {lapsed} "
                    "AND adopted >= ?",
                    (given_up, now, *pipelines, self.lease_s, now, MAX_ADOPTIONS),
                )
                rows = db.execute(
                    f"SELECT * FROM runs WHERE {lapsed} ORDER BY updated LIMIT ?",
                    (*pipelines, self.lease_s, now, limit),
                ).fetchall()
                # Never one this process executes (its renewal was late): one execution.
                rows = [row for row in rows if row["run_id"] not in self.active]
                for row in rows:
                    db.execute(
                        "UPDATE runs SET owner = ?, lease = ?, adopted = adopted + 1 "
                        "WHERE run_id = ?",
                        (self.owner, now + self.lease_s, row["run_id"]),
                    )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return [_run(row) | {"owner": self.owner, "adopted": row["adopted"] + 1} for row in rows]

    def nodes_done(self, run_id: str) -> list[str]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT node FROM checkpoints WHERE run_id = ? ORDER BY at", (run_id,)
            ).fetchall()
        return [row[0] for row in rows]

    def _update(self, run_id: str, **fields: Any) -> None:
        """Written by the run's owner only: a replica whose run was adopted elsewhere
        (its lease lapsed) leaves the run to its new owner."""
        names = ", ".join(f"{name} = ?" for name in fields)
        with closing(self._connect()) as db, db:
            db.execute(
                f"UPDATE runs SET {names}, updated = ? WHERE run_id = ? AND owner = ?",
                (*fields.values(), time.time(), run_id, self.owner),
            )

    def _connect(self, timeout: float = 30) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=timeout)
        db.row_factory = sqlite3.Row
        return db


def _for(run: dict[str, Any]) -> dict[str, Any]:
    """What a recorded run is resumed with: its tenant's data (`Runtime.execute`)."""
    return {"tenant": run.get("tenant") or DEFAULT_TENANT}


def _sees(caller: Caller, run: dict[str, Any]) -> bool:
    """Whether `caller` may see or decide `run`: one of its tenant's, or any for admin."""
    return caller.allows("admin") or (run.get("tenant") or DEFAULT_TENANT) == caller.tenant


def _run(row: sqlite3.Row) -> dict[str, Any]:
    run = dict(row)
    for name in ("request", "awaiting", "decisions", "output", "error"):
        if run[name] is not None:
            run[name] = json.loads(run[name])
    return run


class DecisionBody(BaseModel):
    """A person's decision on a run waiting for approval."""

    decision: Literal["approve", "reject"]
    reason: str = Field("", max_length=2000, description="Why (kept with the run).")
    arguments: dict[str, Any] | None = Field(
        None,
        description="With approve: fields of the proposed action to change (checked "
        "against the action's contract: 422 naming a field it breaks).",
    )


class Waiting(BaseModel):
    """A run stopped for a person's decision (the 202's body, the `waiting` event's)."""

    run_id: str
    status: Literal["waiting"]
    awaiting: dict[str, Any] = Field(
        description="The approval node, the proposed action (server, method, arguments), "
        "the summary for the person, the scope that may decide, the expiry, the fields "
        "the person may change."
    )


class RunView(BaseModel):
    """A run of a pipeline with an approval node."""

    run_id: str
    pipeline: str
    status: Status
    awaiting: dict[str, Any] | None = Field(
        None, description="What the run waits for: the proposed action, its summary, scope."
    )
    expires: float | None = Field(None, description="When the approval expires (epoch s).")
    decisions: list[dict[str, Any]] = Field(
        default_factory=list, description="Each decision: node, decision, by (key name), reason."
    )
    nodes_done: list[str] = Field(default_factory=list)
    adopted: int = Field(
        0, description="Times a replica took the run over after its own stopped executing it."
    )
    output: Any = None
    error: Any = None
    started_by: str | None = None
    tenant: str = Field(DEFAULT_TENANT, description="Whose data the run reads and writes.")
    created: float
    updated: float


class Runs:
    """Starting, resuming and reading one pipeline's runs (`runs_router` serves them)."""

    def __init__(self, compiled: CompiledGraph, runtime: Runtime, store: RunStore) -> None:
        self.compiled, self.runtime, self.store = compiled, runtime, store
        self.name = compiled.graph.name

    async def start(
        self, request: BaseModel, caller: Caller | None, **execute: Any
    ) -> tuple[str, RunResult | JSONResponse]:
        """Run the pipeline as a recorded run: its id, and its result or a 202 for a
        stop. `execute`: `Runtime.execute`'s arguments but the run's own (its `tenant`
        is recorded with the run: every resumption runs for it)."""
        run_id = (await self.begin(request, caller, execute.get("tenant")))["run_id"]
        return run_id, await self._go(run_id, request, [], execute)

    async def begin(
        self, request: BaseModel, caller: Caller | None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Record a new run (for a streamed one) for `tenant` (default: the default
        tenant); what `Runtime.stream` runs it with."""
        run_id = uuid.uuid4().hex
        self.store.hold(run_id)  # renewed while this request's task runs
        try:
            await asyncio.to_thread(
                self.store.create,
                run_id,
                self.name,
                request.model_dump_json(),
                caller.name if caller else None,
                tenant or DEFAULT_TENANT,
            )
        except BaseException:
            self.release(run_id)
            raise
        return {"run_id": run_id, "checkpoints": self.store.checkpoints}

    def release(self, run_id: str) -> None:
        """This replica no longer executes the run: its lease is not renewed, so a run
        left `running` (its stream's caller hung up) is adopted and finished by a
        `Keeper`."""
        self.store.active.pop(run_id, None)

    async def stopped(self, run_id: str, pending: Pending) -> dict[str, Any]:
        """Record the stop; the body a caller gets for it (202, or a `waiting` event)."""
        await asyncio.to_thread(self.store.waiting, run_id, pending)
        self.release(run_id)
        return {"run_id": run_id, "status": "waiting", "awaiting": asdict(pending)}

    async def ended(self, run_id: str, output: Any = None, failure: Any = None) -> None:
        status: Status = "failed" if failure is not None else "finished"
        await asyncio.to_thread(self.store.ended, run_id, status, output, failure)
        self.release(run_id)

    async def resume(self, run: dict[str, Any]) -> RunResult | JSONResponse | None:
        """Go on with a run adopted from a replica that stopped executing it
        (`RunStore.adopt`), from its checkpoints and with its decisions; recorded as it
        ends (None when it failed: recorded too)."""
        try:
            request = self.compiled.input.model_validate(run["request"])
        except ValidationError as exc:  # the pipeline's input changed since it started
            failure = {"error": "RunNotResumable", "detail": str(exc)}
            await asyncio.to_thread(self.store.ended, run["run_id"], "failed", None, failure)
            return None
        try:
            return await self._go(run["run_id"], request, run["decisions"], _for(run))
        except Exception:  # recorded by `_go`; nobody waits on an adopted run
            log.warning("adopted run %s of %s failed", run["run_id"], self.name, exc_info=True)
            return None

    async def decide(self, run_id: str, body: DecisionBody, caller: Caller) -> Any:
        found = await asyncio.to_thread(self.store.get, run_id)
        if found is None or found["pipeline"] != self.name or not _sees(caller, found):
            return _not_found(run_id, self.name)
        run = found
        needed = (run["awaiting"] or {}).get("scope") or f"approve:{self.name}"
        if not caller.allows(needed):  # the approval's own scope, else the pipeline's
            raise AuthError(403, f"deciding on this run needs the scope {needed}")
        if run["status"] == "waiting" and _expired(run):
            await self.expire(run)
            return _conflict(run_id, "expired", "the approval expired before the decision")
        if run["status"] != "waiting":
            return _conflict(run_id, run["status"], "the run is not waiting for a decision")
        awaiting = run["awaiting"]
        if body.decision == "approve" and body.arguments:  # checked before it is claimed
            refused = sorted(set(body.arguments) - set(awaiting.get("editable") or []))
            if refused:  # what runs is what the person read, but for what they may change
                editable = awaiting.get("editable") or "nothing"
                errors = [
                    {
                        "field": f"arguments.{name}",
                        "error": "not editable at this approval",
                        "fix": f"change only {editable}; reject instead",
                    }
                    for name in refused
                ]
                return JSONResponse({"error": "invalid request", "detail": errors}, 422)
            contract = self.runtime.catalog.contract(awaiting["server"], awaiting["method"])
            try:
                contract.request.model_validate(awaiting["arguments"] | body.arguments)
            except ValidationError as exc:
                errors = field_errors([dict(e) for e in exc.errors()])
                return JSONResponse({"error": "invalid request", "detail": errors}, 422)
        # The stored request is read back before the claim: a claimed run must resume.
        request = self.compiled.input.model_validate(run["request"])
        node = awaiting["node"]
        verdict = Verdict(
            body.decision, caller.name, body.reason, body.arguments, awaiting["arguments"]
        )
        claimed, run = await asyncio.to_thread(self.store.claim, run_id, node, verdict)
        if not claimed:
            if run["status"] == "waiting" and _expired(run):
                await self.expire(run)
                return _conflict(run_id, "expired", "the approval expired before the decision")
            return _conflict(run_id, run["status"], "another decision came first")
        # Shielded: a caller who hangs up does not stop a claimed run halfway; it ends
        # recorded, whatever happens (`_go`).
        outcome = await asyncio.shield(
            asyncio.ensure_future(
                self._go(run_id, request, run["decisions"], _for(run), retry=Pending(**awaiting))
            )
        )
        if isinstance(outcome, JSONResponse):
            return outcome  # waiting again, at a later approval
        now = await asyncio.to_thread(self.store.get, run_id)
        ended = now if now is not None else run
        answer = {"run_id": run_id, "status": ended["status"], "output": outcome.output}
        return JSONResponse(jsonable_encoder(answer))

    async def view(
        self, run_id: str, starter: Caller | None = None, reader: Caller | None = None
    ) -> RunView | JSONResponse:
        """The run; with `starter`, only if that key started it, with `reader`, only if
        it is of that key's tenant or the key is an admin (else 404, as for none)."""
        found = await asyncio.to_thread(self.store.get, run_id)
        if found is None or found["pipeline"] != self.name:
            return _not_found(run_id, self.name)
        if reader is not None and not _sees(reader, found):
            return _not_found(run_id, self.name)
        if starter is not None and found["started_by"] != starter.name:
            return _not_found(run_id, self.name)
        run = found
        if run["status"] == "waiting" and _expired(run):
            await self.expire(run)
            now = await asyncio.to_thread(self.store.get, run_id)
            run = now if now is not None else run
        done = await asyncio.to_thread(self.store.nodes_done, run_id)
        return RunView(**run, nodes_done=done)

    async def listed(
        self, status: str | None, limit: int, offset: int, reader: Caller | None = None
    ) -> list[RunView]:
        """A page of the pipeline's runs (in `status`; with `reader`, those it may see:
        its tenant's, every tenant's for an admin), expired approvals resolved first."""
        tenant = None if reader is None or reader.allows("admin") else reader.tenant
        find = functools.partial(self.store.find, self.name, status, limit, offset, tenant)
        found = await asyncio.to_thread(find)
        late = [run for run in found if run["status"] == "waiting" and _expired(run)]
        for run in late:
            await self.expire(run)
        if late:
            found = await asyncio.to_thread(find)
        return [RunView(**run) for run in found]

    async def expire(self, run: dict[str, Any]) -> None:
        verdict = Verdict("expire", reason="the approval expired")
        claimed, run = await asyncio.to_thread(
            self.store.claim, run["run_id"], run["awaiting"]["node"], verdict
        )
        if claimed:
            request = self.compiled.input.model_validate(run["request"])
            await self._go(run["run_id"], request, run["decisions"], _for(run))

    async def _go(
        self,
        run_id: str,
        request: BaseModel,
        decisions: list[dict[str, Any]],
        execute: dict[str, Any],
        retry: Pending | None = None,
    ) -> RunResult | JSONResponse:
        """Run (or resume) and record how it ended. `retry`: what the run waited for
        before this decision: when its action could not be made for a passing reason (the
        server full, a deadline), the run waits for it again, its decision not used up
        (the action's key makes a second try apply once), and the caller gets the error."""
        verdicts = {
            d["node"]: Verdict(d["decision"], d["by"], d["reason"], d["arguments"], d.get("seen"))
            for d in decisions
        }
        self.store.hold(run_id)
        try:
            result = await self.runtime.execute(
                self.compiled,
                request,
                run_id=run_id,
                checkpoints=self.store.checkpoints,
                decisions=verdicts,
                **execute,
            )
        except RunWaiting as stop:
            body = await self.stopped(run_id, stop.pending)
            return JSONResponse(body, status_code=202, headers={"x-servegraph-run-id": run_id})
        except Exception as exc:  # recorded: a run never stays `running` for this
            if (
                retry is not None
                and isinstance(exc, PipelineRuntimeError)
                and exc.node == retry.node
                and exc.status_code in (503, 504)
            ):
                await asyncio.to_thread(self.store.waiting, run_id, retry, True)
                raise
            await asyncio.to_thread(self.store.ended, run_id, "failed", None, failure_of(exc))
            raise
        else:  # recorded before the lease is let go: a finished run is never adopted
            last = list(verdicts.values())[-1].decision if verdicts else None
            status: Status = "expired" if last == "expire" else "finished"
            status = "rejected" if last == "reject" else status
            await asyncio.to_thread(self.store.ended, run_id, status, result.output)
            return result
        finally:  # ended, stopped, or cancelled with its caller: then adopted elsewhere
            self.release(run_id)


class Keeper:
    """One per ingress replica: renews the leases of the runs it executes and adopts
    the runs whose lease lapsed, resuming each in the background (`Runs.resume`)."""

    def __init__(self, store: RunStore, runs: list[Runs]) -> None:
        self.store = store
        self.runs = {r.name: r for r in runs}
        self.resuming: set[asyncio.Task[Any]] = set()  # held: the loop keeps weak refs

    async def tick(self) -> list[str]:
        """One round: renew, then adopt and start resuming; the adopted runs' ids."""
        await asyncio.to_thread(self.store.renew)
        adopted = await asyncio.to_thread(self.store.adopt, list(self.runs))
        for run in adopted:
            log.info("adopting run %s of %s (its lease lapsed)", run["run_id"], run["pipeline"])
            task = asyncio.create_task(self.runs[run["pipeline"]].resume(run))
            self.resuming.add(task)
            task.add_done_callback(self.resuming.discard)
        return [run["run_id"] for run in adopted]

    async def keep(self) -> None:
        """Rounds every third of a lease until cancelled (the replica's shutdown)."""
        while True:
            try:
                await self.tick()
            except Exception:  # a locked or unreadable store: the next round tries again
                log.warning("keeping runs failed; trying again", exc_info=True)
            await asyncio.sleep(self.store.lease_s / 3)


def runs_router(runs: Runs, run_scope: str) -> APIRouter:
    """GET /<name>/runs/<id> (the pipeline's scope or the approvers'), GET /<name>/runs
    (`approve:<name>`) and POST /<name>/runs/<id>/decision (the approval node's `scope`,
    else `approve:<name>`)."""
    name = runs.name
    approve = f"approve:{name}"
    own = {node.scope for node in approvals(runs.compiled.graph) if node.scope}
    # Checked before the body is read, where every approval decides by `approve:<name>`;
    # where one names its own scope, any key's body is read and the run's scope checked.
    decider = require(None if own else approve)
    router = APIRouter()

    async def show_run(run_id: str, caller: Caller = Depends(require(None))) -> Any:  # noqa: B008
        """The key that started the run, or one that may decide (it holds a customer's
        request: no other caller of the pipeline reads it)."""
        deciders = {approve, *own}
        if not (caller.allows(run_scope) or any(map(caller.allows, deciders))):
            raise AuthError(403, f"this key has neither the scope {run_scope} nor {approve}")
        starter = None if any(map(caller.allows, deciders)) else caller
        return await runs.view(run_id, starter, reader=caller)

    async def list_runs(
        status: Status | None = Query(None, description="Only runs in this state."),  # noqa: B008
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
        caller: Caller = Depends(require(approve)),  # noqa: B008  # FastAPI's way
    ) -> dict[str, Any]:
        found = await runs.listed(status, limit, offset, reader=caller)
        return {"runs": found, "limit": limit, "offset": offset}

    async def decide(
        run_id: str,
        body: DecisionBody,
        caller: Caller = Depends(decider),  # noqa: B008  # FastAPI's way
    ) -> Any:
        return await runs.decide(run_id, body, caller)

    conflict: dict[int | str, dict[str, Any]] = {
        409: {"description": "The run is not waiting (names its state)"}
    }
    router.add_api_route(
        f"/{name}/runs/{{run_id}}",
        show_run,
        methods=["GET"],
        response_model=RunView,
        summary=f"A run of {name}: where it is, what it awaits, its output",
        operation_id=f"run_of_{name}",
        responses={**RESPONSES, 404: {"description": "No such run of this pipeline"}},
    )
    router.add_api_route(
        f"/{name}/runs",
        list_runs,
        methods=["GET"],
        summary=f"Runs of {name}, e.g. those waiting for approval (?status=waiting)",
        operation_id=f"runs_of_{name}",
        responses=RESPONSES,
    )
    router.add_api_route(
        f"/{name}/runs/{{run_id}}/decision",
        decide,
        methods=["POST"],
        summary=f"Approve or reject what a run of {name} waits for",
        operation_id=f"decide_{name}",
        responses={**RESPONSES, 404: {"description": "No such run"}, **conflict},
    )
    return router


def failure_of(exc: Exception) -> dict[str, Any]:
    """How a run that failed with `exc` is recorded: a node's failure as its HTTP
    body names it, anything else by its type and message."""
    if isinstance(exc, PipelineRuntimeError):
        return runtime_error_body(exc)
    return {"error": type(exc).__name__, "detail": str(exc)}


def _expired(run: dict[str, Any]) -> bool:
    return run["expires"] is not None and run["expires"] <= time.time()


def _not_found(run_id: str, pipeline: str) -> JSONResponse:
    detail = f"no run {run_id} of {pipeline}"
    return JSONResponse({"error": "RunNotFound", "detail": detail}, status_code=404)


def _conflict(run_id: str, status: str, detail: str) -> JSONResponse:
    body = {"error": "RunConflict", "run_id": run_id, "status": status, "detail": detail}
    return JSONResponse(body, status_code=409)
