"""The vector index model server: a durable FAISS index (SQLite-backed), one replica.

`SERVER` is its catalog entry. Importing this package imports only pydantic models.
"""

from deployments.vector_index import contract as c
from servegraph import Method, Server, ServerSpec


class VectorIndexMethods(Server, name="vector_index"):
    """The vector index's methods, typed: a pipeline calls ``vector_index.<method>(<fields>)``
    (`servegraph.lang.calls`); `SERVER` takes its contracts from here."""

    # Upserts by id, replaces by filter: repeating it changes nothing more.
    # Every method reads or writes one tenant's items: the platform sets `tenant`.
    add = Method(c.AddRequest, c.AddResponse, writes=True, idempotent=True, tenant_field="tenant")
    search = Method(c.SearchRequest, c.SearchResponse, idempotent=True, tenant_field="tenant")
    delete = Method(
        c.DeleteRequest, c.DeleteResponse, writes=True, idempotent=True, tenant_field="tenant"
    )
    count = Method(c.CountRequest, c.CountResponse, idempotent=True, tenant_field="tenant")
    # The answer cache (`deployments.vector_index.answers`), the platform's to call.
    answers_get = Method(
        c.AnswersGetRequest, c.AnswersGetResponse, idempotent=True, tenant_field="tenant"
    )
    answers_put = Method(
        c.AnswersPutRequest, c.AnswersPutResponse, writes=True, tenant_field="tenant"
    )


vector_index = VectorIndexMethods()

SERVER = ServerSpec(
    name=VectorIndexMethods.name,
    methods=VectorIndexMethods.contracts(),
    app_builder="deployments.vector_index.server:app",
    deployment="VectorIndex",
    serve_class="deployments.vector_index.server:VectorIndexDeployment",
    merged_calls=True,
    in_process="deployments.vector_index.model:VectorIndex",
    route_prefix="/index",
    reads={"stats": ("stats", c.IndexStats)},
    description="durable FAISS index (SQLite-backed), one replica by design",
)
