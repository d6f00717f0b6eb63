"""Canary analysis, as pure functions (Argo Rollouts' semantics): which sessions a canary gets, how one analysis
window of live traffic is judged, and what the rollout does next. The chat service's router and `erpops canary`
are built on these; nothing here does I/O.

- `route(session, weight)`: sticky: a conversation stays on the release it started on while the weight holds.
- `judge(canary, stable, cfg)`: one window of the canary's calls against the stable release's: Failed on an
  error rate, a p95 latency or a bad-answer rate (empty, wrong language, chat-template tokens) beyond its bound;
  Inconclusive with too little traffic to say; else Successful.
- `next_action(outcomes, step, cfg)`: failures beyond `failure_limit` abort (weight 0, the stable release keeps
  serving); an inconclusive window pauses for a human (`erpops canary promote|abort`); a successful one moves to
  the next step, and after the last one the canary is promoted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from erpops.config import CanaryPolicy
from serving.telemetry import percentile

__all__ = ["Call", "CanaryPolicy", "Verdict", "judge", "next_action", "route"]


@dataclass(frozen=True)
class Call:
    ok: bool
    latency_s: float
    problems: tuple[str, ...] = ()
    """What is wrong with the answer (deployment.ollama_deploy.answer_problems); empty: a good answer."""


@dataclass(frozen=True)
class Verdict:
    outcome: str
    """"Successful" | "Failed" | "Inconclusive"."""
    reasons: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)


def route(session: str, weight_percent: float) -> str:
    """"canary" or "stable" for a conversation, the same every time for the same weight (a hash of the session
    id in [0, 100)), and a session on the canary at w stays there at any larger w."""
    bucket = int(hashlib.sha256(session.encode()).hexdigest()[:8], 16) % 10_000 / 100
    return "canary" if bucket < weight_percent else "stable"


def _figures(calls: Sequence[Call]) -> dict:
    ok = [c for c in calls if c.ok]
    return {"requests": len(calls), "error_rate": (len(calls) - len(ok)) / len(calls) if calls else 0.0,
            "p95_s": percentile([c.latency_s for c in ok], 95) if ok else float("nan"),
            "bad_answer_rate": sum(1 for c in ok if c.problems) / len(ok) if ok else 0.0}


def judge(canary: Sequence[Call], stable: Sequence[Call], policy: CanaryPolicy) -> Verdict:
    c, s = _figures(canary), _figures(stable)
    figures = {"canary": c, "stable": s}
    if c["requests"] < policy.min_requests:
        return Verdict("Inconclusive", [f"{c['requests']} canary calls in the window, {policy.min_requests} needed"],
                       figures)
    reasons = []
    if c["error_rate"] > policy.max_error_rate:
        reasons.append(f"error rate {c['error_rate']:.3f} > {policy.max_error_rate}")
    if c["bad_answer_rate"] > policy.max_bad_answer_rate:
        problems = sorted({p.split(":")[0] for call in canary for p in call.problems})
        reasons.append(f"bad answers {c['bad_answer_rate']:.3f} > {policy.max_bad_answer_rate} ({'; '.join(problems)})")
    bound = max(policy.p95_floor_s, policy.max_p95_ratio * s["p95_s"]) if s["requests"] and s["p95_s"] == s["p95_s"] \
        else policy.p95_floor_s
    if c["p95_s"] == c["p95_s"] and c["p95_s"] > bound:
        reasons.append(f"p95 {c['p95_s']:.2f} s > {bound:.2f} s")
    return Verdict("Failed" if reasons else "Successful", reasons, figures)


def next_action(outcomes: Sequence[str], step: int, policy: CanaryPolicy, failures: int | None = None) -> str:
    """After the analyses judged so far at this step (oldest first) and the current step index:
    "abort" | "pause" | "next-step" | "promote" | "wait" (nothing judged yet, or a failure still tolerated).
    `failures`: Failed analyses over the whole rollout (default: those among `outcomes`)."""
    failed = sum(1 for o in outcomes if o == "Failed") if failures is None else failures
    if failed > policy.failure_limit:
        return "abort"
    if not outcomes:
        return "wait"
    last = outcomes[-1]
    if last == "Inconclusive":
        return "pause"
    if last == "Failed":  # tolerated by failure_limit: judge this step again
        return "wait"
    return "promote" if step >= len(policy.steps) - 1 else "next-step"
