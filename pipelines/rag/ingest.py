"""RAG ingestion: chunk -> embed -> index (replacing the documents' old chunks).

Chunk ids are ``<doc id>#<n>`` and every chunk carries its ``doc_id``. The index adds
the new chunks and removes every old chunk of the same documents in one transaction,
so a re-ingested document is replaced, not duplicated, even when it now has fewer
chunks; and a re-ingest that fails leaves the previous version whole.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from tqdm import tqdm

from deployments.embedder import embedder
from deployments.embedder.contract import EmbedResponse
from deployments.vector_index import vector_index
from deployments.vector_index.contract import AddResponse, IndexItem
from pipelines.rag.models import Document, IngestedDocument, IngestRequest, IngestResponse
from servegraph import Pipeline
from servegraph.security.client import client_headers

KB_DIR = Path(__file__).parent / "kb"


def build_pipeline() -> Pipeline:
    p = Pipeline(
        "rag_ingest",
        input=IngestRequest,
        output=IngestResponse,
        description="Chunk, embed and index documents (re-ingest replaces).",
        # The largest request (1,000,000 characters) embeds ~40,000 chunks.
        deadline_s=600,
    )
    chunks = p.function(
        "chunk", chunk_documents, documents=p.input.documents, chunk_chars=p.input.chunk_chars
    )
    vectors = p.call("embed", embedder.embed(texts=chunks.texts))
    items = p.function("items", to_items, chunks=chunks, embedded=vectors)
    # Upserts by id and replaces by doc_id: safe to repeat.
    added = p.call(
        "index",
        vector_index.add(items=items, replace=chunks.doc_filters),
        idempotent=True,
        retries=2,
    )
    p.returns(p.function("report", report, chunks=chunks, added=added))
    return p


def split_markdown(text: str, chunk_chars: int) -> list[str]:
    """Paragraph-packed chunks of about `chunk_chars`, never splitting a paragraph
    unless it alone is longer than a chunk."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        while len(paragraph) > chunk_chars:
            cut = paragraph.rfind(" ", 0, chunk_chars)
            cut = cut if cut > chunk_chars // 2 else chunk_chars
            if current:
                chunks.append(current)
                current = ""
            chunks.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if current and len(current) + len(paragraph) + 2 > chunk_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        chunks.append(current)
    return chunks


def title_of(document: Document) -> str:
    heading = re.search(r"^#+\s*(.+)$", document.text, flags=re.MULTILINE)
    return str(document.metadata.get("title") or (heading.group(1) if heading else document.id))


def chunk_documents(documents: list[Document], chunk_chars: int) -> dict:
    records, per_doc = [], {}
    for document in documents:
        pieces = split_markdown(document.text, chunk_chars)
        per_doc[document.id] = len(pieces)
        title = title_of(document)
        for n, text in enumerate(pieces):
            records.append(
                {
                    "id": f"{document.id}#{n}",
                    "text": text,
                    "metadata": {
                        **document.metadata,
                        "doc_id": document.id,
                        "title": title,
                        "chunk": n,
                    },
                }
            )
    return {
        "records": records,
        "texts": [r["text"] for r in records],
        "per_doc": per_doc,
        "doc_filters": [{"doc_id": d.id} for d in documents],
    }


def to_items(chunks: dict, embedded: EmbedResponse) -> list[IndexItem]:
    return [
        IndexItem(**record, vector=vector)
        for record, vector in zip(chunks["records"], embedded.vectors, strict=True)
    ]


def report(chunks: dict, added: AddResponse) -> IngestResponse:
    return IngestResponse(
        documents=[IngestedDocument(id=d, chunks=n) for d, n in chunks["per_doc"].items()],
        chunks=len(chunks["records"]),
        replaced=added.replaced,
        index_count=added.count,
    )


def knowledge_base() -> list[Document]:
    """The shipped support and product articles, one per Markdown file."""
    docs = []
    for path in sorted(KB_DIR.glob("*.md")):
        category = path.stem.split("-", 1)[0]
        docs.append(
            Document(
                id=f"kb/{path.stem}",
                text=path.read_text(),
                metadata={"category": category, "source": "kb"},
            )
        )
    return docs


def ingest(base_url: str, documents: list[Document], batch: int = 8) -> int:
    """Ingest through the REST endpoint in batches, with progress; returns chunks indexed."""
    total = 0
    with (
        httpx.Client(base_url=base_url, timeout=300, headers=client_headers()) as client,
        tqdm(total=len(documents), desc="ingesting knowledge base", unit="doc") as progress,
    ):
        for start in range(0, len(documents), batch):
            group = documents[start : start + batch]
            response = client.post(
                "/pipelines/rag_ingest", json={"documents": [d.model_dump() for d in group]}
            )
            response.raise_for_status()
            total += response.json()["chunks"]
            progress.update(len(group))
    return total


def on_deploy(base_url: str) -> None:
    """Start-up hook of `servegraph run`: ingest the shipped knowledge base."""
    ingest(base_url, knowledge_base())
