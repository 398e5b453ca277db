"""A new model server is one folder plus one catalog line (the README's "Adding a model
server"): this test writes that folder, a lexical reranker, into `deployments/`'s
package path, adds its `SERVER` to a catalog, and the framework takes it from there: the
contract checks of `test_contracts` hold, a pipeline calling it validates and runs in
process, and the planner deploys it with its REST surface. Nothing else is edited."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import BaseModel

import deployments
from deployments.catalog import CATALOG
from servegraph import Catalog, InProcessRuntime, Pipeline, validate
from servegraph.deploy.planner import plan_platform
from servegraph.lang.graph import resolve
from tests.deployments.test_contracts import check, served_class

FOLDER = {
    "__init__.py": """
        from deployments.reranker import contract as c
        from servegraph import Method, Server, ServerSpec


        class RerankerMethods(Server, name="reranker"):
            rerank = Method(c.RerankRequest, c.RerankResponse, idempotent=True)


        reranker = RerankerMethods()

        SERVER = ServerSpec(
            name=RerankerMethods.name,
            methods=RerankerMethods.contracts(),
            app_builder="deployments.reranker.server:app",
            deployment="Reranker",
            serve_class="deployments.reranker.server:RerankerDeployment",
            in_process="deployments.reranker.model:Reranker",
            route_prefix="/reranker",
        )
    """,
    "contract.py": """
        from pydantic import BaseModel, Field

        from deployments.fields import NonEmptyText


        class RerankRequest(BaseModel):
            query: NonEmptyText
            texts: list[NonEmptyText] = Field(min_length=1, max_length=1000)


        class RerankResponse(BaseModel):
            order: list[int]
    """,
    "model.py": """
        from deployments.reranker.contract import RerankRequest, RerankResponse


        class Reranker:
            async def rerank(self, request: RerankRequest) -> RerankResponse:
                words = set(request.query.lower().split())
                overlap = [len(words & set(t.lower().split())) for t in request.texts]
                order = sorted(range(len(overlap)), key=lambda i: -overlap[i])
                return RerankResponse(order=order)
    """,
    "server.py": """
        from typing import Any

        from ray import serve

        from deployments.reranker.model import Reranker
        from deployments.serve_options import SHED, server_app

        PROFILES = {"cpu": {"num_replicas": 1, **SHED}, "gpu": {"num_replicas": 2, **SHED}}


        @serve.deployment(name="Reranker")
        class RerankerDeployment(Reranker):
            pass


        def app(args: Any = None) -> Any:
            return server_app("reranker", RerankerDeployment, PROFILES, args)
    """,
}


@pytest.fixture
def reranker(tmp_path: Path) -> Iterator[ModuleType]:
    folder = tmp_path / "reranker"
    folder.mkdir()
    for name, text in FOLDER.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip())
    deployments.__path__.append(str(tmp_path))  # as if the folder were in deployments/
    try:
        import deployments.reranker as package

        yield package
    finally:
        deployments.__path__.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.startswith("deployments.reranker")]:
            del sys.modules[module]


class Query(BaseModel):
    query: str
    texts: list[str]


def reranked(reranker: ModuleType) -> Pipeline:
    p = Pipeline("reranked", input=Query, output=reranker.contract.RerankResponse)
    p.returns(p.call("rerank", reranker.reranker.rerank(query=p.input.query, texts=p.input.texts)))
    return p


async def test_one_folder_and_one_catalog_line_make_a_served_model_server(
    reranker: ModuleType,
) -> None:
    catalog = Catalog([*CATALOG.values(), reranker.SERVER])  # the one catalog line
    spec = catalog["reranker"]
    for cls in (served_class(spec), resolve(spec.in_process)):
        check(cls, "rerank", spec.methods["rerank"])

    graph = reranked(reranker).build()
    validate(graph, catalog)
    servers = catalog.in_process_servers(skip=set(CATALOG))
    answer = await InProcessRuntime(catalog, servers).run(
        graph, {"query": "refund policy", "texts": ["shipping times", "our refund policy"]}
    )
    assert answer.order == [1, 0]

    (app,) = [a for a in plan_platform([graph], catalog).apps if a.name == "reranker"]
    assert (app.route_prefix, app.import_path) == ("/reranker", "deployments.reranker.server:app")
    assert resolve(app.import_path)(app.args) is not None  # builds without Ray running
