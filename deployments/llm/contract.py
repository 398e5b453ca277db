"""The LLM's contract for pipeline nodes (API consumers use the OpenAI routes at /v1)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(BaseModel):
    """A chat call from a pipeline node (the OpenAI route serves API consumers)."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(256, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    json_schema: dict | None = Field(
        None, description="Constrain the output to this JSON schema (guided decoding)."
    )
    stop: list[str] | None = None
    stream_field: str | None = Field(
        None,
        description=(
            "With json_schema, when streamed: chunks carry only the text of this top-level "
            "string field of the reply (e.g. 'answer'), as it is generated."
        ),
    )


class ChatChunk(BaseModel):
    """New text of a streamed reply (or of its `stream_field`)."""

    text: str


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


class ChatResponse(BaseModel):
    text: str
    finish_reason: str | None
    usage: Usage
    model: str
