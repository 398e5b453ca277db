"""Delete documents from the knowledge base by id: every chunk of each, in one
transaction of the index. The caller's tenant's documents only: an id another tenant
also uses is not touched. Deleting an id the tenant does not have deletes nothing."""

from __future__ import annotations

from deployments.vector_index import vector_index
from deployments.vector_index.contract import DeleteResponse as IndexDeleted
from pipelines.rag.models import DeleteRequest, DeleteResponse
from servegraph import Pipeline


def build_pipeline() -> Pipeline:
    p = Pipeline(
        "rag_delete",
        input=DeleteRequest,
        output=DeleteResponse,
        description="Delete documents (every chunk of each) by id.",
    )
    filters = p.function("filters", by_document, ids=p.input.ids)
    # Deleting what is already gone changes nothing: safe to repeat.
    deleted = p.call("delete", vector_index.delete(any_of=filters), idempotent=True, retries=2)
    p.returns(p.function("report", report, deleted=deleted))
    return p


def by_document(ids: list[str]) -> list[dict[str, str]]:
    return [{"doc_id": doc_id} for doc_id in dict.fromkeys(ids)]


def report(deleted: IndexDeleted) -> DeleteResponse:
    return DeleteResponse(deleted=deleted.deleted, index_count=deleted.count)
