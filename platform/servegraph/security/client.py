"""The local user's side: the admin key `servegraph run` creates once, and the headers a
local client (start-up hooks, benchmarks, examples, tests) sends."""

from __future__ import annotations

import os
from pathlib import Path

from servegraph.security.keys import AuthSettings, KeyStore


def ensure_local_admin_key() -> tuple[Path, bool] | None:
    """`servegraph run`'s step: the local user's admin key, created once, in its file
    (mode 0600): (the file, created now). None when auth is off."""
    settings = AuthSettings()
    if settings.unsafe_disabled:
        return None
    store = KeyStore(settings.store_path)
    _, created = store.ensure_local_admin(settings.local_key_file)
    return settings.local_key_file, created


def client_headers() -> dict[str, str]:
    """What a local client (the start-up hooks, benchmarks, examples, tests) sends: the
    key in `SERVEGRAPH_API_KEY`, else the local user's admin key that `servegraph run`
    stored (`AuthSettings.local_key_file`); none if neither exists."""
    key = os.environ.get("SERVEGRAPH_API_KEY")
    if not key:
        path = AuthSettings().local_key_file
        key = path.read_text().strip() if path.exists() else None
    return {"authorization": f"Bearer {key}"} if key else {}
