"""Order and account look-ups in the support database (SQLite, built from `seed.sql` by
`prepare`, or on first use), each scoped to the customer it is made for
(`LookupRequest.email`): a record another customer owns is not found, in the same
words and by the same query as one that does not exist.

The actions (`refund_order`, `cancel_order`) change an order of that customer, each in
one transaction that also records its idempotency key with its outcome: a repeat with
the key (a retry after a replica died, a resumed run, a second approval) answers the
first outcome and changes nothing, however many arrive at once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from decimal import Decimal, InvalidOperation
from pathlib import Path

from deployments.records.contract import (
    EMAIL,
    ORDER_NUMBER,
    ActionRequest,
    ActionResult,
    CancelRequest,
    Lookup,
    LookupRequest,
    RefundRequest,
)
from deployments.settings import ModelSettings
from servegraph import InvalidInputError

SEED = Path(__file__).with_name("seed.sql")

# What the actions keep, added to a database built before they existed as well.
ACTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS refunds (order_id TEXT PRIMARY KEY, amount TEXT NOT NULL,
                                    reason TEXT, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS applied_actions (key TEXT PRIMARY KEY, method TEXT NOT NULL,
                                            request_sha256 TEXT NOT NULL,
                                            outcome TEXT NOT NULL, at REAL NOT NULL);
"""
# An order may be cancelled until it ships.
CANCELLABLE = {"processing"}


def database() -> Path:
    """The support database, built from the seed the first time (atomically: never a
    half-built file)."""
    path = ModelSettings().home / "records" / "support.sqlite3"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # one per process building it
        tmp.unlink(missing_ok=True)
        with sqlite3.connect(tmp) as db:
            db.executescript(SEED.read_text())
        tmp.replace(path)
    with closing(sqlite3.connect(path, timeout=30)) as db, db:
        db.executescript(ACTIONS_SCHEMA)
    return path


def prepare() -> None:
    """Set-up: the database exists."""
    database()


class SupportRecords:
    """Looks orders and accounts up, refunds and cancels orders. Each call runs in a
    thread, so one replica serves many callers at once; SQLite serialises the writes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or database()

    async def lookup_order(self, request: LookupRequest) -> Lookup:
        number = ORDER_NUMBER.search(request.text)
        if not number:
            return Lookup(message="error: lookup_order needs an order number (five digits)")
        order = await self._row(
            "SELECT * FROM orders WHERE id = ? AND email = ?", number.group(0), request.email
        )
        if order is None:  # missing, or another customer's: the same answer
            return Lookup(message=f"no order {number.group(0)} found for this customer")
        return Lookup(
            message=(
                f"order {order['id']}: {order['product']}, status {order['status']}, "
                f"carrier {order['carrier']}, estimated delivery {order['eta']}, "
                f"total {order['total']}"
            ),
            record=order,
        )

    async def lookup_account(self, request: LookupRequest) -> Lookup:
        email = EMAIL.search(request.text)
        if not email:
            return Lookup(message="error: lookup_account needs the customer's email address")
        asked = email.group(0).lower()
        # Only the customer's own account: any other address is "no account", as if none.
        account = await self._row(
            "SELECT * FROM accounts WHERE email = ? AND email = ?", asked, request.email
        )
        if account is None:
            return Lookup(message=f"no account for {asked}")
        return Lookup(
            message=(
                f"account {account['email']}: {account['name']}, {account['plan']}, "
                f"status {account['status']}, customer since {account['since']}"
            ),
            record=account,
        )

    async def _row(self, sql: str, *params: str) -> dict[str, str] | None:
        return await asyncio.to_thread(self._query, sql, *params)

    def _query(self, sql: str, *params: str) -> dict[str, str] | None:
        with sqlite3.connect(f"file:{self.path}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            row = db.execute(sql, params).fetchone()
        return {k: str(v) for k, v in dict(row).items()} if row else None

    async def refund_order(self, request: RefundRequest) -> ActionResult:
        return await asyncio.to_thread(self._act, "refund_order", request, self._refund)

    async def cancel_order(self, request: CancelRequest) -> ActionResult:
        return await asyncio.to_thread(self._act, "cancel_order", request, self._cancel)

    def _act(
        self,
        method: str,
        request: ActionRequest,
        change: Callable[[sqlite3.Connection, dict[str, str], ActionRequest], ActionResult],
    ) -> ActionResult:
        """One transaction: the key's earlier outcome if it has one, else the checks,
        the change and the key with its outcome. `BEGIN IMMEDIATE` takes the write lock
        first, so concurrent repeats of one key wait and then find it applied."""
        key = request.idempotency_key
        digest = hashlib.sha256(
            f"{method}\n{request.model_dump_json(exclude={'idempotency_key'})}".encode()
        ).hexdigest()
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            try:
                if key:
                    seen = db.execute(
                        "SELECT request_sha256, outcome FROM applied_actions WHERE key = ?",
                        (key,),
                    ).fetchone()
                    if seen is not None:
                        if seen["request_sha256"] != digest:
                            raise InvalidInputError(
                                "idempotency_key",
                                "already used for a different request",
                                "send a new key for a new action, the same key only to repeat one",
                            )
                        first = ActionResult.model_validate_json(seen["outcome"])
                        db.execute("ROLLBACK")
                        return first.model_copy(update={"replayed": True})
                result = self._checked(db, request, change)
                if key:
                    db.execute(
                        "INSERT INTO applied_actions VALUES (?, ?, ?, ?, ?)",
                        (key, method, digest, result.model_dump_json(), time.time()),
                    )
                db.execute("COMMIT")
                return result
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _checked(
        self,
        db: sqlite3.Connection,
        request: ActionRequest,
        change: Callable[[sqlite3.Connection, dict[str, str], ActionRequest], ActionResult],
    ) -> ActionResult:
        number = ORDER_NUMBER.search(request.text)
        if not number:
            return ActionResult(outcome="refused", message="no order number (five digits) given")
        row = db.execute(
            "SELECT * FROM orders WHERE id = ? AND email = ?", (number.group(0), request.email)
        ).fetchone()
        if row is None:  # missing, or another customer's: the same answer
            return ActionResult(
                outcome="refused", message=f"no order {number.group(0)} found for this customer"
            )
        return change(db, {k: str(v) for k, v in dict(row).items()}, request)

    @staticmethod
    def _refund(
        db: sqlite3.Connection, order: dict[str, str], request: ActionRequest
    ) -> ActionResult:
        assert isinstance(request, RefundRequest)
        number = order["id"]
        refused = ActionResult(outcome="refused", message="", order=number)
        done = db.execute("SELECT amount FROM refunds WHERE order_id = ?", (number,)).fetchone()
        if done is not None:
            return refused.model_copy(
                update={"message": f"order {number} was already refunded (${done['amount']})"}
            )
        if order["status"] == "cancelled":
            return refused.model_copy(
                update={"message": f"order {number} was cancelled: nothing to refund"}
            )
        try:
            total = Decimal(order["total"].lstrip("$"))
        except InvalidOperation:
            return refused.model_copy(update={"message": f"order {number} has no total"})
        amount = request.amount if request.amount is not None else total
        if amount > total:
            return refused.model_copy(
                update={"message": f"${amount} is more than order {number}'s total of ${total}"}
            )
        db.execute(
            "INSERT INTO refunds VALUES (?, ?, ?, ?)",
            (number, f"{amount:.2f}", request.reason, time.time()),
        )
        return ActionResult(
            outcome="done",
            message=f"order {number} refunded ${amount:.2f}",
            order=number,
            amount=f"{amount:.2f}",
        )

    @staticmethod
    def _cancel(
        db: sqlite3.Connection, order: dict[str, str], request: ActionRequest
    ) -> ActionResult:
        number, status = order["id"], order["status"]
        if status == "cancelled":
            return ActionResult(
                outcome="refused", message=f"order {number} was already cancelled", order=number
            )
        if status not in CANCELLABLE:
            return ActionResult(
                outcome="refused",
                message=f"order {number} cannot be cancelled: it is {status}",
                order=number,
            )
        db.execute("UPDATE orders SET status = 'cancelled' WHERE id = ?", (number,))
        return ActionResult(outcome="done", message=f"order {number} cancelled", order=number)
