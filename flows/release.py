"""The release flow: serve a registered version (the knowledge base in Milvus, the model in Ollama). Wiring only.

    erpops deploy [--version V]                          # this flow for the champion (or V)
    prefect deployment run release/release-dev           # the deployment in prefect.yaml

Staging order: the new collection is written and queried before its alias moves; the Ollama release
answers before `latest` moves. If the Ollama half fails, the alias goes back; given `restore` (the alias
plan of the promotion that made this version champion), the registry goes back too, so a failed release
changes nothing that serves users.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from prefect import flow
from prefect.states import Failed

from deployment.deploy import registered_bundle, revert_knowledge_base
from erpops.config import load_mlflow_settings, load_recipe
from erpops.orchestration import publish_summary
from erpops.runtime import setup_process
from erpops.summary import RunSummary
from evaluation.retrieval import read_golden
from flows import steps
from flows.train_and_gate import RELEASE_STAGES, cache_dir
from registry.promote import AliasPlan, read_champion, restore_aliases

log = logging.getLogger("erpops.release")


@flow(name="release", log_prints=True)
def release(recipe_path: str = "recipes/smollm2-135m/cpu.yaml", mlflow_config: str | None = None,
            version: str | None = None, run_name: str | None = None, restore: dict | None = None):
    """Deploy `version` (default: the champion) to the knowledge base and Ollama.

    run_name: the train-and-gate run whose summary gets the release stages (default: a new `release-*` folder).
    restore: {"set", "delete", "before"} of the promotion to undo when serving cannot follow.
    Returns the summary dict, or a Failed state naming the stage and the reason.
    """
    setup_process()
    recipe = load_recipe(recipe_path)
    settings = load_mlflow_settings(mlflow_config)
    version = str(version or read_champion(settings).version or "")
    if not version:
        return Failed(message="no champion to release: pass a version")
    run_dir = recipe.output_root / (run_name or f"release-v{version}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary_path = run_dir / "run_summary.json"
    if summary_path.is_file():
        summary = RunSummary.read(summary_path)
    else:
        summary = RunSummary(run_dir, recipe_path, None)
        summary.skip_rest("not part of a release")
    for name in RELEASE_STAGES:
        summary.stages[name].status, summary.stages[name].reason = "pending", None
    plan = AliasPlan(restore["set"], tuple(restore.get("delete", ())), restore.get("before", {})) if restore else None
    try:
        _release(recipe, settings, version, run_dir, summary, plan)
    except Exception as e:
        log.error("release of v%s stopped: %s", version, e)
        summary.skip_rest("an earlier release stage failed")
    summary.outputs["released_version"] = version
    path = summary.write()
    publish_summary(summary.to_dict())
    if summary.mlflow_run_id:
        from erpops.tracking import Tracker

        Tracker(summary.mlflow_run_id, settings.tracking_uri).log_dict(summary.to_dict(), "run_summary.json")
    if not summary.ok:
        failed = [f"{r.name}: {r.reason}" for r in summary.stages.values() if r.status == "failed"]
        return Failed(message=f"release of v{version} failed ({'; '.join(failed)}); summary: {path}")
    return summary.to_dict()


def _release(recipe, settings, version: str, run_dir: Path, summary: RunSummary, plan: AliasPlan | None) -> None:
    aliases = (settings.aliases.champion, settings.aliases.previous)

    def undo_registry():
        if plan is not None:
            restore_aliases(settings, plan, aliases, reason=f"release of v{version} failed; serving stays as it was")

    with summary.stage("deploy_kb") as s:
        try:
            gguf, spec = registered_bundle(settings.tracking_uri, settings.registered_model_name, version,
                                           Path(tempfile.mkdtemp(prefix=f"release-v{version}-")))
            data = steps.validate_task.with_options(result_storage=cache_dir(recipe))(
                recipe.data, recipe.model, run_dir / "data")
            golden_path = recipe.data.root / "golden_queries.jsonl"
            golden = read_golden(golden_path) if golden_path.is_file() else None
            kb = steps.kb_task(recipe.deploy, data.docs, f"v{version}", golden)
        except BaseException:
            undo_registry()
            raise
        s.outputs = {"collection": kb.collection, "alias": kb.alias, "rows": kb.rows,
                     "previous_collection": kb.previous_collection,
                     "retrieval": kb.retrieval["metrics"] if kb.retrieval else "no golden_queries.jsonl"}
        if kb.retrieval and summary.mlflow_run_id:
            from erpops.tracking import Tracker

            tracker = Tracker(summary.mlflow_run_id, settings.tracking_uri)
            tracker.log_metrics({f"kb/{k}": v for k, v in kb.retrieval["metrics"].items()})
            tracker.log_dict(kb.retrieval, "evaluation/retrieval.json")
    summary.outputs["collection"] = kb.collection
    tags = {"deploy.collection": kb.collection}
    with summary.stage("deploy_ollama") as s:
        try:
            ollama, skipped = steps.ollama_task(recipe.deploy, version, gguf, spec)
        except BaseException:
            try:
                revert_knowledge_base(kb)
            finally:
                undo_registry()
            raise
        if ollama:
            tags["deploy.ollama_release"] = ollama.release_tag
            s.outputs = {"release": ollama.release_tag, "serving": ollama.serving_tag, "host": ollama.host}
            summary.outputs["ollama_model"] = ollama.serving_tag
        else:
            s.status, s.reason = "skipped", skipped
    steps.tag_task(settings, version, tags)
