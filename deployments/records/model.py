"""Order and account look-ups in the support database (read-only SQLite, built from
`seed.sql` by `prepare`, or on first use), each scoped to the customer it is made for
(`LookupRequest.email`): a record another customer owns is not found, in the same
words and by the same query as one that does not exist."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

from deployments.records.contract import EMAIL, ORDER_NUMBER, Lookup, LookupRequest
from deployments.settings import ModelSettings

SEED = Path(__file__).with_name("seed.sql")


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
    return path


def prepare() -> None:
    """Set-up: the database exists."""
    database()


class SupportRecords:
    """Looks orders and accounts up. Each look-up reads in a thread, so one replica
    serves many callers at once."""

    def __init__(self) -> None:
        self.path = database()

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
