"""The semantic answer cache (issue 29), in one run:

1. **Threshold** on the labelled pairs (`pipelines/rag/eval/cache_pairs.jsonl`: each
   question of the knowledge base with paraphrases that should share its answer and
   near misses that should not), with the real embedder: the lowest similarity that
   reuses no near miss of the tuning half, then the held-back half judged with it
   (wrong reuse, paraphrases reused).
2. **Replay** on the platform (local Ray, the real models): a support workload with
   repetition (questions drawn with Zipf popularity; a repeat is the same words, the
   same with trivial changes, or a paraphrase), four callers at once, with a key of
   its own tenant whose knowledge base is ingested first: hit rate over the repeats,
   wrong reuse (a hit for another question), latency of hits and misses, cost per
   1,000 requests with and without the cache, and the load generator's CPU; then 200
   hits one at a time, nothing else running: the hit path's own latency, by hop.
3. **Stale answers**: 8 writers re-ingest 4 documents (each pausing 30-90 s, so a
   document changes about every 15 s), each version's text naming its number, while
   32 readers ask about them; a reader notes the last version whose write had
   returned before its request, and an answer whose passages show an older one is
   stale.

    .venv/bin/python -m benchmarks.cache [--requests 300] [--race-s 60]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks import report
from benchmarks.load import percentile

PAIRS = Path(__file__).resolve().parents[1] / "pipelines" / "rag" / "eval" / "cache_pairs.jsonl"
TENANT = "bench"


def pairs() -> list[dict[str, Any]]:
    return [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]


def similarities(rows: list[dict[str, Any]]) -> np.ndarray:
    """Each pair's cosine similarity, by the embedder the platform serves."""
    from deployments.embedder.model import SentenceEncoder

    encoder = SentenceEncoder()
    a = np.asarray(encoder.encode([r["a"] for r in rows]))
    b = np.asarray(encoder.encode([r["b"] for r in rows]))
    return (a * b).sum(axis=1)


@dataclass
class Judged:
    threshold: float
    wrong: int  # near misses reused
    near_misses: int
    reused: int  # paraphrases reused
    paraphrases: int


def tune(rows: list[dict[str, Any]], sims: np.ndarray) -> float:
    """The lowest threshold (to 0.005) that reuses none of the tuning half's near misses."""
    misses = [
        float(s) for s, r in zip(sims, rows, strict=True) if r["split"] == "tune" and not r["same"]
    ]
    return round(float(np.ceil((max(misses) + 1e-6) / 0.005)) * 0.005, 3)


def judge(rows: list[dict[str, Any]], sims: np.ndarray, threshold: float, split: str) -> Judged:
    chosen = [(float(s), r["same"]) for s, r in zip(sims, rows, strict=True) if r["split"] == split]
    return Judged(
        threshold,
        sum(int(s >= threshold) for s, same in chosen if not same),
        sum(int(not same) for _, same in chosen),
        sum(int(s >= threshold) for s, same in chosen if same),
        sum(int(same) for _, same in chosen),
    )


# -- the replay -----------------------------------------------------------------


def variants(question: str, rng: random.Random) -> str:
    """The same question as people retype it: case, punctuation, a greeting."""
    kind = rng.randrange(4)
    if kind == 0:
        return question.lower()
    if kind == 1:
        return question.rstrip("?") + " ?"
    if kind == 2:
        return "Hi, " + question[0].lower() + question[1:]
    return question + " Thanks!"


def workload(n: int, seed: int = 29) -> list[tuple[int, str]]:
    """`n` (group, question) requests: a group is a question of the knowledge base and
    its paraphrases; groups drawn with Zipf popularity (s = 1.1); a repeat of a group
    is its first words half the time, a retyped variant a quarter, a paraphrase a
    quarter."""
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for row in pairs():
        groups.setdefault(row["a"], [])
        if row["same"]:
            groups[row["a"]].append(row["b"])
    names = list(groups)
    rng.shuffle(names)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
    asked: set[int] = set()
    out = []
    for _ in range(n):
        g = rng.choices(range(len(names)), weights)[0]
        base = names[g]
        if g not in asked:
            question = base
        else:
            roll = rng.random()
            question = (
                base
                if roll < 0.5
                else variants(base, rng)
                if roll < 0.75
                else rng.choice(groups[base])
            )
        asked.add(g)
        out.append((g, question))
    return out


def replay(base_url: str, key: str, requests: list[tuple[int, str]]) -> dict[str, Any]:
    """Four callers through `requests` in order; each answer's group, cache result,
    latency and cost."""
    results: list[dict[str, Any]] = [{} for _ in requests]
    cursor = iter(range(len(requests)))
    lock = threading.Lock()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()

    def caller() -> None:
        headers = {"authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=180) as client:
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                group, question = requests[i]
                began = time.perf_counter()
                answer = client.post(
                    "/pipelines/rag", json={"question": question, "max_tokens": 64}
                )
                took = time.perf_counter() - began
                usage = json.loads(answer.headers.get("x-servegraph-usage", "{}"))
                results[i] = {
                    "nodes_ms": usage.get("nodes_ms", {}),
                    "total_ms": usage.get("total_ms", 0.0),
                    "group": group,
                    "status": answer.status_code,
                    "cache": answer.headers.get("x-servegraph-cache", "-"),
                    "s": took,
                    "usd": usage.get("usd", 0.0),
                    "saved_usd": usage.get("cache_saved_usd", 0.0),
                    "answer": answer.json().get("answer") if answer.status_code == 200 else None,
                }

    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(caller) for _ in range(4)]:
            future.result()
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"results": results, "wall_s": wall, "client_cpu_s": cpu}


def hits_alone(base_url: str, key: str, questions: list[str], n: int = 200) -> dict[str, Any]:
    """`n` hits one after another, nothing else running: the hit path's own latency,
    by hop (the client's view, the ingress's total, its nodes), and every process's
    CPU per hit (`benchmarks.cpu`): who spends the time. Asks only questions the
    cache holds: each is asked once first, and skipped if that was not a hit."""
    import os

    from benchmarks import cpu

    headers = {"authorization": f"Bearer {key}"}
    took: list[float] = []
    nodes: dict[str, list[float]] = {}
    total: list[float] = []
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:

        def ask(question: str) -> tuple[httpx.Response, float]:
            body = {"question": question, "max_tokens": 64}
            began = time.perf_counter()
            answer = client.post("/pipelines/rag", json=body)
            return answer, time.perf_counter() - began

        held = [q for q in questions if ask(q)[0].headers.get("x-servegraph-cache") == "hit"]
        with cpu.measured(clients={os.getpid()}) as spent:
            for i in range(n):
                answer, seconds = ask(held[i % len(held)])
                took.append(seconds)
                usage = json.loads(answer.headers["x-servegraph-usage"])
                total.append(usage["total_ms"])
                for node, ms in usage["nodes_ms"].items():
                    nodes.setdefault(node, []).append(ms)
    window = spent[0]

    def p(values: list[float], q: float, scale: float = 1.0) -> float:
        return round(percentile(values, q) * scale, 2) if values else float("nan")

    return {
        "hits": len(took),
        "questions": len(held),
        "client_p50_ms": p(took, 0.5, 1000),
        "client_p99_ms": p(took, 0.99, 1000),
        "ingress_p50_ms": p(total, 0.5),
        "ingress_p99_ms": p(total, 0.99),
        "node_p50_ms": {node: p(ms, 0.5) for node, ms in nodes.items()},
        "node_calls": {node: len(ms) for node, ms in nodes.items()},
        "cpu_ms_per_hit": {
            role: round(seconds / max(len(took), 1) * 1000, 2)
            for role, seconds in sorted(window.cpu_s.items(), key=lambda kv: -kv[1])
        },
        "busiest_process_share": {r: round(b, 2) for r, b in window.busiest.items()},
    }


def judge_replay(requests: list[tuple[int, str]], done: dict[str, Any]) -> dict[str, Any]:
    results = done["results"]
    made: dict[int, set[str]] = {}  # each group's answers, as its misses made them
    for (group, _), result in zip(requests, results, strict=True):
        if result["cache"] != "hit" and result["answer"] is not None:
            made.setdefault(group, set()).add(result["answer"])
    seen: set[int] = set()
    repeats = hits = wrong = 0
    for (group, _), result in zip(requests, results, strict=True):
        if group in seen:
            repeats += 1
            hits += result["cache"] == "hit"
        if result["cache"] == "hit" and result["answer"] not in made.get(group, set()):
            wrong += 1  # an answer made for another group's question
        seen.add(group)
    hit_s = [r["s"] for r in results if r["cache"] == "hit"]
    miss_s = [r["s"] for r in results if r["cache"] == "miss"]
    miss_usd = [r["usd"] for r in results if r["cache"] == "miss"]
    on = sum(r["usd"] for r in results) / len(results) * 1000
    off = (sum(miss_usd) / len(miss_usd)) * 1000 if miss_usd else float("nan")
    return {
        "requests": len(results),
        "errors": sum(r["status"] != 200 for r in results),
        "repeats": repeats,
        "hits": hits,
        "hit_rate_of_repeats": hits / repeats if repeats else float("nan"),
        "wrong_reuse": wrong,
        "hit_p50_ms": percentile(hit_s, 0.5) * 1000 if hit_s else float("nan"),
        "hit_p99_ms": percentile(hit_s, 0.99) * 1000 if hit_s else float("nan"),
        "miss_p50_ms": percentile(miss_s, 0.5) * 1000 if miss_s else float("nan"),
        "miss_p99_ms": percentile(miss_s, 0.99) * 1000 if miss_s else float("nan"),
        "usd_per_1000_on": on,
        "usd_per_1000_off": off,
        "saved_usd": sum(r["saved_usd"] for r in results),
        "wall_s": done["wall_s"],
        "client_cpu_s": done["client_cpu_s"],
    }


# -- the stale-answer race ------------------------------------------------------


def race(
    base_url: str,
    key: str,
    seconds: float,
    writers: int = 8,
    readers: int = 32,
    pause_s: tuple[float, float] = (30, 90),
) -> dict[str, Any]:
    """`writers` re-ingest 4 documents, each pausing `pause_s` (uniform) between
    writes, while `readers` ask about them, for `seconds`. With 8 writers a document
    changes about every 15 s: long enough for its answer to be made (seconds, with 32
    readers at the LLM) and asked again."""
    headers = {"authorization": f"Bearer {key}"}
    docs = {f"race/policy-{n}": f"policy {word}" for n, word in enumerate("ABCD")}
    acknowledged = dict.fromkeys(docs, 0)
    lock = threading.Lock()
    stale: list[str] = []
    counts = {"hit": 0, "miss": 0, "writes": 0, "errors": 0}
    ends = time.monotonic() + seconds

    def text(doc: str, version: int) -> str:
        return f"# {docs[doc]}\n\nThe {docs[doc]} is at version {version} since today."

    def ingest(client: httpx.Client, doc: str, version: int) -> None:
        body = {"documents": [{"id": doc, "text": text(doc, version)}]}
        answer = client.post("/pipelines/rag_ingest", json=body)
        answer.raise_for_status()

    with httpx.Client(base_url=base_url, headers=headers, timeout=180) as client:
        for doc in docs:
            ingest(client, doc, 0)

    def write(n: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=180) as client:
            round_ = 0
            while time.monotonic() < ends:
                doc = list(docs)[(n + round_) % len(docs)]
                round_ += 1
                with lock:  # one writer per version number; reads go on meanwhile
                    version = acknowledged[doc] + 1
                    ingest(client, doc, version)
                    acknowledged[doc] = version  # its write has returned
                    counts["writes"] += 1
                time.sleep(max(0.0, min(random.uniform(*pause_s), ends - time.monotonic())))

    def read(n: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=180) as client:
            round_ = 0
            while time.monotonic() < ends:
                doc = list(docs)[(n + round_) % len(docs)]
                round_ += 1
                with lock:
                    floor = acknowledged[doc]
                question = {
                    "question": f"What version is the {docs[doc]} at?",
                    "k": 1,
                    "max_tokens": 16,
                    "filter": {"doc_id": doc},
                }
                answer = client.post("/pipelines/rag", json=question)
                if answer.status_code != 200:
                    counts["errors"] += 1
                    continue
                result = answer.headers.get("x-servegraph-cache", "-")
                counts[result] = counts.get(result, 0) + 1
                for passage in answer.json()["passages"]:
                    version = int(passage["text"].split("version ")[1].split()[0])
                    if version < floor:
                        stale.append(f"{doc}: {result} showed v{version} after v{floor}")

    with ThreadPoolExecutor(max_workers=writers + readers) as pool:
        futures = [pool.submit(write, n) for n in range(writers)]
        futures += [pool.submit(read, n) for n in range(readers)]
        for future in futures:
            future.result()
    return {"stale": len(stale), "examples": stale[:5], **counts}


@contextmanager
def tenant_key() -> Iterator[str]:
    """A key of the benchmark's own tenant (its documents, its cached answers), revoked
    at the end."""
    from servegraph.security.keys import AuthSettings, KeyStore

    store = KeyStore(AuthSettings().store_path)
    name = f"bench-cache-{int(time.time())}"
    try:
        yield store.create(name, ["invoke:rag", "write:rag_ingest"], tenant=TENANT)
    finally:
        store.revoke(name)


def ingest_knowledge_base(base_url: str, key: str) -> None:
    from pipelines.rag.ingest import knowledge_base

    documents = [d.model_dump() for d in knowledge_base()]
    with httpx.Client(base_url=base_url, timeout=600) as client:
        answer = client.post(
            "/pipelines/rag_ingest",
            json={"documents": documents},
            headers={"authorization": f"Bearer {key}"},
        )
        answer.raise_for_status()


def main() -> None:
    from benchmarks.platform_up import serving_everything

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--race-s", type=float, default=150)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--ingress",
        choices=["proxy", "haproxy"],
        default=None,
        help="what answers HTTP (default SERVEGRAPH_INGRESS: Serve's proxy)",
    )
    args = parser.parse_args()

    rows = pairs()
    sims = similarities(rows)
    threshold = tune(rows, sims)
    tuned, held = judge(rows, sims, threshold, "tune"), judge(rows, sims, threshold, "heldout")
    print(f"threshold {threshold} (rag ships {shipped_threshold()}):")
    for name, j in (("tuning", tuned), ("held back", held)):
        print(
            f"  {name}: near misses reused {j.wrong}/{j.near_misses}, "
            f"paraphrases reused {j.reused}/{j.paraphrases}",
            flush=True,
        )

    requests = workload(args.requests)
    platform = serving_everything(dashboard=False, ingress=args.ingress)
    with platform as cluster, tenant_key() as key:
        ingest_knowledge_base(cluster.base_url, key)
        replayed = judge_replay(requests, replay(cluster.base_url, key, requests))
        print(json.dumps(replayed, indent=1), flush=True)
        alone = hits_alone(cluster.base_url, key, sorted({q for _, q in requests}))
        print(json.dumps(alone, indent=1), flush=True)
        raced = race(cluster.base_url, key, args.race_s)
        print(json.dumps(raced, indent=1), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "tuned": tuned.__dict__,
                    "held": held.__dict__,
                    "replay": replayed,
                    "alone": alone,
                    "race": raced,
                },
                indent=1,
            )
        )
    report.save(
        "cache",
        [
            report.Figure(
                f"cache: near misses reused, held back (threshold {threshold})",
                100 * held.wrong / held.near_misses,
                None,
                "%",
                "<= 1",
                higher_is_better=False,
            ),
            report.Figure(
                "cache: hits of the replay's repeats",
                100 * replayed["hit_rate_of_repeats"],
                None,
                "%",
                ">= 80",
            ),
            report.Figure(
                "cache: stale answers, 8 writers x 32 readers",
                raced["stale"],
                None,
                "answers",
                "<= 0",
                higher_is_better=False,
            ),
            report.Figure(
                "cache: a hit's p99 during the replay (misses at the LLM beside it)",
                replayed["hit_p99_ms"],
                None,
                "ms",
                "< 20",
                higher_is_better=False,
            ),
            report.Figure(
                "cache: a hit's p99 alone, one caller",
                alone["client_p99_ms"],
                None,
                "ms",
                "< 20",
                higher_is_better=False,
            ),
            report.Figure(
                "cache: USD per 1,000 rag requests, on / off",
                replayed["usd_per_1000_on"],
                replayed["usd_per_1000_off"],
                "USD",
                "reported",
                higher_is_better=False,
            ),
        ],
    )


def shipped_threshold() -> float:
    from pipelines.rag.qa import CACHE_THRESHOLD

    return CACHE_THRESHOLD


if __name__ == "__main__":
    main()
