"""API keys with roles, and the append-only audit log of the service (one sqlite file, `<data_dir>/serving.db`).

    erpops api-key create --name ci-bot --role operator   # prints the key once; only its hash is stored
    erpops api-key list
    erpops api-key revoke <key id>
    erpops audit [--limit 50]

A key is `erpk_<id>_<secret>`: the id finds the row, the secret (32 random bytes) is compared by its sha256 in
constant time. A fast hash is enough for a random 256-bit secret (nothing to brute-force), as with GitHub or
Stripe tokens; a password would need a slow one. Roles nest: viewer reads, operator also runs tests and
comparisons, admin also loads/unloads models and switches or rolls back releases.

The audit log records every mutating call (who, what, when, the HTTP status and an outcome line); triggers abort
every UPDATE and DELETE on it. It never holds a key or a prompt.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from registry.ledger import append_only

ROLES = ("viewer", "operator", "admin")
"""Lowest to highest; each role may do everything the ones before it may."""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS erpops_api_keys (
    key_id     TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ({", ".join(repr(r) for r in ROLES)})),
    hash       TEXT NOT NULL,              -- sha256 hex of the secret part
    created    TEXT NOT NULL,
    revoked    TEXT                        -- NULL while the key is valid
);
CREATE TABLE IF NOT EXISTS erpops_audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      TEXT NOT NULL,                 -- UTC, ISO 8601
    actor   TEXT NOT NULL,                 -- key name (key id), or "anonymous"
    role    TEXT,
    action  TEXT NOT NULL,                 -- METHOD path
    target  TEXT,                          -- model id or environment
    status  INTEGER NOT NULL,              -- HTTP status answered
    outcome TEXT NOT NULL DEFAULT ''
);
{append_only("erpops_audit")}
"""


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    role: str

    def may(self, role: str) -> bool:
        """True when this principal's role is `role` or above it."""
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def actor(self) -> str:
        return f"{self.name} ({self.key_id})"


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: str
    actor: str
    role: str | None
    action: str
    target: str | None
    status: int
    outcome: str

    def to_dict(self) -> dict:
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(key: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    parts = key.strip().split("_")
    if len(parts) != 3 or parts[0] != "erpk" or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


class KeyStore:
    """API keys and the audit log in one sqlite file; every call opens its own connection (thread-safe)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as c:
            c.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        c = sqlite3.connect(self.path, timeout=30)
        c.execute("PRAGMA journal_mode=WAL")
        return c

    def create(self, name: str, role: str) -> tuple[str, Principal]:
        """A new key: (the key, shown once and never stored, its principal)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        if not name.strip():
            raise ValueError("a key needs a name (who or what uses it)")
        key_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32).replace("_", "-")
        with self._connect() as c:
            c.execute("INSERT INTO erpops_api_keys (key_id, name, role, hash, created) VALUES (?, ?, ?, ?, ?)",
                      (key_id, name.strip(), role, _digest(secret), _now()))
        return f"erpk_{key_id}_{secret}", Principal(key_id, name.strip(), role)

    def verify(self, key: str) -> Principal | None:
        """The principal of a valid, unrevoked key; None otherwise (no hint which part was wrong)."""
        parts = split_key(key or "")
        if parts is None:
            return None
        key_id, secret = parts
        with self._connect() as c:
            row = c.execute("SELECT name, role, hash FROM erpops_api_keys WHERE key_id = ? AND revoked IS NULL",
                            (key_id,)).fetchone()
        if row is None or not hmac.compare_digest(row[2], _digest(secret)):
            return None
        return Principal(key_id, row[0], row[1])

    def revoke(self, key_id: str) -> bool:
        with self._connect() as c:
            return c.execute("UPDATE erpops_api_keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL",
                             (_now(), key_id)).rowcount == 1

    def keys(self) -> list[dict]:
        with self._connect() as c:
            rows = c.execute("SELECT key_id, name, role, created, revoked FROM erpops_api_keys ORDER BY created").fetchall()
        return [dict(zip(("key_id", "name", "role", "created", "revoked"), r)) for r in rows]

    def audit(self, principal: Principal | None, action: str, target: str | None, status: int, outcome: str = "") -> None:
        with self._connect() as c:
            c.execute("INSERT INTO erpops_audit (at, actor, role, action, target, status, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (_now(), principal.actor if principal else "anonymous", principal.role if principal else None,
                       action, target, status, outcome[:500]))

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The newest `limit` entries, oldest first."""
        with self._connect() as c:
            rows = c.execute("SELECT id, at, actor, role, action, target, status, outcome FROM erpops_audit "
                             "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [AuditEntry(*r) for r in reversed(rows)]
