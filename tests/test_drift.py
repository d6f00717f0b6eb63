"""Drift of live traffic against the training data: the statistics (pure), then the job on real parts (chat traces
in MLflow, the release's Milvus Lite collection, the report logged to MLflow)."""

from __future__ import annotations

import random

import pytest

from evaluation.drift import DriftThresholds, Sample, compare, language_tvd, psi, render_drift_html


def _sample(n, length, lang, score, answered=True, seed=0):
    rng, s = random.Random(seed), Sample()
    for _ in range(n):
        s.add("x" * max(1, int(rng.gauss(length, length / 5))), lang if isinstance(lang, str) else rng.choice(lang),
              rng.gauss(score, 0.05), answered if isinstance(answered, bool) else rng.random() < answered)
    return s


def test_psi_is_zero_for_the_same_distribution_and_grows_with_a_shift():
    rng = random.Random(1)
    ref = [rng.gauss(0, 1) for _ in range(2000)]
    same = [rng.gauss(0, 1) for _ in range(2000)]
    assert psi(ref, ref) == pytest.approx(0, abs=1e-9) and psi(ref, same) < 0.05
    assert 0.1 < psi(ref, [x + 0.5 for x in same]) < psi(ref, [x + 1.5 for x in same])
    assert psi([], same) != psi([], same)  # NaN: nothing to compare with


def test_language_mix_distance():
    assert language_tvd(["ko", "en"] * 50, ["en", "ko"] * 20) == 0
    assert language_tvd(["ko"] * 10, ["en"] * 10) == 1
    assert language_tvd(["ko", "en"] * 5, ["en"] * 10) == pytest.approx(0.5)


def test_the_same_traffic_has_not_drifted_and_a_changed_one_has(tmp_path):
    ref = _sample(300, 40, ["ko", "en"], 0.6, 0.95)
    assert compare(ref, _sample(100, 40, ["ko", "en"], 0.6, 0.95, seed=3)).drifted == []
    changed = compare(ref, _sample(100, 120, "en", 0.3, 0.4, seed=4))
    assert changed.judged and [d.split(":")[0] for d in changed.drifted] == [
        "question length", "best retrieval score", "language mix", "unanswered share"]
    few = compare(ref, _sample(5, 120, "en", 0.3, 0.4), DriftThresholds(min_questions=30))
    assert not few.judged and few.drifted == []
    html = render_drift_html(changed, ref, _sample(100, 120, "en", 0.3, 0.4), tmp_path / "d.html", "drift <v2>")
    text = html.read_text()
    assert "drift &lt;v2&gt;" in text and "data:image/png;base64," in text and "language mix" in text


@pytest.mark.integration
def test_the_drift_job_judges_a_releases_traces_and_logs_the_report(tmp_path, corpus):
    import mlflow
    from conftest import data_cfg
    from service_world import served_world

    from serving.traffic import DRIFT_EXPERIMENT, drift_job

    with served_world(tmp_path / "world", cache=False, batch_wait_s=0, canary_analysis=False) as w:
        for i in range(35):  # long English questions about nothing the ERP knows
            r = w.client.post("/api/v1/chat", json={"message": f"Tell me a long story about dragons and castles, part {i}, "
                                                               "with as many knights as you like."},
                              headers=w.auth("viewer"))
            assert r.status_code == 200
        result = drift_job(w.service.settings, w.cfg, w.mlflow, data_cfg(corpus), None, tmp_path / "drift")
        rep = result.report
        assert rep.questions == 35 and rep.judged and rep.reference_questions > 0
        assert rep.metrics["unanswered_rate"] == 1.0 and any(d.startswith("language mix") for d in rep.drifted), rep
        run = mlflow.MlflowClient(w.mlflow.tracking_uri).get_run(result.run_id)
        assert run.data.tags["release"] == result.release == w.releases["2"].release_id
        assert run.data.tags["drifted"] == "true" and run.data.metrics["questions"] == 35
        assert [a.path for a in mlflow.MlflowClient(w.mlflow.tracking_uri).list_artifacts(result.run_id)] == [
            f"drift-{result.release}.html"]
        assert mlflow.MlflowClient(w.mlflow.tracking_uri).get_experiment(run.info.experiment_id).name == DRIFT_EXPERIMENT


@pytest.mark.integration
def test_the_cli_reports_drift_and_requests_one_retrain(tmp_path, corpus):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO
    from service_world import served_world

    with served_world(tmp_path / "world", cache=False, batch_wait_s=0, canary_analysis=False) as w:
        for i in range(32):
            assert w.client.post("/api/v1/chat", json={"message": f"Write a poem about the sea, verse {i}, in rhyme."},
                                 headers=w.auth("viewer")).status_code == 200
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"name: t\ndata:\n  root: {corpus}\n  min_examples_per_module: 2\n"
                          f"deploy:\n  milvus_uri: {w.cfg.milvus_uri}\n  ollama_host: {w.double.url}\n  chunk_chars: 400\n")
        (tmp_path / "serve.yaml").write_text(f"recipe: {recipe}\ndata_dir: {tmp_path / 'serving'}\nenv: staging\n")
        (tmp_path / "mlflow.yaml").write_text(f"tracking_uri: {w.mlflow.tracking_uri}\n"
                                              f"artifact_location: {w.mlflow.artifact_location}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "PREFECT_API"))}

        def drift():
            return subprocess.run([sys.executable, "-m", "erpops.cli", "drift", "--emit", "--since", "1h", "--config",
                                   str(tmp_path / "serve.yaml"), "--mlflow-config", str(tmp_path / "mlflow.yaml"),
                                   "--out", str(tmp_path / "drift")], capture_output=True, text=True, env=env,
                                  cwd=REPO, timeout=600)

        first, second = drift(), drift()
        assert first.returncode == 3, first.stderr[-3000:]
        assert "drifted: " in first.stdout and "unanswered_rate" in first.stdout
        asked = [json.loads(x) for x in (first.stdout + second.stdout).splitlines() if x.startswith('{"retrain"')]
        assert [a["retrain"] for a in asked] == ["requested", "rate-limited"]  # one request per window
        assert asked[0]["event_sent"] is False  # no Prefect server here: nothing to tell, and said so
