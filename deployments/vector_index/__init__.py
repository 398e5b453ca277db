"""The vector index model server: a durable FAISS index (SQLite-backed), one replica.

`SERVER` is its catalog entry. Importing this package imports only pydantic models.
"""

from deployments.vector_index import contract as c
from servegraph import MethodContract, ServerSpec

SERVER = ServerSpec(
    name="vector_index",
    methods={
        # Upserts by id, replaces by filter: repeating it changes nothing more.
        "add": MethodContract(c.AddRequest, c.AddResponse, writes=True, idempotent=True),
        "search": MethodContract(c.SearchRequest, c.SearchResponse, idempotent=True),
        "delete": MethodContract(c.DeleteRequest, c.DeleteResponse, writes=True, idempotent=True),
        "count": MethodContract(c.CountRequest, c.CountResponse, idempotent=True),
    },
    app_builder="deployments.vector_index.server:app",
    deployment="VectorIndex",
    serve_class="deployments.vector_index.server:VectorIndexDeployment",
    merged_calls=True,
    in_process="deployments.vector_index.model:VectorIndex",
    route_prefix="/index",
    reads={"stats": ("stats", c.IndexStats)},
    description="durable FAISS index (SQLite-backed), one replica by design",
)
