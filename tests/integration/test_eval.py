"""A slice of the pipelines' evaluation (benchmarks.eval_pipelines) on the real models,
against the deployed platform, four requests at a time: a regression in what the
pipelines answer fails the build. The thresholds sit below the figures measured on the
whole data sets (README, "What the pipelines answer"), with room for a slice's noise."""

from __future__ import annotations

import pytest

from benchmarks.eval_pipelines import Scores, evaluate, over_http
from servegraph.deploy.local_ray import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def results(pipelines: LocalCluster) -> dict[str, Scores]:
    with over_http(pipelines.base_url) as target:
        return evaluate(*target, split="all", concurrency=4, limit=8)


def test_rag_replies_are_clean_cited_and_grounded(results: dict[str, Scores]) -> None:
    # Measured on this slice: KB 8/8 and pydoc 6/8 replies cite a passage with the fact.
    for name, cites in (("rag kb", 0.75), ("rag pydoc", 0.5)):
        scores = results[name]
        assert not scores.errors, scores.errors
        assert scores.count("clean") == 8 and scores.rate("clean") == 1.0, name
        assert scores.rate("hit") >= 0.75, name
        assert scores.rate("cites_fact") >= cites, name


def test_the_agent_converges_uses_the_right_tool_and_states_the_fact(
    results: dict[str, Scores],
) -> None:
    scores = results["triage"]
    assert not scores.errors, scores.errors
    assert scores.count("routing") == 8
    assert scores.rate("completed") == 1.0
    assert scores.rate("repeated_tool") == 0.0
    assert scores.rate("right_tool_first_keyed") >= 0.9
    assert scores.rate("reply_fact") >= 0.6
    assert scores.rate("routing") >= 0.75
