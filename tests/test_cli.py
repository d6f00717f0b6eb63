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
    for cmd in ("run", "validate", "train", "optimize", "evaluate", "promote", "deploy", "rollback", "status", "ui"):
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
