"""The stages as Prefect tasks: one thin wrapper per plain stage function, with its cache key and retries.

Each cached task's key is what the stage reads (erpops.stage_cache): a rerun with the same data, recipe
section, upstream artefacts and code returns the stored result as a `Cached` state without running.
Retries (exponential backoff, jitter) are set only on I/O tasks that are safe to repeat (the champion and bundle
downloads, version tags); a release undoes itself on failure instead, and computing stages
fail once and say why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from data_contracts.validate import ValidateResult, validate_data
from deployment.deploy import registered_bundle, release_version
from erpops.config import DataConfig, MLflowSettings, ModelConfig, Recipe
from erpops.device import Runtime
from erpops.stage_cache import ContentKey, artefacts_exist, digest_file, digest_json, digest_paths
from erpops.tracking import Tracker
from evaluation.evaluate import evaluate_candidate
from registry.champion import fetch_champion
from registry.promote import AliasPlan, log_shipped_model, read_champion, register_version, tag_version, version_exists
from training.base_model import MODELS_DIR, load_tokenizer, resolve_base_model, resolve_tokenizer
from training.launch import train as train_stage
from training.lora import TrainResult
from training.optimize import optimize_model

IO_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2), "retry_jitter_factor": 0.5}
"""Retries for tasks that talk to a store: 2 s, 4 s, 8 s (+/- 50%)."""


def validate_step(data: DataConfig, model: ModelConfig, out_dir: Path, tracker=None) -> ValidateResult:
    """Data contracts with the base model's tokenizer (loaded here, so a cache hit does not load it)."""
    return validate_data(data, out_dir, tracker, load_tokenizer(model, MODELS_DIR))


@dataclass(frozen=True)
class Promoted:
    version: str
    plan: AliasPlan
    settings: MLflowSettings
    """The store it was registered in."""

    def still_stands(self) -> bool:
        """A cached promotion is reused only while its version exists and, if it moved the champion, the
        champion is still that version (a failed release that put the champion back makes the next run
        decide again). A promotion the registry refused (the champion had moved since the gate: `plan.skipped`) is
        never reused: the champion it was refused against may be back, and the gate's pass stands to be acted on.
        Only the registry's "no such version" counts as gone; any other registry error is raised (a transient outage
        must not make the cache forget a version that still exists)."""
        if self.plan.skipped or not version_exists(self.settings, self.version):
            return False
        champion = self.settings.aliases.champion
        return champion not in self.plan.set or read_champion(self.settings).version == self.version


def promote_step(settings: MLflowSettings, run_id: str, gguf_path: Path, modelfile: Path | None,
                 lineage: dict[str, str], passed: bool, expected_champion: str | None) -> Promoted:
    """Log the shipped GGUF as the run's pyfunc model, then register it and move aliases (compare-and-set)."""
    model_uri = log_shipped_model(run_id, settings.tracking_uri, gguf_path, modelfile)
    version, plan = register_version(settings, model_uri, run_id, lineage, passed, expected_champion=expected_champion)
    return Promoted(version, plan, settings)


def train_step(recipe: Recipe, base: Path | str, train_examples: list[dict], out_dir: Path, runtime: Runtime,
               tracker: Tracker, resume: bool = False) -> TrainResult:
    """The train stage here, or on `recipe.train.deployment` (another work pool) with the result passed back
    through the MLflow run: the split goes up as an artifact, the adapter and `train/result.json` come back."""
    if not recipe.train.deployment:
        return train_stage(recipe, base, train_examples, out_dir, runtime, tracker, resume=resume)
    import mlflow
    from prefect.deployments import run_deployment

    from flows.train_remote import RESULT_ARTIFACT, TRAIN_SPLIT_ARTIFACT

    split = out_dir / "remote" / Path(TRAIN_SPLIT_ARTIFACT).name  # the rows given (validate may have been cached)
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in train_examples), encoding="utf-8")
    tracker.log_artifact(split, str(Path(TRAIN_SPLIT_ARTIFACT).parent))
    tracker.flush()
    name, timeout = recipe.train.deployment, recipe.train.deployment_timeout_s
    run = run_deployment(name, parameters={"recipe": recipe.model_dump(mode="json"), "mlflow_run_id": tracker.run_id,
                                           "tracking_uri": tracker.tracking_uri}, timeout=timeout)
    if run.state is None or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        if run.state is not None and not run.state.is_final():
            from prefect.client.orchestration import get_client

            from erpops.orchestration import cancel_run

            with get_client(sync_client=True) as client:  # the remote worker stops the training process
                cancel_run(client, run.id, f"train stage gave up after {timeout:.0f} s")
        raise RuntimeError(f"train deployment {name}: flow run {run.id} ended {state} "
                           f"({run.state.message if run.state else 'no state'}) within {timeout:.0f} s")
    mlflow.set_tracking_uri(tracker.tracking_uri)
    got = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path=RESULT_ARTIFACT,
                                                   dst_path=str(out_dir / "remote")))
    data = json.loads(got.read_text())
    adapter = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path="adapter",
                                                       dst_path=str(out_dir)))
    return TrainResult(**{**data, "adapter_dir": adapter})


def _validate_parts(i: dict[str, Any]) -> dict[str, Any]:
    d: DataConfig = i["data"]
    return {"data": d, "model": i["model"], "tokenizer": _base_identity(resolve_tokenizer(i["model"], MODELS_DIR)),
            "files": digest_paths([d.root / d.qa_pairs, d.root / d.chat_logs, d.root / d.docs, d.root / d.feedback])}


def _train_parts(i: dict[str, Any]) -> dict[str, Any]:
    r = i["recipe"]
    return {"model": r.model, **_base_identity(i["base"]), "lora": r.lora, "train": r.train,
            "max_seq_len": r.data.max_seq_len, "examples": digest_json(i["train_examples"]),
            "runtime": digest_json(i["runtime"])}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


READ_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
              "vocab.*", "merges.txt", "spiece.model", "chat_template*", "*processor_config.json")
"""Files of a model folder, besides its weights, that transformers reads (fnmatch patterns, top level)."""


def _base_identity(base: Path | str) -> dict[str, Any]:
    """The base model (or tokenizer) folder as the stages read it: the content of the files transformers reads
    besides the weights (config, tokenizer, chat template: small; `READ_FILES`) and each weight file's name, size
    and modification time, so that a model rewritten under the same path (`model.path`) trains again instead of
    coming from the cache (hashing gigabytes of weights on every run would cost seconds; a rewritten file has a new
    time). Other files (a README, notes) do not count. A hub id is its name only."""
    import fnmatch

    root = Path(base)
    weights = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES) if root.is_dir() else []
    read = sorted(f for f in root.iterdir() if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in READ_FILES)
                  ) if root.is_dir() else []
    return {"base": str(base), "files": [[f.name, digest_file(f)] for f in read],
            "weights": [[str(f.relative_to(root)), st.st_size, st.st_mtime_ns] for f in weights for st in [f.stat()]]}


def _optimize_parts(i: dict[str, Any]) -> dict[str, Any]:
    return {"optimize": i["cfg"], **_base_identity(i["base"]), "adapter": digest_paths([i["adapter_dir"]]),
            "eval": digest_json(i["eval_examples"]), "calibration": digest_json(i.get("calibration_examples")),
            "runtime": digest_json(i["runtime"])}


def _evaluate_parts(i: dict[str, Any]) -> dict[str, Any]:
    champion = i["champion"]
    return {"gate": i["cfg"], "candidate": digest_file(i["gguf_path"]), "eval": digest_json(i["eval_examples"]),
            "champion": None if champion is None else {
                "version": champion.version, "metrics": champion.metrics,
                "gguf": digest_file(champion.gguf) if champion.gguf else None},
            "runtime": digest_json(i["runtime"])}


def _promote_parts(i: dict[str, Any]) -> dict[str, Any]:
    s: MLflowSettings = i["settings"]
    lineage = {k: v for k, v in i["lineage"].items() if k not in ("git_commit", "mlflow_run_id", "recipe_hash")}
    return {"store": s.tracking_uri, "model": s.registered_model_name, "gguf": digest_file(i["gguf_path"]),
            "modelfile": digest_file(i["modelfile"]) if i["modelfile"] else None, "lineage": lineage,
            "passed": i["passed"], "expected_champion": i["expected_champion"]}


def _cached(fn, stage: str, parts, packages: tuple[str, ...], valid=artefacts_exist):
    return ContentKey(stage=stage, parts=parts, packages=packages, valid=valid).task(fn, name=stage)


validate_task = _cached(validate_step, "validate", _validate_parts, ("data_contracts", "erpops"))
base_model_task = task(resolve_base_model, name="base-model", cache_policy=NO_CACHE)
train_task = _cached(train_step, "train", _train_parts, ("training", "erpops"))
optimize_task = _cached(optimize_model, "optimize", _optimize_parts, ("training", "deployment", "evaluation", "erpops"))
champion_task = task(fetch_champion, name="fetch-champion", cache_policy=NO_CACHE, **IO_RETRIES)
# data_contracts: the gate's language_agreement detects languages with its rules
evaluate_task = _cached(evaluate_candidate, "evaluate", _evaluate_parts, ("evaluation", "training", "data_contracts",
                                                                          "erpops"))
promote_task = _cached(promote_step, "promote", _promote_parts, ("registry", "erpops"), valid=lambda r: r.still_stands())
tag_task = task(tag_version, name="tag-version", cache_policy=NO_CACHE, **IO_RETRIES)
bundle_task = task(registered_bundle, name="registered-bundle", cache_policy=NO_CACHE, **IO_RETRIES)
release_task = task(release_version, name="release", cache_policy=NO_CACHE)
