"""The chat service and its HTTP face over stubs (no MLflow server, Milvus or Ollama): a provider double whose
answers say which release's model made them, the release ledger as lists resolved by the catalogue's own pure
`resolve`, and the real keys, audit log, cache and context stores. For what needs exact interleavings: a release
switch during an answer, two keys on one session id, refused calls in the audit log, webhook payload shapes."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from deployment.releases import Release, ReleaseEvent
from erpops.config import DeployConfig, MLflowSettings
from serving.app import create_app
from serving.cache import MemoryCache
from serving.catalog import ModelRef, resolve
from serving.context import MemoryContext
from serving.keys import KeyStore
from serving.providers import Deployment, Reply, Router
from serving.service import ChatInput, Service
from serving.settings import ServeSettings
from serving.telemetry import LiveStats, Metrics
from serving.tracing import Tracer

R1, R2 = "v1-20250101000000000", "v2-20250102000000000"
WAIT_S = 5


class Provider:
    """Answers through `answer(model, messages)`; by default, which release the staging tag points at."""

    name, kind = "double", "ollama"

    def __init__(self):
        self.tag = {"erp-assistant:staging": R1}
        """What each environment tag of the Ollama double points at: it moves as deployment._apply moves it."""
        self.answer: Callable[[str, list[dict]], str] = lambda model, messages: f"answer of {self.tag[model]}"

    def chat(self, model, messages, options=None, timeout_s=None):
        return Reply(self.answer(model, messages), model, self.name, 1, 1, 0.01)

    def supports_images(self, model):
        return False


class Retriever:
    alias = "erp_kb_staging"

    def retrieve(self, question, collection=None, embedding_model=None):
        return [], None


class Ledger:
    """The release ledger as lists; `switch` writes it as deployment.deploy._switch does, around the tag's move."""

    def __init__(self, provider: Provider):
        self.provider = provider
        self.releases = [_release(R1, "1"), _release(R2, "2")]
        self.events = [_event("deploy", R1, None)]

    def write(self, action: str, release: str, frm: str | None) -> None:
        self.events.append(_event(action, release, frm))

    def move_tag(self, release: str) -> None:
        self.provider.tag["erp-assistant:staging"] = release

    def switch(self, action: str, release: str, frm: str) -> None:
        self.write("switching", release, frm)
        self.move_tag(release)
        self.write(action, release, frm)

    def resolve(self, model_id: str, prefer_env: str | None = None) -> ModelRef:
        return resolve(model_id, DeployConfig(), self.releases, list(self.events), set(), prefer_env)


def _release(rid: str, version: str) -> Release:
    return Release(rid, "erp-assistant", version, "0" * 64, "1" * 64, f"erp_kb_{rid}", "e", "2" * 64,
                   f"erp-assistant:{rid}", "t", "me")


def _event(action: str, rid: str, frm: str | None) -> ReleaseEvent:
    return ReleaseEvent("t", "erp-assistant", "staging", action, rid, frm, "me")


@pytest.fixture
def world(tmp_path):
    provider = Provider()
    ledger = Ledger(provider)
    settings = ServeSettings(data_dir=tmp_path / "serving", canary_analysis=False, trace=False, batch_wait_s=0,
                             max_body_bytes=1024)
    service = Service(settings, DeployConfig(), MLflowSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"),
                      KeyStore(tmp_path / "serving" / "serving.db"), MemoryContext(), Router([Deployment(provider)]),
                      Retriever(), ledger, Metrics(), LiveStats(), Tracer("", "x", enabled=False), "http://127.0.0.1:1",
                      MemoryCache())
    yield service, provider, ledger
    service.close()


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    return thread, out


# ---- the response cache across release switches ----------------------------------------------------
def test_the_same_question_of_the_same_release_is_answered_from_the_cache(world):
    service, _, _ = world
    first, again = service.chat(ChatInput("Q")), service.chat(ChatInput("Q"))
    assert (first.cached, again.cached) == (False, True) and again.answer == first.answer == f"answer of {R1}"


def test_an_answer_made_while_a_switch_moved_the_tag_is_not_served_after_a_rollback(world):
    service, provider, ledger = world
    service.chat(ChatInput("warm-up"))
    asked, go_on = threading.Event(), threading.Event()

    def answer(model, messages):
        if messages[-1]["content"] == "Q":
            asked.set()
            go_on.wait(WAIT_S)  # the request reaches the model after the switch moved the tag
        return f"answer of {provider.tag[model]}"

    provider.answer = answer
    thread, out = _in_thread(lambda: service.chat(ChatInput("Q")))
    assert asked.wait(WAIT_S)
    ledger.switch("deploy", R2, R1)
    assert service.chat(ChatInput("other")).release == R2
    go_on.set()
    thread.join(WAIT_S)
    assert out["value"].answer == f"answer of {R2}"  # what the model behind the tag said, labelled with R1
    ledger.switch("rollback", R1, R2)
    again = service.chat(ChatInput("Q"))
    assert (again.release, again.answer, again.cached) == (R1, f"answer of {R1}", False)


def test_an_answer_begun_while_a_switch_is_under_way_is_not_cached(world):
    service, _, ledger = world
    ledger.write("switching", R2, R1)
    ledger.move_tag(R2)  # the ledger still says R1; the tag already answers with R2
    during = service.chat(ChatInput("Q"))
    assert (during.release, during.answer) == (R1, f"answer of {R2}")
    ledger.move_tag(R1)  # the switch failed and was put back
    ledger.write("failed", R2, R1)
    after = service.chat(ChatInput("Q"))
    assert (after.answer, after.cached) == (f"answer of {R1}", False)


def test_an_answer_across_a_switch_that_failed_and_was_put_back_is_not_cached(world):
    service, provider, ledger = world
    asked, switched, answered, put_back = (threading.Event() for _ in range(4))

    def answer(model, messages):
        asked.set()
        switched.wait(WAIT_S)  # the switch moved the tag after the question was resolved
        text = f"answer of {provider.tag[model]}"
        answered.set()
        put_back.wait(WAIT_S)
        return text

    provider.answer = answer
    thread, out = _in_thread(lambda: service.chat(ChatInput("Q")))
    assert asked.wait(WAIT_S)
    ledger.write("switching", R2, R1)
    ledger.move_tag(R2)
    switched.set()
    assert answered.wait(WAIT_S)
    ledger.move_tag(R1)
    ledger.write("failed", R2, R1)
    put_back.set()
    thread.join(WAIT_S)
    assert out["value"].answer == f"answer of {R2}" and out["value"].release == R1
    provider.answer = lambda model, messages: f"answer of {provider.tag[model]}"
    after = service.chat(ChatInput("Q"))
    assert (after.answer, after.cached) == (f"answer of {R1}", False)


# ---- conversations belong to a key ------------------------------------------------------------------
def test_a_session_id_names_a_conversation_of_one_key_only(world):
    service, provider, _ = world
    provider.answer = lambda model, messages: "seen: " + " | ".join(m["content"] for m in messages[1:-1])
    alice, _ = service.keys.create("alice", "viewer")
    bob, _ = service.keys.create("bob", "viewer")
    client = TestClient(create_app(service))

    def ask(key: str, message: str) -> str:
        r = client.post("/api/v1/chat", headers={"X-API-Key": key}, json={"message": message, "session_id": "s-1"})
        assert r.status_code == 200, r.text
        return r.json()["answer"]

    assert ask(alice, "my salary is 9,000,000 KRW") == "seen: "
    assert ask(bob, "what did I say?") == "seen: "
    assert ask(alice, "and my bonus?").startswith("seen: my salary is 9,000,000 KRW | seen: ")
    assert "salary" not in ask(bob, "and now?")


# ---- refused calls in the audit log -------------------------------------------------------------------
def test_a_body_too_large_is_audited_with_who_sent_it(world):
    service, _, _ = world
    viewer, who = service.keys.create("viewer-key", "viewer")
    client = TestClient(create_app(service))
    promote = "/api/v1/environments/staging/promote"
    big = b'{"source": "dev", "reason": "' + b"x" * 2000 + b'"}'

    def chunks():
        yield big[:600]
        yield big[600:]

    answers = [client.post(promote, headers={"X-API-Key": viewer, "content-type": "application/json"}, content=big),
               client.post(promote, headers={"Authorization": "Bearer erpk_nope_nope"}, content=big),
               client.post(promote, headers={"Authorization": f"Bearer {viewer}"}, content=chunks()),
               client.post("/api/v1/chat", headers={"X-API-Key": viewer}, content=big)]  # the chat is not audited
    assert [r.status_code for r in answers] == [413] * 4
    rows = [(e.actor, e.role, e.action, e.target, e.status) for e in service.keys.audit_log(10)]
    action = "POST /api/v1/environments/{env}/promote"
    assert rows == [(who.actor, "viewer", action, "staging", 413), ("anonymous", None, action, "staging", 413),
                    (who.actor, "viewer", action, "staging", 413)]
    assert all(e.outcome == "body over 1024 bytes" for e in service.keys.audit_log(10))


# ---- webhook payload shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("body,says", [
    ({"alerts": "firing"}, "alerts is a string, not a list"),
    ({"alerts": {"a": 1}}, "alerts is an object, not a list"),
    ({"alerts": [{"labels": "x"}]}, "alerts[0].labels is a string, not an object"),
    ({"alerts": [1]}, "alerts[0] is a number, not an object"),
    ({"alerts": [{"status": "firing", "labels": {"alertname": 3}, "annotations": []}]},
     "alerts[0].labels.alertname is a number, not a string; alerts[0].annotations is a list, not an object"),
    ({}, "alerts is missing"),
    ([], "the body is a list, not an object"),
])
def test_a_webhook_that_is_not_an_alertmanager_payload_gets_400_saying_why(world, monkeypatch, body, says):
    service, _, _ = world
    monkeypatch.setenv(service.settings.alert_secret_env, "s3cret")
    client = TestClient(create_app(service), raise_server_exceptions=False)
    r = client.post("/hooks/alertmanager", headers={"Authorization": "Bearer s3cret"}, json=body)
    assert r.status_code == 400 and r.json()["detail"].endswith(says), r.text
    ok = client.post("/hooks/alertmanager", headers={"Authorization": "Bearer s3cret"},
                     json={"alerts": [{"status": "firing", "labels": {"alertname": "X"}, "annotations": {}}]})
    assert ok.status_code == 202 and ok.json() == {"alerts": 1, "retrain": "not asked"}
