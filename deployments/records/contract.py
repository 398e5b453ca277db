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
from decimal import Decimal
from typing import Annotated, Literal

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


# The contract of an action: a write, safe to repeat because the server applies it once
# per `idempotency_key` (`servegraph.lang.catalog.MethodContract.idempotency_field`).
APPLIED_ONCE = {"writes": True, "idempotent": True, "idempotency_field": "idempotency_key"}
MAX_REFUND_USD = Decimal("10000")  # above any order this shop sells; a typo's bound


class ActionRequest(BaseModel):
    """A change to one order, made for the customer who owns it."""

    text: NonEmptyText = Field(description="Text holding the order number (five digits).")
    email: CustomerEmail = Field(
        description=(
            "The customer the action is made for, as the calling application "
            "authenticated them: only an order this customer owns is changed."
        )
    )
    reason: str = Field("", max_length=500, description="Why, in the customer's words.")
    idempotency_key: str = Field(
        "",
        max_length=200,
        description=(
            "Applies the action once per key: a repeat with the same key answers the "
            "first outcome (`replayed`) and changes nothing. A pipeline's run fills it "
            "(its run id and the node); a direct caller sends its own, one per intended "
            "action. Empty: no protection against a repeat."
        ),
    )


class RefundRequest(ActionRequest):
    amount: Decimal | None = Field(
        None,
        gt=0,
        le=MAX_REFUND_USD,
        max_digits=12,
        decimal_places=2,
        description="USD to refund; the order's total by default, never more than it.",
    )


class CancelRequest(ActionRequest):
    pass


class ActionResult(BaseModel):
    outcome: Literal["done", "refused"] = Field(
        description="`done`: the change was made; `refused`: a check failed (`message`)."
    )
    message: str = Field(description="What happened, or why not, in one line.")
    order: str | None = Field(None, description="The order's number, when one was found.")
    amount: str | None = Field(None, description="The refunded amount (USD), when refunded.")
    replayed: bool = Field(
        False, description="The first outcome under this idempotency key, answered again."
    )
