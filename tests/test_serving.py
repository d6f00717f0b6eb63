"""The API and chat service (serving/) over real parts: an MLflow registry on sqlite, two real releases (Milvus Lite
collections, Ollama tags on the test double), API keys in sqlite, MLflow tracing. One world per module (building
the releases is the slow part); each test states what it changes."""

from __future__ import annotations

import json
import logging

import pytest
from service_world import NAME, served_world

pytestmark = pytest.mark.integration

API = "/api/v1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with served_world(tmp_path_factory.mktemp("served")) as w:
        yield w


@pytest.fixture
def double(world):
    """The double with its knobs back at their defaults after the test."""
    d = world.double
    yield d
    d.answers.clear()
    d.generate_error = None
    d.generate_delay_s = 0.0


# ---- keys, roles, audit -------------------------------------------------------------------------
def test_keys_are_required_and_roles_nest(world):
    c = world.client
    r = c.get(f"{API}/ai-models/list")
    assert r.status_code == 401 and "missing API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert c.get(f"{API}/ai-models/list", headers={"Authorization": "Bearer erpk_nope_nope"}).status_code == 401
    assert c.get(f"{API}/ai-models/list", headers={"X-API-Key": world.keys["viewer"]}).status_code == 200
    r = c.post(f"{API}/ai-models/v2/test", json={"prompt": "hi"}, headers=world.auth("viewer"))
    assert r.status_code == 403 and "needs operator" in r.json()["detail"]
    r = c.post(f"{API}/ai-models/v2/start", headers=world.auth("operator"))
    assert r.status_code == 403 and "needs admin" in r.json()["detail"]
    assert c.get("/livez").status_code == 200  # health and metrics need no key


def test_one_reading_of_the_key_for_routes_and_the_audit_of_refused_bodies(world):
    from starlette.datastructures import Headers

    from serving.app import request_key

    assert request_key(Headers({"authorization": "Bearer  erpk_a_b "})) == "erpk_a_b"
    assert request_key(Headers({"authorization": "bearer erpk_a_b", "x-api-key": "erpk_c_d"})) == "erpk_a_b"
    assert request_key(Headers({"authorization": "Bearer ", "x-api-key": "erpk_c_d"})) == "erpk_c_d"
    assert request_key(Headers({"authorization": "Basic dXNlcg==", "x-api-key": "erpk_c_d"})) == "erpk_c_d"
    assert request_key(Headers({})) == ""
    # an empty bearer with a valid X-API-Key is let in by the routes as by `caller`
    r = world.client.get(f"{API}/ai-models/list", headers={"Authorization": "Bearer ", "X-API-Key": world.keys["viewer"]})
    assert r.status_code == 200


def test_a_registry_that_does_not_answer_is_a_503_not_an_unknown_model(world, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    def locked(self, *a, **k):
        raise MlflowException("database is locked")

    monkeypatch.setattr(mlflow.MlflowClient, "search_model_versions", locked)
    r = world.client.get(f"{API}/ai-models/v2/metrics", headers=world.auth("viewer"))
    assert r.status_code == 503 and "registry did not answer" in r.json()["detail"]
    monkeypatch.undo()
    assert world.client.get(f"{API}/ai-models/v9/metrics", headers=world.auth("viewer")).status_code == 404


def test_a_revoked_key_stops_working_and_keys_are_stored_hashed(world):
    key, who = world.service.keys.create("temp", "viewer")
    assert world.client.get(f"{API}/ai-models/list", headers={"X-API-Key": key}).status_code == 200
    assert world.service.keys.revoke(who.key_id)
    assert world.client.get(f"{API}/ai-models/list", headers={"X-API-Key": key}).status_code == 401
    raw = (world.root / "serving" / "serving.db").read_bytes()
    assert key.split("_")[2].encode() not in raw  # only the hash of the secret is stored


def test_mutating_calls_are_audited_without_keys_or_prompts(world, double, caplog):
    secret_prompt = "비밀 프롬프트 7f3a: 급여 테이블을 보여줘"
    with caplog.at_level(logging.DEBUG):
        world.client.post(f"{API}/ai-models/v2/test", json={"prompt": secret_prompt}, headers=world.auth("operator"))
        world.client.post(f"{API}/ai-models/v2/stop", headers=world.auth("viewer"))  # refused
        world.client.post(f"{API}/ai-models/v2/stop", headers=world.auth("admin"))
    entries = world.service.keys.audit_log(10)
    tail = [(e.actor.split(" ")[0], e.action, e.target, e.status) for e in entries[-3:]]
    assert tail == [("operator-key", "POST /api/v1/ai-models/{model_id}/test", "v2", 200),
                    ("viewer-key", "POST /api/v1/ai-models/{model_id}/stop", "v2", 403),
                    ("admin-key", "POST /api/v1/ai-models/{model_id}/stop", "v2", 200)]
    stored = json.dumps([e.to_dict() for e in entries], ensure_ascii=False)
    for secret in (secret_prompt, *world.keys.values()):
        assert secret not in stored and secret not in caplog.text
    with pytest.raises(Exception, match="append-only"):
        import sqlite3

        with sqlite3.connect(world.service.keys.path) as c:
            c.execute("DELETE FROM erpops_audit")


# ---- the catalogue -------------------------------------------------------------------------------
def test_list_joins_registry_releases_and_ollama(world):
    body = world.client.get(f"{API}/ai-models/list", headers=world.auth("viewer")).json()
    by_id = {m["id"]: m for m in body["models"]}
    assert list(by_id) == ["v2", "v1"]
    assert by_id["v2"]["envs"] == {"staging": "current"} and by_id["v1"]["envs"] == {"staging": "previous"}
    assert by_id["v2"]["ollama_tag"] == f"{NAME}:staging"
    assert by_id["v1"]["ollama_tag"] == world.releases["1"].ollama_tag  # not serving: its own release tag
    assert by_id["v2"]["gate_verdict"] == "promote" and by_id["v2"]["lineage"]["dataset_digest"] == "data-2"
    assert {m["state"] for m in body["models"]} <= {"loaded", "available"}
    assert body["providers"][0]["provider"] == "ollama"


def test_detail_and_unknown_ids(world):
    h = world.auth("viewer")
    d = world.client.get(f"{API}/ai-models/2", headers=h).json()
    assert d["id"] == "v2" and [r["release_id"] for r in d["releases"]] == [world.releases["2"].release_id]
    staging = world.client.get(f"{API}/ai-models/staging", headers=h).json()
    assert staging["version"] == "2" and staging["envs"] == {"staging": "current"}
    r = world.client.get(f"{API}/ai-models/v99", headers=h)
    assert r.status_code == 404 and "unknown model id 'v99'" in r.json()["detail"] and "v1, v2" in r.json()["detail"]
    r = world.client.get(f"{API}/ai-models/prod", headers=h)  # an environment that serves nothing yet
    assert r.status_code == 200 and r.json()["state"] == "absent"
    r = world.client.post(f"{API}/ai-models/prod/test", json={"prompt": "hi"}, headers=world.auth("operator"))
    assert r.status_code == 409 and "serves no release" in r.json()["detail"]


def test_start_and_stop_load_and_unload_in_ollama(world, double):
    h = world.auth("admin")
    tag = world.releases["1"].ollama_tag
    r = world.client.post(f"{API}/ai-models/v1/start", headers=h)
    assert r.status_code == 200 and r.json() == {"id": "v1", "tag": tag, "state": "loaded"}
    assert tag in double.loaded
    r = world.client.post(f"{API}/ai-models/v1/stop", headers=h)
    assert r.json()["state"] == "available" and tag not in double.loaded and double.unloaded[-1] == tag


# ---- answering -------------------------------------------------------------------------------------
def test_test_answers_with_latency_tokens_and_the_parameters_sent(world, double):
    r = world.client.post(f"{API}/ai-models/v2/test", headers=world.auth("operator"),
                          json={"prompt": "How do I post a journal entry?", "parameters": {"temperature": 0, "num_predict": 40}})
    body = r.json()
    assert r.status_code == 200 and body["answer"].startswith("Open Finance") and body["language"] == "en"
    assert body["completion_tokens"] == len(body["answer"].split()) and body["prompt_tokens"] == 8
    assert body["latency_s"] > 0 and body["provider"] == "ollama"
    sent = [b for m, p, b in double.request_json if p == "/api/chat"][-1]
    assert sent["model"] == f"{NAME}:staging" and sent["options"]["num_predict"] == 40 and sent["options"]["temperature"] == 0


@pytest.mark.parametrize("body,status,says", [
    ({"prompt": "x", "parameters": {"num_predict": 100000}}, 422, "num_predict"),
    ({"prompt": "x", "parameters": {"bogus": 1}}, 422, "bogus"),
    ({"prompt": ""}, 422, "prompt"),
    ({}, 422, "prompt: Field required"),
])
def test_bad_test_requests_get_a_clear_4xx(world, body, status, says):
    r = world.client.post(f"{API}/ai-models/v2/test", json=body, headers=world.auth("operator"))
    assert r.status_code == status and says in r.json()["detail"]


def test_malformed_json_and_oversized_bodies(world):
    h = {**world.auth("operator"), "Content-Type": "application/json"}
    r = world.client.post(f"{API}/ai-models/v2/test", content=b'{"prompt": "x",', headers=h)
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed JSON body")
    big = json.dumps({"prompt": "x" * (world.service.settings.max_body_bytes + 10)})
    r = world.client.post(f"{API}/ai-models/v2/test", content=big, headers=h)
    assert r.status_code == 413 and "request body over" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(world.service.settings.max_body_bytes // 65536 + 2):
            yield b"x" * 65536

    r = world.client.post(f"{API}/ai-models/v2/test", content=chunks(), headers=h)
    assert r.status_code == 413


def test_live_metrics_and_prometheus_follow_the_calls(world, double):
    h = world.auth("operator")
    for _ in range(3):
        world.client.post(f"{API}/ai-models/v1/test", json={"prompt": "재고 이동?"}, headers=h)
    double.generate_error = "model crashed"
    r = world.client.post(f"{API}/ai-models/v1/test", json={"prompt": "재고 이동?"}, headers=h)
    assert r.status_code == 503 and "model crashed" in r.json()["detail"]
    m = world.client.get(f"{API}/ai-models/v1/metrics", headers=world.auth("viewer")).json()
    assert m["requests"] >= 4 and m["errors"] >= 1 and 0 < m["error_rate"] < 1
    assert m["latency_p50_s"] > 0 and m["latency_p99_s"] >= m["latency_p50_s"] and m["tokens_per_s"] > 0
    assert sum(b["requests"] for b in m["series"]) == m["requests"]
    text = world.client.get("/metrics").text
    assert 'erpops_generations_total{env="staging",model="erp-assistant",outcome="error",provider="none",version="1"}' in text
    assert 'erpops_generation_duration_seconds_count{env="staging",model="erp-assistant",provider="ollama",version="1"}' in text


def test_alert_rules_use_series_the_service_exports(world):
    import re

    import yaml

    from conftest import REPO

    rules = yaml.safe_load((REPO / "serving" / "alerts.yml").read_text())["groups"][0]["rules"]
    exported = set(re.findall(r"^# TYPE (\S+)", world.client.get("/metrics").text, re.M))
    for rule in rules:
        for name in re.findall(r"\b(erpops_[a-z_]+)", rule["expr"]):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert name in exported or base in exported, f"{rule['alert']}: {name} is not exported"


# ---- chat ------------------------------------------------------------------------------------------
def test_chat_retrieves_answers_and_keeps_the_conversation(world, double):
    h = world.auth("viewer")
    first = world.client.post(f"{API}/chat", json={"message": "How do I move stock between warehouses?"}, headers=h).json()
    assert first["answer"].startswith("Open Finance") and first["version"] == "2" and first["env"] == "staging"
    assert first["sources"] and first["sources"][0]["doc"] == "inventory_transfer_en.md"
    threshold = world.service.retriever.threshold
    assert all(s["score"] >= threshold for s in first["sources"]) and len(first["sources"]) <= 5
    sent = [b for m, p, b in double.request_json if p == "/api/chat"][-1]
    assert "Warehouse stock transfers" in sent["messages"][0]["content"]  # the retrieved chunk is in the prompt
    second = world.client.post(f"{API}/chat", headers=h, json={"message": "And annual leave?",
                                                               "session_id": first["session_id"]}).json()
    sent = [b for m, p, b in double.request_json if p == "/api/chat"][-1]
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][1]["content"] == "How do I move stock between warehouses?"
    assert second["sources"][0]["doc"] == "hr_leave_en.md"


def test_the_same_question_in_the_same_state_is_answered_from_the_cache(world, double):
    h = world.auth("viewer")
    ask = {"message": "Who approves annual leave requests?", "parameters": {"temperature": 0}}
    calls = lambda: sum(1 for m, p in double.requests if p == "/api/chat")  # noqa: E731
    first = world.client.post(f"{API}/chat", json=ask, headers=h).json()
    before = calls()
    second = world.client.post(f"{API}/chat", json=ask, headers=h).json()
    assert not first["cached"] and second["cached"] and second["answer"] == first["answer"] and calls() == before
    again = world.client.post(f"{API}/chat", json={**ask, "session_id": second["session_id"]}, headers=h).json()
    assert not again["cached"]  # a conversation with history is another prompt
    other = world.client.post(f"{API}/chat", json={**ask, "parameters": {"temperature": 0.5}}, headers=h).json()
    assert not other["cached"]
    assert 'erpops_response_cache_total{outcome="hit"} 1.0' in world.client.get("/metrics").text


def test_off_topic_questions_get_no_sources(world, double):
    r = world.client.post(f"{API}/chat", json={"message": "What is the capital of Mongolia?"}, headers=world.auth("viewer"))
    assert r.status_code == 200 and r.json()["sources"] == []


def test_chat_streams_ndjson(world, double):
    with world.client.stream("POST", f"{API}/chat", headers=world.auth("viewer"),
                             json={"message": "재고 이동은 어떻게 하나요?", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0]["type"] == "start" and events[0]["session_id"] and events[-1]["type"] == "done"
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    assert len(deltas) > 1 and "".join(deltas) == events[-1]["answer"] == double.answer


def test_a_stream_that_fails_says_so_in_the_stream(world, double):
    double.generate_error = "out of memory"
    with world.client.stream("POST", f"{API}/chat", headers=world.auth("viewer"),
                             json={"message": "재고?", "stream": True}) as r:
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0]["type"] == "start" and events[-1]["type"] == "error" and "out of memory" in events[-1]["detail"]


def test_images_are_refused_for_a_model_without_vision(world, double):
    r = world.client.post(f"{API}/chat", headers=world.auth("viewer"),
                          json={"message": "이 화면은?", "images": ["iVBORw0KGgo="]})
    assert r.status_code == 409 and "does not accept images" in r.json()["detail"]
    r = world.client.post(f"{API}/chat", headers=world.auth("viewer"), json={"message": "이 화면은?", "images": ["not base64!"]})
    assert r.status_code == 422 and "images" in r.json()["detail"]


def test_images_reach_a_model_with_vision(world, double):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.service import Service

    double.capabilities[f"{NAME}:staging"] = ["completion", "vision"]
    try:  # a fresh service: the other one remembers that this tag had no vision
        service = Service.from_settings(world.service.settings.model_copy(update={"trace": False}), deploy=world.cfg,
                                        mlflow=world.mlflow)
        key, _ = service.keys.create("vision", "viewer")
        r = TestClient(create_app(service)).post(f"{API}/chat", headers={"X-API-Key": key},
                                                 json={"message": "이 화면의 오류는?", "images": ["iVBORw0KGgoAAAA="]})
        assert r.status_code == 200 and not r.json()["cached"]
        sent = [b for m, p, b in double.request_json if p == "/api/chat"][-1]
        assert sent["messages"][-1]["images"] == ["iVBORw0KGgoAAAA="] and sent["messages"][-1]["content"] == "이 화면의 오류는?"
        assert all("images" not in m for m in sent["messages"][:-1])
    finally:
        double.capabilities.clear()


def test_chat_requests_are_traced_to_mlflow(world, double):
    import mlflow

    body = world.client.post(f"{API}/chat", json={"message": "Month-end closing steps?"}, headers=world.auth("viewer")).json()
    assert body["trace_id"]
    mlflow.flush_trace_async_logging()
    trace = mlflow.get_trace(body["trace_id"])
    names = sorted(s.name for s in trace.data.spans)
    assert names == ["chat", "generation", "retrieval"]
    retrieval = next(s for s in trace.data.spans if s.name == "retrieval")
    assert retrieval.outputs[0]["metadata"]["doc"] == "finance_closing_en.md"
    assert trace.info.experiment_id == world.service.tracer.experiment_id


# ---- batch test and compare -------------------------------------------------------------------------
CASES = [{"id": f"c{i}", "question": f"How do I close period {i}?", "reference": f"Post accruals and lock period {i}."}
         for i in range(8)]


def test_batch_test_scores_with_the_gate_metrics(world, double):
    double.answers[world.releases["1"].ollama_tag] = "Post accruals and lock the period."
    r = world.client.post(f"{API}/ai-models/batch-test", headers=world.auth("operator"),
                          json={"model": "v1", "jsonl": "\n".join(json.dumps(c) for c in CASES)})
    body = r.json()
    assert r.status_code == 200 and body["cases"] == 8
    assert set(body["metrics"]) >= {"rouge_l", "exact_match", "keyword_coverage", "language_agreement", "latency_p50_s"}
    assert body["metrics"]["language_agreement"] == 1.0 and body["metrics"]["rouge_l"] > 0.5
    assert max(world.service.batcher.batches) > 1  # the cases went to the model in dynamic batches
    r = world.client.post(f"{API}/ai-models/batch-test", headers=world.auth("operator"),
                          json={"model": "v1", "jsonl": '{"id": "a", "question": "q"}'})
    assert r.status_code == 422 and "jsonl line 1" in r.json()["detail"]


def test_compare_pairs_two_versions_with_bootstrap_intervals(world, double):
    double.answers[world.releases["1"].ollama_tag] = "I cannot help with that."
    double.answers[f"{NAME}:staging"] = "Post accruals and lock the period."
    r = world.client.post(f"{API}/ai-models/compare", headers=world.auth("operator"),
                          json={"baseline": "v1", "candidate": "staging", "cases": CASES})
    body = r.json()
    assert r.status_code == 200 and body["paired_cases"] == 8
    rouge = next(c for c in body["comparisons"] if c["metric"] == "rouge_l")
    assert rouge["outcome"] == "better" and rouge["low"] > 0 and rouge["candidate"] > rouge["champion"]


def test_chat_fails_over_to_an_openai_compatible_backup_and_health_says_why(world, double):
    from provider_doubles import OpenAIDouble

    from serving.app import create_app
    from serving.providers import ProviderConfig
    from serving.service import Service

    with OpenAIDouble(answer="Backup says: post the transfer order.", models=(f"{NAME}:staging",)) as backup:
        providers = [ProviderConfig(name="ollama", kind="ollama", base_url=double.url),
                     ProviderConfig(name="backup", kind="openai", base_url=backup.url)]
        settings = world.service.settings.model_copy(update={"providers": providers, "trace": False, "cache": False})
        service = Service.from_settings(settings, deploy=world.cfg, mlflow=world.mlflow)
        from fastapi.testclient import TestClient

        client = TestClient(create_app(service))
        key, _ = service.keys.create("failover", "viewer")
        h = {"X-API-Key": key}
        double.generate_error = "GPU fell off the bus"
        answers = [client.post(f"{API}/chat", json={"message": "stock transfer?"}, headers=h).json() for _ in range(4)]
        assert [a["provider"] for a in answers] == ["backup"] * 4
        assert answers[0]["answer"] == "Backup says: post the transfer order."
        health = {p["provider"]: p for p in client.get(f"{API}/providers", headers=h).json()["providers"]}
        assert health["ollama"]["cooling_down"] and health["ollama"]["failures"] >= 3 and health["backup"]["ok"]
        ollama_calls = sum(1 for m, p in double.requests if p == "/api/chat")
        client.post(f"{API}/chat", json={"message": "stock transfer?"}, headers=h)
        assert sum(1 for m, p in double.requests if p == "/api/chat") == ollama_calls  # skipped while cooling down
        assert 'erpops_provider_up{provider="ollama"} 0.0' in client.get("/metrics").text


# ---- releases ------------------------------------------------------------------------------------------
def test_admin_rolls_an_environment_back_and_the_chat_follows(world, double):
    r = world.client.post(f"{API}/environments/staging/rollback", json={"reason": "drill"}, headers=world.auth("operator"))
    assert r.status_code == 403
    r = world.client.post(f"{API}/environments/staging/rollback", json={"reason": "drill"}, headers=world.auth("admin"))
    assert r.status_code == 200 and r.json()["version"] == "1" and r.json()["rolled_back"] == world.releases["2"].release_id
    chat = world.client.post(f"{API}/chat", json={"message": "Who approves annual leave requests?",
                                                  "parameters": {"temperature": 0}}, headers=world.auth("viewer")).json()
    assert chat["version"] == "1" and not chat["cached"]  # asked before of v2: the switch invalidated that answer
    assert world.service.cache.invalidate(world.releases["2"].release_id) == 0
    r = world.client.post(f"{API}/environments/staging/rollback", json={}, headers=world.auth("admin"))
    assert r.status_code == 409 and "no earlier release" in r.json()["detail"]
    envs = world.client.get(f"{API}/environments", headers=world.auth("viewer")).json()["environments"]
    assert envs["staging"]["current"]["model_version"] == "1" and envs["prod"]["current"] is None
    last = world.service.keys.audit_log(2)
    assert [(e.action, e.target, e.status) for e in last] == [
        ("POST /api/v1/environments/{env}/rollback", "staging", 200),
        ("POST /api/v1/environments/{env}/rollback", "staging", 409)]


def test_health_endpoints(world):
    assert world.client.get("/livez").json() == {"status": "ok"}
    r = world.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["knowledge_base"]["ok"]
