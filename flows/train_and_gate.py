"""The train-and-gate flow: validate -> train -> optimize -> evaluate -> promote. Wiring only.

    erpops run                                            # this flow, then the release flow when it promoted
    prefect deployment run train-and-gate/nightly-retrain # the scheduled deployment (prefect.yaml)

Every stage is cached by content (flows.steps): a rerun with nothing changed finds every stage `Cached`
and registers nothing ("no change"); a run that failed at stage k starts again at k; a changed gate
setting reruns only evaluate and promote. It never deploys: the release flow does (flows.release).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow
from prefect.states import Failed

from data_contracts.dataset import read_examples
from erpops.config import load_mlflow_settings, load_recipe
from erpops.device import resolve_runtime
from erpops.orchestration import emit_promotion, publish_summary
from erpops.runtime import git_commit, setup_process
from erpops.stage_cache import digest_json
from erpops.summary import RELEASE_STAGES, RunSummary
from erpops.tracking import Tracker
from flows import steps
from registry.ledger import current_actor
from registry.promote import no_change, read_champion, version_tags
from training.base_model import MODELS_DIR

log = logging.getLogger("erpops.pipeline")

def cache_dir(recipe) -> Path:
    """Where stage results are stored by key: beside the run folders (`.erpops/cache` by default)."""
    return Path(recipe.output_root).parent / "cache"


@flow(name="train-and-gate", log_prints=True)
def train_and_gate(recipe_path: str = "recipes/smollm2-135m/cpu.yaml", mlflow_config: str | None = None,
                   run_name: str | None = None, reason: str = ""):
    """Validate -> train -> optimize -> evaluate -> promote, each stage cached by content.

    Returns the run summary (a dict; `outputs.promoted` says whether the champion moved, `outputs.no_change`
    that nothing new was registered: the candidate is the champion's GGUF, or its gate decision is cached); when a stage failed, a Failed state whose message names the stage, the
    reason and the summary file. `reason` (why this run started: a schedule, a merge, an alert) is a run tag.
    """
    setup_process()
    recipe = load_recipe(recipe_path)
    settings = load_mlflow_settings(mlflow_config)
    runtime = resolve_runtime(recipe.train.precision)
    run_name = run_name or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = recipe.output_root / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    tracker = Tracker.start(settings, run_name, tags={"recipe": recipe.name, "recipe.hash": recipe.digest(),
                                                       "git.commit": commit, "erpops.reason": reason or "manual"})
    tracker.log_params(_flatten(recipe.model_dump(mode="json")))
    tracker.log_text(Path(recipe_path).read_text(encoding="utf-8"), "recipe.yaml")
    summary = RunSummary(run_dir, recipe_path, tracker.run_id)
    for name in RELEASE_STAGES:
        summary.stages[name].status, summary.stages[name].reason = "skipped", "the release flow deploys (flows.release)"
    try:
        _run_stages(recipe, settings, runtime, run_dir, tracker, summary, commit, cache_dir(recipe))
        if summary.outputs.get("promoted"):  # prefect.yaml's release-staging deployment is triggered by this event
            promote = summary.stages["promote"].outputs
            emit_promotion(settings.registered_model_name, promote["model_version"],
                           promote["aliases_before"].get(settings.aliases.champion), recipe_path, mlflow_config,
                           current_actor(), reason or "gate")
    except Exception as e:
        log.error("train-and-gate stopped: %s", e)
        fail_unfinished(summary, f"{type(e).__name__}: {e}")
    finally:
        if not summary.ok:
            summary.skip_rest("an earlier stage failed")
        summary.outputs.setdefault("no_change", False)
        tracker.set_tags({"erpops.no_change": str(summary.outputs["no_change"]).lower(),
                          "erpops.stages_cached": ",".join(s.name for s in summary.stages.values() if s.status == "cached")})
        tracker.log_dict(summary.to_dict(), "run_summary.json")
        tracker.log_metrics(summary.memory_metrics())
        tracker.end("FINISHED" if summary.ok else "FAILED")
        path = summary.write()
        publish_summary(summary.to_dict())
    if not summary.ok:  # a Failed state, not an exception: the reason is in the summary, not a traceback
        failed = [f"{r.name}: {r.reason}" for r in summary.stages.values() if r.status == "failed"]
        return Failed(message=f"pipeline failed ({'; '.join(failed)}); summary: {path}")
    return summary.to_dict()


def fail_unfinished(summary: RunSummary, reason: str) -> None:
    """Record an error raised outside every stage block (an MLflow call between stages, the promotion event) as a
    failed stage, so the run cannot end ok with stages never run: the first stage still pending fails "before it
    started"; when none is pending, the last one that ran fails "after it finished". A run that already has a failed
    stage (the error came from that stage) is left as it is."""
    if not summary.ok:
        return
    pending = [s for s in summary.stages.values() if s.status == "pending"]
    if pending:
        pending[0].status, pending[0].reason = "failed", f"before it started: {reason}"
        return
    ran = [s for s in summary.stages.values() if s.status in ("ok", "cached")]
    if ran:
        ran[-1].status, ran[-1].reason = "failed", f"after it finished: {reason}"


def _call(task_, stage, *args, **kwargs):
    """Run a cached task; mark the stage `cached` (with the key) when Prefect returned the stored result."""
    state = task_(*args, return_state=True, **kwargs)
    result = state.result()  # raises the stage's own exception when it failed
    if state.name == "Cached":
        stage.status = "cached"
        stage.reason = "same inputs, recipe section and code as an earlier run"
    return result


def _run_stages(recipe, settings, runtime, run_dir, tracker, summary, commit, cache: Path) -> None:
    opts = {"result_storage": cache}
    with summary.stage("validate") as s:
        data = _call(steps.validate_task.with_options(**opts), s, recipe.data, recipe.model, run_dir / "data", tracker)
        s.outputs = {"train": str(data.train_path), "eval": str(data.eval_path), "digest": data.digest,
                     "n_train": data.n_train, "n_eval": data.n_eval, "n_docs": len(data.docs)}
    if summary.stages["validate"].status == "cached":
        tracker.set_tags({"data_contract": "passed", "dataset.digest": data.digest})
    train_examples, eval_examples = read_examples(data.train_path), read_examples(data.eval_path)

    with summary.stage("train") as s:
        base = steps.base_model_task(recipe.model, MODELS_DIR)
        # a rerun under the same run name continues from the newest checkpoint of that run folder
        trained = _call(steps.train_task.with_options(**opts), s, recipe, base, train_examples, run_dir, runtime,
                        tracker, resume=True)
        s.outputs = {"adapter": str(trained.adapter_dir), "first_loss": trained.first_loss,
                     "final_loss": trained.final_loss, "tokens_per_s": round(trained.tokens_per_s, 1)}

    with summary.stage("optimize") as s:
        opt = _call(steps.optimize_task.with_options(**opts), s, recipe.optimize, base, trained.adapter_dir,
                    eval_examples[: recipe.gate.max_examples], run_dir, runtime, tracker,
                    calibration_examples=train_examples)
        shipped = opt.gguf[opt.shipped]
        s.outputs = {"merged_model": str(opt.merged_dir), "int8_backend": opt.int8_backend,
                     "pruning": opt.pruning.reason if opt.pruning else "off",
                     "int8": opt.int8.reason if opt.int8 else "", "shipped": opt.shipped, "ship_reason": opt.ship_reason,
                     "variants": [asdict(v) for v in opt.variants], "modelfile": str(opt.modelfile),
                     **{f"gguf_{k}": str(g.path) for k, g in opt.gguf.items()}}
    summary.outputs.update({"merged_model": str(opt.merged_dir), "modelfile": str(opt.modelfile),
                            "gguf_sha256": shipped.sha256, **{f"gguf_{k}": str(g.path) for k, g in opt.gguf.items()}})

    champion_now = read_champion(settings).version
    same = no_change(shipped.sha256, champion_now, version_tags(settings, champion_now) if champion_now else {})
    if same:  # a retrain that changed nothing: nothing to gate, no new version
        summary.skip_rest(same)
        summary.outputs.update({"model_version": champion_now, "promoted": False, "no_change": True})
        return

    with summary.stage("evaluate") as s:
        champion = steps.champion_task(settings, run_dir / "champion")
        result = _call(steps.evaluate_task.with_options(**opts), s, recipe.gate, shipped.path, eval_examples, champion,
                       run_dir, runtime, tracker, candidate_nll=shipped.example_nll)
        headline = {k: v for k, v in result.metrics.items() if not k.startswith("module/")}  # per module: MLflow only
        s.outputs = {"metrics": headline,
                     "verdict": result.verdict.verdict, "reasons": result.verdict.reasons,
                     "champion_version": champion.version if champion else None, "report": str(result.report_path),
                     "html_report": str(result.html_path)}
    summary.metrics.update(headline)
    if summary.stages["evaluate"].status == "cached":  # the new MLflow run shows the scores it reuses
        tracker.log_metrics({f"eval/{k}": v for k, v in headline.items()})
        tracker.set_tags({"gate.verdict": result.verdict.verdict})

    with summary.stage("promote") as s:
        lineage = {"git_commit": commit, "dataset_digest": data.digest, "recipe_hash": recipe.digest(),
                   "data_contract": "passed", "gate_verdict": result.verdict.verdict, "gate_hash": digest_json(recipe.gate),
                   "gguf_sha256": shipped.sha256,
                   "gguf_type": shipped.kind, "mlflow_run_id": tracker.run_id,
                   # the newest curated feedback version trained on (users' corrections, erpops feedback export)
                   "feedback_data": (getattr(data, "feedback", ()) or ("none",))[-1],
                   "feedback_rows": str(getattr(data, "feedback_rows", 0))}
        # compare-and-set: the champion moves only if it is still the one the gate compared against
        promoted = _call(steps.promote_task.with_options(**opts), s, settings, tracker.run_id, shipped.path,
                         opt.modelfile, lineage, result.verdict.passed, champion.version if champion else None)
        plan = promoted.plan
        s.outputs = {"model_version": promoted.version, "aliases_set": plan.set, "aliases_before": plan.before,
                     "aliases_deleted": list(plan.delete), "verdict": result.verdict.verdict}
        if plan.skipped:
            s.outputs["promotion_skipped"] = plan.skipped
    moved = s.status == "ok" and settings.aliases.champion in plan.set
    # the same decision on the same candidate was already recorded: nothing new in the registry
    summary.outputs.update({"model_version": promoted.version, "promoted": moved, "no_change": s.status == "cached"})
    if not moved:
        why = plan.skipped or result.verdict.headline or result.verdict.verdict
        summary.outputs["not_released"] = f"gate verdict {result.verdict.verdict}, champion unchanged: {why}"
        for name in RELEASE_STAGES:
            summary.stages[name].reason = summary.outputs["not_released"]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
