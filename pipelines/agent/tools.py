"""The agent's local tools: order and account look-ups in the shipped SQLite database.

The database is built from `seed.sql` on first use, into the platform's data folder.
"""

from __future__ import annotations

import re
import sqlite3
from functools import lru_cache
from pathlib import Path

from deployments.settings import ModelSettings

SEED = Path(__file__).with_name("seed.sql")


@lru_cache(maxsize=1)
def database() -> Path:
    path = ModelSettings().home / "agent" / "support.sqlite3"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        with sqlite3.connect(tmp) as db:
            db.executescript(SEED.read_text())
        tmp.replace(path)  # atomic: never a half-built database
    return path


def _query(sql: str, args: tuple) -> dict | None:
    with sqlite3.connect(f"file:{database()}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(sql, args).fetchone()
    return dict(row) if row else None


ORDER_NUMBER = re.compile(r"\b\d{5}\b")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


def lookup_order(argument: str) -> tuple[str, dict | None]:
    """What the tool tells the agent, and the order it found (None if none)."""
    number = ORDER_NUMBER.search(argument)
    if not number:
        return "error: lookup_order needs an order number (five digits), e.g. 12345", None
    order = _query("SELECT * FROM orders WHERE id = ?", (number.group(0),))
    if order is None:
        return f"no order {number.group(0)} found", None
    return (
        f"order {order['id']}: {order['product']}, status {order['status']}, "
        f"carrier {order['carrier']}, estimated delivery {order['eta']}, total {order['total']}"
    ), order


def lookup_account(argument: str) -> tuple[str, dict | None]:
    """What the tool tells the agent, and the account it found (None if none)."""
    email = EMAIL.search(argument)
    if not email:
        return "error: lookup_account needs the customer's email address", None
    account = _query("SELECT * FROM accounts WHERE email = ?", (email.group(0).lower(),))
    if account is None:
        return f"no account for {email.group(0)}", None
    return (
        f"account {account['email']}: {account['name']}, {account['plan']}, "
        f"status {account['status']}, customer since {account['since']}"
    ), account
