"""The embedder model server: all-MiniLM-L6-v2 sentence embeddings, dynamically batched.

`SERVER` is its catalog entry. Importing this package imports only pydantic models.
"""

from deployments.embedder import contract as c
from servegraph import Method, Server, ServerSpec
from servegraph.server import BatchStats


class EmbedderMethods(Server, name="embedder"):
    """The embedder's methods, typed: a pipeline calls ``embedder.<method>(<fields>)``
    (`servegraph.lang.calls`); `SERVER` takes its contracts from here."""

    embed = Method(c.EmbedRequest, c.EmbedResponse, idempotent=True)
    embed_one = Method(c.EmbedOneRequest, c.Embedding, idempotent=True)


embedder = EmbedderMethods()

SERVER = ServerSpec(
    name=EmbedderMethods.name,
    methods=EmbedderMethods.contracts(),
    app_builder="deployments.embedder.server:app",
    deployment="Embedder",
    serve_class="deployments.embedder.server:EmbedderDeployment",
    merged_calls=True,
    in_process="deployments.embedder.model:Embedder",
    models="deployments.embedder.model:model_folders",
    route_prefix="/embedder",
    # A replica's start on the 2-core machine (README, "A replica's cold start"): a call
    # to this server scaled to zero that cannot wait this long is refused at once.
    cold_start_s=9.4,
    reads={"info": ("info", c.EmbedderInfo), "stats": ("batch_stats", BatchStats)},
    description="all-MiniLM-L6-v2 sentence embeddings, dynamically batched",
)
