"""The support records' contract: a look-up takes the text that holds the key (an
agent's tool argument, or a ticket) and answers what a person would be told."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

from deployments.fields import NonEmptyText

# The keys a look-up finds in its text; callers use them to know which look-up applies.
ORDER_NUMBER = re.compile(r"\b\d{5}\b")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


class LookupRequest(BaseModel):
    text: NonEmptyText = Field(
        description="Text holding the key: an order number (five digits) or an email."
    )


class Lookup(BaseModel):
    message: str = Field(description="What was found, or why nothing was, in one line.")
    record: dict[str, str] | None = Field(None, description="The row found, if any.")
