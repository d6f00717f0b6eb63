import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny" / "test.yaml")
HEAVY = ("torch", "transformers", "mlflow", "prefect", "great_expectations", "peft", "pymilvus", "sentence_transformers")


def test_cli_module_imports_no_heavy_library():
    code = "import sys, erpops.cli; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def erpops(*args, cwd=REPO, env=None):
    return subprocess.run([sys.executable, "-m", "erpops.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_help_lists_every_command():
    out = erpops("--help").stdout
    for cmd in ("run", "validate", "train", "optimize", "evaluate", "promote", "deploy", "rollback", "status", "ui",
                "serve-api", "api-key", "audit"):
        assert cmd in out


def test_validate_exits_1_with_file_line_rule_and_no_traceback(corpus):
    bad = corpus / "qa_pairs.jsonl"
    with open(bad, "a", encoding="utf-8") as f:
        f.write('{"id": "qa-999", "module": "crm", "lang": "en", "instruction": "Hi there", "response": "Hello there"}\n')
        f.write("not json\n")
    proc = erpops("validate", "--recipe", TINY, "--data", str(corpus))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"{bad}:41" in proc.stdout and "gx.enum.module" in proc.stdout
    assert f"{bad}:42" in proc.stdout and "json.parse" in proc.stdout
    js = json.loads(erpops("validate", "--recipe", TINY, "--data", str(corpus), "--json").stdout)
    assert not js["ok"] and {v["line"] for v in js["violations"]} == {41, 42}


def test_validate_clean_data_exits_0(corpus):
    proc = erpops("validate", "--recipe", TINY, "--data", str(corpus))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all rules pass" in proc.stdout


def test_bad_recipe_is_a_clear_error(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\ntrain: {max_steps: zero}\n")
    proc = erpops("validate", "--recipe", str(bad))
    assert proc.returncode == 2 and "train.max_steps" in proc.stderr and "Traceback" not in proc.stderr


def test_status_json_on_an_empty_store(tmp_path):
    proc = erpops("status", "--json", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout)
    assert state["versions"] == [] and state["model"] == "erp-assistant"


def _store(tmp_path, verdicts):
    """A registry with one version per gate verdict (folders as sources: enough for alias moves) and v1 champion."""
    import mlflow

    from erpops.config import MLflowSettings
    from registry.promote import promote_version

    settings = MLflowSettings(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
    client.create_registered_model(settings.registered_model_name)
    for i, verdict in enumerate(verdicts):
        (tmp_path / f"src{i}").mkdir()
        client.create_model_version(settings.registered_model_name, str(tmp_path / f"src{i}"), tags={"gate_verdict": verdict})
    promote_version(settings, "1")
    return {"MLFLOW_TRACKING_URI": settings.tracking_uri, "ERPOPS_TRIGGER": "ci"}


def test_promote_past_the_gate_needs_force_and_reason_and_shows_in_history(tmp_path):
    env = _store(tmp_path, ["promote", "reject"])
    proc = erpops("promote", "2", env=env)
    assert proc.returncode == 1 and "'reject', not 'promote'" in proc.stderr and "Traceback" not in proc.stderr
    proc = erpops("promote", "2", "--force", "--reason", "eval set outdated", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["aliases_set"] == {"champion": "2", "previous": "1"}

    history = json.loads(erpops("status", "--history", "--json", env=env).stdout)
    moves = [(e["alias"], e["from_version"], e["to_version"], e["action"], e["actor"]) for e in history["entries"]]
    assert moves[-2:] == [("champion", "1", "2", "force-promote", "ci"), ("previous", None, "1", "force-promote", "ci")]
    assert history["entries"][-1]["reason"] == "eval set outdated" and history["drift"] == {}
    table = erpops("status", "--history", env=env).stdout.splitlines()
    assert table[-1].split()[2:] == ["previous", "-", "->", "v1", "force-promote", "ci", "eval", "set", "outdated"]

    first = history["entries"][0]["at"]  # v1 became champion then; v2 later
    proc = erpops("status", "--at", first.replace("+00:00", ""), env=env)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": v1")
    proc = erpops("status", "--at", "1999-01-01T00:00:00", "--json", env=env)
    assert json.loads(proc.stdout)["champion"] is None
    proc = erpops("status", "--at", "last tuesday", env=env)
    assert proc.returncode == 2 and "ISO 8601" in proc.stderr


def test_api_key_and_serve_api_start_the_service(tmp_path):
    """The commands a user runs: create a key, start the service, ask it (the key is refused once revoked)."""
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = tmp_path / "serve.yaml"
    serve.write_text(f"data_dir: {tmp_path / 'serving'}\nport: {port}\nrecipe: {TINY}\ntrace: false\n")
    (tmp_path / "mlflow.yaml").write_text(f"tracking_uri: sqlite:///{tmp_path}/mlflow.db\n")
    env = {"MLFLOW_TRACKING_URI": "", "ERPOPS_MLFLOW_CONFIG": str(tmp_path / "mlflow.yaml"),
           "OLLAMA_HOST": "http://127.0.0.1:9"}
    created = erpops("api-key", "create", "--name", "ci", "--role", "viewer", "--config", str(serve), env=env)
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)
    assert key["role"] == "viewer" and key["key"].startswith(f"erpk_{key['key_id']}_")
    bad = erpops("api-key", "create", "--name", "x", "--role", "root", "--config", str(serve), env=env)
    assert bad.returncode == 2 and "unknown role" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "erpops.cli", "serve-api", "--config", str(serve)], cwd=REPO,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/livez", timeout=2).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else "no answer"
                time.sleep(0.5)
        ask = urllib.request.Request(f"{url}/api/v1/ai-models/list", headers={"X-API-Key": key["key"]})
        with urllib.request.urlopen(ask, timeout=30) as r:
            assert json.loads(r.read())["models"] == []
        assert erpops("api-key", "revoke", key["key_id"], "--config", str(serve), env=env).returncode == 0
        try:
            urllib.request.urlopen(ask, timeout=30)
            raise AssertionError("a revoked key was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_evaluate_refuses_a_run_whose_optimize_stage_did_not_finish_or_whose_gguf_changed(tmp_path):
    run = tmp_path / "run"
    (run / "gguf").mkdir(parents=True)
    gguf = run / "gguf" / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF left by a rerun that failed its checks")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    proc = erpops("evaluate", "--recipe", TINY, "--run-dir", str(run), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optimize.json is missing" in proc.stderr and "nothing evaluated" in proc.stderr
    (run / "optimize.json").write_text(json.dumps({"shipped": "q8_0", "gguf": {"q8_0": {"sha256": "0" * 64}}}))
    proc = erpops("evaluate", "--recipe", TINY, "--run-dir", str(run), env=env)
    assert proc.returncode == 2 and "not the q8_0 file the optimize stage verified" in proc.stderr
    assert not (tmp_path / "m.db").exists()  # refused before any MLflow run was started
