"""The support records' contract: a look-up takes the text that holds the key (an
agent's tool argument, or a ticket) and the customer it is made for, and answers what
that customer would be told.

Trust model: the calling application authenticated the customer and sends their email
(`email`); a look-up only ever answers with that customer's own records. An order of
another customer is "not found", in the same words as an order that does not exist, so
order numbers cannot be enumerated across customers.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, Field, StringConstraints

from deployments.fields import NonEmptyText

# The keys a look-up finds in its text; callers use them to know which look-up applies.
ORDER_NUMBER = re.compile(r"\b\d{5}\b")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")

CustomerEmail = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True, to_lower=True, max_length=320, pattern=r"^[\w.+-]+@[\w-]+\.[\w.]+$"
    ),
]


class LookupRequest(BaseModel):
    text: NonEmptyText = Field(
        description="Text holding the key: an order number (five digits) or an email."
    )
    email: CustomerEmail = Field(
        description=(
            "The customer the look-up is made for, as the calling application "
            "authenticated them (never an address read from a ticket's text): only "
            "records this customer owns are returned."
        )
    )


class Lookup(BaseModel):
    message: str = Field(description="What was found, or why nothing was, in one line.")
    record: dict[str, str] | None = Field(None, description="The row found, if any.")
