"""The support records answer a look-up only with records the customer it is made for
owns (`LookupRequest.email`, the customer the calling application authenticated): an
order of another customer reads exactly like one that does not exist, so order numbers
cannot be enumerated across customers. In process, no Ray."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.records import SERVER
from deployments.records.contract import LookupRequest


@pytest.fixture
def records(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVEGRAPH_HOME", str(tmp_path))  # the real seed, built here
    from deployments.records.model import SupportRecords

    return SupportRecords()


def ask(text: str, email: str) -> LookupRequest:
    return LookupRequest(text=text, email=email)


async def test_a_customer_finds_their_own_order_and_account(records) -> None:
    order = await records.lookup_order(ask("Where is order 12345?", "ANA@example.com"))
    assert order.record and order.record["product"] == "Nimbus headphones"
    assert "in transit" in order.message
    account = await records.lookup_account(ask("lee@example.com", "lee@example.com"))
    assert account.record and account.record["name"] == "Lee Park"


async def test_another_customers_order_reads_like_a_missing_one(records) -> None:
    # 10234 is sam@example.com's; 99999 is nobody's.
    theirs = await records.lookup_order(ask("Where is order 10234?", "ana@example.com"))
    missing = await records.lookup_order(ask("Where is order 99999?", "ana@example.com"))
    assert theirs.record is None and missing.record is None
    assert theirs.message == "no order 10234 found for this customer"
    assert theirs.message.replace("10234", "99999") == missing.message
    assert "Summit" not in theirs.model_dump_json() and "sam@" not in theirs.model_dump_json()


async def test_another_customers_account_reads_like_a_missing_one(records) -> None:
    theirs = await records.lookup_account(ask("lee@example.com", "ana@example.com"))
    missing = await records.lookup_account(ask("nobody@example.com", "ana@example.com"))
    assert theirs.record is None and missing.record is None
    assert theirs.message == "no account for lee@example.com"
    assert theirs.message.replace("lee@", "nobody@") == missing.message


@pytest.mark.parametrize("email", [None, "", "not-an-email", "ana@example.com OR 1=1"])
def test_a_look_up_needs_the_customers_email(email) -> None:
    body = {"text": "order 12345"} | ({} if email is None else {"email": email})
    with pytest.raises(ValidationError) as raised:
        LookupRequest.model_validate(body)
    assert raised.value.errors()[0]["loc"] == ("email",)


def test_the_catalog_contract_requires_the_email_on_both_look_ups() -> None:
    for method in ("lookup_order", "lookup_account"):
        request = SERVER.methods[method].request
        assert request.model_fields["email"].is_required(), method
