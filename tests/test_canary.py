"""Canary analysis as pure functions: sticky routing, one window's verdict, the rollout's next action."""

from __future__ import annotations

import uuid

import pytest

from serving.canary import Call, CanaryPolicy, judge, next_action, route

P = CanaryPolicy()
GOOD = [Call(True, 0.5)] * 40


def test_routing_is_sticky_proportional_and_monotone_in_the_weight():
    sessions = [uuid.uuid4().hex for _ in range(4000)]
    at10 = {s for s in sessions if route(s, 10) == "canary"}
    at50 = {s for s in sessions if route(s, 50) == "canary"}
    assert 0.08 < len(at10) / 4000 < 0.12 and 0.46 < len(at50) / 4000 < 0.54
    assert at10 <= at50  # nobody moves back to stable when the weight grows
    assert all(route(s, 10) == route(s, 10) for s in sessions[:50])
    assert {route(s, 0) for s in sessions} == {"stable"} and {route(s, 100) for s in sessions} == {"canary"}


def test_a_healthy_window_succeeds():
    v = judge(GOOD, GOOD, P)
    assert v.outcome == "Successful" and v.reasons == [] and v.figures["canary"]["requests"] == 40


def test_too_little_traffic_is_inconclusive():
    v = judge(GOOD[:5], GOOD, P)
    assert v.outcome == "Inconclusive" and "5 canary calls" in v.reasons[0]


def test_errors_slow_answers_and_garbage_each_fail_a_window():
    errors = [Call(False, 0.1)] * 4 + GOOD[:36]
    assert judge(errors, GOOD, P).reasons == ["error rate 0.100 > 0.05"]
    slow = [Call(True, 3.0)] * 40
    assert judge(slow, GOOD, P).outcome == "Failed" and "p95 3.00 s > 1.00 s" in judge(slow, GOOD, P).reasons[0]
    garbage = [Call(True, 0.5, ("answered in en, asked in ko",))] * 10 + GOOD[:30]
    v = judge(garbage, GOOD, P)
    assert v.outcome == "Failed" and "bad answers 0.250" in v.reasons[0] and "answered in en, asked in ko" in v.reasons[0]


def test_latency_is_judged_against_the_stable_release():
    stable = [Call(True, 4.0)] * 40
    assert judge([Call(True, 5.0)] * 40, stable, P).outcome == "Successful"  # 5 <= 1.5 x 4
    assert judge([Call(True, 6.5)] * 40, stable, P).outcome == "Failed"


def test_next_action_follows_argo():
    assert next_action([], 0, P) == "wait"
    assert next_action(["Successful"], 0, P) == "next-step"
    assert next_action(["Successful", "Successful", "Successful"], 2, P) == "promote"
    assert next_action(["Successful", "Inconclusive"], 1, P) == "pause"
    assert next_action(["Successful", "Failed"], 1, P) == "abort"  # failureLimit 0
    tolerant = CanaryPolicy(failure_limit=1)
    assert next_action(["Failed"], 0, tolerant) == "wait" and next_action(["Failed", "Failed"], 0, tolerant) == "abort"
    assert next_action(["Successful"], 1, tolerant, failures=2) == "abort"  # failures of earlier steps count


def test_the_policy_refuses_steps_that_do_not_rise():
    from pydantic import ValidationError

    for steps in [(), (50, 10), (10, 10, 100), (0, 100), (10, 120)]:
        with pytest.raises(ValidationError, match="canary.steps must rise"):
            CanaryPolicy(steps=steps)


def _ev(action, canary="c1", step=0, weight=10.0, outcome="", env="staging", figures=None):
    import json

    from deployment.canaries import CanaryEvent

    return CanaryEvent(f"2026-12-04T08:00:{len(action):02d}+00:00", "erp-assistant", env, canary, action, "r-new", "r-old",
                       step, weight, outcome, json.dumps(figures or {}), "tester", action)


def test_the_canary_state_is_replayed_from_its_events():
    from deployment.canaries import canary_state

    start = _ev("start", figures={"policy": P.model_dump(), "mode": "canary"})
    assert canary_state([], "staging") is None
    s = canary_state([start, _ev("analysis", outcome="Failed")], "staging")
    assert (s.status, s.weight, s.outcomes, s.failures, s.active) == ("progressing", 10, ("Failed",), 1, True)
    s = canary_state([start, _ev("analysis", outcome="Successful"), _ev("step", step=1, weight=50)], "staging")
    assert (s.step, s.weight, s.outcomes, s.step_started_at) == (1, 50, (), "2026-12-04T08:00:04+00:00")
    s = canary_state([start, _ev("pause")], "staging")
    assert (s.status, s.weight, s.active) == ("paused", 10, True)
    s = canary_state([start, _ev("abort", weight=0)], "staging")
    assert (s.status, s.weight, s.active) == ("aborted", 0, False)
    other = _ev("abort", canary="c0", weight=0)  # an older canary's event changes nothing
    assert canary_state([start, other, _ev("step", env="prod")], "staging").status == "progressing"
    assert canary_state([start], "prod") is None


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_call_logs_keep_each_arms_calls_by_time(backend):
    from conftest import redis_up

    from serving.canary_log import MemoryCallLog, RedisCallLog

    if backend == "redis":
        if not redis_up():
            pytest.skip("no Redis at 127.0.0.1:6379")
        log = RedisCallLog("redis://127.0.0.1:6379/13", keep=3)
    else:
        log = MemoryCallLog(keep=3)
    cid = f"c-{uuid.uuid4().hex[:8]}"
    for t, call in enumerate([Call(True, 0.1), Call(False, 0.2), Call(True, 0.3, ("empty answer",)), Call(True, 0.4)]):
        log.record(cid, "canary", call, at=1000.0 + t)
    log.record(cid, "stable", Call(True, 9.0), at=1000.0)
    got = log.calls(cid, "canary", since=1001.0)
    assert got == [Call(False, 0.2), Call(True, 0.3, ("empty answer",)), Call(True, 0.4)]
    assert log.calls(cid, "canary", since=1002.5) == [Call(True, 0.4)]
    assert log.calls(cid, "stable", since=0) == [Call(True, 9.0)] and log.calls("nope", "canary", 0) == []
