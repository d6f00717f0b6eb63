"""The release flow: a registered version and its knowledge base, built as one release and switched into an
environment together. Wiring only (deployment.deploy does the work).

    erpops deploy --env staging [--version V]            # this flow
    prefect deployment run release/release-dev           # a deployment in prefect.yaml
    (promotion to champion)                              # release/release-staging starts by its event trigger

If the release fails, the environment serves what it served before; given `restore` (the alias plan of the
promotion that made this version champion, from `erpops run`), the registry goes back too. Once the environment
has switched, the release stands: what fails after it (retention, the version's tags) is a warning in the switch
stage's outputs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from prefect import flow
from prefect.states import Failed

from deployment.deploy import ReleaseError, ReleaseOutcome
from erpops.config import load_mlflow_settings, load_recipe
from erpops.orchestration import publish_summary
from erpops.runtime import setup_process
from erpops.summary import RELEASE_STAGES, RunSummary
from evaluation.retrieval import read_golden
from flows import steps
from flows.train_and_gate import cache_dir
from registry.ledger import current_actor
from registry.promote import AliasPlan, read_champion, restore_aliases, version_tags

log = logging.getLogger("erpops.release")


@flow(name="release", log_prints=True)
def release(recipe_path: str = "recipes/smollm2-135m/cpu.yaml", mlflow_config: str | None = None,
            version: str | None = None, env: str | None = None, run_name: str | None = None,
            restore: dict | None = None, reason: str = ""):
    """Release `version` (default: the champion) to `env` (default: the recipe's deploy.release_env).

    run_name: the train-and-gate run whose summary gets the release stages (default: a new `release-*` folder).
    restore: {"set", "delete", "before"} of the promotion to undo when the release fails.
    Returns the summary dict, or a Failed state naming the stage and the reason.
    """
    setup_process()
    recipe = load_recipe(recipe_path)
    settings = load_mlflow_settings(mlflow_config or None)
    env = env or recipe.deploy.release_env
    version = str(version or read_champion(settings).version or "")
    if not version:
        return Failed(message="no champion to release: pass a version")
    run_dir = recipe.output_root / (run_name or f"release-{env}-v{version}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary_path = run_dir / "run_summary.json"
    if summary_path.is_file():
        summary = RunSummary.read(summary_path)
    else:
        summary = RunSummary(run_dir, recipe_path, None)
        summary.skip_rest("not part of a release")
    for name in RELEASE_STAGES:
        summary.stages[name].status, summary.stages[name].reason = "pending", None
    try:
        outcome = _release(recipe, settings, env, version, run_dir, reason)
    except Exception as e:
        stage = e.stage if isinstance(e, ReleaseError) else "deploy_kb"
        if isinstance(e, ReleaseError):
            _record(summary, e.outcome)
        summary.stages[stage].status, summary.stages[stage].reason = "failed", f"{type(e).__name__}: {e}"
        summary.skip_rest("an earlier release stage failed")
        log.error("release of v%s to %s stopped: %s", version, env, e)
        if restore:
            plan = AliasPlan(restore["set"], tuple(restore.get("delete", ())), restore.get("before", {}))
            try:
                restore_aliases(settings, plan, (settings.aliases.champion, settings.aliases.previous),
                                reason=f"release of v{version} to {env} failed; serving stays as it was")
            except Exception as undo:  # the summary is still written, and says the aliases stayed where they are
                summary.stages[stage].reason += (f"; the champion and previous aliases were NOT put back "
                                                 f"({type(undo).__name__}: {undo}): `erpops status` shows them, "
                                                 f"`erpops promote VERSION` moves the champion")
                log.error("release of v%s to %s: aliases not put back: %s", version, env, undo)
    else:
        _record(summary, outcome)
        _tag_release(summary, settings, env, version, outcome)
    summary.outputs.update({"released_version": version, "release_env": env})
    path = summary.write()
    publish_summary(summary.to_dict())
    if summary.mlflow_run_id:
        from erpops.tracking import Tracker

        tracker = Tracker(summary.mlflow_run_id, settings.tracking_uri)
        tracker.log_dict(summary.to_dict(), "run_summary.json")
        kb = summary.stages["deploy_kb"].outputs.get("retrieval")
        if isinstance(kb, dict):
            tracker.log_metrics({f"kb/{k}": v for k, v in kb.items()})
    if not summary.ok:
        failed = [f"{r.name}: {r.reason}" for r in summary.stages.values() if r.status == "failed"]
        return Failed(message=f"release of v{version} to {env} failed ({'; '.join(failed)}); summary: {path}")
    return summary.to_dict()


def _release(recipe, settings, env: str, version: str, run_dir: Path, reason: str) -> ReleaseOutcome:
    """The release of `version` to `env`. The registered GGUF is downloaded into a temporary folder that is removed
    when the release is done, unless its Ollama half was skipped: the outcome then points the user at that folder
    to import the model by hand."""
    folder = Path(tempfile.mkdtemp(prefix=f"release-v{version}-"))
    outcome = None
    try:
        gguf, spec = steps.bundle_task(settings.tracking_uri, settings.registered_model_name, version, folder)
        data = steps.validate_task.with_options(result_storage=cache_dir(recipe))(recipe.data, recipe.model,
                                                                                   run_dir / "data")
        golden_path = recipe.data.root / "golden_queries.jsonl"
        golden = read_golden(golden_path) if golden_path.is_file() else None
        outcome = steps.release_task(recipe.deploy, settings, env, version, gguf, spec, data.docs, golden,
                                     current_actor(), reason, version_tags(settings, version).get("gguf_sha256"))
        return outcome
    except ReleaseError as e:
        outcome = e.outcome
        raise
    finally:
        if not (outcome and outcome.ollama_skipped):
            shutil.rmtree(folder, ignore_errors=True)


def _tag_release(summary: RunSummary, settings, env: str, version: str, o: ReleaseOutcome) -> None:
    """Tag the version with the release and collection now serving `env`. The environment has switched, so a tag
    that cannot be written is a warning in the switch stage, not a failed release."""
    try:
        steps.tag_task(settings, version, {f"deploy.{env}.release": o.release.release_id,
                                           f"deploy.{env}.collection": o.release.collection})
    except Exception as e:
        warning = f"registry tags of v{version} not written: {type(e).__name__}: {e}"
        summary.stages[RELEASE_STAGES[-1]].outputs.setdefault("warnings", []).append(warning)
        log.warning("release of v%s to %s: %s", version, env, warning)


def _record(summary: RunSummary, o: ReleaseOutcome) -> None:
    """The outcome's three parts as the summary's three release stages."""
    kb, ol, sw = (summary.stages[n] for n in RELEASE_STAGES)
    if o.kb:
        kb.status, kb.duration_s = "ok", round(o.seconds.get("kb", 0.0), 2)
        kb.outputs = {"collection": o.kb.collection, "rows": o.kb.rows, "embedding_model": o.kb.embedding_model,
                      "retrieval": o.kb.retrieval["metrics"] if o.kb.retrieval else "no golden_queries.jsonl",
                      "seconds": o.kb.seconds}
        summary.outputs["collection"] = o.kb.collection
    if o.ollama:
        skipped = o.ollama_skipped
        ol.status, ol.reason = ("skipped", o.ollama[len("skipped: "):]) if skipped else ("ok", None)
        ol.duration_s = round(o.seconds.get("ollama", 0.0), 2)
        ol.outputs = {} if skipped else {"release": o.ollama, "health": o.health}
        if not skipped:
            summary.outputs["ollama_model"] = o.ollama
    if "switch" in o.seconds:
        sw.status, sw.duration_s = "ok", round(o.seconds["switch"], 2)
        sw.outputs = {"env": o.env, "release": o.release.release_id, "previous": o.previous, "collected": o.collected}
        if o.warnings:
            sw.outputs["warnings"] = list(o.warnings)
        summary.outputs["release_id"] = o.release.release_id
