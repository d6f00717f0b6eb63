"""What the CLI and the flows do with missing or stale inputs: a clear exit 2 naming what is missing, no traceback,
no MLflow run left RUNNING, no earlier run's summary reported as this one's, no temporary folder left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny" / "test.yaml"


def erpops(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ERPOPS_MLFLOW"))}
    return subprocess.run([sys.executable, "-m", "erpops.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**base, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", **env}, timeout=300)


def tiny_recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY.read_text().replace("output_root: .erpops/runs", f"output_root: {tmp_path / 'runs'}"))
    return recipe


def mlflow_runs(db: Path) -> list:
    if not db.exists():
        return []
    import sqlite3

    with sqlite3.connect(db) as c:
        return c.execute("select name, status from runs").fetchall()


@pytest.mark.parametrize("command", ["optimize", "evaluate"])
def test_a_missing_run_folder_exits_2_naming_it_with_no_mlflow_run(tmp_path, command):
    missing = tmp_path / "no-such-run"
    proc = erpops(tmp_path, command, "--recipe", str(TINY), "--run-dir", str(missing))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert mlflow_runs(tmp_path / "mlflow.db") == []


def test_optimize_names_each_missing_input_of_a_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "eval.jsonl").write_text("")
    proc = erpops(tmp_path, "optimize", "--recipe", str(TINY), "--run-dir", str(run))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{run / 'adapter'}" in proc.stderr and f"{run / 'data' / 'train.jsonl'}" in proc.stderr
    assert "eval.jsonl" not in proc.stderr
    assert mlflow_runs(tmp_path / "mlflow.db") == []


def test_canary_of_an_unregistered_version_exits_2_and_leaves_no_download_folder(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = erpops(tmp_path, "canary", "start", "--version", "99", "--recipe", str(TINY), TMPDIR=str(tmp))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "version 99" in proc.stderr and "erp-assistant" in proc.stderr
    assert list(tmp.glob("canary-v99-*")) == []


def test_latest_run_folder_is_never_a_release_or_canary_folder(tmp_path):
    from erpops.cli import _latest_run_dir

    run = tmp_path / "tiny-test-20260101-000000"
    for i, name in enumerate([run.name, "release-staging-v3-20260101-000100", "canary-staging-v3-20260101-000200"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1_700_000_000 + i, 1_700_000_000 + i))
    assert _latest_run_dir(NS(output_root=tmp_path)) == run


def test_run_never_reports_an_earlier_summary(tmp_path, monkeypatch):
    from prefect.states import Failed
    from typer.testing import CliRunner

    import flows.pipeline
    from erpops.cli import app

    recipe = tiny_recipe(tmp_path)
    earlier = tmp_path / "runs" / "nightly" / "run_summary.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text(json.dumps({"ok": True, "recipe": str(recipe), "run_dir": str(earlier.parent),
                                   "mlflow_run_id": None, "outputs": {"model_version": "1"}, "metrics": {},
                                   "stages": [{"name": "validate", "status": "ok", "reason": "EARLIER RUN"}]}))
    calls = []

    def pipeline(**kw):
        calls.append(kw)
        return Failed(message="ConfigError: bad-mlflow.yaml: not valid YAML")

    monkeypatch.setattr(flows.pipeline, "pipeline", pipeline)
    result = CliRunner().invoke(app, ["run", "--recipe", str(recipe), "--run-name", "nightly"])
    assert calls and result.exit_code == 1
    assert "EARLIER RUN" not in result.output and "not valid YAML" in result.output
    assert not earlier.exists() and (earlier.parent / "run_summary.previous.json").is_file()


def test_an_error_between_stages_fails_the_run(tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    import flows.train_and_gate as tg
    from erpops.summary import RunSummary
    from registry.promote import Champion

    (tmp_path / "mlflow.yaml").write_text(f"tracking_uri: sqlite:///{tmp_path}/mlflow.db\n")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "ERPOPS_REGISTERED_MODEL", "ERPOPS_ARTIFACT_LOCATION"):
        monkeypatch.delenv(var, raising=False)
    gguf = NS(path=tmp_path, sha256="abc", kind="q8_0", example_nll=None)
    results = {"validate": NS(train_path=tmp_path, eval_path=tmp_path, digest="d", n_train=1, n_eval=1, docs=[]),
               "train": NS(adapter_dir=tmp_path, first_loss=1.0, final_loss=0.5, tokens_per_s=1.0),
               "optimize": NS(merged_dir=tmp_path, int8_backend="x", pruning=None, int8=None, shipped="q8_0",
                              ship_reason="", variants=[], modelfile=tmp_path, gguf={"q8_0": gguf})}

    def locked(*a, **k):
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(tg, "_call", lambda task_, stage, *a, **k: results[stage.name])
    monkeypatch.setattr(tg, "read_examples", lambda p: [{"id": "x"}])
    monkeypatch.setattr(tg.steps, "base_model_task", lambda *a, **k: "base")
    monkeypatch.setattr(tg, "read_champion", lambda s: Champion("1", None))
    monkeypatch.setattr(tg, "version_tags", locked)
    state = tg.train_and_gate.fn(str(tiny_recipe(tmp_path)), str(tmp_path / "mlflow.yaml"), run_name="r")
    assert state.is_failed() and "evaluate: before it started: MlflowException" in state.message
    summary = RunSummary.read(tmp_path / "runs" / "r" / "run_summary.json")
    assert not summary.ok
    assert {n: s.status for n, s in summary.stages.items() if n in ("optimize", "evaluate", "promote")} == \
        {"optimize": "ok", "evaluate": "failed", "promote": "skipped"}
    assert mlflow_runs(tmp_path / "mlflow.db") == [("r", "FAILED")]


def test_fail_unfinished_blames_the_last_stage_when_none_is_pending_and_keeps_a_stage_failure():
    from erpops.summary import RunSummary
    from flows.train_and_gate import fail_unfinished

    done = RunSummary(Path("."), "r.yaml")
    for name in ("validate", "train", "optimize", "evaluate", "promote"):
        done.stages[name].status = "ok"
    for name in ("deploy_kb", "deploy_ollama", "switch"):
        done.stages[name].status = "skipped"
    fail_unfinished(done, "RuntimeError: event not sent")
    assert done.stages["promote"].status == "failed" and "after it finished" in done.stages["promote"].reason
    failed = RunSummary(Path("."), "r.yaml")
    failed.stages["train"].status, failed.stages["train"].reason = "failed", "OOM"
    fail_unfinished(failed, "OOM")
    assert [s.name for s in failed.stages.values() if s.status == "failed"] == ["train"]


def test_train_remote_removes_its_work_folder_when_the_download_fails(tmp_path, monkeypatch):
    import tempfile

    import mlflow.artifacts

    from flows.train_remote import train_remote

    def unreachable(**kw):
        assert Path(kw["dst_path"]).is_dir()
        raise OSError("tracking server unreachable")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", unreachable)
    from erpops.config import Recipe

    with pytest.raises(OSError, match="unreachable"):
        train_remote.fn(Recipe(name="t").model_dump(mode="json"), "run-id", f"sqlite:///{tmp_path}/m.db")
    assert list(tmp_path.glob("train-remote-*")) == []


@pytest.mark.parametrize("command", ["optimize", "evaluate"])
def test_nothing_to_work_on_is_exit_2_not_a_rejection(tmp_path, command):
    """Exit 1 is `evaluate`'s "the gate rejected"; a fresh checkout with no run folder is "nothing to evaluate"."""
    from typer.testing import CliRunner

    from erpops.cli import app

    result = CliRunner().invoke(app, [command, "--recipe", str(tiny_recipe(tmp_path))])
    assert result.exit_code == 2 and "no run folder under" in result.output, result.output
