"""Registry: alias decisions as pure functions, and the thin MLflow layer on a real sqlite store."""

import pytest

from erpops.config import Aliases
from registry import promote as P

A = Aliases()


def test_plan_first_passing_version_becomes_champion_without_previous():
    plan = P.plan_promotion({}, "1", True, A)
    assert plan.set == {"candidate": "1", "champion": "1"}


def test_plan_failed_gate_moves_only_candidate():
    plan = P.plan_promotion({"champion": "1"}, "2", False, A)
    assert plan.set == {"candidate": "2"}


def test_plan_passing_version_pushes_old_champion_to_previous():
    plan = P.plan_promotion({"champion": "1", "previous": "0"}, "2", True, A)
    assert plan.set == {"candidate": "2", "champion": "2", "previous": "1"}


def test_plan_rollback():
    assert P.plan_rollback({"champion": "3", "previous": "2"}, {"2": "1"}, A).set == {"champion": "2", "previous": "1"}
    plan = P.plan_rollback({"champion": "3", "previous": "2"}, {}, A)
    assert plan.set == {"champion": "2"} and plan.delete == ("previous",)
    with pytest.raises(ValueError, match="nothing to roll back"):
        P.plan_rollback({"champion": "3"}, {}, A)


def _register(settings, tmp_path, passed, tag="x"):
    from erpops.tracking import Tracker

    tracker = Tracker.start(settings, f"run-{tag}")
    gguf = tmp_path / f"model-{tag}.gguf"
    gguf.write_bytes(b"GGUF" + tag.encode() * 100)
    uri = P.log_shipped_model(tracker.run_id, settings.tracking_uri, gguf, None)
    tracker.end()
    return P.register_version(settings, uri, tracker.run_id, {"gate_verdict": "promote" if passed else "reject",
                                                                "dataset_digest": "d" * 64}, passed)


def _aliases(settings):
    import mlflow

    return P.current_aliases(mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri), settings.registered_model_name)


def test_register_promote_reject_rollback_on_a_real_store(mlflow_settings, tmp_path):
    from registry.status import registry_state

    v1, _ = _register(mlflow_settings, tmp_path, True, "a")
    assert _aliases(mlflow_settings) == {"candidate": v1, "champion": v1}
    v2, _ = _register(mlflow_settings, tmp_path, False, "b")
    assert _aliases(mlflow_settings) == {"candidate": v2, "champion": v1}
    v3, _ = _register(mlflow_settings, tmp_path, True, "c")
    assert _aliases(mlflow_settings) == {"candidate": v3, "champion": v3, "previous": v1}
    assert P.version_tags(mlflow_settings, v3)["parent_champion"] == v1

    state = registry_state(mlflow_settings)
    assert [v["version"] for v in state["versions"]] == [v3, v2, v1]
    assert state["versions"][1]["tags"]["gate_verdict"] == "reject"

    champion, plan = P.rollback_registry(mlflow_settings)
    assert champion == v1
    assert _aliases(mlflow_settings) == {"candidate": v3, "champion": v1}  # v1 had no parent: previous removed

    P.promote_version(mlflow_settings, v3)
    assert _aliases(mlflow_settings)["champion"] == v3 and _aliases(mlflow_settings)["previous"] == v1


def test_failure_while_moving_aliases_leaves_no_half_written_version(mlflow_settings, tmp_path, monkeypatch):
    from registry.status import registry_state

    v1, _ = _register(mlflow_settings, tmp_path, True, "a")

    def boom(*a, **k):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(P, "apply_plan", boom)
    with pytest.raises(RuntimeError, match="went away"):
        _register(mlflow_settings, tmp_path, True, "b")
    state = registry_state(mlflow_settings)
    assert [v["version"] for v in state["versions"]] == [v1]
    assert _aliases(mlflow_settings) == {"candidate": v1, "champion": v1}


def test_champion_metrics_come_from_the_champion_run(mlflow_settings, tmp_path):
    import mlflow

    assert P.champion_metrics(mlflow_settings) is None
    v1, _ = _register(mlflow_settings, tmp_path, True, "a")
    client = mlflow.MlflowClient(mlflow_settings.tracking_uri, mlflow_settings.tracking_uri)
    run_id = client.get_model_version(mlflow_settings.registered_model_name, v1).run_id
    client.log_metric(run_id, "eval/rouge_l", 0.25)
    client.log_metric(run_id, "eval/perplexity", 30.0)
    assert P.champion_metrics(mlflow_settings) == {"rouge_l": 0.25, "perplexity": 30.0}


def test_failure_after_some_aliases_moved_restores_them(mlflow_settings, tmp_path, monkeypatch):
    v1, _ = _register(mlflow_settings, tmp_path, True, "a")
    real = P.apply_plan

    def half(client, name, plan):  # candidate and champion move, then the registry fails
        client.set_registered_model_alias(name, "candidate", plan.set["candidate"])
        client.set_registered_model_alias(name, "champion", plan.set["champion"])
        raise RuntimeError("lost the connection")

    monkeypatch.setattr(P, "apply_plan", half)
    with pytest.raises(RuntimeError, match="lost the connection"):
        _register(mlflow_settings, tmp_path, True, "b")
    monkeypatch.setattr(P, "apply_plan", real)
    assert _aliases(mlflow_settings) == {"candidate": v1, "champion": v1}


def test_restore_leaves_alone_an_alias_someone_else_moved_since(mlflow_settings, tmp_path):
    v1, _ = _register(mlflow_settings, tmp_path, True, "a")
    v2, plan = _register(mlflow_settings, tmp_path, True, "b")
    assert plan.before == {"candidate": v1, "champion": v1}
    v3, _ = _register(mlflow_settings, tmp_path, True, "c")  # another promotion lands meanwhile
    P.restore_aliases(mlflow_settings, plan, ("champion", "previous"))  # v2's deployment failed
    assert _aliases(mlflow_settings)["champion"] == v3  # not put back to v1 over v3
    v4, plan4 = _register(mlflow_settings, tmp_path, True, "d")
    P.restore_aliases(mlflow_settings, plan4, ("champion", "previous"))
    assert _aliases(mlflow_settings)["champion"] == v3 and _aliases(mlflow_settings)["previous"] == v2
