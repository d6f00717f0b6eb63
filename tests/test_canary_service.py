"""Canary releases through the chat service, on real parts: a real registry, real Milvus Lite collections, the
Ollama double serving both releases, the canary ledger, and the analysis. Faults are injected into the canary's
release after it passed its health check (errors, slow answers, garbage), as a release that degrades under live
traffic would; each is rolled back by the analysis while the stable release keeps serving. A healthy canary walks
its steps to 100% and is promoted."""

from __future__ import annotations

import itertools
import re
import time
from datetime import timedelta

import pytest
from service_world import SPEC, served_world
from test_ollama import fake_gguf
from test_vector_store import DOCS

from deployment.canaries import CanaryLedger
from deployment.deploy import collect, rollback_env
from deployment.releases import ReleaseLedger
from deployment.rollout import CanaryError, promote_canary, start_canary
from deployment.vector_store import alias_target, open_milvus
from erpops.config import CanaryPolicy

pytestmark = pytest.mark.integration

POLICY = CanaryPolicy(steps=(50, 100), window_s=30, interval_s=0.2, min_requests=5, p95_floor_s=0.5)
QUESTION = "재고 이동은 어떻게 등록하나요?"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with served_world(tmp_path_factory.mktemp("canary"), cache=False, batch_wait_s=0, trace=False,
                      canary_analysis=False) as w:
        yield w


@pytest.fixture(autouse=True)
def _no_canary_left_running(request):
    """Sessions numbered per test; and a test that fails half-way must not leave the next one (they share the
    module's world) a running canary."""
    SESSIONS.update(test=re.sub(r"[^A-Za-z0-9_.:-]", "_", request.node.name)[:96], count=itertools.count())
    yield
    if "world" in request.fixturenames:
        w = request.getfixturevalue("world")
        state = w.service.canary()
        if state is not None and state.active:
            w.client.post("/api/v1/environments/staging/canary/abort", json={"reason": "test cleanup"},
                          headers=w.auth("admin"))


def _start(w, policy=POLICY, **kw):
    import mlflow

    client = mlflow.MlflowClient(w.mlflow.tracking_uri, w.mlflow.tracking_uri)
    version = client.create_model_version(w.mlflow.registered_model_name, source=str(w.root)).version
    gguf = fake_gguf(w.root, f"canary-v{version}")
    return start_canary(w.cfg, w.mlflow, "staging", str(version), gguf, SPEC, DOCS, None, "tester", policy=policy,
                        **kw).state


SESSIONS = {"test": "", "count": itertools.count()}


def _new_session() -> str:
    """A new conversation's id: the test's name and a number, not random. A session's arm is a hash of its id, so
    which go to the canary, and every share asserted on, is the same in every run, whatever ran before."""
    return f"{SESSIONS['test']}-{next(SESSIONS['count'])}"


def _chat(w, session=None):
    r = w.client.post("/api/v1/chat", json={"message": QUESTION, "session_id": session or _new_session()},
                      headers=w.auth("viewer"))
    assert r.status_code == 200, r.text
    return r.json()


def _until_canary_calls(w, n: int, limit: int = 200) -> list[dict]:
    """Chats from new conversations until `n` of them went to the canary."""
    out = []
    for _ in range(limit):
        out.append(_chat(w))
        if sum(1 for a in out if a["arm"] == "canary") >= n:
            return out
    raise AssertionError(f"fewer than {n} canary answers in {limit} chats")


def _serving(w) -> tuple[str, str, str]:
    """(release the ledger says staging serves, collection its alias points at, digest of its Ollama tag)."""
    current, _ = ReleaseLedger(w.mlflow).serving("staging")
    with open_milvus(w.cfg.milvus_uri) as client:
        collection = alias_target(client, "erp_kb_staging")
    return current, collection, w.double.model("erp-assistant:staging")["digest"]


def _window_over(state):
    return state.step_started() + timedelta(seconds=state.policy.window_s + 1)


def test_a_healthy_canary_walks_its_steps_and_is_promoted(world):
    w = world
    stable = _serving(w)
    state = _start(w)
    assert (state.status, state.weight, state.stable_release) == ("progressing", 50, stable[0])
    assert _serving(w) == stable  # building the canary's release switched nothing

    answers = _until_canary_calls(w, POLICY.min_requests)
    while not any(a["arm"] == "stable" for a in answers) and len(answers) < 200:  # at 50%, the first 5 can all be canary
        answers.append(_chat(w))
    canary = [a for a in answers if a["arm"] == "canary"]
    assert {a["release"] for a in canary} == {state.release_id}
    assert {a["release"] for a in answers if a["arm"] == "stable"} == {stable[0]}
    assert 0.2 < len(canary) / len(answers) < 0.9 or len(answers) < 12
    sticky = canary[0]["session_id"]
    assert all(_chat(w, sticky)["arm"] == "canary" for _ in range(3))  # a conversation stays on its side

    assert collect(w.cfg, w.mlflow)["collections_dropped"] == []  # a running canary's collection is kept
    assert w.service.canary_tick() is None  # inside the window, a healthy canary waits
    out = w.service.canary_tick(_window_over(w.service.canary()))
    assert out["action"] == "next-step" and out["state"].weight == 100

    assert {a["arm"] for a in _until_canary_calls(w, POLICY.min_requests)} == {"canary"}
    out = w.service.canary_tick(_window_over(w.service.canary()))
    assert out["action"] == "promote" and out["state"].status == "promoted"
    current, collection, digest = _serving(w)
    release = ReleaseLedger(w.mlflow).release(state.release_id)
    assert (current, collection) == (state.release_id, release.collection)
    assert digest == w.double.model(release.ollama_tag)["digest"]
    after = _chat(w)
    assert (after["release"], after["arm"]) == (state.release_id, None)
    actions = [e.action for e in CanaryLedger(w.mlflow).events("staging") if e.canary_id == state.canary_id]
    assert actions == ["start", "analysis", "step", "analysis", "promote"]


@pytest.mark.parametrize("fault,says", [
    ("errors", "error rate"),
    ("slow", "p95"),
    ("garbage", "bad answers"),
])
def test_a_faulty_canary_is_rolled_back_within_its_window(world, fault, says):
    w = world
    stable = _serving(w)
    state = _start(w)
    tag = ReleaseLedger(w.mlflow).release(state.release_id).ollama_tag
    if fault == "errors":
        w.double.errors[tag] = "CUDA error: out of memory"
    elif fault == "slow":
        w.double.delays[tag] = 0.8
    else:
        w.double.answers[tag] = "<|im_start|>assistant Sure! <|im_end|>"
    try:
        answers = _until_canary_calls(w, POLICY.min_requests) if fault != "errors" else \
            [_chat(w) for _ in range(40)]  # a failed canary answer is asked again of the stable release
        if fault == "errors":
            assert {a["release"] for a in answers} == {stable[0]}
        out = w.service.canary_tick()  # inside the window: a failed measurement aborts at once
    finally:
        w.double.errors.pop(tag, None), w.double.delays.pop(tag, None), w.double.answers.pop(tag, None)
    assert out["action"] == "abort", out
    now = w.service.canary()
    assert (now.status, now.weight) == ("aborted", 0) and says in now.reason
    assert _serving(w) == stable  # the stable release's alias and Ollama tag never moved
    last = ReleaseLedger(w.mlflow).events()[-1]
    assert (last.action, last.release_id, last.from_release) == ("failed", state.release_id, stable[0])
    assert {a["arm"] for a in [_chat(w) for _ in range(5)]} == {None}


def test_a_streamed_answer_the_canary_fails_to_begin_comes_from_the_stable_release(world):
    import json

    w = world
    stable = _serving(w)
    state = _start(w)
    tag = ReleaseLedger(w.mlflow).release(state.release_id).ollama_tag
    w.double.errors[tag] = "CUDA error: out of memory"
    try:
        streams = []
        while len(w.service.calls.calls(state.canary_id, "canary", 0.0)) < POLICY.min_requests and len(streams) < 200:
            with w.client.stream("POST", "/api/v1/chat", headers=w.auth("viewer"),
                                 json={"message": QUESTION, "session_id": _new_session(), "stream": True}) as r:
                streams.append([json.loads(line) for line in r.iter_lines() if line])
        assert all(not c.ok for c in w.service.calls.calls(state.canary_id, "canary", 0.0))
        assert all(s[0]["type"] == "start" and s[-1]["type"] == "done" for s in streams)
        assert {(s[0]["release"], s[0]["arm"]) for s in streams} <= {(stable[0], None), (stable[0], "stable")}
        out = w.service.canary_tick()  # the failures were recorded against the canary
    finally:
        w.double.errors.pop(tag, None)
        if w.service.canary().active:  # a failed assertion above must not leave the next test a running canary
            w.client.post("/api/v1/environments/staging/canary/abort", json={}, headers=w.auth("admin"))
    assert out["action"] == "abort" and "error rate" in w.service.canary().reason


def test_too_little_traffic_pauses_for_a_human_who_promotes_or_aborts(world):
    w = world
    state = _start(w)
    out = w.service.canary_tick(_window_over(state))
    assert out["action"] == "pause" and w.service.canary().status == "paused"
    with pytest.raises(CanaryError, match="already has canary"):
        _start(w)
    assert _chat(w)["arm"] in ("canary", "stable")  # a paused canary keeps its weight
    state = promote_canary(w.cfg, w.mlflow, "staging", "tester", "looked fine")
    assert (state.status, state.weight) == ("progressing", 100)

    r = w.client.post("/api/v1/environments/staging/canary/abort", json={"reason": "seen enough"},
                      headers=w.auth("operator"))
    assert r.status_code == 403
    r = w.client.post("/api/v1/environments/staging/canary/abort", json={"reason": "seen enough"},
                      headers=w.auth("admin"))
    assert r.status_code == 200 and r.json()["canary"]["status"] == "aborted"
    r = w.client.post("/api/v1/environments/staging/canary/abort", json={}, headers=w.auth("admin"))
    assert r.status_code == 409 and "no canary running" in r.json()["detail"]
    got = w.client.get("/api/v1/environments/staging/canary", headers=w.auth("viewer")).json()
    assert [e["action"] for e in got["events"]] == ["start", "analysis", "pause", "step", "abort"]
    with pytest.raises(CanaryError, match="serves no release yet"):
        start_canary(w.cfg, w.mlflow, "dev", "1", fake_gguf(w.root, "dev"), SPEC, DOCS, None, "tester")


def test_an_ab_split_holds_its_weight_until_a_human_ends_it(world):
    w = world
    stable = _serving(w)
    state = _start(w, ab_split=30)
    assert (state.mode, state.weight) == ("ab", 30)
    _until_canary_calls(w, POLICY.min_requests)
    out = w.service.canary_tick(_window_over(state))
    assert out["action"] == "hold" and (out["state"].weight, out["state"].status) == (30, "progressing")
    state = promote_canary(w.cfg, w.mlflow, "staging", "tester", "B won")
    assert state.status == "promoted" and _serving(w)[0] == state.release_id != stable[0]
    state = _start(w, ab_split=12.5)  # a fractional split is a valid weight, replayed like any other
    assert (state.mode, state.weight, state.policy.steps) == ("ab", 12.5, (12.5,))
    with pytest.raises(CanaryError, match="already has canary"):
        _start(w, ab_split=20)
    w.client.post("/api/v1/environments/staging/canary/abort", json={"reason": "done"}, headers=w.auth("admin"))
    for bad in (0, 100, 150):
        with pytest.raises(CanaryError, match="strictly between 0 and 100"):
            _start(w, ab_split=bad)


def test_a_canary_of_a_release_no_longer_serving_is_aborted(world):
    w = world
    state = _start(w)

    rollback_env(w.cfg, w.mlflow, "staging", "tester", "someone rolled back")
    assert _chat(w)["arm"] is None  # the canary compared against another release: no longer routed
    out = w.service.canary_tick()
    assert out["action"] == "abort" and out["state"].canary_id == state.canary_id
    assert "was switched" in w.service.canary().reason


def test_a_paused_canary_is_not_promoted_over_a_release_deployed_since(world):
    """Paused for too little traffic; meanwhile someone rolls the environment back. A human's promote would switch
    to a release compared with one that no longer serves: the canary is aborted instead, the rollback stands."""
    w = world
    state = _start(w)
    w.service.canary_tick(_window_over(state))
    assert w.service.canary().status == "paused"
    rollback_env(w.cfg, w.mlflow, "staging", "tester", "someone rolled back")
    after_rollback = _serving(w)
    with pytest.raises(CanaryError, match="was switched"):
        promote_canary(w.cfg, w.mlflow, "staging", "tester", "looked fine", full=True)
    assert w.service.canary().status == "aborted" and _serving(w) == after_rollback


def test_a_canary_started_with_no_ollama_answering_says_where_its_bundle_is(world):
    import mlflow
    from test_providers import free_port

    w = world
    client = mlflow.MlflowClient(w.mlflow.tracking_uri, w.mlflow.tracking_uri)
    version = client.create_model_version(w.mlflow.registered_model_name, source=str(w.root)).version
    gguf = fake_gguf(w.root, f"canary-v{version}-no-ollama")
    down = w.cfg.model_copy(update={"ollama_host": f"http://127.0.0.1:{free_port()}"})
    started = start_canary(down, w.mlflow, "staging", str(version), gguf, SPEC, DOCS, None, "tester", policy=POLICY)
    try:
        assert started.release.ollama_skipped and started.state.status == "progressing"
        assert f"bundle to import by hand: {gguf.parent}" in started.release.ollama
    finally:
        w.client.post("/api/v1/environments/staging/canary/abort", json={"reason": "done"}, headers=w.auth("admin"))
    assert w.service.canary().status == "aborted"


def test_the_analysis_thread_rolls_a_faulty_canary_back_by_itself(tmp_path):
    with served_world(tmp_path, cache=False, batch_wait_s=0, trace=False, canary_poll_s=0.2) as w:
        state = _start(w)
        w.double.errors[ReleaseLedger(w.mlflow).release(state.release_id).ollama_tag] = "model crashed"
        t0 = time.monotonic()
        while w.service.canary().status == "progressing" and time.monotonic() - t0 < POLICY.window_s:
            _chat(w)
        elapsed = time.monotonic() - t0
        now = w.service.canary()
        assert now.status == "aborted" and "error rate" in now.reason, now
        assert elapsed < POLICY.window_s  # within the window, not at its end
        metrics = w.client.get("/metrics").text
        assert 'erpops_canary_answers_total{arm="canary",env="staging",outcome="error"}' in metrics
        assert 'erpops_canary_weight{env="staging"} 0.0' in metrics


QUESTIONS = ["재고 이동은 어떻게 등록하나요?", "구매 발주 승인 절차는?", "How do I post a goods receipt?",
             "월말 결산은 언제 하나요?", "How is a sales order released?", "거래처 등록 방법을 알려주세요",
             "Where do I see open invoices?", "출고 지시서를 취소하려면?"]


def test_ab_compares_both_releases_on_the_logged_questions(tmp_path):
    with served_world(tmp_path, cache=False, batch_wait_s=0, canary_analysis=False) as w:
        state = _start(w, ab_split=50)
        for i, q in enumerate(QUESTIONS * 2):
            r = w.client.post("/api/v1/chat", json={"message": q, "session_id": f"s{i}"}, headers=w.auth("viewer"))
            assert r.status_code == 200
        assert w.service.logged_questions(state.canary_id) and \
            set(w.service.logged_questions(state.canary_id)) == set(QUESTIONS)
        tag = ReleaseLedger(w.mlflow).release(state.release_id).ollama_tag
        w.double.answers[tag] = "<|im_start|>assistant Sure!"  # B degrades: template tokens, wrong language
        r = w.client.post("/api/v1/environments/staging/canary/compare", json={"limit": 50}, headers=w.auth("operator"))
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["questions"], got["A"], got["B"]) == (len(QUESTIONS), state.stable_release, state.release_id)
        by = {c["metric"]: c for c in got["comparisons"]}
        assert set(by) == {"good_answer", "language_agreement", "latency_s"}
        assert by["good_answer"]["outcome"] == "worse" and got["means"]["B"]["good_answer"] == 0.0
        assert got["means"]["A"]["good_answer"] == 1.0
        assert w.client.post("/api/v1/environments/staging/canary/compare", json={},
                             headers=w.auth("viewer")).status_code == 403


def test_the_cli_shows_and_aborts_a_canary(world, tmp_path):
    import json

    from conftest import erpops_cli

    w = world
    state = _start(w)
    run = erpops_cli(tmp_path, w.cfg, w.mlflow, w.double.url)

    def cli(*args):
        return run("canary", *args, "--env", "staging")

    shown = json.loads(cli("status", "--json").stdout)
    assert shown["canary"]["canary_id"] == state.canary_id and shown["canary"]["status"] == "progressing"
    aborted = cli("abort", "--reason", "CAB-9")
    assert aborted.returncode == 0, aborted.stderr[-2000:]
    assert json.loads(aborted.stdout)["status"] == "aborted"
    again = cli("abort")
    assert again.returncode == 2 and "no canary running" in again.stderr and "Traceback" not in again.stderr
    table = cli("status").stdout
    assert f"canary {state.canary_id} in staging: aborted" in table and "CAB-9" in table
