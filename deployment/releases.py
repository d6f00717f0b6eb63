"""Releases: a model and its knowledge base shipped, and rolled back, as one unit, per environment.

    erpops releases [--env staging] [--json]       # what serves where, and every switch
    erpops deploy --env dev --version 3             # build a release of v3 and switch dev to it
    erpops promote-env staging prod --reason "..."  # prod gets staging's release (same GGUF, same collection)
    erpops rollback --env prod                      # prod back to the release it served before

A release is {release id, model version, GGUF sha256, Modelfile digest, collection, embedding model, corpus
digest}: built once, then switched into one environment after another without being rebuilt. Where
`releases.py` keeps it: two append-only tables beside the promotion ledger (registry.ledger.ledger_path, the
tracking database for a sqlite:/// store): `erpops_releases` (one row per release built) and
`erpops_release_events` (every switch, rollback, approval and failed attempt, with who and why).

What an environment serves is replayed from its events (`env_stack`, a pure function): a switch pushes a
release, a rollback pops one. A switch is written as `switching` before the first half moves and as `deploy`
or `promote-env` after both moved; a `switching` with nothing after it is a switch that crashed half-way,
which `deployment.deploy.reconcile` puts back before anything else happens in that environment.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from erpops.config import MLflowSettings
from registry.ledger import append_only

RELEASES = "erpops_releases"
EVENTS = "erpops_release_events"
SWITCHES = ("deploy", "promote-env")
"""Events that make a release the one an environment serves."""
EVENT_ACTIONS = (*SWITCHES, "rollback", "switching", "failed", "reconcile")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {RELEASES} (
    release_id       TEXT PRIMARY KEY,
    model            TEXT NOT NULL,
    model_version    TEXT NOT NULL,
    gguf_sha256      TEXT NOT NULL,
    modelfile_digest TEXT NOT NULL,
    collection       TEXT NOT NULL,
    embedding_model  TEXT NOT NULL,
    corpus_digest    TEXT NOT NULL,
    ollama_tag       TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    actor            TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {EVENTS} (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at           TEXT NOT NULL,
    model        TEXT NOT NULL,
    env          TEXT NOT NULL,
    action       TEXT NOT NULL CHECK (action IN ({", ".join(repr(a) for a in EVENT_ACTIONS)})),
    release_id   TEXT,
    from_release TEXT,
    actor        TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS {EVENTS}_env ON {EVENTS} (model, env, id);
{append_only(RELEASES, EVENTS)}
"""


@dataclass(frozen=True)
class Release:
    """What one release ships: everything needed to serve it again, or to check it is what was built."""

    release_id: str
    """`v<version>-<UTC yyyymmddHHMMSSmmm>`: a valid Ollama tag and, with `-` as `_`, part of a Milvus name."""
    model: str
    """Registered model name."""
    model_version: str
    """Registered model version whose GGUF this release serves."""
    gguf_sha256: str
    """sha256 of the GGUF file (checked again against the Ollama blob before the model is created)."""
    modelfile_digest: str
    """sha256 of the Modelfile (TEMPLATE, SYSTEM, parameters) the Ollama model was created with."""
    collection: str
    """Milvus collection of the knowledge base built for this release."""
    embedding_model: str
    """Embedder of that collection (queries must use the same one)."""
    corpus_digest: str
    """sha256 over the documents the collection was built from."""
    ollama_tag: str
    """`<ollama_model>:<release_id>`, the Ollama model of this release on any host that has it. Where the Ollama
    half was skipped (no server answered) no host has it until a switch to the release creates it."""
    created_at: str
    """UTC, ISO 8601."""
    actor: str
    """Who built it (user@host, prefect:<flow run>, $ERPOPS_TRIGGER)."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReleaseEvent:
    """One thing that happened to an environment."""

    at: str
    model: str
    env: str
    action: str
    """deploy, promote-env, rollback (a switch that changed what serves), switching (intent, written first),
    failed (an attempt that changed nothing), reconcile (a half-done switch put back)."""
    release_id: str | None
    """The release the environment serves after this event (the one attempted, for switching and failed)."""
    from_release: str | None
    """What it served before."""
    actor: str
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def new_release_id(version: str, now: datetime | None = None) -> str:
    """`v<version>-<UTC time to the millisecond>`: sorts by time, unique per build."""
    t = now or utc_now()
    return f"v{version}-{t.strftime('%Y%m%d%H%M%S')}{t.microsecond // 1000:03d}"


def collection_name(base: str, release_id: str) -> str:
    """Milvus names allow letters, digits and underscores."""
    return f"{base}_{release_id.replace('-', '_')}"


def corpus_digest(docs: Sequence[dict]) -> str:
    """sha256 over the documents (file, title, module, lang, body), in file order: any edit changes it."""
    blob = json.dumps(sorted(({k: d.get(k) for k in ("file", "title", "module", "lang", "body")} for d in docs),
                             key=lambda d: d["file"] or ""), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def env_stack(events: Sequence[ReleaseEvent], env: str) -> list[str]:
    """The environment's releases, oldest first, as its switches and rollbacks leave them: the last one serves,
    the one before it is what `rollback` goes back to. Attempts (switching, failed) change nothing."""
    stack: list[str] = []
    for e in events:
        if e.env != env:
            continue
        if e.action in SWITCHES and e.release_id:
            if not stack or stack[-1] != e.release_id:
                stack.append(e.release_id)
        elif e.action == "rollback" and stack:
            stack.pop()
            if e.release_id and (not stack or stack[-1] != e.release_id):  # rolled back to something else
                stack.append(e.release_id)
    return stack


def pending_switch(events: Sequence[ReleaseEvent], env: str) -> ReleaseEvent | None:
    """A `switching` intent with no switch, failure or reconcile after it: a switch that stopped half-way."""
    last = None
    for e in events:
        if e.env == env:
            last = e
    return last if last is not None and last.action == "switching" else None


class ReleaseLedger:
    """The two tables, in the ledger database of the given MLflow settings."""

    def __init__(self, settings: MLflowSettings):
        from registry.ledger import ledger_path

        self.path: Path = ledger_path(settings)
        self.model = settings.registered_model_name

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.executescript(SCHEMA)
        return conn

    def _write(self, sql: str, row: tuple) -> None:
        conn = self._connect()
        try:
            conn.execute(sql, row)
        finally:
            conn.close()

    def add_release(self, release: Release) -> None:
        cols = [f.name for f in fields(Release)]
        self._write(f"INSERT INTO {RELEASES} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    tuple(getattr(release, c) for c in cols))

    def add_event(self, event: ReleaseEvent) -> None:
        cols = [f.name for f in fields(ReleaseEvent)]
        self._write(f"INSERT INTO {EVENTS} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    tuple(getattr(event, c) for c in cols))

    def event(self, env: str, action: str, release_id: str | None, from_release: str | None, actor: str,
              reason: str = "") -> ReleaseEvent:
        e = ReleaseEvent(utc_now().isoformat(timespec="microseconds"), self.model, env, action, release_id,
                         from_release, actor, reason)
        self.add_event(e)
        return e

    def _read(self, table: str, cls, order: str):
        from registry.ledger import read_rows

        return [cls(*r) for r in read_rows(self.path, table, [f.name for f in fields(cls)], self.model, order)]

    def releases(self) -> list[Release]:
        """Every release built, oldest first."""
        return self._read(RELEASES, Release, "created_at, release_id")

    def events(self) -> list[ReleaseEvent]:
        """Every event, in the order written."""
        return self._read(EVENTS, ReleaseEvent, "id")

    def release(self, release_id: str) -> Release:
        for r in self.releases():
            if r.release_id == release_id:
                return r
        raise KeyError(f"no release {release_id!r} in {self.path}")

    def serving(self, env: str) -> tuple[str | None, str | None]:
        """(release serving env, release before it), per the events."""
        stack = env_stack(self.events(), env)
        return (stack[-1] if stack else None), (stack[-2] if len(stack) > 1 else None)


def format_releases(releases: Sequence[Release], events: Sequence[ReleaseEvent], envs: Sequence[str]) -> str:
    """Per environment, what serves and what rollback would go back to; then every event, newest last."""
    by_id = {r.release_id: r for r in releases}
    lines = ["environment  serving                       model  collection                         previous"]
    for env in envs:
        stack = env_stack(events, env)
        cur = by_id.get(stack[-1]) if stack else None
        prev = stack[-2] if len(stack) > 1 else "-"
        lines.append(f"{env:<12} {(cur.release_id if cur else '-'):<29} {('v' + cur.model_version) if cur else '-':<6} "
                     f"{(cur.collection if cur else '-'):<34} {prev}")
    lines.append("")
    lines.append("time (UTC)           env        action       release                       from                          actor  reason")
    for e in events:
        lines.append(f"{e.at[:19].replace('T', ' '):<20} {e.env:<10} {e.action:<12} {e.release_id or '-':<29} "
                     f"{e.from_release or '-':<29} {e.actor}  {e.reason}".rstrip())
    return "\n".join(lines)
