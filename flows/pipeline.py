"""The pipeline flow: wiring only. Each task wraps one stage's plain function.

    erpops run --recipe recipes/smollm2-135m/cpu.yaml
    python -m flows.pipeline recipes/smollm2-135m/cpu.yaml
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed

from data_contracts.dataset import read_examples
from data_contracts.validate import validate_data
from deployment.deploy import deploy_model, revert_knowledge_base
from deployment.vector_store import deploy_knowledge_base
from erpops.config import load_mlflow_settings, load_recipe
from erpops.device import resolve_runtime
from erpops.runtime import git_commit, setup_process
from erpops.summary import RunSummary
from erpops.tracking import Tracker
from evaluation.evaluate import evaluate_candidate
from evaluation.retrieval import read_golden
from registry.champion import fetch_champion
from registry.promote import log_shipped_model, register_version, restore_aliases, tag_version
from training.base_model import MODELS_DIR, load_tokenizer, resolve_base_model
from training.launch import train as train_stage
from training.optimize import optimize_model

log = logging.getLogger("erpops.pipeline")

validate_task = task(validate_data, name="validate", cache_policy=NO_CACHE)
base_model_task = task(resolve_base_model, name="base-model", cache_policy=NO_CACHE)
train_task = task(train_stage, name="train", cache_policy=NO_CACHE)
optimize_task = task(optimize_model, name="optimize", cache_policy=NO_CACHE)
champion_task = task(fetch_champion, name="fetch-champion", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
evaluate_task = task(evaluate_candidate, name="evaluate", cache_policy=NO_CACHE)
register_task = task(register_version, name="register", cache_policy=NO_CACHE)
kb_task = task(deploy_knowledge_base, name="deploy-knowledge-base", cache_policy=NO_CACHE)
ollama_task = task(deploy_model, name="deploy-ollama", cache_policy=NO_CACHE)


@flow(name="erpops-pipeline", log_prints=True)
def pipeline(recipe_path: str = "recipes/smollm2-135m/cpu.yaml", mlflow_config: str | None = None,
             run_name: str | None = None):
    """Validate -> train -> optimize -> evaluate -> promote -> deploy.

    Returns the run summary (a dict); when a stage failed, a Failed state whose message names the stage,
    the reason and the summary file.
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
                                                       "git.commit": commit})
    tracker.log_params(_flatten(recipe.model_dump(mode="json")))
    tracker.log_text(Path(recipe_path).read_text(encoding="utf-8"), "recipe.yaml")
    summary = RunSummary(run_dir, recipe_path, tracker.run_id)
    try:
        _run_stages(recipe, settings, runtime, run_dir, tracker, summary, commit)
    except Exception as e:
        log.error("pipeline stopped: %s", e)
    finally:
        summary.skip_rest("an earlier stage failed")
        tracker.log_dict(summary.to_dict(), "run_summary.json")
        tracker.end("FINISHED" if summary.ok else "FAILED")
        path = summary.write()
    if not summary.ok:  # a Failed state, not an exception: the reason is in the summary, not a traceback
        failed = [f"{r.name}: {r.reason}" for r in summary.stages.values() if r.status == "failed"]
        return Failed(message=f"pipeline failed ({'; '.join(failed)}); summary: {path}")
    return summary.to_dict()


def _run_stages(recipe, settings, runtime, run_dir, tracker, summary, commit) -> None:
    with summary.stage("validate") as s:
        tokenizer = load_tokenizer(recipe.model, MODELS_DIR)
        data = validate_task(recipe.data, run_dir / "data", tracker, tokenizer)
        s.outputs = {"train": str(data.train_path), "eval": str(data.eval_path), "digest": data.digest,
                     "n_train": data.n_train, "n_eval": data.n_eval, "n_docs": len(data.docs)}
    train_examples, eval_examples = read_examples(data.train_path), read_examples(data.eval_path)

    with summary.stage("train") as s:
        base = base_model_task(recipe.model, MODELS_DIR)
        # a rerun under the same run name continues from the newest checkpoint of that run folder
        trained = train_task(recipe, base, train_examples, run_dir, runtime, tracker, resume=True)
        s.outputs = {"adapter": str(trained.adapter_dir), "first_loss": trained.first_loss,
                     "final_loss": trained.final_loss, "tokens_per_s": round(trained.tokens_per_s, 1)}

    with summary.stage("optimize") as s:
        opt = optimize_task(recipe.optimize, base, trained.adapter_dir, eval_examples[: recipe.gate.max_examples],
                            run_dir, runtime, tracker, calibration_examples=train_examples)
        shipped, modelfile, spec = opt.gguf[opt.shipped], opt.modelfile, opt.modelfile_spec
        s.outputs = {"merged_model": str(opt.merged_dir), "int8_backend": opt.int8_backend,
                     "pruning": opt.pruning.reason if opt.pruning else "off",
                     "int8": opt.int8.reason if opt.int8 else "", "shipped": opt.shipped, "ship_reason": opt.ship_reason,
                     "variants": [asdict(v) for v in opt.variants], "modelfile": str(modelfile),
                     **{f"gguf_{k}": str(g.path) for k, g in opt.gguf.items()}}
    summary.outputs.update({"merged_model": str(opt.merged_dir), "modelfile": str(modelfile),
                            **{f"gguf_{k}": str(g.path) for k, g in opt.gguf.items()}})

    with summary.stage("evaluate") as s:
        champion = champion_task(settings, run_dir / "champion")
        result = evaluate_task(recipe.gate, shipped.path, eval_examples, champion, run_dir, runtime, tracker)
        headline = {k: v for k, v in result.metrics.items() if not k.startswith("module/")}  # per module: MLflow only
        s.outputs = {"metrics": headline,
                     "verdict": result.verdict.verdict, "reasons": result.verdict.reasons,
                     "champion_version": champion.version if champion else None, "report": str(result.report_path),
                     "html_report": str(result.html_path)}
    summary.metrics.update(headline)

    with summary.stage("promote") as s:
        model_uri = log_shipped_model(tracker.run_id, settings.tracking_uri, shipped.path, modelfile)
        lineage = {"git_commit": commit, "dataset_digest": data.digest, "recipe_hash": recipe.digest(),
                   "data_contract": "passed", "gate_verdict": result.verdict.verdict, "gguf_sha256": shipped.sha256,
                   "gguf_type": shipped.kind, "mlflow_run_id": tracker.run_id}
        # compare-and-set: the champion moves only if it is still the one the gate compared against
        version, plan = register_task(settings, model_uri, tracker.run_id, lineage, result.verdict.passed,
                                      expected_champion=champion.version if champion else None)
        s.outputs = {"model_version": version, "aliases_set": plan.set, "verdict": result.verdict.verdict}
        if plan.skipped:
            s.outputs["promotion_skipped"] = plan.skipped
    summary.outputs["model_version"] = version

    if not result.verdict.passed or plan.skipped:
        why = plan.skipped or result.verdict.headline or result.verdict.verdict
        summary.skip_rest(f"gate verdict {result.verdict.verdict}, champion unchanged: {why}")
        return
    aliases_moved = (settings.aliases.champion, settings.aliases.previous)
    with summary.stage("deploy_kb") as s:
        try:
            golden_path = recipe.data.root / "golden_queries.jsonl"
            golden = read_golden(golden_path) if golden_path.is_file() else None
            kb = kb_task(recipe.deploy, data.docs, f"v{version}", golden)
        except BaseException:
            restore_aliases(settings, plan, aliases_moved)
            raise
        s.outputs = {"collection": kb.collection, "alias": kb.alias, "rows": kb.rows,
                     "previous_collection": kb.previous_collection,
                     "retrieval": kb.retrieval["metrics"] if kb.retrieval else "no golden_queries.jsonl"}
        if kb.retrieval:
            tracker.log_metrics({f"kb/{k}": v for k, v in kb.retrieval["metrics"].items()})
            tracker.log_dict(kb.retrieval, "evaluation/retrieval.json")
    summary.outputs["collection"] = kb.collection
    tags = {"deploy.collection": kb.collection}
    with summary.stage("deploy_ollama") as s:
        try:
            release, skipped = ollama_task(recipe.deploy, version, shipped.path, spec)
        except BaseException:
            try:
                revert_knowledge_base(kb)
            finally:
                restore_aliases(settings, plan, aliases_moved)
            raise
        if release:
            tags["deploy.ollama_release"] = release.release_tag
            s.outputs = {"release": release.release_tag, "serving": release.serving_tag, "host": release.host}
            summary.outputs["ollama_model"] = release.serving_tag
        else:
            s.status, s.reason = "skipped", skipped
    tag_version(settings, version, tags)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


if __name__ == "__main__":
    state = pipeline(sys.argv[1] if len(sys.argv) > 1 else "recipes/smollm2-135m/cpu.yaml", return_state=True)
    sys.exit(0 if state.is_completed() else 1)
