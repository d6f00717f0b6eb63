"""Alerts back into training: the chat service receives Alertmanager's webhook, and an alert labelled
`action: retrain` (serving/alerts.yml) becomes the Prefect event `erpops.retrain.requested`, which triggers the
on-alert deployment of prefect.yaml: train-and-gate with the alert as its reason.

    # alertmanager.yml
    receivers:
      - name: erpops
        webhook_configs:
          - url: http://127.0.0.1:8600/hooks/alertmanager
            http_config: {authorization: {credentials_file: /etc/erpops/alert-secret}}

A webhook is accepted when it carries the shared secret (ERPOPS_ALERT_SECRET): as Alertmanager sends it, a bearer
token; or signed, from any other sender, with `X-Erpops-Timestamp` (Unix seconds, within 5 minutes) and
`X-Erpops-Signature: sha256=<HMAC-SHA256(secret, "<timestamp>." + body)>`, each signature accepted once by a
replica (a replay to another replica within the 5 minutes reaches the retrain window, which absorbs it). A forged
one gets 401, a replayed or stale one 409; a flood is absorbed by the retrain window: at most one request per
`retrain_window_s` (the others are recorded as rate-limited, with a log line), and the on-alert deployment's
concurrency limit (1, CANCEL_NEW) never lets two retrains run at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from registry.ledger import append_only

log = logging.getLogger(__name__)

MAX_SKEW_S = 300
"""How far a signed webhook's timestamp may be from now."""


class WebhookRefused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class SeenSignatures:
    """Signatures accepted within the skew window (a replay inside it is refused; outside it, the timestamp is)."""

    def __init__(self, keep_s: float = 2 * MAX_SKEW_S):
        self.keep_s = keep_s
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, signature: str, now: float) -> bool:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - self.keep_s:
                self._seen.popitem(last=False)
            if signature in self._seen:
                return False
            self._seen[signature] = now
            return True


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `X-Erpops-Signature` value of a body sent at `timestamp`."""
    return "sha256=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(headers: Mapping[str, str], body: bytes, secret: str | None, now: float, seen: SeenSignatures) -> str:
    """How the webhook proved itself ("signature" or "bearer"); raises WebhookRefused (403 without a configured
    secret, 401 forged, 409 stale or replayed)."""
    if not secret:
        raise WebhookRefused(403, "no alert secret configured (ERPOPS_ALERT_SECRET): every webhook is refused")
    h = {k.lower(): v for k, v in headers.items()}
    if "x-erpops-signature" in h:
        try:
            ts = int(h.get("x-erpops-timestamp", ""))
        except ValueError:
            raise WebhookRefused(401, "signed webhook without a valid X-Erpops-Timestamp") from None
        if not hmac.compare_digest(h["x-erpops-signature"].encode(), sign(secret, ts, body).encode()):
            raise WebhookRefused(401, "webhook signature does not match")
        if abs(now - ts) > MAX_SKEW_S:
            raise WebhookRefused(409, f"webhook timestamp is {now - ts:+.0f} s from now (limit {MAX_SKEW_S} s)")
        if not seen.first_time(h["x-erpops-signature"], now):
            raise WebhookRefused(409, "webhook replayed (this signature was accepted before)")
        return "signature"
    auth = h.get("authorization", "")
    if auth.startswith("Bearer ") and hmac.compare_digest(auth[len("Bearer "):].encode(), secret.encode()):
        return "bearer"
    raise WebhookRefused(401, "webhook without a valid signature or bearer secret")


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def payload_problems(payload: object) -> list[str]:
    """What keeps a decoded webhook body from being an Alertmanager payload (version 4) as far as this service
    reads one: an object whose `alerts` is a list of objects, each with an optional string `status` and optional
    `labels` and `annotations` that map names to strings. [] for a payload of that shape. Pure."""
    if not isinstance(payload, dict):
        return [f"the body is {_kind(payload)}, not an object"]
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        return [f"alerts is {_kind(alerts)}, not a list" if "alerts" in payload else "alerts is missing"]
    problems = []
    for i, a in enumerate(alerts):
        if not isinstance(a, dict):
            problems.append(f"alerts[{i}] is {_kind(a)}, not an object")
            continue
        if "status" in a and not isinstance(a["status"], str):
            problems.append(f"alerts[{i}].status is {_kind(a['status'])}, not a string")
        for part in ("labels", "annotations"):
            value = a.get(part)
            if part in a and not isinstance(value, dict):
                problems.append(f"alerts[{i}].{part} is {_kind(value)}, not an object")
            elif isinstance(value, dict):
                problems += [f"alerts[{i}].{part}.{k} is {_kind(v)}, not a string" for k, v in value.items()
                             if not isinstance(v, str)]
    return problems


def retrain_reasons(payload: dict) -> list[str]:
    """The firing alerts of an Alertmanager payload (version 4) that ask for a retrain (label action=retrain),
    each as a line naming the alert, its release and its summary. Pure; `payload` has no `payload_problems`."""
    reasons = []
    for a in payload.get("alerts") or []:
        labels, notes = a.get("labels") or {}, a.get("annotations") or {}
        if a.get("status") == "firing" and labels.get("action") == "retrain":
            where = " ".join(f"{k}={labels[k]}" for k in ("env", "version") if labels.get(k))
            reasons.append(f"{labels.get('alertname', 'alert')} ({where}): {notes.get('summary', '')}".rstrip(": "))
    return reasons


class RetrainWindow:
    """At most one retrain request per window, across replicas and restarts: an append-only table in the
    service's database, decided under a write lock."""

    TABLE = "erpops_retrain_requests"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.executescript(f"""
                CREATE TABLE IF NOT EXISTS {self.TABLE} (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
                    outcome TEXT NOT NULL, reason TEXT NOT NULL);{append_only(self.TABLE)}""")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def decide(self, reason: str, window_s: float, now: float | None = None) -> tuple[bool, float | None]:
        """(allowed, when the last allowed request was): records this request as requested or rate-limited."""
        now = time.time() if now is None else now
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            last = conn.execute(f"SELECT MAX(at) FROM {self.TABLE} WHERE outcome = 'requested'").fetchone()[0]
            allowed = last is None or now - last >= window_s
            conn.execute(f"INSERT INTO {self.TABLE} (at, outcome, reason) VALUES (?, ?, ?)",
                         (now, "requested" if allowed else "rate-limited", reason))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return allowed, last

    def request(self, reasons: list[str], source: str, window_s: float, env: str, recipe: str,
                mlflow_config: str | None) -> dict:
        """Ask for a retrain (the Prefect event erpops.retrain.requested) unless one was asked within `window_s`:
        what the alert receiver and `erpops drift --emit` both call."""
        from erpops.orchestration import emit, retrain_event

        reason = f"{source}: " + "; ".join(reasons)
        allowed, last = self.decide(reason, window_s)
        if not allowed:
            log.info("retrain not requested: the last request was %.0f s ago (window %.0f s); %s", time.time() - last,
                     window_s, reason)
            return {"retrain": "rate-limited", "next_after_s": round(last + window_s - time.time(), 1), "reason": reason}
        sent = emit(retrain_event(env, reason, reasons, recipe, mlflow_config))
        log.warning("retrain requested (%s): %s", "event sent" if sent else "no Prefect server to tell", reason)
        return {"retrain": "requested", "event_sent": sent, "reason": reason}

    def history(self) -> list[tuple[float, str, str]]:
        conn = self._connect()
        try:
            return conn.execute(f"SELECT at, outcome, reason FROM {self.TABLE} ORDER BY id").fetchall()
        finally:
            conn.close()
