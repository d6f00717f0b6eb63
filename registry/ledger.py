"""Append-only promotion ledger: every move of an alias (candidate, champion, previous), when, by whom, why.

    erpops status --history                  # the ledger, newest last
    erpops status --history --json
    erpops status --at 2026-11-21T10:00:00   # which version was champion then (UTC)

Where it lives: with a `sqlite:///` tracking URI, in the table `erpops_alias_ledger` of that same database
file, so the ledger is backed up and copied together with the registry it describes. With any other tracking
URI (an MLflow server over http) the server's database is not ours to write, and the ledger is a local sqlite
file `.erpops/ledger.db` (relative to the working directory, like the registry lock) with the same schema.

Append-only: triggers abort every UPDATE and DELETE on the table. Entries are written by `registry/promote.py`
under the registry lock, only after the MLflow alias calls succeeded; when the write fails the aliases are
put back, so the ledger never records a move that did not happen. (A crash between the two can leave a move
unrecorded: `ledger_drift` shows where the registry and the ledger disagree.)

Rows are read in the order they were appended (the lock serialises writers), which is also time order.
"""

from __future__ import annotations

import getpass
import os
import socket
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from erpops.config import Aliases, MLflowSettings

TABLE = "erpops_alias_ledger"
LOCAL_LEDGER = Path(".erpops/ledger.db")
ACTIONS = ("register", "promote", "force-promote", "rollback", "restore")
PROMOTIONS = ("promote", "force-promote")



def append_only(*tables: str) -> str:
    """SQL for triggers that refuse UPDATE and DELETE on each table: the ledgers' and the audit logs' guarantee."""
    return "".join(f"""
CREATE TRIGGER IF NOT EXISTS {t}_no_update BEFORE UPDATE ON {t}
BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END;
CREATE TRIGGER IF NOT EXISTS {t}_no_delete BEFORE DELETE ON {t}
BEGIN SELECT RAISE(ABORT, '{t} is append-only'); END;""" for t in tables)


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,            -- UTC, ISO 8601 with offset
    model        TEXT NOT NULL,            -- registered model name
    alias        TEXT NOT NULL,
    from_version TEXT,                     -- NULL: the alias did not exist
    to_version   TEXT,                     -- NULL: the alias was deleted
    action       TEXT NOT NULL CHECK (action IN ({", ".join(repr(a) for a in ACTIONS)})),
    actor        TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT '',
    gate_verdict TEXT,
    run_id       TEXT
);
CREATE INDEX IF NOT EXISTS {TABLE}_model_alias ON {TABLE} (model, alias, id);
{append_only(TABLE)}
"""

_COLUMNS = ("at", "model", "alias", "from_version", "to_version", "action", "actor", "reason", "gate_verdict", "run_id")


@dataclass(frozen=True)
class LedgerEntry:
    """One alias move, as it happened."""

    at: str
    """When, UTC, ISO 8601 (`2026-11-21T10:00:00.123456+00:00`)."""
    model: str
    """Registered model name."""
    alias: str
    """The alias that moved."""
    from_version: str | None
    """Version it pointed to before; None when the alias did not exist."""
    to_version: str | None
    """Version it points to now; None when the alias was deleted."""
    action: str
    """register, promote, force-promote, rollback or restore."""
    actor: str
    """Who or what triggered it: `user@host`, `prefect:<flow-run-id>` or $ERPOPS_TRIGGER (e.g. `ci`)."""
    reason: str = ""
    """Free text given with the action (required for force-promote)."""
    gate_verdict: str | None = None
    """`gate_verdict` tag of the version the alias now points to (of the one it left, for a deletion)."""
    run_id: str | None = None
    """MLflow run of that same version."""

    def to_dict(self) -> dict:
        return asdict(self)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def parse_when(when: str | datetime) -> datetime:
    """An aware UTC datetime; a time without offset is taken as UTC. Raises ValueError on a bad string."""
    t = datetime.fromisoformat(when.strip().replace("Z", "+00:00")) if isinstance(when, str) else when
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def resolve_actor(env: Mapping[str, str], flow_run_id: str | None, user: str, host: str) -> str:
    """$ERPOPS_TRIGGER when set (a deliberate label such as `ci`), else the Prefect flow run, else user@host."""
    if env.get("ERPOPS_TRIGGER"):
        return env["ERPOPS_TRIGGER"]
    if flow_run_id:
        return f"prefect:{flow_run_id}"
    return f"{user}@{host}"


def current_actor() -> str:
    """The actor of this process (see `resolve_actor`). Prefect is asked only if this process imported it."""
    flow_run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    if "prefect" in sys.modules:
        from prefect.runtime import flow_run

        flow_run_id = flow_run.get_id() or flow_run_id
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment and none in the password database
        user = "unknown"
    return resolve_actor(os.environ, flow_run_id, user, socket.gethostname())


def ledger_path(settings: MLflowSettings) -> Path:
    """The tracking database itself for a sqlite:/// URI, else the local `.erpops/ledger.db`."""
    if settings.tracking_uri.startswith("sqlite:///"):
        return Path(settings.tracking_uri[len("sqlite:///"):])
    return LOCAL_LEDGER


def append(settings: MLflowSettings, entries: Sequence[LedgerEntry]) -> None:
    """Write the entries in one transaction (all or none). Call it under the registry lock."""
    if not entries:
        return
    path = ledger_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.executescript(SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(f"INSERT INTO {TABLE} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                             [tuple(getattr(e, c) for c in _COLUMNS) for e in entries])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


def read_rows(path: Path, table: str, columns: Sequence[str], model: str, order: str = "id") -> list[tuple]:
    """A ledger table's rows of one model, read-only: a missing file or table has none."""
    if not path.is_file():
        return []
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE model = ? ORDER BY {order}",
                            (model,)).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    finally:
        conn.close()


def read_ledger(settings: MLflowSettings) -> list[LedgerEntry]:
    """Entries of the configured model, oldest first. Read-only: a missing file or table is an empty ledger."""
    return [LedgerEntry(*row) for row in read_rows(ledger_path(settings), TABLE, _COLUMNS, settings.registered_model_name)]


def champion_from(entries: Sequence[LedgerEntry], when: str | datetime, champion: str = "champion") -> str | None:
    """The version the `champion` alias pointed to at `when`, replaying the entries; None if none did."""
    t = parse_when(when)
    version = None
    for e in entries:
        if e.alias == champion and parse_when(e.at) <= t:
            version = e.to_version
    return version


def champion_at(settings: MLflowSettings, when: str | datetime) -> str | None:
    """Which version was champion at time `when` (UTC when it carries no offset), per the ledger."""
    return champion_from(read_ledger(settings), when, settings.aliases.champion)


def last_promotion(entries: Sequence[LedgerEntry], version: str, champion: str = "champion") -> LedgerEntry | None:
    """The latest promote / force-promote that made `version` champion (rollbacks and restores are not
    promotions: they do not change which champion a version replaced)."""
    found = None
    for e in entries:
        if e.alias == champion and e.to_version == version and e.action in PROMOTIONS:
            found = e
    return found


def ledger_drift(entries: Sequence[LedgerEntry], aliases: Mapping[str, str], names: Aliases) -> dict[str, tuple[str | None, str | None]]:
    """alias -> (per ledger, per registry) for each managed alias where the two disagree: a move made before
    the ledger existed, outside erpops, or lost in a crash between the alias call and the ledger write."""
    last: dict[str, str | None] = {}
    for e in entries:
        last[e.alias] = e.to_version
    out = {}
    for alias in (names.candidate, names.champion, names.previous):
        if last.get(alias) != aliases.get(alias):
            out[alias] = (last.get(alias), aliases.get(alias))
    return out


def format_history(entries: Sequence[LedgerEntry]) -> str:
    """The ledger as a table, newest last."""
    if not entries:
        return "  no alias moves recorded yet"
    header = ("time (UTC)", "alias", "from -> to", "action", "actor", "reason")
    rows = [(parse_when(e.at).strftime("%Y-%m-%d %H:%M:%S"), e.alias,
             f"{_v(e.from_version)} -> {_v(e.to_version)}", e.action, e.actor, e.reason) for e in entries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]).rstrip()
                     for r in [header, *rows])


def _v(version: str | None) -> str:
    return f"v{version}" if version else "-"
