"""The platform's model servers, as pipelines see them: names, typed methods, builders.

Importing this module imports only pydantic models: no Ray, no model.
"""

from __future__ import annotations

from deployments import schemas as s
from servegraph import Catalog, MethodContract, ServerSpec

CATALOG = Catalog(
    [
        ServerSpec(
            name="llm",
            methods={
                # No side effect: a chat whose replica died is asked again.
                "chat": MethodContract(
                    s.ChatRequest,
                    s.ChatResponse,
                    chunk=s.ChatChunk,
                    stream_method="chat_stream",
                    usage="usage",
                    idempotent=True,
                )
            },
            app_builder="deployments.apps:llm_app",
            deployment="deployments.apps:llm_deployment_name",  # depends on the model id
            route_prefix="/",
            client="deployments.llm:LLMClient",
            description="vLLM via ray.serve.llm; OpenAI routes at /v1",
        ),
        ServerSpec(
            name="embedder",
            methods={
                "embed": MethodContract(s.EmbedRequest, s.EmbedResponse, idempotent=True),
                "embed_one": MethodContract(s.EmbedOneRequest, s.Embedding, idempotent=True),
            },
            app_builder="deployments.apps:embedder_app",
            deployment="Embedder",
            route_prefix="/embedder",
            reads={"info": ("info", s.EmbedderInfo), "stats": ("batch_stats", s.BatchStats)},
            description="all-MiniLM-L6-v2 sentence embeddings, dynamically batched",
        ),
        ServerSpec(
            name="classifier",
            methods={
                "classify": MethodContract(s.ClassifyRequest, s.Classification, idempotent=True),
                "classify_batch": MethodContract(
                    s.ClassifyBatchRequest, s.ClassifyBatchResponse, idempotent=True
                ),
            },
            app_builder="deployments.apps:classifier_app",
            deployment="Classifier",
            route_prefix="/classifier",
            reads={"info": ("info", s.ClassifierInfo), "stats": ("batch_stats", s.BatchStats)},
            description="support-ticket category classifier, dynamically batched",
        ),
        ServerSpec(
            name="vector_index",
            methods={
                # Upserts by id, replaces by filter: repeating it changes nothing more.
                "add": MethodContract(s.AddRequest, s.AddResponse, idempotent=True),
                "search": MethodContract(s.SearchRequest, s.SearchResponse, idempotent=True),
                "delete": MethodContract(s.DeleteRequest, s.DeleteResponse, idempotent=True),
                "count": MethodContract(s.CountRequest, s.CountResponse, idempotent=True),
            },
            app_builder="deployments.apps:vector_index_app",
            deployment="VectorIndex",
            route_prefix="/index",
            reads={"stats": ("stats", s.IndexStats)},
            description="durable FAISS index (SQLite-backed), one replica by design",
        ),
    ]
)
