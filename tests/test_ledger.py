"""Promotion ledger: pure replay functions, the append-only table, where it lives, who the actor is."""

import sqlite3
from datetime import datetime, timezone

import pytest

from erpops.config import Aliases, MLflowSettings
from registry import ledger as L

A = Aliases()


def entry(at, alias, frm, to, action="promote", **kw):
    return L.LedgerEntry(at=at, model="erp-assistant", alias=alias, from_version=frm, to_version=to, action=action,
                         actor="alice@box", **kw)


HISTORY = [
    entry("2026-11-21T09:00:00+00:00", "champion", None, "1"),
    entry("2026-11-21T10:00:00+00:00", "champion", "1", "2"),
    entry("2026-11-21T10:00:00+00:00", "previous", None, "1"),
    entry("2026-11-21T12:00:00+00:00", "champion", "2", "1", "rollback"),
    entry("2026-11-21T12:00:00+00:00", "previous", "1", None, "rollback"),
]


def test_champion_from_replays_the_champion_moves_up_to_the_time():
    assert L.champion_from(HISTORY, "2026-11-21T08:59:59") is None
    assert L.champion_from(HISTORY, "2026-11-21T09:30:00") == "1"
    assert L.champion_from(HISTORY, "2026-11-21T10:00:00") == "2"  # a move at exactly T counts
    assert L.champion_from(HISTORY, "2026-11-21T11:59:59Z") == "2"
    assert L.champion_from(HISTORY, datetime(2026, 11, 21, 13, tzinfo=timezone.utc)) == "1"
    assert L.champion_from(HISTORY, "2026-11-21T13:30:00+02:00") == "2"  # 11:30 UTC


def test_champion_from_sees_a_deleted_champion_as_none():
    history = [*HISTORY, entry("2026-11-22T00:00:00+00:00", "champion", "1", None, "restore")]
    assert L.champion_from(history, "2026-11-22T00:00:01") is None


def test_parse_when_rejects_garbage():
    with pytest.raises(ValueError):
        L.parse_when("yesterday")


def test_last_promotion_ignores_rollbacks_and_restores():
    assert L.last_promotion(HISTORY, "1").from_version is None  # the rollback back to v1 is not a promotion
    assert L.last_promotion(HISTORY, "2").from_version == "1"
    assert L.last_promotion(HISTORY, "3") is None


def test_ledger_drift_names_aliases_where_registry_and_ledger_disagree():
    assert L.ledger_drift(HISTORY, {"champion": "1"}, A) == {}
    assert L.ledger_drift(HISTORY, {"champion": "1", "candidate": "4"}, A) == {"candidate": (None, "4")}
    assert L.ledger_drift([], {"champion": "1"}, A) == {"champion": (None, "1")}


@pytest.mark.parametrize("env, flow_run, expected", [
    ({"ERPOPS_TRIGGER": "ci"}, "f-1", "ci"),
    ({}, "f-1", "prefect:f-1"),
    ({"ERPOPS_TRIGGER": ""}, None, "alice@box"),
])
def test_resolve_actor(env, flow_run, expected):
    assert L.resolve_actor(env, flow_run, "alice", "box") == expected


def test_current_actor_uses_the_trigger_variable(monkeypatch):
    monkeypatch.setenv("ERPOPS_TRIGGER", "nightly")
    assert L.current_actor() == "nightly"


def test_ledger_lives_in_the_sqlite_tracking_db_else_in_a_local_file(tmp_path):
    assert L.ledger_path(MLflowSettings(tracking_uri=f"sqlite:///{tmp_path}/m.db")) == tmp_path / "m.db"
    assert L.ledger_path(MLflowSettings(tracking_uri="http://mlflow:5000")) == L.LOCAL_LEDGER


def test_table_is_append_only(tmp_path):
    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    assert L.read_ledger(settings) == []  # no file yet: empty, and reading creates nothing
    assert not (tmp_path / "m.db").exists()
    L.append(settings, HISTORY[:2])
    L.append(settings, HISTORY[2:])
    assert L.read_ledger(settings) == HISTORY
    conn = sqlite3.connect(tmp_path / "m.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(f"UPDATE {L.TABLE} SET to_version = '9' WHERE alias = 'champion'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute(f"DELETE FROM {L.TABLE}")
    with pytest.raises(sqlite3.IntegrityError):  # unknown action
        conn.execute(f"INSERT INTO {L.TABLE} (at, model, alias, action, actor) VALUES ('t', 'm', 'a', 'oops', 'x')")
    conn.close()
    assert L.read_ledger(settings) == HISTORY
    other = settings.model_copy(update={"registered_model_name": "other"})
    assert L.read_ledger(other) == []


def test_champion_at_reads_the_stored_ledger(tmp_path):
    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    L.append(settings, HISTORY)
    assert L.champion_at(settings, "2026-11-21T11:00:00") == "2"
    assert L.champion_at(settings, "2026-11-21T12:00:00") == "1"


def test_format_history_is_a_table_newest_last():
    lines = L.format_history([*HISTORY[:2], entry("2026-11-21T11:00:00+00:00", "champion", "2", "3",
                                                   "force-promote", reason="hotfix for the VAT answers")]).splitlines()
    assert lines[0].split() == ["time", "(UTC)", "alias", "from", "->", "to", "action", "actor", "reason"]
    assert lines[1].split()[:6] == ["2026-11-21", "09:00:00", "champion", "-", "->", "v1"]
    assert lines[-1].split()[3:] == ["v2", "->", "v3", "force-promote", "alice@box", "hotfix", "for", "the", "VAT",
                                     "answers"]
    assert L.format_history([]) == "  no alias moves recorded yet"
