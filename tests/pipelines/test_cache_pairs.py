"""The answer cache's threshold against the labelled pairs
(`pipelines/rag/eval/cache_pairs.jsonl`), with the real embedder: what `rag` ships is
what tuning picks, it reuses no near miss of either half, and the pairs are what they
claim (every question of the knowledge base with paraphrases and near misses, the two
halves disjoint by question)."""

from __future__ import annotations

from benchmarks.cache import judge, pairs, similarities, tune
from pipelines.rag.qa import CACHE_THRESHOLD


def test_the_shipped_threshold_is_the_tuned_one_and_reuses_no_near_miss() -> None:
    rows = pairs()
    sims = similarities(rows)
    assert tune(rows, sims) == CACHE_THRESHOLD
    for split in ("tune", "heldout"):
        judged = judge(rows, sims, CACHE_THRESHOLD, split)
        assert judged.near_misses >= 30 and judged.paraphrases >= 30
        assert judged.wrong / judged.near_misses <= 0.01, judged


def test_the_halves_share_no_question() -> None:
    rows = pairs()
    halves = {split: {r["a"] for r in rows if r["split"] == split} for split in ("tune", "heldout")}
    assert halves["tune"] and halves["heldout"] and not halves["tune"] & halves["heldout"]
