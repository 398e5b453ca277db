"""The support records' actions (`refund_order`, `cancel_order`): the checks a shop makes,
each change made once per idempotency key however many repeats arrive at once, and a
key never reused for a different action. In process on the real SQLite database, no
Ray; the concurrent cases run in threads, as the replica runs them."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.records.contract import CancelRequest, LookupRequest, RefundRequest
from servegraph import InvalidInputError


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))  # the real seed, built here
    from deployments.records.model import SupportRecords

    return SupportRecords()


def refund(order: str = "12345", email: str = "ana@example.com", **kw: Any) -> RefundRequest:
    return RefundRequest(text=f"Please refund order {order}", email=email, **kw)


def cancel(order: str, email: str, **kw: Any) -> CancelRequest:
    return CancelRequest(text=f"Cancel order {order}", email=email, **kw)


def refunds(records) -> list[tuple[str, str]]:
    with sqlite3.connect(records.path) as db:
        return db.execute("SELECT order_id, amount FROM refunds ORDER BY order_id").fetchall()


async def test_a_refund_is_made_once_and_a_second_one_is_refused(records) -> None:
    first = await records.refund_order(refund(idempotency_key="a"))
    assert (first.outcome, first.amount, first.replayed) == ("done", "89.90", False)
    again = await records.refund_order(refund(idempotency_key="b"))  # a new action
    assert again.outcome == "refused" and "already refunded ($89.90)" in again.message
    assert refunds(records) == [("12345", "89.90")]


async def test_a_repeat_with_the_key_answers_the_first_outcome_and_changes_nothing(
    records,
) -> None:
    first = await records.refund_order(refund(amount=Decimal("10.00"), idempotency_key="k"))
    repeat = await records.refund_order(refund(amount=Decimal("10.00"), idempotency_key="k"))
    assert repeat.replayed and repeat.model_copy(update={"replayed": False}) == first
    refused = await records.cancel_order(cancel("12345", "ana@example.com", idempotency_key="c"))
    assert refused.outcome == "refused" and "in transit" in refused.message
    again = await records.cancel_order(cancel("12345", "ana@example.com", idempotency_key="c"))
    assert again.replayed and again.message == refused.message
    assert refunds(records) == [("12345", "10.00")]


async def test_a_key_used_for_another_action_is_a_422_naming_it(records) -> None:
    await records.refund_order(refund(amount=Decimal("5.00"), idempotency_key="k"))
    with pytest.raises(InvalidInputError) as raised:
        await records.refund_order(refund(amount=Decimal("6.00"), idempotency_key="k"))
    assert raised.value.field == "idempotency_key" and "new key" in raised.value.fix
    with pytest.raises(InvalidInputError):
        await records.cancel_order(cancel("12345", "ana@example.com", idempotency_key="k"))
    assert refunds(records) == [("12345", "5.00")]


async def test_fifty_repeats_at_once_apply_once(records) -> None:
    results = await asyncio.gather(
        *(records.refund_order(refund(idempotency_key="same")) for _ in range(50))
    )
    assert [r.outcome for r in results] == ["done"] * 50
    assert sum(not r.replayed for r in results) == 1
    assert refunds(records) == [("12345", "89.90")]


async def test_fifty_different_refunds_of_one_order_at_once_refund_it_once(records) -> None:
    results = await asyncio.gather(
        *(records.refund_order(refund(idempotency_key=f"k{i}")) for i in range(50))
    )
    assert sorted(r.outcome for r in results) == ["done"] + ["refused"] * 49
    assert refunds(records) == [("12345", "89.90")]


async def test_the_shops_checks(records) -> None:
    # More than the order's total; another customer's order reads like a missing one.
    over = await records.refund_order(refund(amount=Decimal("90.00")))
    assert over.outcome == "refused" and "more than order 12345's total of $89.90" in over.message
    theirs = await records.refund_order(refund(order="10234"))
    missing = await records.refund_order(refund(order="99999"))
    assert theirs.outcome == missing.outcome == "refused" and theirs.order is None
    assert theirs.message.replace("10234", "99999") == missing.message
    # An order is cancelled until it ships, once; a cancelled order is not refunded.
    lee = "lee@example.com"
    done = await records.cancel_order(cancel("11872", lee))
    assert done.outcome == "done"
    assert "already cancelled" in (await records.cancel_order(cancel("11872", lee))).message
    shipped = await records.cancel_order(cancel("10234", "sam@example.com"))
    assert shipped.outcome == "refused" and "it is delivered" in shipped.message
    after = await records.refund_order(refund(order="11872", email=lee))
    assert after.outcome == "refused" and "cancelled" in after.message
    order = await records.lookup_order(LookupRequest(text="order 11872", email=lee))
    assert "status cancelled" in order.message
    assert refunds(records) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("amount", "0"), ("amount", "-1"), ("amount", "10000.01"), ("amount", "1.001")],
)
def test_a_refund_amount_out_of_bounds_is_refused_naming_the_field(field, value) -> None:
    body = {"text": "order 12345", "email": "ana@example.com", field: value}
    with pytest.raises(ValidationError) as raised:
        RefundRequest.model_validate(body)
    assert raised.value.errors()[0]["loc"] == (field,)


async def test_a_database_built_before_the_actions_gets_their_tables(tmp_path, monkeypatch) -> None:
    from deployments.records.model import SEED, SupportRecords, database

    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))
    old = tmp_path / "records" / "support.sqlite3"
    old.parent.mkdir()
    with sqlite3.connect(old) as db:
        db.executescript(SEED.read_text())  # the seed alone: no refunds, no keys
    assert database() == old
    done = await SupportRecords(old).refund_order(refund(idempotency_key="x"))
    assert done.outcome == "done"
