"""Search the knowledge base without an answer: the chunks closest to a question, with
their scores (embed ─► retrieve). For a help desk's search box, or to check what `rag`
would read, at the cost of one embedding and one index search, no LLM.

Like every call to the index, it reads the caller's tenant's documents only.
"""

from __future__ import annotations

from deployments.embedder import embedder
from deployments.vector_index import vector_index
from deployments.vector_index.contract import SearchResponse
from pipelines.rag.models import Found, SearchQuery, SearchResults
from servegraph import Pipeline


def build_pipeline() -> Pipeline:
    p = Pipeline(
        "rag_search",
        input=SearchQuery,
        output=SearchResults,
        description="The knowledge-base chunks closest to a question, no answer.",
    )
    query = p.call("embed", embedder.embed_one(text=p.input.question))
    found = p.call(
        "retrieve",
        vector_index.search(vector=query.vector, k=p.input.k, filter=p.input.filter),
        idempotent=True,
        retries=1,
    )
    p.returns(p.function("results", results, found=found))
    return p


def results(found: SearchResponse) -> SearchResults:
    return SearchResults(
        results=[
            Found(
                id=hit.id,
                doc_id=str(hit.metadata.get("doc_id", hit.id)),
                title=str(hit.metadata.get("title", "")),
                text=hit.text,
                score=hit.score,
            )
            for hit in found.hits
        ]
    )
