"""Registry: alias decisions as pure functions, and the thin MLflow layer on a real sqlite store."""

import multiprocessing
from pathlib import Path

import pytest

from erpops.config import Aliases
from registry import ledger as L
from registry import promote as P

A = Aliases()


@pytest.fixture(autouse=True)
def _actor(monkeypatch):
    monkeypatch.setenv("ERPOPS_TRIGGER", "pytest")


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


def test_stale_champion_compares_against_the_expected_one():
    assert P.stale_champion({"champion": "1"}, P.UNCHECKED, A) is None
    assert P.stale_champion({"champion": "1"}, "1", A) is None
    assert P.stale_champion({}, None, A) is None
    assert "champion v1, but the champion is now champion v2" in P.stale_champion({"champion": "2"}, "1", A)
    assert "no champion, but" in P.stale_champion({"champion": "2"}, None, A)
    assert P.stale_champion({}, "1", A).endswith("now no champion")


def test_promotion_action_needs_force_and_a_reason_past_the_gate():
    assert P.promotion_action("promote", False, "") == "promote"
    assert P.promotion_action("promote", True, "") == "promote"  # nothing to force
    assert P.promotion_action("reject", True, "hotfix") == "force-promote"
    with pytest.raises(P.PromotionRefused, match="--force"):
        P.promotion_action("reject", False, "hotfix")
    with pytest.raises(P.PromotionRefused, match="--force"):
        P.promotion_action(None, False, "")
    with pytest.raises(P.PromotionRefused, match="non-empty --reason"):
        P.promotion_action("reject", True, "  ")


def test_plan_retention_keeps_the_newest_and_every_aliased_version():
    versions = [str(v) for v in range(1, 8)]
    assert P.plan_retention(versions, set()) == ["1", "2", "3", "4"]
    assert P.plan_retention(versions, {"2", "7"}) == ["1", "3", "4"]
    assert P.plan_retention(["10", "9", "8", "2"], set(), keep=3) == ["2"]  # numeric, not string, order
    assert P.plan_retention(["1", "2", "3"], set()) == []
    assert P.plan_retention(versions, set(), keep=6) == ["1"]


def test_alias_moves_skip_no_op_sets_and_list_deletions_first():
    plan = P.AliasPlan({"champion": "2", "candidate": "3"}, ("previous",), before={"champion": "3", "previous": "1",
                                                                                  "candidate": "3"})
    assert P.alias_moves(plan) == [("previous", "1", None), ("champion", "3", "2")]


def test_plan_restore_undoes_only_moves_still_standing():
    plan = P.AliasPlan({"champion": "3", "previous": "2"}, before={"champion": "2"})
    undo = P.plan_restore(plan, {"champion": "3", "previous": "2"}, ("champion", "previous"))
    assert undo.set == {"champion": "2"} and undo.delete == ("previous",)
    undo = P.plan_restore(plan, {"champion": "4", "previous": "3"}, ("champion", "previous"))  # moved on since
    assert undo.set == {} and undo.delete == ()
    rollback = P.AliasPlan({"champion": "1"}, ("previous",), before={"champion": "2", "previous": "1"})
    assert P.plan_restore(rollback, {"champion": "1"}, ("champion", "previous")).set == {"champion": "2",
                                                                                         "previous": "1"}


def _register(settings, tmp_path, passed, tag="x", expected=P.UNCHECKED, heavy=False):
    from erpops.tracking import Tracker

    tracker = Tracker.start(settings, f"run-{tag}")
    gguf = tmp_path / f"model-{tag}.gguf"
    gguf.write_bytes(b"GGUF" + tag.encode() * 100)
    if heavy:  # what a pipeline run also logs: the adapter (and a merged model), besides light reports
        for folder in ("adapter", "merged_model"):
            (tmp_path / tag / folder).mkdir(parents=True, exist_ok=True)
            (tmp_path / tag / folder / "weights.bin").write_bytes(b"w" * 1000)
            tracker.log_artifact(tmp_path / tag / folder, folder)
        tracker.log_text("name: test", "recipe.yaml")
    uri = P.log_shipped_model(tracker.run_id, settings.tracking_uri, gguf, None)
    tracker.end()
    return P.register_version(settings, uri, tracker.run_id, {"gate_verdict": "promote" if passed else "reject",
                                                                "dataset_digest": "d" * 64}, passed, expected)


def _moves(settings):
    return [(e.alias, e.from_version, e.to_version, e.action) for e in L.read_ledger(settings)]


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

    entries = L.read_ledger(mlflow_settings)
    assert _moves(mlflow_settings) == [
        ("candidate", None, v1, "register"), ("champion", None, v1, "promote"),
        ("candidate", v1, v2, "register"),
        ("candidate", v2, v3, "register"), ("champion", v1, v3, "promote"), ("previous", None, v1, "promote"),
        ("previous", v1, None, "rollback"), ("champion", v3, v1, "rollback"),
        ("champion", v1, v3, "promote"), ("previous", None, v1, "promote")]
    assert {e.actor for e in entries} == {"pytest"}
    assert entries[4].gate_verdict == "promote" and entries[4].run_id == state["versions"][0]["run_id"]
    assert entries[2].gate_verdict == "reject"
    assert [e.at for e in entries] == sorted(e.at for e in entries)
    assert L.champion_at(mlflow_settings, "2000-01-01T00:00:00") is None
    assert L.champion_at(mlflow_settings, entries[1].at) == v1
    assert L.champion_at(mlflow_settings, entries[4].at) == v3
    assert L.champion_at(mlflow_settings, entries[7].at) == v1
    assert L.champion_at(mlflow_settings, L.utc_now()) == v3
    assert P.version_tags(mlflow_settings, v1)["parent_champion"] == "none"
    assert P.version_tags(mlflow_settings, v2)["parent_champion"] == v1  # lineage, whatever the gate said


def test_stale_champion_registers_candidate_only_and_tags_why(mlflow_settings, tmp_path):
    v1, _ = _register(mlflow_settings, tmp_path, True, "a", expected=None)
    v2, plan = _register(mlflow_settings, tmp_path, True, "b", expected=None)  # gate ran when there was no champion
    assert plan.set == {"candidate": v2} and "no champion, but the champion is now champion v1" in plan.skipped
    assert _aliases(mlflow_settings) == {"candidate": v2, "champion": v1}
    assert P.version_tags(mlflow_settings, v2)[P.SKIPPED_TAG] == plan.skipped
    assert _moves(mlflow_settings)[-1] == ("candidate", v1, v2, "register")
    assert L.read_ledger(mlflow_settings)[-1].reason == plan.skipped
    v3, plan = _register(mlflow_settings, tmp_path, True, "c", expected=v1)
    assert not plan.skipped and _aliases(mlflow_settings) == {"candidate": v3, "champion": v3, "previous": v1}
    with pytest.raises(P.StaleChampionError, match="expected champion v1, found champion v3"):
        P.promote_version(mlflow_settings, v2, expected_champion=v1)
    assert _aliases(mlflow_settings)["champion"] == v3


def test_force_promotion_needs_a_reason_and_is_recorded(mlflow_settings, tmp_path):
    v1, _ = _register(mlflow_settings, tmp_path, True, "a")
    v2, _ = _register(mlflow_settings, tmp_path, False, "b")
    with pytest.raises(P.PromotionRefused, match="'reject', not 'promote'"):
        P.promote_version(mlflow_settings, v2)
    with pytest.raises(P.PromotionRefused, match="non-empty --reason"):
        P.promote_version(mlflow_settings, v2, force=True)
    assert _aliases(mlflow_settings)["champion"] == v1
    P.promote_version(mlflow_settings, v2, force=True, reason="the gate's eval set is stale")
    assert _aliases(mlflow_settings) == {"candidate": v2, "champion": v2, "previous": v1}
    tags = P.version_tags(mlflow_settings, v2)
    assert tags["promotion.force_reason"] == "the gate's eval set is stale" and tags["promotion.forced_by"] == "pytest"
    last = L.read_ledger(mlflow_settings)[-2:]
    assert [(e.alias, e.action, e.reason, e.gate_verdict) for e in last] == [
        ("champion", "force-promote", "the gate's eval set is stale", "reject"),
        ("previous", "force-promote", "the gate's eval set is stale", "promote")]


def test_a_failed_ledger_write_puts_the_aliases_back(mlflow_settings, tmp_path, monkeypatch):
    from registry.status import registry_state

    v1, _ = _register(mlflow_settings, tmp_path, True, "a")
    v2, _ = _register(mlflow_settings, tmp_path, True, "b")
    v3, _ = _register(mlflow_settings, tmp_path, False, "c")
    before = _moves(mlflow_settings)
    real = L.append

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(L, "append", boom)
    with pytest.raises(OSError, match="disk full"):
        _register(mlflow_settings, tmp_path, True, "d")
    with pytest.raises(OSError, match="disk full"):
        P.promote_version(mlflow_settings, v3, force=True, reason="hotfix")
    with pytest.raises(OSError, match="disk full"):
        P.rollback_registry(mlflow_settings)
    monkeypatch.setattr(L, "append", real)
    assert _aliases(mlflow_settings) == {"candidate": v3, "champion": v2, "previous": v1}
    assert [v["version"] for v in registry_state(mlflow_settings)["versions"]] == [v3, v2, v1]
    assert not any(k.startswith("promotion.") for k in P.version_tags(mlflow_settings, v3))
    assert _moves(mlflow_settings) == before


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

    assert P.champion_metrics(mlflow_settings) is None and P.read_champion(mlflow_settings) == P.Champion(None, None)
    v1, _ = _register(mlflow_settings, tmp_path, True, "a")
    client = mlflow.MlflowClient(mlflow_settings.tracking_uri, mlflow_settings.tracking_uri)
    run_id = client.get_model_version(mlflow_settings.registered_model_name, v1).run_id
    client.log_metric(run_id, "eval/rouge_l", 0.25)
    client.log_metric(run_id, "eval/perplexity", 30.0)
    assert P.champion_metrics(mlflow_settings) == {"rouge_l": 0.25, "perplexity": 30.0}
    assert P.read_champion(mlflow_settings) == P.Champion(v1, {"rouge_l": 0.25, "perplexity": 30.0})


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
    P.restore_aliases(mlflow_settings, plan4, ("champion", "previous"), reason="deploy failed")
    assert _aliases(mlflow_settings)["champion"] == v3 and _aliases(mlflow_settings)["previous"] == v2
    assert _moves(mlflow_settings)[-2:] == [("champion", v4, v3, "restore"), ("previous", v3, v2, "restore")]
    assert L.read_ledger(mlflow_settings)[-1].reason == "deploy failed"


def _artifacts_exist(settings, version) -> tuple[bool, set[str]]:
    """(the version's model folder exists, top-level artifacts of its run)."""
    import mlflow

    client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
    mv = client.get_model_version(settings.registered_model_name, version)
    model_dir = Path(client.get_model_version_download_uri(mv.name, mv.version).removeprefix("file://"))
    return model_dir.is_dir() and any(model_dir.rglob("*.gguf")), {f.path for f in client.list_artifacts(mv.run_id)}


def test_retention_deletes_artifacts_of_old_unaliased_versions_only(mlflow_settings, tmp_path):
    v1, _ = _register(mlflow_settings, tmp_path, True, "a", heavy=True)
    v2, _ = _register(mlflow_settings, tmp_path, False, "b", heavy=True)
    v3, _ = _register(mlflow_settings, tmp_path, False, "c", heavy=True)
    v4, _ = _register(mlflow_settings, tmp_path, True, "d", heavy=True)
    # v1 is older than the newest three, but holds `previous`: kept
    assert _aliases(mlflow_settings) == {"candidate": v4, "champion": v4, "previous": v1}
    assert _artifacts_exist(mlflow_settings, v1) == (True, {"adapter", "merged_model", "recipe.yaml"})
    v5, _ = _register(mlflow_settings, tmp_path, True, "e", heavy=True)
    assert _aliases(mlflow_settings) == {"candidate": v5, "champion": v5, "previous": v4}
    # v1 held `previous` until v5's promotion (a failed release of v5 would put it back): kept until the next one
    assert _artifacts_exist(mlflow_settings, v1) == (True, {"adapter", "merged_model", "recipe.yaml"})
    v6, _ = _register(mlflow_settings, tmp_path, False, "f", heavy=True)
    assert _aliases(mlflow_settings) == {"candidate": v6, "champion": v5, "previous": v4}
    for gone in (v1, v2, v3):
        assert _artifacts_exist(mlflow_settings, gone) == (False, {"recipe.yaml"})
        tags = P.version_tags(mlflow_settings, gone)  # the record and its lineage stay
        assert P.RETENTION_TAG in tags and tags["dataset_digest"] == "d" * 64
    for kept in (v4, v5, v6):
        assert _artifacts_exist(mlflow_settings, kept) == (True, {"adapter", "merged_model", "recipe.yaml"})
        assert P.RETENTION_TAG not in P.version_tags(mlflow_settings, kept)
    stamp = P.version_tags(mlflow_settings, v1)[P.RETENTION_TAG]
    with pytest.raises(P.PromotionRefused, match="retention deleted its artifacts"):
        P.promote_version(mlflow_settings, v1)
    assert P.version_tags(mlflow_settings, v1)[P.RETENTION_TAG] == stamp  # not deleted (or tagged) twice
    # rolling back to v4 cannot make v1 (the champion v4 replaced) `previous` again: it has nothing to serve
    champion, plan = P.rollback_registry(mlflow_settings)
    assert champion == v4 and plan.delete == ("previous",)
    assert _moves(mlflow_settings)[-2:] == [
        ("previous", v4, None, "rollback"), ("champion", v5, v4, "rollback")]


def _quick_versions(settings, tmp_path, verdicts) -> list[str]:
    """Versions without a logged model (a folder as source): enough for alias moves, fast."""
    import mlflow

    client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
    client.create_registered_model(settings.registered_model_name)
    out = []
    for i, verdict in enumerate(verdicts):
        (tmp_path / f"src{i}").mkdir()
        run = client.create_run("0")
        out.append(str(client.create_model_version(settings.registered_model_name, str(tmp_path / f"src{i}"),
                                                   run_id=run.info.run_id, tags={"gate_verdict": verdict}).version))
    return out


def _race_promote(settings, version, expected, barrier, results):
    barrier.wait()
    try:
        P.promote_version(settings, version, expected_champion=expected)
        results.put((version, "won"))
    except P.StaleChampionError as e:
        results.put((version, f"stale: {e.actual}"))


def _race_register(settings, source, run_id, expected, barrier, results):
    barrier.wait()
    version, plan = P.register_version(settings, source, run_id, {"gate_verdict": "promote"}, True, expected)
    results.put((version, plan.skipped))


def _race(target, args_per_process):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(args_per_process)), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for args in args_per_process]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_parallel_manual_promotions_from_the_same_champion_one_wins(mlflow_settings, tmp_path):
    v1, v2, v3 = _quick_versions(mlflow_settings, tmp_path, ["promote"] * 3)
    P.promote_version(mlflow_settings, v1, expected_champion=None)
    out = _race(_race_promote, [(mlflow_settings, v2, v1), (mlflow_settings, v3, v1)])
    winners = [v for v, r in out.items() if r == "won"]
    assert len(winners) == 1
    winner, loser = winners[0], ({v2, v3} - set(winners)).pop()
    assert out[loser] == f"stale: {winner}"
    assert _aliases(mlflow_settings) == {"champion": winner, "previous": v1}
    race = [m for m in _moves(mlflow_settings) if m[0] == "champion"][1:]
    assert race == [("champion", v1, winner, "promote")]
    assert L.champion_at(mlflow_settings, L.utc_now()) == winner
    assert L.ledger_drift(L.read_ledger(mlflow_settings), _aliases(mlflow_settings), A) == {}


def test_parallel_pipeline_registrations_from_the_same_champion_one_promotes(mlflow_settings, tmp_path):
    import mlflow

    (v1,) = _quick_versions(mlflow_settings, tmp_path, ["promote"])
    P.promote_version(mlflow_settings, v1)
    client = mlflow.MlflowClient(mlflow_settings.tracking_uri, mlflow_settings.tracking_uri)
    args = []
    for tag in ("x", "y"):
        (tmp_path / tag).mkdir()
        args.append((mlflow_settings, str(tmp_path / tag), client.create_run("0").info.run_id, v1))
    out = _race(_race_register, args)
    assert sorted(out) == ["2", "3"]
    promoted = [v for v, skipped in out.items() if not skipped]
    assert len(promoted) == 1
    winner, loser = promoted[0], ({"2", "3"} - set(promoted)).pop()
    assert f"but the champion is now champion v{winner}" in out[loser]
    assert P.version_tags(mlflow_settings, loser)[P.SKIPPED_TAG] == out[loser]
    aliases = _aliases(mlflow_settings)
    assert aliases["champion"] == winner and aliases["previous"] == v1 and aliases["candidate"] in (winner, loser)
    assert [m for m in _moves(mlflow_settings) if m[0] in ("champion", "previous")][1:] == [
        ("champion", v1, winner, "promote"), ("previous", None, v1, "promote")]
    assert L.ledger_drift(L.read_ledger(mlflow_settings), aliases, A) == {}


LOAD_ELSEWHERE = r"""
import importlib.util, json, sys
# erpops is an editable install in this venv: hide it, as on a machine that only has the model
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", ".", sys.argv[2])]
hidden = [m for m in ("registry", "training", "evaluation", "erpops") if importlib.util.find_spec(m) is not None]
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/erp-assistant@champion")
answers = model.predict(["How do I post a journal entry?"], params={"max_new_tokens": 4})
params = [p.name for p in (model.metadata.signature.params or [])]
print(json.dumps({"importable_before": hidden, "answers": list(answers), "params": params}))
"""


@pytest.mark.integration
def test_registered_model_carries_its_code_and_loads_from_another_folder(mlflow_settings, tmp_path, tiny_model_dir):
    """`models:/erp-assistant@champion` loads and answers in a process where the erpops packages are not
    importable: the pyfunc model carries them (code_paths). The experiment opens as model training."""
    import json
    import subprocess
    import sys

    import mlflow

    from conftest import REPO
    from erpops.tracking import Tracker
    from training.gguf import convert

    gguf = convert(tiny_model_dir, tmp_path / "model-f16.gguf", "f16")
    tracker = Tracker.start(mlflow_settings, "code-paths")
    uri = P.log_shipped_model(tracker.run_id, mlflow_settings.tracking_uri, gguf, None)
    tracker.end()
    P.register_version(mlflow_settings, uri, tracker.run_id, {"gate_verdict": "promote"}, True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, mlflow_settings.tracking_uri, str(REPO)],
                          cwd=elsewhere, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["importable_before"] == []  # the packages came from the model, not from this checkout
    assert len(out["answers"]) == 1 and isinstance(out["answers"][0], str)
    assert out["params"] == ["max_new_tokens"]  # a param the signature lacks, MLflow drops before predict
    assert len(out["answers"][0].split()) <= 4  # params reach predict

    client = mlflow.MlflowClient(mlflow_settings.tracking_uri)
    exp = client.get_experiment_by_name(mlflow_settings.experiment_name)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
