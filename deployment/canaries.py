"""The canary ledger: every canary rollout's start, analysis, step, pause, abort and promotion, append-only, beside
the release ledger (the same database), and the state of an environment's canary replayed from it.

    erpops canary status --env staging        # what `canary_state` says, with the analyses so far

One table, `erpops_canary_events`; what a canary is doing now is a pure function of its events
(`canary_state`), so every replica of the chat service, the CLI and the analysis agree on the weight without any
of them holding state. The policy in force (steps, window, bounds) is written with the `start` event: changing
the recipe does not change a rollout under way.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

from deployment.releases import utc_now
from erpops.config import CanaryPolicy, MLflowSettings
from registry.ledger import append_only

TABLE = "erpops_canary_events"
ACTIONS = ("start", "analysis", "step", "pause", "abort", "promote")
ACTIVE = ("progressing", "paused")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    at             TEXT NOT NULL,
    model          TEXT NOT NULL,
    env            TEXT NOT NULL,
    canary_id      TEXT NOT NULL,
    action         TEXT NOT NULL CHECK (action IN ({", ".join(repr(a) for a in ACTIONS)})),
    release_id     TEXT NOT NULL,
    stable_release TEXT NOT NULL,
    step           INTEGER NOT NULL,
    weight         REAL NOT NULL,
    outcome        TEXT NOT NULL DEFAULT '',
    figures        TEXT NOT NULL DEFAULT '{{}}',
    actor          TEXT NOT NULL,
    reason         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS {TABLE}_env ON {TABLE} (model, env, id);
{append_only(TABLE)}
"""


@dataclass(frozen=True)
class CanaryEvent:
    at: str
    model: str
    env: str
    canary_id: str
    action: str
    """start, analysis (a window or an in-window measurement judged), step (the weight moved up), pause
    (inconclusive: a human decides), abort (weight 0, the stable release serves alone), promote (the environment
    switched to the canary's release)."""
    release_id: str
    """The canary's release."""
    stable_release: str
    """What the environment served when the canary started (and serves until it is promoted)."""
    step: int
    """Index into the policy's steps."""
    weight: float
    """Percent of conversations on the canary after this event."""
    outcome: str = ""
    """For analysis: Successful, Failed or Inconclusive."""
    figures: str = "{}"
    """JSON: for start, {"policy": ..., "mode": "canary" | "ab"}; for analysis, the window's figures."""
    actor: str = ""
    reason: str = ""

    def data(self) -> dict:
        return json.loads(self.figures or "{}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["figures"] = self.data()
        return d


@dataclass(frozen=True)
class CanaryState:
    """One environment's newest canary, as its events leave it."""

    canary_id: str
    env: str
    release_id: str
    stable_release: str
    mode: str
    """"canary" (steps, then promotion) or "ab" (a fixed split held until a human ends it)."""
    policy: CanaryPolicy
    status: str
    """progressing | paused | aborted | promoted."""
    step: int
    weight: float
    started_at: str
    step_started_at: str
    outcomes: tuple[str, ...]
    """Analysis outcomes at this step, oldest first (in-window failures and the window's verdict)."""
    failures: int
    """Failed analyses over the whole rollout (compared with policy.failure_limit)."""
    reason: str

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def step_started(self) -> datetime:
        return datetime.fromisoformat(self.step_started_at)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["policy"] = self.policy.model_dump()
        d["active"] = self.active
        return d


def canary_state(events: Sequence[CanaryEvent], env: str) -> CanaryState | None:
    """The environment's newest canary replayed from the events (None: it never had one). Pure."""
    state: CanaryState | None = None
    for e in events:
        if e.env != env:
            continue
        if e.action == "start":
            data = e.data()
            state = CanaryState(e.canary_id, env, e.release_id, e.stable_release, data.get("mode", "canary"),
                                CanaryPolicy.model_validate(data["policy"]), "progressing", e.step, e.weight, e.at, e.at,
                                (), 0, e.reason)
            continue
        if state is None or e.canary_id != state.canary_id:
            continue
        if e.action == "analysis":
            state = _with(state, outcomes=(*state.outcomes, e.outcome),
                          failures=state.failures + (e.outcome == "Failed"), reason=e.reason)
        elif e.action == "step":
            state = _with(state, status="progressing", step=e.step, weight=e.weight, step_started_at=e.at, outcomes=(),
                          reason=e.reason)
        elif e.action in ("pause", "abort", "promote"):
            status = {"pause": "paused", "abort": "aborted", "promote": "promoted"}[e.action]
            state = _with(state, status=status, weight=e.weight, reason=e.reason)
    return state


def _with(state: CanaryState, **changes) -> CanaryState:
    import dataclasses

    return dataclasses.replace(state, **changes)


class CanaryLedger:
    """The canary table in the ledger database of the given MLflow settings."""

    def __init__(self, settings: MLflowSettings):
        from registry.ledger import ledger_path

        self.path: Path = ledger_path(settings)
        self.model = settings.registered_model_name

    def events(self, env: str | None = None) -> list[CanaryEvent]:
        from registry.ledger import read_rows

        rows = [CanaryEvent(*r) for r in read_rows(self.path, TABLE, [f.name for f in fields(CanaryEvent)],
                                                   self.model, "id")]
        return [e for e in rows if env is None or e.env == env]

    def state(self, env: str) -> CanaryState | None:
        return canary_state(self.events(env), env)

    def latest(self, env: str) -> tuple[CanaryState | None, list[CanaryEvent]]:
        """The environment's newest canary and its own events (`erpops canary status`, the API)."""
        events = self.events(env)
        state = canary_state(events, env)
        return state, [e for e in events if state and e.canary_id == state.canary_id]

    def write(self, state_or_start: CanaryState | dict, action: str, actor: str, *, step: int | None = None,
              weight: float | None = None, outcome: str = "", figures: dict | None = None,
              reason: str = "") -> CanaryEvent:
        """Append one event of the canary `state` (or, for `start`, the dict of canary_id, env, release_id and
        stable_release)."""
        s = state_or_start if isinstance(state_or_start, dict) else asdict(state_or_start)
        e = CanaryEvent(utc_now().isoformat(timespec="microseconds"), self.model, s["env"], s["canary_id"], action,
                        s["release_id"], s["stable_release"], s.get("step", 0) if step is None else step,
                        s.get("weight", 0.0) if weight is None else weight, outcome,
                        json.dumps(figures or {}, ensure_ascii=False, default=str), actor, reason)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.executescript(SCHEMA)
            cols = [f.name for f in fields(CanaryEvent)]
            conn.execute(f"INSERT INTO {TABLE} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                         tuple(getattr(e, c) for c in cols))
        finally:
            conn.close()
        return e


def format_canary(state: CanaryState | None, events: Sequence[CanaryEvent]) -> str:
    """`erpops canary status`: the rollout now, then its events."""
    if state is None:
        return "no canary has run in this environment"
    p = state.policy
    lines = [f"canary {state.canary_id} in {state.env}: {state.status}, {state.mode}, weight {state.weight:g}% "
             f"(step {state.step + 1} of {len(p.steps)}: {', '.join(f'{w}%' for w in p.steps)})",
             f"  canary release {state.release_id}; stable release {state.stable_release}",
             f"  window {p.window_s:g} s, judged every {p.interval_s:g} s; {state.failures} failed analyses "
             f"(limit {p.failure_limit})"]
    if state.reason:
        lines.append(f"  last: {state.reason}")
    lines.append("")
    lines.append("time (UTC)           action    step weight outcome       actor  reason")
    for e in events:
        if e.canary_id == state.canary_id:
            lines.append(f"{e.at[:19].replace('T', ' '):<20} {e.action:<9} {e.step + 1:>4} {e.weight:>5g}% "
                         f"{e.outcome or '-':<13} {e.actor}  {e.reason}".rstrip())
    return "\n".join(lines)
