"""Canary analysis as pure functions: sticky routing, one window's verdict, the rollout's next action."""

from __future__ import annotations

import uuid

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
