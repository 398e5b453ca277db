"""What the showcase pipelines answer, scored on labelled data shipped with the project.

    .venv/bin/python -m benchmarks.eval_pipelines                 # held-out part, own cluster
    .venv/bin/python -m benchmarks.eval_pipelines --url http://127.0.0.1:8000   # `make run`'s
    .venv/bin/python -m benchmarks.eval_pipelines --in-process    # no Ray: the raw models
    .venv/bin/python -m benchmarks.eval_pipelines --split dev     # the part used for tuning
    .venv/bin/python -m benchmarks.eval_pipelines --url ... --version rag=v2   # one version

Data sets (JSON lines, each row with `split`: `dev` for tuning, `heldout` never looked
at while tuning):

- `pipelines/rag/eval/kb.jsonl`: questions on the shipped knowledge base, each with the
  article (`doc_id`) and a `fact`, a phrase of the article that answers it;
- `pipelines/rag/eval/pydoc.jsonl`: the same on an unseen corpus, CPython's pydoc topics
  (shipped with Python, so offline), ingested for the run and deleted after it;
- `pipelines/agent/eval/tickets.jsonl`: support tickets with their `team`, the `tool`
  the agent should call first and a `fact` the reply must contain.

Figures per pipeline: for `rag`, retrieval hit@k (a retrieved passage holds the fact),
citation precision (cited passages from the right article), replies citing a passage
that holds the fact, answers containing the fact, clean replies (not empty, no JSON), and
which path answered; for `triage`, routing accuracy, right tool first (all tickets, and
those holding an order number or email), replies containing the fact, steps per ticket,
loop exhaustion, and who drafted the reply. Latency p50/p95 for both. Requests are sent
`--concurrency` at a time (4 by default), as a support team's tools would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.load import UNCACHED
from servegraph.security.client import client_headers

ROOT = Path(__file__).resolve().parents[1]
DATA = {
    "kb": ROOT / "pipelines/rag/eval/kb.jsonl",
    "pydoc": ROOT / "pipelines/rag/eval/pydoc.jsonl",
    "tickets": ROOT / "pipelines/agent/eval/tickets.jsonl",
}
PYDOC = {"source": "pydoc"}
KB = {"source": "kb"}
LOOKUPS = {"lookup_order", "lookup_account"}
# score the answers, not the 60 s default deadline, nor answers the cache kept from a
# run before (a version compared twice would be timed on its cache)
DEADLINE = {"x-request-timeout": "300", **UNCACHED}

# (pipeline, body) -> the response's JSON; raises on a non-200 answer.
Ask = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


def rows(name: str, split: str = "heldout") -> list[dict[str, Any]]:
    """The labelled rows of a data set; split 'dev', 'heldout' or 'all'."""
    found = [json.loads(line) for line in DATA[name].read_text().splitlines() if line.strip()]
    return [r for r in found if split == "all" or r["split"] == split]


def pydoc_documents(topics: set[str] | None = None) -> list[Any]:
    """CPython's pydoc topics as documents (all, or those named)."""
    from pydoc_data.topics import topics as all_topics

    from pipelines.rag.models import Document

    return [
        Document(id=f"pydoc/{name}", text=text, metadata={**PYDOC, "title": name})
        for name, text in sorted(all_topics.items())
        if topics is None or name in topics
    ]


@dataclass
class Scores:
    """Per-row outcomes (True/False or a number) and latencies, summed up by `rate`."""

    outcomes: dict[str, list[float]] = field(default_factory=dict)
    latency_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, name: str, value: float) -> None:
        self.outcomes.setdefault(name, []).append(float(value))

    def rate(self, name: str) -> float:
        values = self.outcomes.get(name, [])
        return statistics.fmean(values) if values else float("nan")

    def count(self, name: str) -> int:
        return len(self.outcomes.get(name, []))

    def latency(self, q: float) -> float:
        ordered = sorted(self.latency_s)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0


async def _each(
    items: list[dict[str, Any]],
    concurrency: int,
    work: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(item: dict[str, Any]) -> None:
        async with semaphore:
            await work(item)

    await asyncio.gather(*(one(item) for item in items))


async def evaluate_rag(
    ask: Ask, questions: list[dict[str, Any]], filter: dict[str, Any], concurrency: int = 4
) -> Scores:
    scores = Scores()

    async def score(row: dict[str, Any]) -> None:
        started = time.perf_counter()
        try:
            answer = await ask("rag", {"question": row["question"], "filter": filter})
        except Exception as exc:  # scored as a failure, and shown
            scores.errors.append(f"{row['question']}: {exc}")
            return
        scores.latency_s.append(time.perf_counter() - started)
        fact, doc = row["fact"].lower(), row["doc_id"]
        cited = answer["cited"]
        text = answer["answer"]
        scores.add("hit", any(fact in p["text"].lower() for p in answer["passages"]))
        scores.add("doc_hit", any(p["doc_id"] == doc for p in answer["passages"]))
        scores.add("cites_fact", any(fact in p["text"].lower() for p in cited))
        for p in cited:
            scores.add("citation_precision", p["doc_id"] == doc)
        scores.add("answer_fact", fact in text.lower())
        scores.add("clean", bool(text.strip()) and not _looks_like_json(text))
        scores.add("generated", answer["method"] == "generated")
        scores.add("truncated", answer["truncated"])

    await _each(questions, concurrency, score)
    return scores


def _looks_like_json(text: str) -> bool:
    stripped = text.strip()
    return stripped.startswith(("{", "[")) or '"answer"' in stripped or '"sources"' in stripped


async def evaluate_triage(ask: Ask, tickets: list[dict[str, Any]], concurrency: int = 4) -> Scores:
    scores = Scores()

    async def score(row: dict[str, Any]) -> None:
        body = {"text": row["text"], **({"email": row["email"]} if "email" in row else {})}
        started = time.perf_counter()
        try:
            result = await ask("triage", body)
        except Exception as exc:
            scores.errors.append(f"{row['text']}: {exc}")
            return
        scores.latency_s.append(time.perf_counter() - started)
        used = [s["tool"] for s in result["steps"] if s["valid"]]
        right_first = bool(used) and used[0] == row["tool"]
        scores.add("routing", result["team"] == row["team"])
        scores.add("right_tool_first", right_first)
        if row["tool"] in LOOKUPS:
            scores.add("right_tool_first_keyed", right_first)
        scores.add("reply_fact", row["fact"].lower() in result["reply"].lower())
        scores.add("steps", len(result["steps"]))
        scores.add("completed", result["completed"])
        scores.add("llm_drafted", result["drafted"] == "llm")
        tools = [s["tool"] for s in result["steps"] if s["tool"] != "invalid"]
        scores.add("repeated_tool", len(tools) != len(set(tools)))

    await _each(tickets, concurrency, score)
    return scores


# -- where the pipelines run ------------------------------------------------------------


@contextmanager
def over_http(
    url: str, versions: dict[str, str] | None = None
) -> Iterator[tuple[Ask, Callable[[list[Any]], None], Callable[[], None]]]:
    """(ask, ingest, forget_pydoc) against a deployed platform; `versions` pins those
    pipelines' requests to a version (`X-Pipeline-Version`), else the split decides."""
    import httpx

    from pipelines.rag.ingest import ingest

    versions = versions or {}

    async def ask(pipeline: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = DEADLINE | (
            {"x-pipeline-version": versions[pipeline]} if pipeline in versions else {}
        )
        async with httpx.AsyncClient(headers=client_headers(), base_url=url, timeout=330) as client:
            response = await client.post(f"/pipelines/{pipeline}", json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        answered = response.headers.get("x-pipeline-version")
        if pipeline in versions and answered != versions[pipeline]:
            raise RuntimeError(f"{pipeline} answered by {answered}, not {versions[pipeline]}")
        return response.json()

    def forget_pydoc() -> None:
        httpx.post(
            f"{url}/index/delete", json={"filter": PYDOC}, timeout=120, headers=client_headers()
        ).raise_for_status()

    yield ask, lambda documents: ingest(url, documents), forget_pydoc


@contextmanager
def in_process(
    versions: dict[str, str] | None = None,
) -> Iterator[tuple[Ask, Callable[[list[Any]], None], Callable[[], None]]]:
    """(ask, ingest, forget_pydoc) on the raw models in this process, no Ray; `versions`
    picks those pipelines' versions, else their default."""
    import tempfile

    from deployments.catalog import CATALOG
    from deployments.vector_index.contract import DeleteRequest
    from pipelines.rag.ingest import knowledge_base
    from servegraph import InProcessRuntime
    from servegraph.lang.discovery import default_version, discover_versions

    graphs = {
        name: found[(versions or {}).get(name) or default_version(found)]
        for name, found in discover_versions().items()
    }
    with tempfile.TemporaryDirectory() as index:
        servers = CATALOG.in_process_servers(
            options={"vector_index": {"path": Path(index) / "index"}}
        )
        runtime = InProcessRuntime(CATALOG, servers)
        graphs = {name: runtime.compile(g) for name, g in graphs.items()}  # once
        try:

            async def ask(pipeline: str, body: dict[str, Any]) -> dict[str, Any]:
                return (await runtime.run(graphs[pipeline], body)).model_dump(mode="json")

            def ingest(documents: list[Any]) -> None:
                for start in range(0, len(documents), 8):
                    batch = [d.model_dump() for d in documents[start : start + 8]]
                    asyncio.run(ask("rag_ingest", {"documents": batch}))

            def forget_pydoc() -> None:
                servers["vector_index"].delete(DeleteRequest(filter=PYDOC))

            ingest(knowledge_base())
            yield ask, ingest, forget_pydoc
        finally:
            servers["llm"].close()


@contextmanager
def own_cluster(
    versions: dict[str, str] | None = None,
) -> Iterator[tuple[Ask, Callable[[list[Any]], None], Callable[[], None]]]:
    """The whole platform on a fresh local Ray, stopped on exit."""
    from benchmarks.platform_up import serving_everything

    with serving_everything() as cluster, over_http(cluster.base_url, versions) as target:
        yield target


# -- the run ----------------------------------------------------------------------------


def evaluate(
    ask: Ask,
    ingest: Callable[[list[Any]], None],
    forget_pydoc: Callable[[], None],
    split: str = "heldout",
    concurrency: int = 4,
    limit: int | None = None,
) -> dict[str, Scores]:
    """Every data set's `split` scored; with `limit`, that many rows of each, evenly
    spaced (so a small slice still spans the teams and articles)."""

    def some(name: str) -> list[dict[str, Any]]:
        found = rows(name, split)
        return found[:: max(1, len(found) // limit)][:limit] if limit else found

    pydoc = some("pydoc")
    ingest(pydoc_documents({r["doc_id"].removeprefix("pydoc/") for r in pydoc} if limit else None))
    try:
        return asyncio.run(_evaluate(ask, some("kb"), pydoc, some("tickets"), concurrency))
    finally:
        forget_pydoc()


async def _evaluate(
    ask: Ask, kb: list[dict], pydoc: list[dict], tickets: list[dict], concurrency: int
) -> dict[str, Scores]:
    return {
        "rag kb": await evaluate_rag(ask, kb, KB, concurrency),
        "rag pydoc": await evaluate_rag(ask, pydoc, PYDOC, concurrency),
        "triage": await evaluate_triage(ask, tickets, concurrency),
    }


def figures(results: dict[str, Scores], split: str) -> list[report.Figure]:
    """The issue's figures, with its targets, from one evaluation."""
    rag = Scores()
    for name in ("rag kb", "rag pydoc"):
        for key, values in results[name].outcomes.items():
            rag.outcomes.setdefault(key, []).extend(values)
    agent, pydoc = results["triage"], results["rag pydoc"]

    def pct(name: str, scores: Scores, key: str, target: str) -> report.Figure:
        return report.Figure(f"{name} ({split})", 100 * scores.rate(key), None, "%", target)

    return [
        pct("rag: clean replies", rag, "clean", ">= 100"),
        pct("rag: citing a passage holding the fact, pydoc", pydoc, "cites_fact", ">= 80"),
        pct("rag: the same, shipped articles", results["rag kb"], "cites_fact", ">= 80"),
        pct("rag: retrieval hit@4", rag, "hit", ">= 90"),
        pct("agent: tickets ending before the step limit", agent, "completed", ">= 90"),
        pct(
            "agent: right tool first, order number or email",
            agent,
            "right_tool_first_keyed",
            ">= 95",
        ),
        pct("agent: replies containing the fact", agent, "reply_fact", ">= 80"),
        pct("agent: routing accuracy", agent, "routing", ">= 90"),
    ]


def summary(results: dict[str, Scores]) -> str:
    """Every figure of every data set, as a Markdown table."""
    keys = {
        "rag": [
            ("hit", "retrieval hit@4 (a passage holds the fact)"),
            ("doc_hit", "retrieval: the right article in the top 4"),
            ("citation_precision", "citation precision (cited passages of the right article)"),
            ("cites_fact", "replies citing a passage that holds the fact"),
            ("answer_fact", "answers containing the fact"),
            ("clean", "clean replies (no raw JSON, not empty)"),
            ("generated", "answered by the LLM (the rest: extractive)"),
            ("truncated", "replies cut off at max_tokens"),
        ],
        "triage": [
            ("routing", "routing accuracy"),
            ("right_tool_first", "right tool first"),
            ("right_tool_first_keyed", "right tool first, ticket with order number or email"),
            ("reply_fact", "replies containing the fact"),
            ("completed", "ending before the step limit (the rest: loop exhausted)"),
            ("repeated_tool", "a tool called twice"),
            ("llm_drafted", "reply drafted by the LLM (the rest: stated from the facts)"),
        ],
    }
    lines = ["| data set | figure | value | n |", "|---|---|---|---|"]
    for name, scores in results.items():
        for key, label in keys[name.split()[0]]:
            if n := scores.count(key):
                lines.append(f"| {name} | {label} | {100 * scores.rate(key):.0f} % | {n} |")
        if n := scores.count("steps"):
            lines.append(f"| {name} | steps per ticket (mean) | {scores.rate('steps'):.2f} | {n} |")
        lines.append(
            f"| {name} | latency p50 / p95 | {scores.latency(0.5):.1f} s / "
            f"{scores.latency(0.95):.1f} s | {len(scores.latency_s)} |"
        )
        if scores.errors:
            lines.append(f"| {name} | failed requests | {len(scores.errors)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=["heldout", "dev", "all"], default="heldout")
    parser.add_argument("--url", help="a running platform (default: start one on local Ray)")
    parser.add_argument("--in-process", action="store_true", help="no Ray: the raw models")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--limit", type=int, help="only N rows of each data set, evenly spaced")
    parser.add_argument(
        "--version",
        action="append",
        default=[],
        metavar="PIPELINE=VERSION",
        help="score that version of the pipeline (repeat for several); else its default, or "
        "over HTTP whatever its traffic split sends",
    )
    args = parser.parse_args(argv)
    try:
        versions = dict(item.split("=", 1) for item in args.version)
    except ValueError:
        parser.error("--version: write PIPELINE=VERSION, e.g. rag=v2")
    if versions:
        from servegraph.lang.discovery import discover_versions

        served = discover_versions()
        for pipeline, version in versions.items():
            if version not in served.get(pipeline, {}):
                known = ", ".join(f"{p}={v}" for p, vs in served.items() for v in vs)
                parser.error(f"--version {pipeline}={version}: not defined here; one of {known}")
    target = (
        in_process(versions)
        if args.in_process
        else over_http(args.url, versions)
        if args.url
        else own_cluster(versions)
    )
    with target as (ask, ingest, forget_pydoc):
        results = evaluate(ask, ingest, forget_pydoc, args.split, args.concurrency, args.limit)
    print(summary(results))
    for name, scores in results.items():
        for error in scores.errors:
            print(f"{name} failed: {error}", file=sys.stderr)
    if args.split == "heldout" and not args.limit:
        pinned = "".join(f"_{p}_{v}" for p, v in sorted(versions.items()))
        report.save(f"eval_pipelines{pinned}", figures(results, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
