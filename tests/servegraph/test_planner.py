"""Planning Serve applications from graphs (`plan_platform`): which model servers are
deployed, the deployment options pipelines ask of them, and how the ingress finds its
graphs. No Ray: a plan is data until `deploy()`."""

from __future__ import annotations

import pytest

from servegraph import GraphValidationError, Pipeline
from servegraph.deploy.planner import plan_platform
from tests.servegraph import toy


def classified(name: str, **deployment: object) -> Pipeline:
    p = Pipeline(name, input=toy.Text, output=str)
    label = p.call(
        "classify", "classifier", "classify", text=p.input.text, deployment=deployment or None
    )
    p.returns(p.function("shout", toy.shout, text=label.label))
    return p


def apps(plan) -> dict[str, dict]:
    return {app.name: app.args for app in plan.apps}


def test_only_the_servers_a_graph_calls_are_planned_even_inside_a_switch() -> None:
    plan = apps(plan_platform([toy.routed().build(), toy.rag().build()], toy.CATALOG))
    assert set(plan) == {"classifier", "embedder", "index", "pipelines"}
    every = plan_platform([toy.rag().build()], toy.CATALOG, all_servers=True)
    assert set(apps(every)) == {*toy.CATALOG, "pipelines"}


def test_a_nodes_deployment_options_reach_its_servers_application() -> None:
    graph = classified("a", num_replicas=2, ray_actor_options={"num_cpus": 0.5}).build()
    plan = apps(plan_platform([graph], toy.CATALOG))
    assert plan["classifier"] == {
        "overrides": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}
    }
    # Two pipelines may share a server when they ask for the same options.
    same = classified("b", num_replicas=2, ray_actor_options={"num_cpus": 0.5}).build()
    assert apps(plan_platform([graph, same], toy.CATALOG))["classifier"] == plan["classifier"]


def test_two_pipelines_asking_one_server_for_different_options_are_refused() -> None:
    one = classified("one", num_replicas=2).build()
    other = classified("other", num_replicas=3).build()
    with pytest.raises(GraphValidationError) as error:
        plan_platform([one, other], toy.CATALOG)
    text = str(error.value)
    assert "other.classify" in text and "one.classify" in text
    assert "give the shared model server one set of deployment options" in text
    # Two versions of one pipeline share its servers too, and are told apart by version.
    v2 = one.model_copy(
        update={"version": "v2", "nodes": [n.model_copy(deep=True) for n in one.nodes]}
    )
    v2.nodes[0].deployment.num_replicas = 3
    with pytest.raises(GraphValidationError) as error:
        plan_platform([one, v2], toy.CATALOG)
    assert "one v2.classify" in str(error.value) and "one v1.classify" in str(error.value)


def test_the_ingress_rediscovers_packaged_graphs_and_carries_others_as_yaml() -> None:
    # A name the package does not define: its versions there (rag's v2) are planned too,
    # and the shipped ones call the real catalog's servers, not the toy's.
    graph = toy.rag().build().model_copy(update={"name": "toy_rag"})
    packaged = apps(plan_platform([graph], toy.CATALOG, packages=["pipelines"]))["pipelines"]
    assert packaged["packages"] == ["pipelines"] and packaged["names"] == ["toy_rag"]
    carried = apps(plan_platform([graph], toy.CATALOG))["pipelines"]
    assert carried["packages"] == [] and "name: toy_rag" in carried["graphs_yaml"][0]


def test_where_the_catalog_lives_is_configured_not_hard_wired(monkeypatch) -> None:
    monkeypatch.setenv("SERVEGRAPH_CATALOG", "acme.models:CATALOG")
    plan = apps(plan_platform([toy.rag().build()], toy.CATALOG))
    assert plan["pipelines"]["catalog"] == "acme.models:CATALOG"
    given = plan_platform([toy.rag().build()], toy.CATALOG, catalog_path="x.y:Z")
    assert apps(given)["pipelines"]["catalog"] == "x.y:Z"
