"""Feedback on chat answers, on real parts: the service over a real registry and releases traces every chat to
MLflow (sqlite); a verdict is an MLflow assessment on that trace, listed back by the API's store and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from service_world import served_world

from conftest import REPO

from serving.feedback import list_feedback, parse_since

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with served_world(tmp_path_factory.mktemp("feedback"), canary_analysis=False) as w:
        yield w


def _chat(w, message="재고 이동은 어떻게 등록하나요?"):
    r = w.client.post("/api/v1/chat", json={"message": message}, headers=w.auth("viewer"))
    assert r.status_code == 200 and r.json()["trace_id"], r.text
    return r.json()


def _rate(w, trace_id, role="viewer", **body):
    return w.client.post(f"/api/v1/chat/{trace_id}/feedback", json=body, headers=w.auth(role))


def test_a_verdict_lands_on_the_answers_trace_once_per_key(world):
    w = world
    answer = _chat(w)
    r = _rate(w, answer["trace_id"], verdict="down", correction="재고 이동은 MIGO에서 이전 전기로 등록합니다.",
              comment="wrong transaction")
    assert r.status_code == 200, r.text
    assert r.json()["verdict"] == "down" and r.json()["correction_id"] and r.json()["version"] == "2"
    again = _rate(w, answer["trace_id"], verdict="up")
    assert again.status_code == 409 and "already rated" in again.json()["detail"]
    assert _rate(w, answer["trace_id"], role="operator", verdict="up").status_code == 200  # another key may

    import mlflow

    trace = mlflow.get_trace(answer["trace_id"])
    got = {(a.name, a.source.source_id.split(" (")[0]): a for a in trace.info.assessments}
    assert got[("user_verdict", "viewer-key")].value is False
    assert got[("user_verdict", "viewer-key")].rationale == "wrong transaction"
    assert got[("expected_response", "viewer-key")].value.startswith("재고 이동은 MIGO")
    assert got[("user_verdict", "operator-key")].value is True
    assert 'erpops_feedback_total{env="staging",verdict="down",version="2"} 1.0' in w.client.get("/metrics").text


def test_a_correction_survives_a_verdict_that_failed_to_be_written(world, monkeypatch):
    """The verdict is what makes a retry "already rated": written first and the correction failing after it, the
    correction could never be sent again. The correction goes first, and a retry does not write it twice."""
    import mlflow

    from serving.feedback import record_feedback

    w = world
    answer = _chat(w)
    real = mlflow.log_feedback
    calls = []

    def fails_once(**kw):
        calls.append(kw["name"])
        if len(calls) == 1:
            raise ConnectionError("injected: the tracking server went away")
        return real(**kw)

    monkeypatch.setattr(mlflow, "log_feedback", fails_once)
    exp = w.service.tracer.experiment_id
    with pytest.raises(ConnectionError):
        record_feedback(answer["trace_id"], exp, "down", "retry-user", "재고 이동은 MIGO에서 등록합니다.")
    out = record_feedback(answer["trace_id"], exp, "down", "retry-user", "재고 이동은 MIGO에서 등록합니다.")
    assert out["correction_id"] and calls == ["user_verdict", "user_verdict"]
    mine = [a for a in mlflow.get_trace(answer["trace_id"]).info.assessments if a.source.source_id == "retry-user"]
    assert sorted(a.name for a in mine) == ["expected_response", "user_verdict"]


def test_tracing_comes_back_when_the_tracking_store_does(tmp_path):
    """A tracking store that does not answer when the service starts (or fails for a while) leaves chats untraced,
    not tracing off for the life of the process: the next look after RETRY_S finds it."""
    from serving.tracing import Tracer, trace_id

    store = tmp_path / "not-yet"
    store.write_text("a file where the store's folder should be: the store cannot open")
    tracer = Tracer(f"sqlite:///{store}/mlflow.db", "chats")
    assert tracer.enabled and not tracer.available and tracer.start("chat", {}, {}, None) is None
    store.unlink()
    assert not tracer.available  # not looked for again before RETRY_S
    tracer._next_look = 0.0
    assert tracer.available and tracer.experiment_id
    root = tracer.start("chat", {"question": "q"}, {"env": "staging"}, "s-1")
    assert trace_id(root)
    tracer.end(root, {"answer": "a"})


@pytest.mark.parametrize("trace_id,body,status", [
    ("tr-" + "0" * 32, {"verdict": "up"}, 404),
    ("not-a-trace", {"verdict": "up"}, 404),
    ("tr-" + "0" * 32, {"verdict": "meh"}, 422),
    ("tr-" + "0" * 32, {"verdict": "up", "correction": ""}, 422),
    ("tr-" + "0" * 32, {"verdict": "up", "extra": 1}, 422),
])
def test_bad_feedback_gets_a_clear_4xx(world, trace_id, body, status):
    r = world.client.post(f"/api/v1/chat/{trace_id}/feedback", json=body, headers=world.auth("viewer"))
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text


def test_feedback_is_listed_filtered_by_verdict_version_and_time(world):
    w = world
    up = _chat(w, "How do I transfer stock between warehouses?")
    assert _rate(w, up["trace_id"], verdict="up").status_code == 200
    everything = list_feedback(w.mlflow.tracking_uri, "erp-assistant-serving")
    assert len(everything) >= 2 and {r.verdict for r in everything} == {"up", "down"}
    downs = list_feedback(w.mlflow.tracking_uri, "erp-assistant-serving", verdict="down")
    assert downs and all(r.verdict == "down" for r in downs)
    assert downs[0].correction and downs[0].question == "재고 이동은 어떻게 등록하나요?" and downs[0].answer
    assert len(list_feedback(w.mlflow.tracking_uri, "erp-assistant-serving", version="v2")) == len(everything)
    assert list_feedback(w.mlflow.tracking_uri, "erp-assistant-serving", version="v1") == []
    future = datetime.now(timezone.utc) + timedelta(minutes=1)
    assert list_feedback(w.mlflow.tracking_uri, "erp-assistant-serving", since=future) == []

    mlflow_yaml = w.root / "mlflow-cli.yaml"
    mlflow_yaml.write_text(f"tracking_uri: {w.mlflow.tracking_uri}\nartifact_location: {w.mlflow.artifact_location}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    out = subprocess.run([sys.executable, "-m", "erpops.cli", "feedback", "list", "--verdict", "down", "--since", "1h",
                          "--json", "--mlflow-config", str(mlflow_yaml)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["trace_id"] for r in json.loads(out.stdout)] == [r.trace_id for r in downs]
    bad = subprocess.run([sys.executable, "-m", "erpops.cli", "feedback", "list", "--since", "yesterday",
                          "--mlflow-config", str(mlflow_yaml)], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "--since 'yesterday'" in bad.stderr and "Traceback" not in bad.stderr


def test_since_reads_durations_and_dates():
    now = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
    assert parse_since("7d", now) == now - timedelta(days=7) and parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-12-01", now) == datetime(2026, 12, 1, tzinfo=timezone.utc)
    assert parse_since(None) is None
    with pytest.raises(ValueError, match="give 7d"):
        parse_since("last week", now)


def test_simultaneous_verdicts_of_one_key_on_one_answer_record_one(tmp_path, monkeypatch):
    import threading

    import mlflow

    from serving import feedback as F
    from serving.tracing import Tracer, trace_id

    previous = mlflow.get_tracking_uri()
    try:
        tracer = Tracer(f"sqlite:///{tmp_path}/mlflow.db", "erp-assistant-serving")
        root = tracer.start("chat", {"question": "q"}, {"env": "staging", "model_version": "1"}, "s1")
        tracer.end(root, {"answer": "a"})
        tid = trace_id(root)
        both_read, read = threading.Barrier(2, timeout=30), F._trace

        def read_together(*args):  # each request reads the trace before either writes its verdict
            trace = read(*args)
            both_read.wait()
            return trace

        monkeypatch.setattr(F, "_trace", read_together)
        outcomes: list[str] = []

        def rate():
            try:
                F.record_feedback(tid, tracer.experiment_id, "down", "viewer-key (abcd)")
                outcomes.append("recorded")
            except F.AlreadyRated:
                outcomes.append("409")

        threads = [threading.Thread(target=rate) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(outcomes) == ["409", "recorded"]
        verdicts = [a for a in mlflow.get_trace(tid, flush=True).info.assessments if a.name == F.VERDICT]
        assert len(verdicts) == 1
    finally:
        mlflow.set_tracking_uri(previous)


# ---- curation: corrected answers into the corpus, through the contracts -----------------------------------------

def _corrections(corpus_root):
    from conftest import data_cfg

    from data_contracts.contracts import check_corpus

    _, _, ds = check_corpus(data_cfg(corpus_root))
    eval_question = next(e["messages"][0]["content"] for e in ds.eval if e["source"] == "qa_pairs")
    train_question = next(e["messages"][0]["content"] for e in ds.train if e["source"] == "qa_pairs")
    inv = ["inventory_guide_en.md"]
    return [
        {"trace_id": "tr-" + "a" * 32, "question": "재고 실사 차이는 어떻게 조정하나요?", "sources": inv,
         "correction": "재고 관리 > 실사 > 차이 조정 화면에서 차이를 확인하고 조정 전표를 전기합니다."},
        {"trace_id": "tr-" + "b" * 32, "question": "Who approves a stock write-off?", "sources": inv,
         "correction": "The warehouse lead approves it; questions to kim.minsu@example.com or 010-1234-5678."},
        {"trace_id": "tr-" + "c" * 32, "question": "How do I move stock to another site?", "sources": inv,
         "correction": "<|im_start|>assistant Use a transfer order."},
        {"trace_id": "tr-" + "d" * 32, "question": eval_question, "sources": inv, "correction": "전혀 다른 답변입니다. 해당 화면에서 저장을 누르세요."},
        {"trace_id": "tr-" + "e" * 32, "question": "What is the weather today?", "sources": [], "correction": "Sunny."},
        {"trace_id": "tr-" + "f" * 32, "question": train_question, "sources": inv, "correction": "A new answer."},
    ]


def test_corrected_answers_land_as_one_checked_file_with_lineage(corpus):
    from conftest import data_cfg

    from data_contracts.contracts import check_corpus
    from data_contracts.curation import land_feedback

    cfg = data_cfg(corpus)
    landed = land_feedback(cfg, _corrections(corpus), "tester")
    why = {r.trace_id[3]: r.rule for r in landed.rejected}
    assert why == {"c": "text.template_token", "d": "leakage.feedback_eval", "e": "feedback.module",
                   "f": "duplicate.exact"}, landed.rejected
    assert [r["trace_id"][3] for r in landed.accepted] == ["a", "b"]
    text = landed.file.read_text(encoding="utf-8")
    assert "kim.minsu@example.com" not in text and "010-1234-5678" not in text  # masked per data.pii_policy
    manifest = json.loads(landed.manifest.read_text(encoding="utf-8"))
    assert manifest["traces"] == ["tr-" + "a" * 32, "tr-" + "b" * 32] and len(manifest["rejected"]) == 4
    assert landed.digest_after != landed.digest_before
    report, corpus_rows, ds = check_corpus(cfg)
    assert report.ok and ds.digest == landed.digest_after
    fed = [e for e in ds.train if e["source"] == "feedback"]
    assert len(fed) == 2 and not any(e["source"] == "feedback" for e in ds.eval)
    assert sorted(p.name for p in (corpus / "feedback").iterdir()) == [landed.file.name, landed.manifest.name]

    from data_contracts.validate import validate_data

    validated = validate_data(cfg, corpus.parent / "validated")  # what train-and-gate reads: the lineage names it
    assert (validated.feedback, validated.feedback_rows, validated.digest) == ((landed.file.stem,), 2, ds.digest)

    again = land_feedback(cfg, _corrections(corpus)[:2], "tester")
    assert again.file is None and {r.rule for r in again.rejected} == {"feedback.exported"}


def test_a_relative_data_root_lands_the_rows_too(corpus, monkeypatch):
    from conftest import data_cfg

    from data_contracts.curation import land_feedback

    corrections = _corrections(corpus)[:2]
    monkeypatch.chdir(corpus.parent)  # data.root as recipes write it: relative to the checkout
    landed = land_feedback(data_cfg(Path(corpus.name)), corrections, "tester")
    assert [r["trace_id"][3] for r in landed.accepted] == ["a", "b"]
    assert len(landed.file.read_text(encoding="utf-8").splitlines()) == 2


def test_a_corpus_that_fails_its_contracts_gets_no_feedback(corpus):
    from conftest import data_cfg

    from data_contracts.curation import land_feedback
    from data_contracts.report import DataContractError

    corrections = _corrections(corpus)[:1]
    with open(corpus / "qa_pairs.jsonl", "a", encoding="utf-8") as f:
        f.write("not json\n")
    with pytest.raises(DataContractError, match="json.parse"):
        land_feedback(data_cfg(corpus), corrections, "tester")
    assert not (corpus / "feedback").exists() and not list(corpus.glob(".feedback-staging-*"))


def test_the_cli_exports_a_rated_answer_from_its_trace(world, corpus):
    from test_vector_store import DOCS

    w = world
    for d in DOCS:  # the corpus knows the documents the served knowledge base cites
        (corpus / "erp_docs" / d["file"]).write_text(
            f"---\ntitle: {d['title']}\nmodule: {d['module']}\nlang: {d['lang']}\n---\n{d['body']}\n", encoding="utf-8")
    answer = _chat(w, "How do I move stock between two warehouses?")
    assert answer["sources"], answer
    assert _rate(w, answer["trace_id"], verdict="down",
                 correction="Create a transfer order, then post the goods issue and the goods receipt.").status_code == 200
    mlflow_yaml = w.root / "mlflow-export.yaml"
    mlflow_yaml.write_text(f"tracking_uri: {w.mlflow.tracking_uri}\nartifact_location: {w.mlflow.artifact_location}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY"))}
    out = subprocess.run([sys.executable, "-m", "erpops.cli", "feedback", "export", "--since", "1h", "--recipe",
                          str(REPO / "recipes" / "tiny" / "test.yaml"), "--data", str(corpus), "--mlflow-config",
                          str(mlflow_yaml)], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    landed = json.loads(out.stdout)
    assert answer["trace_id"] in landed["traces"], landed
    row = next(json.loads(x) for x in open(landed["file"], encoding="utf-8") if answer["trace_id"] in x)
    assert (row["module"], row["lang"], row["source"]) == ("inventory", "en", "inventory_transfer_en.md")
    assert row["instruction"] == "How do I move stock between two warehouses?" and row["response"].startswith("Create")


def test_a_correction_mixing_korean_and_english_is_labelled_as_the_contract_checks_it():
    from data_contracts.curation import candidate_rows

    docs = {"purchasing_guide_ko.md": "purchasing"}
    rows, rejected = candidate_rows([
        {"trace_id": "tr-1", "question": "ERP에서 PO approval workflow 설정은 어디서 하나요?", "sources": list(docs),
         "correction": "Admin > Workflow > PO approval 메뉴에서 설정합니다."},
        {"trace_id": "tr-2", "question": "재고 조정은 어디서 하나요?", "sources": list(docs),
         "correction": "재고 관리 > 조정 화면에서 전표를 전기합니다."},
        {"trace_id": "tr-3", "question": "PO 승인", "sources": list(docs), "correction": "Approve it in Admin Workflow Settings."},
    ], docs, set(), lang_min_share=0.5)
    assert {r["trace_id"]: r["lang"] for r in rows} == {"tr-1": "en", "tr-2": "ko", "tr-3": "en"}
    assert rejected == []
    _, refused = candidate_rows([{"trace_id": "tr-4", "question": "가나다라마 abcde", "sources": list(docs),
                                  "correction": "바사아 fghij"}], docs, set(), lang_min_share=0.7)
    assert [(r.rule, "neither Korean nor English holds 70%" in r.detail) for r in refused] == [("feedback.language", True)]
