"""Canary releases and A/B splits of one environment, with Argo Rollouts' semantics and no Kubernetes: a release is
built beside the one serving (nothing switched), the chat service sends it a growing share of conversations, and
each step's window of live traffic is judged against the stable release's.

    erpops canary start --env staging --version 3      # build v3's release, 10% of conversations on it
    erpops canary start --env staging --version 3 --ab 50   # A/B: a fixed 50% split, held until a human ends it
    erpops canary status --env staging                 # weight, step, every analysis so far
    erpops canary promote --env staging [--full]       # a paused canary to its next step (or all the way)
    erpops canary abort --env staging --reason "..."   # weight 0 now; the stable release serves alone

The steps, windows and bounds are the recipe's `deploy.canary` (erpops.config.CanaryPolicy), recorded with the
canary when it starts. The analysis (`analyze`, run by the chat service every `interval_s`) follows Argo: a failed
measurement beyond `failure_limit` aborts at once; an inconclusive window (too little traffic) pauses for a human;
a successful window moves to the next weight, and after the last one the environment is switched to the canary's
release (`deployment.deploy.switch_release`: both halves and the registry alias, or none). An abort sets the weight
to 0 and writes a `failed` event to the release ledger; the environment's Ollama tag and collection alias were
never moved, so the stable release keeps serving without a switch (a promotion that stopped half-way is put back
first). The chat service routes by the state replayed from the canary ledger (deployment/canaries.py), so every
replica follows the same weight.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from deployment.canaries import CanaryLedger, CanaryState
from deployment.deploy import (ReleaseError, ReleaseOutcome, env_target, prepare_release, reconcile, release_lock,
                               switch_release)
from deployment.modelfile import ModelfileSpec
from deployment.releases import ReleaseLedger, utc_now
from erpops.config import CanaryPolicy, DeployConfig, MLflowSettings
from erpops.runtime import file_lock
from serving.canary import Call, Verdict, judge, next_action

log = logging.getLogger(__name__)


class CanaryError(ValueError):
    """A canary command that cannot apply now (none running, one already running, nothing stable to compare)."""


@contextlib.contextmanager
def canary_lock(settings: MLflowSettings):
    """One canary decision at a time per store (two replicas judging the same window write one step, not two).
    Taken before, never inside, the release lock."""
    from registry.ledger import ledger_path

    with file_lock(Path(str(ledger_path(settings)) + ".canary.lock")):
        yield


def _active(ledger: CanaryLedger, env: str) -> CanaryState:
    state = ledger.state(env)
    if state is None or not state.active:
        raise CanaryError(f"{env} has no canary running" + (f" (the last, {state.canary_id}, was {state.status})"
                                                             if state else ""))
    return state


class CanaryStart(NamedTuple):
    state: CanaryState
    """The canary as the ledger has it after the start."""
    release: ReleaseOutcome
    """How its release was built (`release.ollama_skipped`: no Ollama server answered, and `release.ollama` says
    where the bundle is to import by hand)."""


def start_canary(cfg: DeployConfig, settings: MLflowSettings, env: str, version: str, gguf: Path, spec: ModelfileSpec,
                 docs: list[dict], golden: list[dict] | None, actor: str, reason: str = "",
                 policy: CanaryPolicy | None = None, ab_split: float | None = None,
                 expected_sha256: str | None = None) -> CanaryStart:
    """Build a release of `version` for `env` without switching it (deploy.prepare_release), then start routing
    the first step's share of conversations to it. `ab_split` (percent): an A/B test at that fixed weight instead
    of steps; it is judged the same way (a failure aborts it) but never promotes itself."""
    target = env_target(cfg, env)  # unknown environment: ValueError before anything is built
    if target.requires_reason and not reason.strip():
        raise CanaryError(f"a canary in {env} needs --reason (recorded with who started it)")
    ledger = CanaryLedger(settings)
    stable = _precheck(ledger, settings, env)
    policy = policy or cfg.canary
    mode = "canary"
    if ab_split is not None:
        if not 0 < ab_split < 100:
            raise CanaryError(f"--ab takes the B share in percent, strictly between 0 and 100, got {ab_split}")
        policy, mode = CanaryPolicy.model_validate({**policy.model_dump(), "steps": (ab_split,)}), "ab"
    out = prepare_release(cfg, settings, env, version, gguf, spec, docs, golden, actor, expected_sha256)
    with canary_lock(settings):
        if _precheck(ledger, settings, env) != stable:
            raise CanaryError(f"{env} switched while the canary's release was built; start it again")
        start = {"canary_id": f"canary-{out.release.release_id}", "env": env, "release_id": out.release.release_id,
                 "stable_release": stable}
        ledger.write(start, "start", actor, step=0, weight=float(policy.steps[0]),
                     figures={"policy": policy.model_dump(), "mode": mode, "version": version},
                     reason=reason or f"{mode} of v{version} against {stable}")
    state = ledger.state(env)
    log.info("canary %s: %s%% of %s conversations on %s", state.canary_id, state.weight, env, state.release_id)
    return CanaryStart(state, out)


def _precheck(ledger: CanaryLedger, settings: MLflowSettings, env: str) -> str:
    state = ledger.state(env)
    if state is not None and state.active:
        raise CanaryError(f"{env} already has canary {state.canary_id} ({state.status}, {state.weight:g}%): "
                          f"`erpops canary promote` or `erpops canary abort` it first")
    current, _ = ReleaseLedger(settings).serving(env)
    if current is None:
        raise CanaryError(f"{env} serves no release yet: a canary needs a stable release to compare with "
                          f"(`erpops deploy --env {env}` first)")
    return current


def analyze(cfg: DeployConfig, settings: MLflowSettings, env: str, canary: Sequence[Call], stable: Sequence[Call],
            actor: str, now: datetime | None = None, expected: tuple[str, str] | None = None) -> dict | None:
    """One analysis of a progressing canary with the calls of its current step so far (each arm's, since
    `step_started_at`). Inside the window only a failure is acted on; when the window is over its verdict moves
    the rollout (Argo: abort / pause / next step / promote). Returns {"verdict", "action", "state"}, or None when
    nothing was decided. `expected`: (canary id, step start) the calls were gathered for; when the rollout has moved
    on since (a newer canary, or another replica or a human moved the step), nothing is judged."""
    ledger = CanaryLedger(settings)
    with canary_lock(settings):
        state = ledger.state(env)
        if state is None or state.status != "progressing" or \
                (expected and expected != (state.canary_id, state.step_started_at)):
            return None
        current, _ = ReleaseLedger(settings).serving(env)
        if current != state.stable_release:
            return _abort(cfg, settings, ledger, state, actor,
                          f"{env} was switched to {current} while the canary ran; its comparison no longer holds")
        now = now or utc_now()
        window_over = (now - state.step_started()).total_seconds() >= state.policy.window_s
        verdict = judge(canary, stable, state.policy)
        if not window_over and verdict.outcome != "Failed":
            return None
        what = "window" if window_over else "measurement"
        ledger.write(state, "analysis", actor, outcome=verdict.outcome, figures=verdict.figures,
                     reason=f"{what} at {state.weight:g}%: " + ("; ".join(verdict.reasons) or "within bounds"))
        failures = state.failures + (verdict.outcome == "Failed")
        action = next_action((*state.outcomes, verdict.outcome), state.step, state.policy, failures)
        if action == "wait":  # a failure within failure_limit: in a window, go on; at its end, judge it again
            if window_over:
                ledger.write(state, "step", actor, reason=f"failed window tolerated ({failures} of "
                                                          f"{state.policy.failure_limit}); the step is judged again")
            return {"verdict": verdict, "action": "wait", "state": ledger.state(env)}
        return _act(cfg, settings, ledger, state, action, verdict, actor)


def _act(cfg: DeployConfig, settings: MLflowSettings, ledger: CanaryLedger, state: CanaryState, action: str,
         verdict: Verdict, actor: str) -> dict:
    why = "; ".join(verdict.reasons)
    if action == "abort":
        return _abort(cfg, settings, ledger, state, actor, f"analysis failed: {why}", verdict)
    if action == "pause":
        ledger.write(state, "pause", actor, reason=f"inconclusive: {why}; `erpops canary promote` or `abort`")
    elif state.mode == "ab":  # a fixed split: a good window starts the next one at the same weight
        ledger.write(state, "step", actor, reason="A/B window within bounds; the split holds")
        action = "hold"
    elif action == "next-step":
        ledger.write(state, "step", actor, step=state.step + 1, weight=float(state.policy.steps[state.step + 1]),
                     reason=f"window at {state.weight:g}% successful")
    elif action == "promote":
        return _promote(cfg, settings, ledger, state, actor, "every step successful")
    return {"verdict": verdict, "action": action, "state": ledger.state(state.env)}


def _abort(cfg: DeployConfig, settings: MLflowSettings, ledger: CanaryLedger, state: CanaryState, actor: str,
           reason: str, verdict: Verdict | None = None) -> dict:
    """Weight 0 at once; then, under the release lock, a switch of the environment that stopped half-way (a
    promotion killed between its halves, or one whose undo failed) is put back to what the ledger says serves
    before the `failed` event is written, since that event would hide it from `pending_switch`. If the put-back
    fails, its error propagates and the `switching` event stays last for the next command to reconcile."""
    ledger.write(state, "abort", actor, weight=0.0, reason=reason)
    with release_lock(settings):  # never between another command's `switching` and its switch
        reconcile(cfg, settings, env_target(cfg, state.env), actor)
        ReleaseLedger(settings).event(state.env, "failed", state.release_id, state.stable_release, actor,
                                      f"canary {state.canary_id} aborted at {state.weight:g}%: {reason}")
    log.warning("canary %s aborted: %s; %s serves alone", state.canary_id, reason, state.stable_release)
    return {"verdict": verdict, "action": "abort", "state": ledger.state(state.env)}


def _promote(cfg: DeployConfig, settings: MLflowSettings, ledger: CanaryLedger, state: CanaryState, actor: str,
             reason: str, gguf_for=None) -> dict:
    """Switch the environment to the canary's release, unless the environment no longer serves the release the
    canary was compared with (someone deployed or rolled back while it was paused): then the comparison does not
    hold, and the canary is aborted instead."""
    current, _ = ReleaseLedger(settings).serving(state.env)
    if current != state.stable_release:
        return _abort(cfg, settings, ledger, state, actor, f"{state.env} was switched to {current} while the canary "
                                                           f"ran; its comparison no longer holds, so it is not promoted")
    try:
        switch_release(cfg, settings, state.env, state.release_id, actor,
                       f"canary {state.canary_id} promoted: {reason}", gguf_for=gguf_for)
    except (ReleaseError, ValueError) as e:  # the switch put itself back: the stable release still serves
        return _abort(cfg, settings, ledger, state, actor, f"promotion failed, switch undone: {e}")
    ledger.write(state, "promote", actor, weight=100.0, reason=reason)
    log.info("canary %s promoted: %s serves %s", state.canary_id, state.env, state.release_id)
    return {"verdict": None, "action": "promote", "state": ledger.state(state.env)}


def promote_canary(cfg: DeployConfig, settings: MLflowSettings, env: str, actor: str, reason: str = "",
                   full: bool = False, gguf_for=None) -> CanaryState:
    """A human's promote (Argo's `promote`): a paused or progressing canary goes to its next step; at the last
    step, with `full`, or for an A/B test, the environment switches to the canary's release."""
    ledger = CanaryLedger(settings)
    with canary_lock(settings):
        state = _active(ledger, env)
        if full or state.mode == "ab" or state.step >= len(state.policy.steps) - 1:
            out = _promote(cfg, settings, ledger, state, actor, f"by {actor}: {reason}".rstrip(": "), gguf_for)
            if out["action"] == "abort":
                raise CanaryError(out["state"].reason)
        else:
            ledger.write(state, "step", actor, step=state.step + 1, weight=float(state.policy.steps[state.step + 1]),
                         reason=f"promoted by {actor}: {reason}".rstrip(": "))
    return ledger.state(env)


def abort_canary(cfg: DeployConfig, settings: MLflowSettings, env: str, actor: str, reason: str = "") -> CanaryState:
    """A human's abort: weight 0 at once; the stable release serves alone (it never stopped serving)."""
    ledger = CanaryLedger(settings)
    with canary_lock(settings):
        state = _active(ledger, env)
        _abort(cfg, settings, ledger, state, actor, f"aborted by {actor}: {reason}".rstrip(": "))
    return ledger.state(env)
