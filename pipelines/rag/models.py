"""Request and response models of the RAG pipelines."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from deployments.fields import Metadata
from deployments.llm.contract import Usage

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


MAX_DOCUMENT_CHARS = 200_000
MAX_REQUEST_CHARS = 1_000_000


DocumentId = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\w.\-/]+$")]


class Document(BaseModel):
    id: DocumentId
    text: Annotated[Text, StringConstraints(max_length=MAX_DOCUMENT_CHARS)] = Field(
        description="Plain text or Markdown."
    )
    metadata: Metadata = Field(default_factory=dict)


class IngestRequest(BaseModel):
    """Up to 64 documents and 1,000,000 characters in all: at the smallest chunk size
    that is at most ~40,000 chunks, well inside what one embed and one index call take."""

    documents: list[Document] = Field(min_length=1, max_length=64)
    chunk_chars: int = Field(600, ge=100, le=4000, description="Target chunk size.")

    @model_validator(mode="after")
    def _bounded(self) -> IngestRequest:
        total = sum(len(d.text) for d in self.documents)
        if total > MAX_REQUEST_CHARS:
            raise ValueError(
                f"documents hold {total} characters in all, more than {MAX_REQUEST_CHARS}; "
                "send them in several requests"
            )
        return self


class IngestedDocument(BaseModel):
    id: str
    chunks: int


class IngestResponse(BaseModel):
    documents: list[IngestedDocument]
    chunks: int
    replaced: int = Field(description="Old chunks removed because a document was re-ingested.")
    index_count: int


class DeleteRequest(BaseModel):
    """Documents to delete by id, with every chunk of each."""

    ids: list[DocumentId] = Field(min_length=1, max_length=1000)


class DeleteResponse(BaseModel):
    deleted: int = Field(description="Chunks removed (0 for an id the tenant does not have).")
    index_count: int = Field(description="The tenant's chunks left in the index.")


class SearchQuery(BaseModel):
    question: Annotated[Text, StringConstraints(max_length=2000)]
    k: int = Field(5, ge=1, le=50, description="Chunks to return.")
    filter: Metadata | None = Field(
        None, description="Only chunks whose metadata matches, e.g. {'category': 'billing'}."
    )


class Found(BaseModel):
    id: str = Field(description="The chunk's id: <document id>#<n>.")
    doc_id: str
    title: str
    text: str
    score: float = Field(description="Cosine similarity to the question.")


class SearchResults(BaseModel):
    results: list[Found] = Field(description="Most similar first.")


class RagQuery(BaseModel):
    question: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=3, max_length=2000)
    ]
    k: int = Field(4, ge=1, le=10, description="Passages to retrieve.")
    filter: Metadata | None = Field(
        None, description="Only passages whose metadata matches, e.g. {'category': 'billing'}."
    )
    max_tokens: int = Field(160, ge=16, le=512)


class Passage(BaseModel):
    n: int = Field(description="The source number the answer cites as [n].")
    id: str
    doc_id: str
    title: str
    text: str
    score: float = Field(description="The vector index's similarity to the question.")
    relevance: float = Field(
        0.0, description="Similarity of the passage's sentence closest to the question."
    )


class Sentence(BaseModel):
    n: int = Field(description="The passage it comes from.")
    text: str
    score: float


class Ranked(BaseModel):
    """The retrieved passages re-ranked by their sentences (the `rank` node)."""

    question: str
    passages: list[Passage]
    relevant: list[int] = Field(description="Numbers of the passages the answer may cite.")
    sentences: list[Sentence] = Field(description="The relevant passages' sentences, best first.")


class RagAnswer(BaseModel):
    answer: str
    citations: list[int] = Field(description="Source numbers the answer relies on.")
    cited: list[Passage] = Field(description="The passages it cites.")
    passages: list[Passage] = Field(description="Everything retrieved, most relevant first.")
    method: Literal["generated", "extractive", "no_sources"] = Field(
        description=(
            "generated: the LLM's answer, checked against what it cites; extractive: the "
            "cited passages' sentences closest to the question, because the generated "
            "answer was empty, repetitive or unsupported; no_sources: nothing was retrieved."
        )
    )
    truncated: bool = Field(
        False, description="The LLM's reply reached max_tokens and was read as partial JSON."
    )
    usage: Usage


EXAMPLES = {
    "rag": {"question": "How long do refunds take after a return?", "k": 4},
    "rag_search": {"question": "refund after a return", "k": 3},
    "rag_delete": {"ids": ["faq-hours"]},
    "rag_ingest": {
        "documents": [
            {
                "id": "faq-hours",
                "text": "Support is open 9-17 CET.",
                "metadata": {"category": "account"},
            }
        ]
    },
}
