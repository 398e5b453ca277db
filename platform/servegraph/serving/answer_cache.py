"""The semantic answer cache on the request path: a pipeline that declares one
(`servegraph.lang.graph.AnswerCache`; `rag` does) has each request's question embedded
and looked up before its graph runs, and a whole answer kept after it ran.

Both steps run as small graphs on the pipeline's own runtime, so they are the request's
nodes like any other (`cache_embed`, `cache_lookup`: in its usage, spans and node
metrics), and the tenant is set on the store's calls by the runtime, as on every call
(`servegraph.tenants`): one tenant's question never finds another's answer.

What is kept is keyed by the pipeline's name and version and by the model files of the
servers it calls (`ServerSpec.models`, `servegraph.deploy.fingerprint.identity`), so a
new version or re-prepared models start from an empty cache. The answers live in the
store next to the chunks they were built from, which forgets an answer in the same
transaction as a write to one of its chunks (`deployments.vector_index.answers`).

Callers choose per request, as HTTP caches let them (RFC 9111):
`Cache-Control: no-cache` runs the graph even if an answer is cached (and keeps the new
one); `no-store` keeps nothing of this request. Every answer says which happened in its
usage (`cache`: "hit", "miss" or "bypass", and for a hit what the reused answer had
cost, the saving).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter

from servegraph.cost.metering import total as total_charge
from servegraph.cost.prices import prices
from servegraph.deploy.fingerprint import identity
from servegraph.engine.runtime import NodeRecord, Runtime
from servegraph.lang.catalog import Catalog
from servegraph.lang.graph import AnswerCache, Graph, Pipeline, resolve

logger = logging.getLogger("ray.serve")

_KEEPING: set[asyncio.Task[Any]] = set()  # held until done: asyncio keeps weak refs


class LookupInput(BaseModel):
    question: str
    exact: str
    scope: str
    threshold: float
    max_age_s: float


class Looked(BaseModel):
    """What a lookup found (the store's `answers_get`) and the question's embedding."""

    found: Any
    embedded: Any


class KeepInput(BaseModel):
    vector: Any
    exact: str
    scope: str
    question: str
    answer: dict[str, Any]
    cost_usd: float
    sources: list[str]
    since: int


@dataclass
class Lookup:
    """One request's lookup: the answer if one was found, else what keeping the answer
    the graph makes needs."""

    output: Any = None  # the cached answer, as the pipeline's output type
    result: str = "miss"  # "hit", "miss", or "bypass" (the caller's no-cache)
    keep: bool = True  # whether the answer made instead is kept (not no-store)
    similarity: float = 0.0
    saved_usd: float = 0.0  # what the cached answer had cost to make
    question: str = ""
    vector: Any = None
    since: int = 0
    scope: str = ""  # what an answer kept from this request is for
    exact: str = ""  # the question's exact key (`exact_key`)

    @property
    def hit(self) -> bool:
        return self.output is not None


def cache_control(header: str | None) -> tuple[bool, bool]:
    """(look up, keep) as a request's Cache-Control header asks."""
    directives = {d.strip().split("=")[0].lower() for d in (header or "").split(",")}
    return "no-cache" not in directives, "no-store" not in directives


class ServedCache:
    """One pipeline version's answer cache (`AnswerCache`), on `runtime`."""

    def __init__(self, graph: Graph, runtime: Runtime, catalog: Catalog) -> None:
        spec = graph.cache
        assert spec is not None
        self.spec, self.runtime = spec, runtime
        self.scope = f"{graph.name}@{graph.version}#{models_of(graph, catalog)}"
        self.exact_graph = runtime.compile(_exact_graph(graph.name, spec))
        self.lookup_graph = runtime.compile(_lookup_graph(graph.name, spec))
        self.keep_graph = runtime.compile(_keep_graph(graph.name, spec))
        self.output = TypeAdapter(resolve(graph.output))
        self.cacheable = resolve(spec.cacheable) if spec.cacheable else None
        listed, _, self._source_id = spec.sources.partition(".")
        self._sources_field = listed

    async def find(
        self,
        request: BaseModel,
        *,
        deadline_s: float,
        records: list[NodeRecord],
        tenant: str,
        reuse: bool = True,
        began: float | None = None,
    ) -> Lookup:
        """Look the request's question up; its nodes go into `records`. First by its
        exact key (`cache_exact`: the same words, one call, no embedding), then by its
        embedding (`cache_embed`, `cache_lookup`). Its other fields (rag's `k`,
        `filter`, `max_tokens`) are part of what must match: an answer is reused only
        for a request that differs by the question's wording. Without `reuse` (the
        caller's no-cache) nothing found is used, but the miss is looked up all the
        same, for what keeping the new answer needs. `began`: what the records' times
        count from (`Runtime.execute`)."""
        question = str(getattr(request, self.spec.question))
        rest = request.model_dump_json(exclude={self.spec.question})
        scope = f"{self.scope}|{hashlib.sha256(rest.encode()).hexdigest()[:16]}"
        asked = LookupInput(
            question=question,
            exact=exact_key(question),
            scope=scope,
            threshold=self.spec.threshold,
            max_age_s=self.spec.max_age_s,
        )
        looking = time.monotonic()
        if reuse:
            found = await self.runtime.run(
                self.exact_graph,
                asked,
                deadline_s=deadline_s,
                records=records,
                tenant=tenant,
                began=began,
            )
            hit = self._answer(found.hit)
            if hit is not None:
                return Lookup(hit, "hit", similarity=1.0, saved_usd=found.hit.cost_usd)
        left = max(deadline_s - (time.monotonic() - looking), 0.001)
        looked = await self.runtime.run(
            self.lookup_graph, asked, deadline_s=left, records=records, tenant=tenant, began=began
        )
        found, vector = looked.found, looked.embedded.vector
        miss = Lookup(
            question=question, vector=vector, since=found.since, scope=scope, exact=asked.exact
        )
        hit = self._answer(found.hit) if reuse else None
        if hit is None:
            return miss
        return Lookup(hit, "hit", similarity=found.hit.similarity, saved_usd=found.hit.cost_usd)

    def _answer(self, hit: Any) -> Any:
        """A found entry's answer as the pipeline's output, or None (none found, or kept
        by an output type since changed: answered anew)."""
        if hit is None:
            return None
        try:
            return self.output.validate_python(hit.answer)
        except ValueError:
            return None

    def keep(self, lookup: Lookup, output: Any, records: list[NodeRecord], tenant: str) -> None:
        """Keep `output`, the answer the graph made after `lookup` missed, in the
        background (the caller has its answer already): what it cost, what it was built
        from, and the write number the run began at (the store refuses it if one of its
        chunks changed since). Never raises: an answer not kept is a later miss."""
        try:
            self._send(lookup, output, records, tenant)
        except Exception:
            logger.warning("an answer of %s could not be kept", self.scope, exc_info=True)

    def _send(self, lookup: Lookup, output: Any, records: list[NodeRecord], tenant: str) -> None:
        if lookup.vector is None or (self.cacheable is not None and not self.cacheable(output)):
            return
        answer = self.output.dump_python(output, mode="json")
        listed = getattr(output, self._sources_field, None) or []
        sources = [str(getattr(item, self._source_id)) for item in listed]
        usd = prices().usd(total_charge([r.charge for r in records if r.charge]))
        keep = KeepInput(
            vector=lookup.vector,
            exact=lookup.exact,
            scope=lookup.scope,
            question=lookup.question,
            answer=answer,
            cost_usd=usd,
            sources=sources,
            since=lookup.since,
        )
        task = asyncio.ensure_future(self._keep(keep, tenant))
        _KEEPING.add(task)
        task.add_done_callback(_KEEPING.discard)

    async def _keep(self, keep: KeepInput, tenant: str) -> None:
        try:
            await self.runtime.run(self.keep_graph, keep, deadline_s=30, tenant=tenant)
        except Exception:  # a lost entry is a later miss, never an error
            logger.warning("keeping an answer of %s failed", self.scope, exc_info=True)


def models_of(graph: Graph, catalog: Catalog) -> str:
    """The identity of the model files the servers `graph` calls load, as this node
    has them (`ServerSpec.models`), read when the ingress starts; "unknown" where this
    node cannot say (answers are then kept under that, until it can)."""
    folders = []
    try:
        for server in sorted({call.server for call in graph.calls()}):
            spec = catalog[server]
            if spec.models:
                folders += [str(f) for f in resolve(spec.models)()]
    except Exception as exc:  # a model package missing on this node
        logger.warning("the model files of %s are unknown here: %s", graph.name, exc)
        return "unknown"
    return identity(*folders) if folders else "no-models"


def lookup_deadline(deadline_s: float) -> float:
    """The share of a request's deadline its lookup may take: a quarter, at most 2 s
    (an embedding and a search, milliseconds when the servers keep up); the run gets
    the rest, whether the lookup answered or not."""
    return min(deadline_s / 4, 2.0)


def exact_key(question: str) -> str:
    """A question's key as retyped: its words, lower-cased, whatever the punctuation
    and spacing between them."""
    words = " ".join(re.findall(r"\w+", question.lower()))
    return hashlib.sha256(words.encode()).hexdigest()[:32]


def _exact_graph(name: str, spec: AnswerCache) -> Graph:
    p = Pipeline(f"{name}.cache_exact", input=LookupInput, output=Any)
    fields = ("exact", "scope", "threshold", "max_age_s")
    ports = {f: getattr(p.input, f) for f in fields}
    p.returns(p.call("cache_exact", spec.store, "answers_get", idempotent=True, **ports))
    return p.build()


def _lookup_graph(name: str, spec: AnswerCache) -> Graph:
    server, _, method = spec.embed.partition(".")
    p = Pipeline(f"{name}.cache_lookup", input=LookupInput, output=Looked)
    embedded = p.call("cache_embed", server, method, text=p.input.question, idempotent=True)
    found = p.call(
        "cache_lookup",
        spec.store,
        "answers_get",
        vector=embedded.vector,
        exact=p.input.exact,
        scope=p.input.scope,
        threshold=p.input.threshold,
        max_age_s=p.input.max_age_s,
        idempotent=True,
    )
    p.returns(found=found, embedded=embedded)
    return p.build()


def _keep_graph(name: str, spec: AnswerCache) -> Graph:
    p = Pipeline(f"{name}.cache_keep", input=KeepInput, output=Any)
    fields = {f: getattr(p.input, f) for f in KeepInput.model_fields}
    p.returns(p.call("cache_keep", spec.store, "answers_put", **fields))
    return p.build()


def usage_part(lookup: Lookup | None) -> dict[str, Any]:
    """The cache's part of a request's usage: nothing without a lookup."""
    if lookup is None:
        return {}
    if not lookup.hit:
        return {"cache": lookup.result}
    return {
        "cache": "hit",
        "cache_similarity": round(lookup.similarity, 4),
        "cache_saved_usd": round(lookup.saved_usd, 9),
    }
