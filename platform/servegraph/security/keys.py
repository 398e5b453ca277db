"""API keys and their store: `KeyStore` (one SQLite file, SHA-256 of each secret,
constant-time comparison), what a key may do (`KeySpec`, `Caller`), the settings
(`AuthSettings`) and the error every check answers with (`AuthError`: 401, 403 or 429).
See `servegraph.security` for the whole story."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from servegraph.errors import ServegraphError
from servegraph.settings import home
from servegraph.tenants import DEFAULT_TENANT, TENANT_HEADER, TENANT_PATTERN, TENANT_RULE

_log = logging.getLogger(__name__)
KEY_PATTERN = re.compile(r"^sg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
SCOPE_PATTERN = re.compile(r"^(admin|llm|(invoke|write|approve):(\*|[A-Za-z0-9_.-]+))$")
LOCAL_ADMIN = "local-admin"
_DUMMY_HASH = hashlib.sha256(b"servegraph: no such key").hexdigest()
_LAST_USED_EVERY_S = 60.0  # how often one replica records a key's last use


class AuthSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRAPH_AUTH_", extra="ignore")

    unsafe_disabled: bool = Field(
        False,
        description="UNSAFE: serve every route to anyone who can reach the port, no key "
        "asked. Only for a machine nobody else can reach.",
    )
    keys: Path | None = Field(
        None, description="The key store (SQLite); default $SERVEGRAPH_HOME/auth/keys.sqlite3."
    )
    cache_s: float = Field(2.0, ge=0, le=60, description="How stale a replica's keys may be.")
    open_docs: bool = Field(
        True, description="Serve /docs and /openapi.json without a key (false: not at all)."
    )

    @property
    def store_path(self) -> Path:
        if self.keys:
            return self.keys
        return home() / "auth" / "keys.sqlite3"

    @property
    def local_key_file(self) -> Path:
        """Where `make run` keeps the local user's admin key (mode 0600)."""
        return self.store_path.parent / f"{LOCAL_ADMIN}.key"


class AuthError(ServegraphError):
    """401, 403 or 429: the HTTP layer turns it into that answer (`servegraph.serving.http`)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        kinds = {401: "unauthorized", 403: "forbidden", 429: "rate limited"}
        return {"error": kinds.get(self.status, "error"), "detail": self.detail}


UNAUTHORIZED = (
    "send a valid API key as `Authorization: Bearer <key>` "
    "(create one with `servegraph keys create`)"
)


def unauthorized() -> AuthError:
    return AuthError(401, UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="servegraph"'})


class KeySpec(BaseModel):
    """A key's record, as stored (the secret only as its hash)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    scopes: list[str] = Field(min_length=1)
    tenant: str = Field(
        DEFAULT_TENANT,
        pattern=TENANT_PATTERN,
        description=f"Whose documents the key reads and writes ({TENANT_RULE}); keys "
        "made before tenants are the default tenant's.",
    )
    requests_per_s: float | None = Field(None, gt=0, description="None: no limit.")
    tokens_per_min: int | None = Field(None, gt=0, description="LLM tokens; None: no limit.")
    created: float = Field(default_factory=time.time)
    last_used: float | None = None

    @field_validator("scopes")
    @classmethod
    def _known_scopes(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:
            if not SCOPE_PATTERN.match(scope):
                raise ValueError(
                    f"unknown scope {scope!r}: use admin, llm, invoke:<pipeline>, "
                    "invoke:*, write:<pipeline>, write:*, approve:<pipeline> or approve:*"
                )
        return scopes


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's name (never the key), its scopes and limits."""

    name: str
    scopes: frozenset[str]
    requests_per_s: float | None = None
    tokens_per_min: int | None = None
    tenant: str = DEFAULT_TENANT

    def allows(self, scope: str) -> bool:
        if "admin" in self.scopes or scope in self.scopes:
            return True
        kind, _, _ = scope.partition(":")
        return f"{kind}:*" in self.scopes

    def acting_for(self, tenant: str | None) -> str:
        """The tenant a request of this key runs for: its own, or `tenant` (the
        X-Servegraph-Tenant header) where it names another and the key is an admin;
        else AuthError 403 naming the scope."""
        if tenant is None or tenant == self.tenant:
            return self.tenant
        if "admin" in self.scopes:
            return tenant
        raise AuthError(
            403,
            f"acting for tenant {tenant!r} needs the scope 'admin'; this key belongs to "
            f"tenant {self.tenant!r}: leave out the {TENANT_HEADER} header, or use a key "
            "of that tenant",
        )

    @property
    def limited(self) -> bool:
        return self.requests_per_s is not None or self.tokens_per_min is not None


ANONYMOUS = Caller("anonymous", frozenset({"admin"}))  # only when auth is unsafe_disabled


class KeyStore:
    """The durable key store: create, list, revoke; and `verify` for the replicas."""

    def __init__(self, path: Path, cache_s: float = 2.0) -> None:
        self.path = Path(path)
        self.cache_s = cache_s
        # The files `_version` stats on every request, as strings (`os.stat` on a str
        # skips pathlib's per-call conversion).
        self._watched = (str(self.path), str(self.path) + "-wal")
        self._lock = threading.Lock()
        self._loaded_at = -1e9
        self._records: dict[str, tuple[str, Caller]] = {}  # key id -> (secret hash, caller)
        self._seen: tuple[tuple[int, int], ...] = ()
        self._last_used: dict[str, float] = {}

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self._private_files()
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, name TEXT NOT NULL "
                "UNIQUE, secret_sha256 TEXT NOT NULL, spec TEXT NOT NULL)"
            )
            yield db
        finally:
            db.close()

    def create(
        self,
        name: str,
        scopes: list[str],
        requests_per_s: float | None = None,
        tokens_per_min: int | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> str:
        """A new key of `tenant`; returned once, stored only as a hash. Raises if `name`
        is taken."""
        spec = KeySpec(
            name=name,
            scopes=scopes,
            requests_per_s=requests_per_s,
            tokens_per_min=tokens_per_min,
            tenant=tenant,
        )
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        with self._db() as db:
            try:
                db.execute(
                    "INSERT INTO keys VALUES (?, ?, ?, ?)",
                    (key_id, name, _sha256(secret), spec.model_dump_json()),
                )
            except sqlite3.IntegrityError:
                raise ValueError(
                    f"a key named {name!r} exists: revoke it first, or pick another name"
                ) from None
        return f"sg_{key_id}_{secret}"

    def _private_files(self) -> None:
        """The store readable by its owner only, before SQLite opens it: its directory
        0700 where this creates it, the database created 0600 (SQLite gives the `-wal`
        and `-shm` files it creates the database's own mode), and a database, `-wal` or
        `-shm` left readable by others (an earlier version, a copy) tightened to 0600."""
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # empty: a database
        for path in (self.path, *(self.path.with_name(self.path.name + s) for s in _SIDE_FILES)):
            _owner_only(path)

    def list(self) -> list[KeySpec]:
        with self._db() as db:
            rows = db.execute("SELECT spec FROM keys ORDER BY name").fetchall()
        return [KeySpec.model_validate_json(spec) for (spec,) in rows]

    def revoke(self, name: str) -> bool:
        with self._db() as db:
            return db.execute("DELETE FROM keys WHERE name = ?", (name,)).rowcount > 0

    def verify(self, key: str, *, refresh: bool = True, touch: bool = True) -> Caller | None:
        """The caller a key belongs to, or None (malformed, unknown or revoked).

        Args:
            refresh: re-read the store first if it changed (`refresh`); without, the
                keys as last read (a caller that refreshes from a thread of its own).
            touch: record the key's last use (a write to the store, once a minute).
        """
        match = KEY_PATTERN.match(key)
        key_id, secret = match.groups() if match else ("", key)
        if refresh:
            self.refresh()
        stored, caller = self._records.get(key_id, (_DUMMY_HASH, None))
        if not hmac.compare_digest(_sha256(secret), stored) or caller is None:
            return None
        if touch:
            self._touch(key_id)
        return caller

    def _version(self) -> tuple[tuple[int, int], ...]:
        """What changes when any process commits to the store: the database and its
        write-ahead log's modification times and sizes (one `stat` each, microseconds)."""
        stats = []
        for path in self._watched:
            try:
                st = os.stat(path)
                stats.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stats.append((0, 0))
        return tuple(stats)

    def refresh(self) -> None:
        """Re-read the keys when the store changed (a key created or revoked by any
        process is seen by the next request), and at least every `cache_s`, for
        filesystems whose modification times lag (NFS)."""
        now = time.monotonic()
        version = self._version()
        if version == self._seen and now - self._loaded_at < self.cache_s:
            return
        with self._lock:
            version = self._version()
            if version == self._seen and now - self._loaded_at < self.cache_s:
                return
            if not self.path.exists():
                records: dict[str, tuple[str, Caller]] = {}
            else:
                with self._db() as db:
                    rows = db.execute("SELECT id, secret_sha256, spec FROM keys").fetchall()
                records = {}
                for key_id, digest, text in rows:
                    spec = KeySpec.model_validate_json(text)
                    records[key_id] = (
                        digest,
                        Caller(
                            spec.name,
                            frozenset(spec.scopes),
                            spec.requests_per_s,
                            spec.tokens_per_min,
                            spec.tenant,
                        ),
                    )
            self._records, self._loaded_at, self._seen = records, time.monotonic(), version

    def _touch(self, key_id: str) -> None:
        """Record the key's last use, at most once a minute per replica (a write per
        request from every replica would serialise them all on the file)."""
        now = time.time()
        if now - self._last_used.get(key_id, 0.0) < _LAST_USED_EVERY_S:
            return
        self._last_used[key_id] = now
        try:
            with self._db() as db:
                row = db.execute("SELECT spec FROM keys WHERE id = ?", (key_id,)).fetchone()
                if row:
                    spec = json.loads(row[0]) | {"last_used": now}
                    db.execute("UPDATE keys SET spec = ? WHERE id = ?", (json.dumps(spec), key_id))
        except sqlite3.Error:
            pass  # last-used is informational; never fail a request on it

    def ensure_local_admin(self, key_file: Path) -> tuple[str, bool]:
        """The local user's admin key, created once: (key, created now). A lost key file
        means a new key (the old record is revoked: the store cannot give a key back)."""
        if key_file.exists():
            _owner_only(key_file)  # one left readable by others (0644) is tightened
            key = key_file.read_text().strip()
            if self.verify(key) is not None:
                return key, False
        self.revoke(LOCAL_ADMIN)
        key = self.create(LOCAL_ADMIN, ["admin"])
        if not key_file.parent.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through os.open: 0600 first
        with os.fdopen(fd, "w") as out:
            out.write(key + "\n")
        return key, True


_SIDE_FILES = ("-wal", "-shm")  # what SQLite keeps next to a database in WAL mode


def _owner_only(path: Path) -> None:
    """`path` at mode 0600 if others (group, world) may read or write it; nothing if it
    does not exist. A file this process may not change (another user's) is left as it
    is, with a warning naming it."""
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.warning("could not make %s readable by its owner only: %s", path, exc)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
