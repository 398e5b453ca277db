"""Versions of a pipeline side by side (issue 28): which version answers a request, and
how versions are found. Arithmetic only; the ingress's use of it is tested on Ray."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

from servegraph import Pipeline
from servegraph.lang.discovery import collect, default_version, discover
from servegraph.lang.graph import Graph
from servegraph.serving.traffic import (
    Board,
    TrafficSplit,
    UnknownVersion,
    agreement,
    default_split,
    point,
    route,
)
from tests.servegraph.toy import Answer, Label, Question

SERVED = {"v1", "v2"}


def test_weights_share_requests_within_the_binomial_interval_and_each_key_sticks() -> None:
    """The benchmark's figure at test size: 90/10 over 2,000 requests from 50 keys."""
    split = TrafficSplit(weights={"v1": 90, "v2": 10})
    rng = random.Random(7)
    keys = [f"key-{n}" for n in range(50)]
    seen: dict[str, set[str]] = {key: set() for key in keys}
    for _ in range(2_000):
        key = rng.choice(keys)
        seen[key].add(route("rag", split, SERVED, caller=key).version)
    assert all(len(versions) == 1 for versions in seen.values())  # each key sticks
    # Sticky, the share is the keys': where 50 keys' points fall. Without a caller,
    # each request draws: 2,000 draws at 10 % stay within the binomial 99 % interval.
    on_v2 = sum(route("rag", split, SERVED, rng=rng).version == "v2" for _ in range(2_000))
    half_width = 2.576 * math.sqrt(2_000 * 0.1 * 0.9)
    assert abs(on_v2 - 200) <= half_width, on_v2
    keys_on_v2 = sum(seen[key] == {"v2"} for key in keys)
    assert abs(keys_on_v2 - 5) <= 2.576 * math.sqrt(50 * 0.1 * 0.9) + 1, keys_on_v2


def test_a_growing_candidate_keeps_the_callers_it_had() -> None:
    callers = [f"caller-{n}" for n in range(400)]

    def on_v2(percent: int) -> set[str]:
        split = TrafficSplit(weights={"v1": 100 - percent, "v2": percent})
        return {c for c in callers if route("rag", split, SERVED, caller=c).version == "v2"}

    steps = [on_v2(p) for p in (1, 5, 25, 50, 100)]
    for smaller, larger in itertools.pairwise(steps):
        assert smaller <= larger
    assert steps[-1] == set(callers) and 0 < len(steps[0]) < 20


def test_a_caller_sticks_per_pipeline_not_across_them() -> None:
    assert point("rag", "ana") == point("rag", "ana")
    assert point("rag", "ana") != point("triage", "ana")


def test_without_stickiness_or_a_caller_each_request_draws() -> None:
    split = TrafficSplit(weights={"v1": 50, "v2": 50}, sticky=False)
    rng = random.Random(1)
    versions = {route("rag", split, SERVED, caller="ana", rng=rng).version for _ in range(50)}
    assert versions == SERVED


def test_a_pinned_request_gets_its_version_and_no_shadow() -> None:
    split = TrafficSplit(weights={"v1": 100}, shadow="v2", shadow_percent=100)
    assert route("rag", split, SERVED, pinned="v2") == route("rag", split, SERVED, pinned="v2")
    pinned = route("rag", split, SERVED, caller="ana", pinned="v2")
    assert (pinned.version, pinned.shadow, pinned.pinned) == ("v2", None, True)
    with pytest.raises(UnknownVersion) as refused:
        route("rag", split, SERVED, pinned="v3")
    assert refused.value.served == ["v1", "v2"]
    assert "'v3'" in str(refused.value) and "v1, v2" in str(refused.value)


def test_a_shadow_runs_its_share_and_never_shadows_itself() -> None:
    always = TrafficSplit(weights={"v1": 90, "v2": 10}, shadow="v2", shadow_percent=100)
    rng = random.Random(3)
    routes = [route("rag", always, SERVED, caller=f"k{n}", rng=rng) for n in range(200)]
    assert all(r.shadow == "v2" for r in routes if r.version == "v1")
    assert all(r.shadow is None for r in routes if r.version == "v2")
    some = always.model_copy(update={"shadow_percent": 20.0})
    shadowed = sum(route("rag", some, SERVED, rng=rng).shadow is not None for _ in range(2_000))
    assert 250 <= shadowed <= 470  # 20 % of the ~90 % on v1: 360 expected


@pytest.mark.parametrize(
    ("split", "names"),
    [
        ({"weights": {"v1": 90, "v2": 20}}, ["weights", "sum to 110"]),
        ({"weights": {"v1": 110, "v2": -10}}, ["weights.v1", "0..100"]),
        ({"weights": {}}, ["weights", "at least one"]),
        ({"weights": {"v1": 100}, "shadow_percent": 10}, ["shadow", "name the version"]),
        ({"weights": {"v1": 100}, "shadow": "v2", "shadow_percent": 101}, ["shadow_percent"]),
        ({"weights": {"v1": 100}, "mirror": "v2"}, ["mirror"]),
    ],
)
def test_a_bad_split_is_refused_naming_the_field(split: dict, names: list[str]) -> None:
    with pytest.raises(ValidationError) as refused:
        TrafficSplit.model_validate(split)
    assert all(name in str(refused.value) for name in names), str(refused.value)


def test_a_split_naming_versions_not_served_says_which_fields() -> None:
    split = TrafficSplit(weights={"v1": 50, "v3": 50}, shadow="v4", shadow_percent=5)
    assert split.problems(SERVED) == [
        "weights.v3: no version 'v3' is served (served: v1, v2)",
        "shadow: no version 'v4' is served (served: v1, v2)",
    ]
    assert TrafficSplit(weights={"v1": 100}).problems(SERVED) == []


def test_the_default_version_is_the_oldest_in_natural_order() -> None:
    assert default_version(["v10", "v2", "v9"]) == "v2"
    assert default_version(["2026-12-06", "2026-11-30"]) == "2026-11-30"
    assert default_split(["v2", "v1"]).weights == {"v1": 100}


def test_the_board_keeps_its_table_in_its_file_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "traffic.json"
    board = Board(path)
    assert board.table()[1] == {}
    revision = board.set("rag", {"weights": {"v1": 90, "v2": 10}})
    assert board.table(revision) == (revision, None)  # nothing new for who has it
    with pytest.raises(ValidationError):
        board.set("rag", {"weights": {"v1": 90}})
    again = Board(path)
    assert again.table()[0] >= revision  # never behind: replicas take its table again
    assert again.table()[1] == {"rag": TrafficSplit(weights={"v1": 90, "v2": 10}).model_dump()}
    cleared = again.set("rag", None)
    assert Board(path).table()[1] == {} and Board(path).table()[0] > cleared


def _qa(version: str, output: type = Answer) -> Graph:
    p = Pipeline("qa", input=Question, output=output, version=version)
    p.returns(p.call("answer", "echo", "answer", question=p.input))
    return p.build()


def test_versions_of_a_pipeline_are_collected_and_a_repeat_is_refused_naming_both() -> None:
    found = collect([(_qa("v1"), "pkg.qa"), (_qa("v2"), "pkg.qa_next")])
    assert set(found["qa"]) == {"v1", "v2"}
    with pytest.raises(ValueError, match=r"pkg\.qa and pkg/qa\.graph\.yaml"):
        collect([(_qa("v1"), "pkg.qa"), (_qa("v1"), "pkg/qa.graph.yaml")])


def test_versions_of_a_pipeline_must_share_its_input_and_output() -> None:
    with pytest.raises(ValueError, match="same input and return the same output"):
        collect([(_qa("v1"), "pkg.qa"), (_qa("v2", output=Label), "pkg.qa_next")])


def test_a_version_that_cannot_travel_in_a_header_is_refused() -> None:
    with pytest.raises(ValidationError, match="version"):
        _qa("v 2")


def test_the_shipped_pipelines_each_have_their_default_version() -> None:
    graphs = discover("pipelines")
    assert {"rag", "triage"} <= set(graphs)
    assert all(g.version == "v1" for g in graphs.values())


def test_a_board_without_its_file_starts_past_every_revision_given_before(tmp_path: Path) -> None:
    old = Board(tmp_path / "a.json")
    given = old.set("rag", {"weights": {"v1": 100}})
    assert Board(tmp_path / "b.json").table()[0] > given


def test_an_unreadable_file_is_set_aside_and_a_bad_split_dropped(tmp_path: Path) -> None:
    path = tmp_path / "traffic.json"
    path.write_text("{not json")
    assert Board(path).table()[1] == {}
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["traffic.json.unreadable"]
    path.write_text(
        '{"revision": 7, "splits": {"rag": {"weights": {"v1": 100}}, "bad": {"weights": {}}}}'
    )
    assert Board(path).table()[1] == {"rag": TrafficSplit(weights={"v1": 100}).model_dump()}


def test_agreement_is_one_for_the_same_answer_and_the_word_overlap_otherwise() -> None:
    assert agreement({"answer": "Refunds take 5 days."}, {"answer": "Refunds take 5 days."}) == 1
    assert agreement("refunds take 5 days", "refunds take 7 days") == 3 / 5
    assert agreement({"a": ["x"]}, {"a": ["y"]}) == 0.0
