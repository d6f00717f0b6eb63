"""The whole flow under Prefect's test harness, on the tiny model, with real MLflow, Milvus Lite and GX,
and the Ollama test double standing in for a server."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _recipe(tmp_path: Path, corpus: Path, *edits: tuple[str, str], name: str = "recipe") -> Path:
    text = (REPO / "recipes" / "tiny" / "test.yaml").read_text()
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    text = text.replace("root: data/erp", f"root: {corpus}").replace("output_root: .erpops/runs", f"output_root: {tmp_path / 'runs'}")
    text = text.replace("milvus_uri: .erpops/milvus.db", f"milvus_uri: {tmp_path / 'milvus.db'}")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def aliases_of(client, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def registry_alias(client, name: str, alias: str) -> str | None:
    return aliases_of(client, name).get(alias)


@pytest.fixture
def env(tmp_path, mlflow_settings, monkeypatch):
    cfg = tmp_path / "mlflow.yaml"
    cfg.write_text(f"tracking_uri: {mlflow_settings.tracking_uri}\nartifact_location: {mlflow_settings.artifact_location}\n")
    return cfg


def test_whole_pipeline_then_bad_data_changes_nothing(prefect_harness, tmp_path, corpus, env, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM

    from deployment import vector_store as V
    from erpops.config import load_mlflow_settings, load_recipe
    from flows.pipeline import pipeline
    from ollama_double import OllamaDouble

    (corpus / "golden_queries.jsonl").write_text(json.dumps(
        {"id": "g1", "lang": "en", "query": "How are approval lines and delegation set up?",
         "relevant_doc": "approvals_guide_en.md"}) + "\n", encoding="utf-8")
    recipe_path = _recipe(tmp_path, corpus)
    recipe = load_recipe(recipe_path)
    settings = load_mlflow_settings(env)
    with OllamaDouble() as ollama:
        monkeypatch.setenv("OLLAMA_HOST", ollama.url)
        summary = pipeline(str(recipe_path), str(env), run_name="first")

        # every stage ran and the summary says so, on disk too
        assert [(s["name"], s["status"]) for s in summary["stages"]] == [
            ("validate", "ok"), ("train", "ok"), ("optimize", "ok"), ("evaluate", "ok"), ("promote", "ok"),
            ("deploy_kb", "ok"), ("deploy_ollama", "ok"), ("switch", "ok")]
        on_disk = json.loads((tmp_path / "runs" / "first" / "run_summary.json").read_text())
        assert on_disk["ok"] and set(on_disk["outputs"]) >= {"merged_model", "gguf_q8_0", "modelfile",
                                                             "collection", "model_version", "release_id"}
        out = summary["outputs"]

        # MLflow: a version with candidate + champion and lineage tags; the summary logged to the run
        client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
        name = settings.registered_model_name
        assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {
            "candidate": out["model_version"], "champion": out["model_version"], "staging": out["model_version"]}
        tags = client.get_model_version(name, out["model_version"]).tags
        for key in ("git_commit", "dataset_digest", "recipe_hash", "gate_verdict", "gguf_sha256", "data_contract"):
            assert tags.get(key), key
        assert tags["gate_verdict"] == "promote" and tags["deploy.staging.collection"] == out["collection"]
        assert tags["deploy.staging.release"] == out["release_id"]
        assert tags["recipe_hash"] == recipe.digest()
        assert (tags["feedback_data"], tags["feedback_rows"]) == ("none", "0")  # no curated feedback in this corpus
        run = client.get_run(summary["mlflow_run_id"])
        assert "train/loss" in run.data.metrics and "eval/rouge_l" in run.data.metrics
        assert summary["stages"][5]["outputs"]["retrieval"]["queries"] == 1 and "kb/hit_at_5" in run.data.metrics
        assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {tags["dataset_digest"][:36]}
        artifacts = {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
        assert {"run_summary.json", "adapter", "data_contracts"} <= artifacts

        # the gate took the candidate's perplexity from the optimize stage's pass over the same file
        report = json.loads(Path(summary["stages"][3]["outputs"]["report"]).read_text())
        optimized = summary["stages"][2]["outputs"]
        shipped = next(v for v in optimized["variants"] if v["name"] == f"gguf_{optimized['shipped']}")
        assert report["perplexity_from"] == "optimize"
        assert report["metrics"]["perplexity"] == pytest.approx(shipped["perplexity"])

        # the GGUF that shipped loads back in transformers
        gguf = Path(out["gguf_q8_0"])
        assert AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name) is not None
        assert "TEMPLATE" in Path(out["modelfile"]).read_text()

        # Milvus: staging's alias points at this release's collection, one row per chunk, right doc for a query
        kb_alias = f"{recipe.deploy.collection_alias}_staging"
        with V.open_milvus(recipe.deploy.milvus_uri) as client_kb:
            assert V.alias_target(client_kb, kb_alias) == out["collection"]
            docs = [p for p in (corpus / "erp_docs").glob("*.md")]
            assert int(client_kb.get_collection_stats(out["collection"])["row_count"]) == summary["stages"][5]["outputs"]["rows"]
            hits = V.search(client_kb, kb_alias, V.load_embedder(recipe.deploy.embedding_model),
                            "How are approval lines and delegation set up?")
            assert hits[0]["doc"] == "approvals_guide_en.md" and len(docs) == 8

        # Ollama (double): the release exists and staging serves it
        release = f"erp-assistant:{out['release_id']}"
        assert out["ollama_model"] == release and out["release_id"].startswith(f"v{out['model_version']}-")
        assert ollama.model(release) is not None and ollama.model("erp-assistant:staging")["copied_from"] == release
        assert registry_alias(client, name, "staging") == out["model_version"]

        # now a broken data file: the flow stops at validation, nothing in the registry or serving changes
        before_versions = len(client.search_model_versions(f"name='{name}'"))
        with open(corpus / "qa_pairs.jsonl", "a", encoding="utf-8") as f:
            f.write('{"id": "qa-bad", "module": "hr", "lang": "en", "instruction": "Hi", "response": "<|im_end|>"}\n')
        state = pipeline(str(recipe_path), str(env), run_name="broken", return_state=True)
        assert state.is_failed() and "validate" in state.message and "run_summary.json" in state.message
        bad = json.loads((tmp_path / "runs" / "broken" / "run_summary.json").read_text())
        assert [s["status"] for s in bad["stages"]] == ["failed"] + ["skipped"] * 7
        reason = bad["stages"][0]["reason"]
        assert f"{corpus / 'qa_pairs.jsonl'}:41" in reason and "text.template_token" in reason
        assert len(client.search_model_versions(f"name='{name}'")) == before_versions
        assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}["champion"] == out["model_version"]
        with V.open_milvus(recipe.deploy.milvus_uri) as client_kb:
            assert V.alias_target(client_kb, kb_alias) == out["collection"]

        # fix the data; the same recipe again: every stage is found in the cache, the candidate is the champion's
        # own GGUF, nothing is gated or registered ("no change")
        lines = (corpus / "qa_pairs.jsonl").read_text(encoding="utf-8").splitlines()
        (corpus / "qa_pairs.jsonl").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
        v1 = out["model_version"]
        same = pipeline(str(recipe_path), str(env), run_name="same")
        assert [s["status"] for s in same["stages"]] == ["cached"] * 3 + ["skipped"] * 5
        assert same["outputs"]["no_change"] and same["outputs"]["model_version"] == v1
        assert "no change" in same["stages"][3]["reason"]
        assert len(client.search_model_versions(f"name='{name}'")) == before_versions
        assert aliases_of(client, name) == {"candidate": v1, "champion": v1, "staging": v1}
        assert client.get_run(same["mlflow_run_id"]).data.tags["erpops.no_change"] == "true"

        # a worse model (one training step) is rejected, with the metric that regressed named. The tiny
        # model moves little in 8 steps (nll +0.06 nats), so this run allows 0.01 instead of 0.05
        worse_recipe = _recipe(tmp_path, corpus, ("max_steps: 8", "max_steps: 1"),
                               ("max_perplexity: 1.0e+9", "max_perplexity: 1.0e+9\n  tolerances: {nll: 0.01}"), name="worse")
        worse = pipeline(str(worse_recipe), str(env), run_name="worse")
        gate = worse["stages"][3]["outputs"]
        assert [s["status"] for s in worse["stages"][:5]] == ["cached", "ok", "ok", "ok", "ok"]
        assert gate["verdict"] == "reject" and any("nll" in r and "worse" in r for r in gate["reasons"])
        assert aliases_of(client, name)["champion"] == v1
        assert "<img src=\"data:image/png;base64," in Path(gate["html_report"]).read_text()

        # only a gate setting changes: validate, train and optimize come from the cache, evaluate and promote run
        reseeded = _recipe(tmp_path, corpus, ("max_steps: 8", "max_steps: 1"),
                           ("max_perplexity: 1.0e+9", "max_perplexity: 1.0e+9\n  tolerances: {nll: 0.01}\n  bootstrap_seed: 7"),
                           name="reseeded")
        again = pipeline(str(reseeded), str(env), run_name="reseeded")
        assert [s["status"] for s in again["stages"][:5]] == ["cached", "cached", "cached", "ok", "ok"]
        assert again["stages"][3]["outputs"]["verdict"] == "reject"
        assert aliases_of(client, name)["champion"] == v1

        # a better one (more steps) is promoted: champion moves, the old one becomes previous
        better = pipeline(str(_recipe(tmp_path, corpus, ("max_steps: 8", "max_steps: 30"), name="better")), str(env),
                          run_name="better")
        gate = better["stages"][3]["outputs"]
        assert gate["verdict"] == "promote", gate["reasons"]
        v2 = better["outputs"]["model_version"]
        assert aliases_of(client, name) == {"candidate": v2, "champion": v2, "previous": v1, "staging": v2}
        assert client.get_model_version(name, v2).tags["parent_champion"] == v1
        assert ollama.model("erp-assistant:staging")["copied_from"] == better["outputs"]["ollama_model"]
        assert ollama.model("erp-assistant:staging-previous")["copied_from"] == release

        proc = subprocess.run([sys.executable, "-m", "erpops.cli", "rollback", "--recipe", str(recipe_path),
                               "--mlflow-config", str(env)], capture_output=True, text=True,
                              env={**os.environ, "OLLAMA_HOST": ollama.url})
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout)
        assert result["champion"] == v1 and result["collection"] == out["collection"]
        aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
        assert aliases["champion"] == v1 and "previous" not in aliases
        with V.open_milvus(recipe.deploy.milvus_uri) as client_kb:
            assert V.alias_target(client_kb, kb_alias) == out["collection"]
        assert ollama.model("erp-assistant:staging")["copied_from"] == release
        assert registry_alias(client, name, "staging") == v1 and result["release"] == out["release_id"]

        # the ledger tells the story: v1 promoted, v2 promoted over it, then rolled back to v1
        from registry.ledger import read_ledger

        moves = [(e.action, e.to_version) for e in read_ledger(settings) if e.alias == "champion"]
        assert moves == [("promote", v1), ("promote", v2), ("rollback", v1)]


def test_ui_serves_the_same_store(tmp_path, env):
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "erpops.cli", "ui", "--mlflow-config", str(env), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5") as r:
                    body = json.loads(r.read())
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        assert any(e["name"] == "Default" for e in body["experiments"])
        assert (tmp_path / "mlflow.db").exists()  # the server created and serves the configured sqlite store
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_run_that_failed_at_promote_resumes_there(prefect_harness, tmp_path, corpus, env, monkeypatch):
    import mlflow

    from erpops.config import load_mlflow_settings
    from flows import steps
    from flows.pipeline import pipeline

    recipe_path = _recipe(tmp_path, corpus)
    settings = load_mlflow_settings(env)
    monkeypatch.setenv("OLLAMA_HOST", "http://127.0.0.1:9")  # no server: the Ollama half is skipped

    def registry_down(*a, **k):
        raise ConnectionError("registry unreachable")

    with monkeypatch.context() as m:
        m.setattr(steps, "register_version", registry_down)
        state = pipeline(str(recipe_path), str(env), run_name="crashed", return_state=True)
    assert state.is_failed() and "promote" in state.message
    client = mlflow.MlflowClient(settings.tracking_uri, settings.tracking_uri)
    assert client.search_model_versions(f"name='{settings.registered_model_name}'") == []

    resumed = pipeline(str(recipe_path), str(env), run_name="resumed")
    assert [s["status"] for s in resumed["stages"][:5]] == ["cached"] * 4 + ["ok"]
    assert resumed["outputs"]["promoted"] and aliases_of(client, settings.registered_model_name)["champion"] == "1"
