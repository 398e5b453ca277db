"""Cross-tenant reads under fuzzing (issue 29): two tenants' keys, documents under the
same ids in both, and schemathesis generating `rag_ingest`, `rag_search` and
`rag_delete` requests with each tenant's key against the pipeline ingress (the real
FastAPI app, runtime, embedder and vector index, in this process, over ASGI: the subject
is what the runtime and the index let through, not the transport).

Every generated request is marked as its tenant's: its documents' ids are half the time
ones the other tenant also has (`shared/0..4`), and their text starts with the tenant's
marker (one chunk per document, its generated metadata left out: keys the index
refuses made most ingests a 422); a deletion names a shared id a third of the time; a
generated `X-Servegraph-Tenant` names the caller's own tenant or the other's (a 403:
neither key is an admin). Each tenant starts with the five shared ids and 20 of its
own. After each case it checks:

- a search returned only chunks with the caller's marker (a chunk without it, or with
  the other's, is a cross-tenant read);
- the answer's `index_count` is the caller's own count (not the sum, not the other's);
- the other tenant's items are exactly what they were (nothing of theirs deleted,
  replaced or added).

    .venv/bin/python -m benchmarks.tenant_fuzz [--cases 2000]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase

from benchmarks import report
from deployments.catalog import CATALOG
from servegraph.engine.runtime import InProcessServers
from servegraph.lang.discovery import discover
from servegraph.security.guard import Guard
from servegraph.security.keys import AuthSettings, KeyStore
from servegraph.serving.ingress import build_fastapi

ROUTES = ("rag_ingest", "rag_search", "rag_delete")
SHARED_IDS = [f"shared/{n}" for n in range(5)]
MARKERS = {"acme": "acme-marker-7f3a", "globex": "globex-marker-91c2"}
TENANT = "x-servegraph-tenant"


def _pick(seed: str, n: int) -> int:
    return int(hashlib.sha256(seed.encode()).hexdigest(), 16) % n


def mark(route: str, body: Any, tenant: str) -> Any:
    """The generated body, made the tenant's: ids overlapping the other tenant's half
    the time, each document's text under the tenant's marker, one chunk each."""
    if not isinstance(body, dict):
        return body
    if route == "rag_ingest" and isinstance(body.get("documents"), list):
        documents = []
        for doc in body["documents"]:
            if not isinstance(doc, dict):
                documents.append(doc)
                continue
            seed = repr(doc.get("id"))
            if _pick(seed, 2):
                doc = {**doc, "id": SHARED_IDS[_pick(seed + "#", len(SHARED_IDS))]}
            text = str(doc.get("text", ""))[:2000]
            documents.append({"id": doc.get("id"), "text": f"{MARKERS[tenant]} {text}"})
        return {**body, "documents": documents, "chunk_chars": 4000}
    if route == "rag_delete" and isinstance(body.get("ids"), list):
        ids = [
            SHARED_IDS[_pick(repr(i), len(SHARED_IDS))] if not _pick(repr(i) + "?", 3) else i
            for i in body["ids"]
        ]
        return {**body, "ids": ids}
    return body


def acting(headers: dict[str, str] | None, tenant: str, other: str) -> dict[str, str]:
    """The generated headers but the tenant header dropped (the deadline, cost and
    version headers are the reliability tier's fuzz); a generated tenant header named
    as the caller's own tenant or the other's, half the time each: its own runs, the
    other's is a 403."""
    asked = next((v for k, v in (headers or {}).items() if k.lower() == TENANT), None)
    if asked is None:
        return {}
    return {TENANT: other if _pick(asked, 2) else tenant}


class Tally:
    """What the fuzzed cases did: statuses per route, and every cross-tenant problem."""

    def __init__(self, index: Any, keys: dict[str, str]) -> None:
        self.index, self.keys = index, keys
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.ran: Counter[str] = Counter()
        self.problems: list[str] = []
        self.failed = 0  # cases with at least one problem

    def snapshot(self, tenant: str) -> dict[str, str]:
        """The tenant's items, id -> text, read straight from the store."""
        rows = self.index._reader().execute(
            "SELECT id, text FROM items WHERE tenant = ? ORDER BY id", (tenant,)
        )
        return dict(rows.fetchall())

    def run(self, case: schemathesis.Case, route: str, tenant: str, other: str) -> None:
        case.body = mark(route, case.body, tenant)
        case.headers = acting(case.headers, tenant, other)
        before, problems = self.snapshot(other), len(self.problems)
        answer = case.call(headers={"authorization": f"Bearer {self.keys[tenant]}"})
        self.ran[route] += 1
        self.statuses[(route, answer.status_code)] += 1
        where = f"{tenant} {route} body={str(case.body)[:200]}"
        if self.snapshot(other) != before:
            self.problems.append(f"{where}: changed {other}'s items")
        if answer.status_code == 200:
            body = answer.json()
            if route == "rag_search":
                self.problems += [
                    f"{where}: read {found['text'][:80]!r}"
                    for found in body["results"]
                    if not found["text"].startswith(MARKERS[tenant])
                ]
            elif body["index_count"] != self.index.count(tenant=tenant):
                self.problems.append(f"{where}: index_count {body['index_count']}")
        self.failed += len(self.problems) > problems


def fuzz_route(operation: Any, examples: int, tally: Tally, tenant: str, other: str) -> None:
    """`examples` generated cases of one route with `tenant`'s key."""
    route = operation.path.strip("/")

    @hypothesis.given(case=operation.as_strategy())
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: a problem reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        tally.run(case, route, tenant, other)

    fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="in all, both tenants")
    args = parser.parse_args()
    per_operation = max(1, args.cases // (len(MARKERS) * len(ROUTES)))

    folder = Path(tempfile.mkdtemp(prefix="sg-tenant-fuzz-"))
    keys_store = KeyStore(folder / "keys.sqlite3", cache_s=0)
    Guard._here = Guard(AuthSettings(keys=keys_store.path, cache_s=0))
    servers = CATALOG.in_process_servers(
        skip=[name for name in CATALOG.servers if name not in ("embedder", "vector_index")],
        options={"vector_index": {"path": folder / "index"}},
    )
    index = servers["vector_index"]._store
    every = discover("pipelines")
    app = build_fastapi(
        {r: every[r] for r in ROUTES}, CATALOG, InProcessServers(servers, threads=True)
    )
    scopes = ["write:rag_ingest", "write:rag_delete", "invoke:rag_search"]
    keys = {t: keys_store.create(f"{t}-app", scopes, tenant=t) for t in MARKERS}

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = {
        op.path.strip("/"): op
        for op in (r.ok() for r in schema.get_all_operations())
        if op.method.upper() == "POST" and op.path.strip("/") in ROUTES
    }
    assert set(operations) == set(ROUTES), sorted(operations)

    # Both tenants start with documents under the same ids.
    for tenant, marker in MARKERS.items():
        ids = [*SHARED_IDS, *(f"{tenant}/{n}" for n in range(20))]
        docs = [{"id": i, "text": f"{marker} seeded {i}"} for i in ids]
        case = operations["rag_ingest"].Case(body={"documents": docs})
        answer = case.call(headers={"authorization": f"Bearer {keys[tenant]}"})
        assert answer.status_code == 200, answer.text

    tally = Tally(index, keys)
    started = time.perf_counter()
    for tenant, other in (("acme", "globex"), ("globex", "acme")):
        for route in ROUTES:
            fuzz_route(operations[route], per_operation, tally, tenant, other)
    took = time.perf_counter() - started
    counts = {t: len(tally.snapshot(t)) for t in MARKERS}

    cases = sum(tally.ran.values())
    print(f"{cases} generated cases in {took:.0f} s, {per_operation} per route and tenant")
    for (route, status), n in sorted(tally.statuses.items()):
        print(f"  {route:12s} {status}: {n}")
    print(f"items at the end: {counts}")
    for problem in tally.problems[:20]:
        print("PROBLEM", problem)
    errors = sum(n for (_, status), n in tally.statuses.items() if status >= 500)
    report.save(
        "tenant_fuzz",
        [
            report.Figure(
                f"cases with a cross-tenant read, count or write, of {cases} fuzzed",
                tally.failed,
                None,
                "cases",
                "<= 0",
                higher_is_better=False,
            ),
            report.Figure("fuzzed tenant cases answered 5xx", errors, None, "cases", "<= 0", False),
        ],
    )


if __name__ == "__main__":
    main()
