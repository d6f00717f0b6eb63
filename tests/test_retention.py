"""Retention and a failed release: aliases a restore can put back keep their artifacts, and rollback never makes
a version whose artifacts retention deleted champion again."""

import pytest
from test_registry import _aliases, _artifacts_exist, _moves, _quick_versions, _register

from erpops.config import Aliases
from registry import promote as P

A = Aliases()


@pytest.fixture(autouse=True)
def _actor(monkeypatch):
    monkeypatch.setenv("ERPOPS_TRIGGER", "pytest")


def test_plan_rollback_refuses_a_pruned_previous():
    with pytest.raises(ValueError, match="cannot roll back to version 2 .*retention deleted its artifacts"):
        P.plan_rollback({"champion": "3", "previous": "2"}, {"2": "1"}, A, pruned={"2"})
    plan = P.plan_rollback({"champion": "3", "previous": "2"}, {"2": "1"}, A, pruned={"1"})
    assert plan.set == {"champion": "2", "previous": "1"}  # the parent's artifacts are not the target's


def test_a_failed_release_restores_aliases_onto_versions_that_kept_their_artifacts(mlflow_settings, tmp_path):
    v1, _ = _register(mlflow_settings, tmp_path, True, "a", heavy=True)
    v2, _ = _register(mlflow_settings, tmp_path, True, "b", heavy=True)
    _register(mlflow_settings, tmp_path, False, "c", heavy=True)
    _register(mlflow_settings, tmp_path, False, "d", heavy=True)
    assert _aliases(mlflow_settings)["previous"] == v1  # older than the newest three, kept for its alias
    v5, plan = _register(mlflow_settings, tmp_path, True, "e", heavy=True)
    assert _aliases(mlflow_settings) == {"candidate": v5, "champion": v5, "previous": v2}
    assert _artifacts_exist(mlflow_settings, v1) == (True, {"adapter", "merged_model", "recipe.yaml"})

    P.restore_aliases(mlflow_settings, plan, ("champion", "previous"), reason="release failed")  # as flows.release
    assert _aliases(mlflow_settings) == {"candidate": v5, "champion": v2, "previous": v1}
    assert P.RETENTION_TAG not in P.version_tags(mlflow_settings, v1)
    champion, _ = P.rollback_registry(mlflow_settings)
    assert champion == v1 and _artifacts_exist(mlflow_settings, v1)[0]


def test_rollback_refuses_a_previous_whose_artifacts_were_deleted(mlflow_settings, tmp_path):
    v1, v2 = _quick_versions(mlflow_settings, tmp_path, ["promote", "promote"])
    P.promote_version(mlflow_settings, v1)
    P.promote_version(mlflow_settings, v2)
    P.tag_version(mlflow_settings, v1, {P.RETENTION_TAG: "2026-01-01T00:00:00+00:00"})  # pruned before the fix
    before = _moves(mlflow_settings)
    with pytest.raises(ValueError, match=f"cannot roll back to version {v1} .*retention deleted its artifacts"):
        P.rollback_registry(mlflow_settings)
    assert _aliases(mlflow_settings) == {"champion": v2, "previous": v1}
    assert _moves(mlflow_settings) == before
