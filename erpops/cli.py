"""erpops command line. Heavy libraries are imported inside commands so `--help` answers at once.

    erpops run                                  # the whole pipeline on the default recipe
    erpops validate --json                      # data contracts only
    erpops status --json                        # registry state: versions, aliases, metrics, lineage
    erpops status --history                     # every alias move: when, who, why (--at TIME: champion then)
    erpops promote 3                            # move the champion by hand (--force --reason TEXT: past the gate)
    erpops deploy --env staging / erpops promote-env staging prod --reason ... / erpops rollback --env prod
    erpops releases                             # what serves in each environment; every switch
    erpops ui                                   # MLflow UI over the same store
    erpops up / erpops down                     # Prefect server + MLflow server + process worker on 127.0.0.1
    erpops trigger -d train-and-gate/on-merge --watch --timeout 3600   # CI: run a deployment, exit by its state
    erpops serve-api                            # model-management API + RAG chat + dashboard on 127.0.0.1:8600
    erpops api-key create --name me --role admin / erpops audit
    erpops feedback list --since 7d --verdict down  # users' verdicts on answers (on their MLflow traces)
    erpops drift --env staging --since 7d          # live traffic against the training data (HTML in MLflow)
    erpops canary start --env staging --version 3   # canary release: 10% -> 50% -> 100%, judged, auto-abort (status, promote, abort)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="MLOps pipeline for the ERP assistant LLM: validate, train, optimize, evaluate, promote, deploy.")

DEFAULT_RECIPE = "recipes/smollm2-135m/cpu.yaml"
RecipeOpt = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="Recipe YAML.")
MlflowOpt = typer.Option(None, "--mlflow-config", help="mlflow.yaml to use (default ./mlflow.yaml).")


def _setup():
    from erpops.runtime import configure_logging, setup_process

    try:
        setup_process()
    except ValueError as e:  # a malformed ERPOPS_* setting
        _fail(str(e), 2)
    configure_logging()


def _fail(message: str, code: int = 1):
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(recipe: str, overrides: dict | None = None):
    from erpops.config import ConfigError, load_recipe

    try:
        return load_recipe(recipe, overrides)
    except ConfigError as e:
        _fail(str(e), 2)


def _settings(path: Optional[str]):
    from erpops.config import ConfigError, load_mlflow_settings

    try:
        return load_mlflow_settings(path)
    except ConfigError as e:
        _fail(str(e), 2)


NOT_RUN_FOLDERS = ("release-", "canary-")
"""Name prefixes of the folders `erpops deploy` / the release flow and `erpops canary start` make beside the run
folders: they hold a release's data, never a trained model."""


def _require(run_dir: Path, needed: dict[str, str], what: str) -> None:
    """Exit 2 naming every file or folder of `needed` ({relative path: the command that makes it}) that `run_dir`
    lacks, before any MLflow run is started."""
    if not run_dir.is_dir():
        _fail(f"nothing to {what}: no run folder {run_dir}", 2)
    missing = [f"{run_dir / rel} (made by {by})" for rel, by in needed.items() if not (run_dir / rel).exists()]
    if missing:
        _fail(f"nothing to {what} in {run_dir}: missing {'; '.join(missing)}", 2)


def _latest_run_dir(recipe) -> Path:
    """The newest folder a train-and-gate run or `erpops train` made under the recipe's output_root."""
    runs = sorted((p for p in recipe.output_root.glob("*") if p.is_dir() and not p.name.startswith(NOT_RUN_FOLDERS)),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        _fail(f"no run folder under {recipe.output_root}: run `erpops train` or `erpops run` first", 2)
    return runs[-1]


@app.command()
def run(recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
        run_name: Optional[str] = typer.Option(None, help="Run folder / MLflow run name (default <recipe>-<time>).")):
    """Run the whole pipeline (Prefect flow): validate, train, optimize, evaluate, promote, deploy."""
    _setup()
    import time

    r = _load(recipe)  # fail fast on a bad recipe, before Prefect starts
    from erpops.summary import RunSummary
    from flows.pipeline import pipeline, set_aside_summary

    run_name = run_name or f"{r.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = r.output_root / run_name / "run_summary.json"
    set_aside_summary(path)  # an earlier run's summary under the same --run-name must not speak for this one
    state = pipeline(recipe_path=recipe, mlflow_config=mlflow_config, run_name=run_name, return_state=True)
    if not path.is_file():
        _fail(f"the pipeline ended {state.name} before writing {path}: {state.message}")
    summary = RunSummary.read(path)
    import logging

    for name in ("prefect", "milvus_lite"):  # their shutdown notes would otherwise follow the summary line
        logging.getLogger(name).setLevel(logging.WARNING)
    typer.echo("\n" + summary.table())
    for k, v in summary.metrics.items():
        typer.echo(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    if summary.outputs.get("no_change"):
        typer.echo("  no change: the candidate is the champion's model, or its gate decision is cached; no new version")
    if "model_version" in summary.outputs:
        typer.echo(f"  model version: {summary.outputs['model_version']}  (see: erpops status; erpops ui)")
    typer.echo(f"summary: {path}")
    if not state.is_completed():
        _fail(f"pipeline {state.name}: {state.message}")
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def validate(recipe: str = RecipeOpt,
             data: Optional[Path] = typer.Option(None, "--data", help="Data folder (overrides the recipe's data.root)."),
             as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """Check the data contracts; exit 1 when a blocking rule fails. Prints file, line and rule of each problem."""
    from erpops.runtime import setup_process

    setup_process()
    r = _load(recipe, {"data.root": str(data)} if data else None)
    from data_contracts.contracts import check_corpus
    from training.base_model import MODELS_DIR, load_tokenizer

    report, _, _ = check_corpus(r.data, load_tokenizer(r.model, MODELS_DIR))
    typer.echo(report.to_json() if as_json else report.table())
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def train(recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
          run_dir: Optional[Path] = typer.Option(None, help="Output folder (default: a new one under the recipe's output_root)."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --run-dir (default: the latest run folder).")):
    """Validate the data, then LoRA-train the base model; logs an MLflow run and writes <run-dir>/adapter.

    Checkpoints go to <run-dir>/checkpoints every train.checkpoint_every steps; after a crash or a kill,
    `erpops train --resume` continues from the newest one."""
    import time

    _setup()
    r = _load(recipe)
    from data_contracts.dataset import read_examples
    from data_contracts.report import DataContractError
    from data_contracts.validate import validate_data
    from erpops import distributed
    from erpops.device import resolve_runtime
    from erpops.tracking import Tracker
    from training.base_model import MODELS_DIR, load_tokenizer, resolve_base_model
    from training.launch import train as train_stage

    runtime = resolve_runtime(r.train.precision)
    # under `accelerate launch -m erpops.cli train`: rank 0 validates and logs, every rank trains
    dist = distributed.init(runtime.device)
    if dist.is_main:
        if resume and run_dir is None:
            run_dir = _latest_run_dir(r)
        run_dir = run_dir or r.output_root / f"{r.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = distributed.broadcast(dist, run_dir)
    tracker = Tracker.start(_settings(mlflow_config), f"train-{run_dir.name}", {"recipe.hash": r.digest()}) if dist.is_main else None
    error, base = "", None
    if dist.is_main:  # a crash here ends the launch: the launcher stops every process when one fails
        try:
            validate_data(r.data, run_dir / "data", tracker, load_tokenizer(r.model, MODELS_DIR))
            base = str(resolve_base_model(r.model, MODELS_DIR))
        except DataContractError as e:
            error = str(e)
    if distributed.broadcast(dist, error):
        if tracker:
            tracker.end("FAILED")
        distributed.close(dist)
        _fail(error if dist.is_main else "data validation failed on rank 0")
    base = distributed.broadcast(dist, base)
    try:
        result = train_stage(r, base, read_examples(run_dir / "data" / "train.jsonl"), run_dir, runtime, tracker,
                             resume=resume)
    except BaseException:  # Ctrl-C included: the run must not stay RUNNING (resume with --resume)
        if tracker:
            tracker.end("KILLED")
        raise
    finally:
        distributed.close(dist)
    if tracker:
        tracker.end()
    if dist.is_main:
        typer.echo(json.dumps({"run_dir": str(run_dir), "adapter": str(result.adapter_dir),
                               "first_loss": result.first_loss, "final_loss": result.final_loss,
                               "tokens_per_s": result.tokens_per_s, "processes": max(dist.world_size,
                                                                                     r.train.num_processes)}, indent=2))


@app.command()
def optimize(recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
             run_dir: Optional[Path] = typer.Option(None, help="Run folder holding adapter/ (default: the latest).")):
    """Merge LoRA, prune, quantize to int8 and export verified GGUF files from a trained run folder."""
    _setup()
    r = _load(recipe)
    run_dir = run_dir or _latest_run_dir(r)
    from data_contracts.dataset import read_examples
    from erpops.device import resolve_runtime
    from erpops.tracking import Tracker
    from training.base_model import MODELS_DIR, resolve_base_model
    from training.optimize import optimize_model

    _require(run_dir, {"adapter": "erpops train", "data/train.jsonl": "erpops train",
                       "data/eval.jsonl": "erpops train"}, "optimize")
    tracker = Tracker.start(_settings(mlflow_config), f"optimize-{run_dir.name}", {"recipe.hash": r.digest()})
    try:
        base = resolve_base_model(r.model, MODELS_DIR)
        evals = read_examples(run_dir / "data" / "eval.jsonl")[: r.gate.max_examples]
        result = optimize_model(r.optimize, base, run_dir / "adapter", evals, run_dir, resolve_runtime(r.train.precision),
                                tracker, calibration_examples=read_examples(run_dir / "data" / "train.jsonl"))
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    typer.echo(result.table())


def _shipped_gguf(run_dir: Path) -> tuple[Path, list | None]:
    """The GGUF the optimize stage of `run_dir` verified and chose to ship, and its per-example scores from that
    stage. Raises ValueError when the stage did not finish there (no `optimize.json`: a rerun that failed deletes
    it, and may leave a file that failed its checks or one made from an earlier adapter) or when the file on disk is
    not the one it verified."""
    from training.gguf import sha256_file

    decided = run_dir / "optimize.json"
    if not decided.is_file():
        raise ValueError(f"{decided} is missing: the optimize stage did not finish in {run_dir} "
                         f"(run `erpops optimize --run-dir {run_dir}`)")
    optimized = json.loads(decided.read_text())
    shipped = optimized["shipped"]
    gguf = run_dir / "gguf" / f"model-{shipped}.gguf"
    export = optimized.get("gguf", {}).get(shipped, {})
    if not gguf.is_file() or export.get("sha256") != sha256_file(gguf):
        raise ValueError(f"{gguf} is not the {shipped} file the optimize stage verified (sha256 "
                         f"{export.get('sha256')}): it was replaced or removed since")
    return gguf, export.get("example_nll")


@app.command()
def evaluate(recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
             run_dir: Optional[Path] = typer.Option(None, help="Run folder holding gguf/ (default: the latest).")):
    """Score the shipped GGUF of a run folder and the champion's on the same examples; apply the gate.

    Exit status: 0 promote, 3 hold (no evidence of a difference), 1 reject, 2 nothing to evaluate (the run's
    optimize stage did not finish, or its GGUF was replaced since)."""
    _setup()
    r = _load(recipe)
    run_dir = run_dir or _latest_run_dir(r)
    from data_contracts.dataset import read_examples
    from erpops.device import resolve_runtime
    from erpops.tracking import Tracker
    from evaluation.evaluate import evaluate_candidate
    from registry.champion import fetch_champion

    try:
        gguf, scores = _shipped_gguf(run_dir)
    except ValueError as e:  # 2: neither a verdict nor a reject (1)
        _fail(f"{e}; nothing evaluated", 2)
    _require(run_dir, {"data/eval.jsonl": "erpops train"}, "evaluate")
    settings = _settings(mlflow_config)
    tracker = Tracker.start(settings, f"evaluate-{run_dir.name}", {"recipe.hash": r.digest()})
    try:
        result = evaluate_candidate(r.gate, gguf, read_examples(run_dir / "data" / "eval.jsonl"),
                                    fetch_champion(settings, run_dir / "champion"), run_dir, resolve_runtime(r.train.precision),
                                    tracker, candidate_nll=scores)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    typer.echo(json.dumps({"metrics": result.metrics, **result.verdict.to_dict(), "report": str(result.report_path),
                           "html_report": str(result.html_path)}, indent=2, ensure_ascii=False))
    raise typer.Exit({"promote": 0, "hold": 3}.get(result.verdict.verdict, 1))


@app.command()
def promote(version: str = typer.Argument(..., help="Model version to make champion."),
            mlflow_config: Optional[str] = MlflowOpt,
            recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="Recipe the triggered staging release uses."),
            force: bool = typer.Option(False, "--force", help="Promote although the version's gate verdict is not 'promote' (needs --reason)."),
            reason: str = typer.Option("", "--reason", help="Why; recorded in the promotion ledger (and as a version tag with --force)."),
            expect_champion: Optional[str] = typer.Option(None, "--expect-champion", help="Refuse unless this version (or 'none') is still the champion.")):
    """Make VERSION the champion by hand; the old champion becomes previous. Moves the registry, and with a Prefect
    server (PREFECT_API_URL) emits the promotion event that triggers the staging release; without one, `erpops
    deploy` serves it. A version the gate did not pass needs --force --reason TEXT."""
    from erpops.runtime import setup_process

    setup_process()
    from mlflow.exceptions import MlflowException

    from registry.promote import UNCHECKED, PromotionRefused, promote_version

    expected = UNCHECKED if expect_champion is None else (None if expect_champion.lower() == "none" else expect_champion)
    try:
        plan = promote_version(_settings(mlflow_config), version, expected, force=force, reason=reason)
    except MlflowException as e:
        _fail(f"cannot promote version {version}: {e.message}")
    except PromotionRefused as e:
        _fail(f"cannot promote version {version}: {e}")
    from erpops.orchestration import emit_promotion
    from registry.ledger import current_actor

    settings = _settings(mlflow_config)
    event = settings.aliases.champion in plan.set and emit_promotion(
        settings.registered_model_name, version, plan.before.get(settings.aliases.champion), recipe, mlflow_config,
        current_actor(), reason or "by hand")
    typer.echo(json.dumps({"version": version, "aliases_set": plan.set, "aliases_before": plan.before, "reason": reason,
                           "event": "erpops.model.promoted" if event else None}))


EnvOpt = typer.Option(None, "--env", "-e", help="Environment (deploy.environments; default: the recipe's deploy.release_env).")


@app.command()
def deploy(recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt, env: Optional[str] = EnvOpt,
           version: Optional[str] = typer.Option(None, help="Registered version to deploy (default: the champion)."),
           reason: str = typer.Option("", "--reason", help="Why; recorded in the release ledger.")):
    """Build a release of a registered version (its GGUF in Ollama, a new knowledge-base collection) and switch the
    environment to both. Exit 1 when a step failed; the environment then serves what it served before."""
    _setup()
    r = _load(recipe)
    from deployment.deploy import env_target

    try:
        env = env_target(r.deploy, env or r.deploy.release_env).name
    except ValueError as e:
        _fail(str(e), 2)
    from flows.release import release

    state = release(recipe_path=recipe, mlflow_config=mlflow_config, version=version, env=env, reason=reason,
                    return_state=True)
    if not state.is_completed():
        _fail(state.message or "release failed")
    summary = state.result()
    stages = {s["name"]: s for s in summary["stages"]}
    kb, ollama = stages["deploy_kb"]["outputs"], stages["deploy_ollama"]
    typer.echo(json.dumps({"env": env, "version": summary["outputs"]["released_version"],
                           "release": summary["outputs"].get("release_id"), "collection": kb.get("collection"),
                           "ollama": ollama["outputs"].get("release") or f"skipped: {ollama['reason']}",
                           "summary": str(Path(summary["run_dir"]) / "run_summary.json")}, indent=2))


@app.command("promote-env")
def promote_env(source: str = typer.Argument(..., help="Environment whose release is promoted, e.g. staging."),
                target: str = typer.Argument(..., help="Environment that gets it, e.g. prod."),
                recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
                reason: str = typer.Option("", "--reason", help="The approval: why (required where the target's requires_reason is set, e.g. prod).")):
    """Switch TARGET to the release SOURCE serves (same GGUF, same collection; nothing rebuilt), after a health
    check on TARGET's Ollama host. The approval is recorded with who gave it and why."""
    _setup()
    r = _load(recipe)
    settings = _settings(mlflow_config)
    from deployment.deploy import ReleaseError, registry_gguf_fetcher
    from deployment.deploy import promote_env as promote
    from registry.ledger import current_actor

    try:
        out = promote(r.deploy, settings, source, target, current_actor(), reason, gguf_for=registry_gguf_fetcher(settings))
    except ValueError as e:
        _fail(str(e), 2)
    except ReleaseError as e:
        _fail(f"promote-env {source} -> {target} failed at {e.stage}, {target} unchanged: {e}")
    typer.echo(json.dumps({"env": target, "release": out.release.release_id, "version": out.release.model_version,
                           "previous": out.previous, "collection": out.release.collection, "ollama": out.ollama}, indent=2))


@app.command()
def rollback(recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt, env: Optional[str] = EnvOpt,
             reason: str = typer.Option("", "--reason", help="Why; recorded in the release ledger and the promotion ledger.")):
    """Switch the environment back to the release it served before: Ollama tag, knowledge-base alias and the
    registry alias together. In the release environment (where champions go) the champion goes back too."""
    _setup()
    r = _load(recipe)
    settings = _settings(mlflow_config)
    from deployment.deploy import ReleaseError, env_target, registry_gguf_fetcher, rollback_serving
    from registry.ledger import current_actor

    try:
        env = env_target(r.deploy, env or r.deploy.release_env).name
    except ValueError as e:
        _fail(str(e), 2)
    try:
        out, champion, stayed = rollback_serving(r.deploy, settings, env, current_actor(), reason,
                                                 gguf_for=registry_gguf_fetcher(settings))
    except (ValueError, ReleaseError) as e:
        _fail(f"rollback of {env} failed, nothing changed: {e}", 2 if isinstance(e, ValueError) else 1)
    if stayed:
        typer.secho(f"champion stays: {stayed}", err=True)
    typer.echo(json.dumps({"env": env, "release": out.release.release_id, "version": out.release.model_version,
                           "rolled_back": out.previous, "collection": out.release.collection, "ollama": out.ollama,
                           "champion": champion}, indent=2))


@app.command()
def releases(recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
             env: Optional[str] = typer.Option(None, "--env", "-e", help="Only this environment."),
             as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """What each environment serves (release, version, collection) and what rollback would go back to; then
    every switch, rollback, approval and failed attempt, newest last."""
    from erpops.runtime import setup_process

    setup_process()
    r = _load(recipe)
    from deployment.releases import ReleaseLedger, env_stack, format_releases

    ledger = ReleaseLedger(_settings(mlflow_config))
    envs = [env] if env else list(r.deploy.environments)
    if env and env not in r.deploy.environments:
        _fail(f"unknown environment {env!r}; configured: {', '.join(r.deploy.environments)}", 2)
    rels, events = ledger.releases(), [e for e in ledger.events() if e.env in envs]
    if as_json:
        state = {e: {"stack": env_stack(events, e)} for e in envs}
        typer.echo(json.dumps({"environments": state, "releases": [x.to_dict() for x in rels],
                               "events": [x.to_dict() for x in events]}, indent=2, ensure_ascii=False))
        return
    typer.echo(format_releases(rels, events, envs))


canary_app = typer.Typer(no_args_is_help=True, help="Canary releases and A/B splits of one environment (deployment/rollout.py).")
app.add_typer(canary_app, name="canary")


def _canary_env(r, env: Optional[str]) -> str:
    from deployment.deploy import env_target

    try:
        return env_target(r.deploy, env or r.deploy.release_env).name
    except ValueError as e:
        _fail(str(e), 2)


@canary_app.command("start")
def canary_start(version: str = typer.Option(..., "--version", help="Registered version the canary serves."),
                 env: Optional[str] = EnvOpt, recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
                 ab: Optional[float] = typer.Option(None, "--ab", help="A/B test: this fixed percent of conversations on the version, held until promote or abort (no steps)."),
                 reason: str = typer.Option("", "--reason", help="Why; recorded in the canary ledger.")):
    """Build a release of VERSION beside the one the environment serves (nothing switched) and send the first
    step's share of conversations to it (deploy.canary.steps); the chat service judges each step's window and
    moves, pauses, aborts or promotes it. Exit 2 when the version is not registered or holds no GGUF.

    The GGUF is downloaded into a temporary folder, removed once the canary started or failed to, unless the
    build's Ollama half was skipped (no server answered: the message then points at the folder, to import the model
    by hand); a switch to the canary's release fetches the GGUF from the registry again where the host lacks its
    model."""
    import shutil
    import tempfile

    _setup()
    r = _load(recipe)
    settings = _settings(mlflow_config)
    env = _canary_env(r, env)
    from deployment.deploy import ReleaseError, registered_bundle
    from data_contracts.report import DataContractError
    from deployment.rollout import CanaryError, start_canary
    from evaluation.retrieval import read_golden
    from flows.steps import validate_step
    from mlflow.exceptions import MlflowException
    from registry.ledger import current_actor
    from registry.promote import version_tags

    version = version.lstrip("v")
    run_dir = r.output_root / f"canary-{env}-v{version}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, keep = Path(tempfile.mkdtemp(prefix=f"canary-v{version}-")), False
    try:
        try:
            gguf, spec = registered_bundle(settings.tracking_uri, settings.registered_model_name, version, folder)
        except (MlflowException, FileNotFoundError) as e:
            _fail(f"canary of v{version} in {env} not started: {settings.registered_model_name} version {version} "
                  f"cannot be fetched from {settings.tracking_uri}: {getattr(e, 'message', e)}; {env} unchanged", 2)
        docs = validate_step(r.data, r.model, run_dir / "data").docs
        golden_path = r.data.root / "golden_queries.jsonl"
        state, built = start_canary(r.deploy, settings, env, version, gguf, spec, docs,
                                    read_golden(golden_path) if golden_path.is_file() else None, current_actor(),
                                    reason, ab_split=ab, expected_sha256=version_tags(settings, version).get("gguf_sha256"))
        keep = built.ollama_skipped  # the started canary's Ollama half too: its message points at the folder
    except CanaryError as e:
        _fail(str(e), 2)
    except DataContractError as e:
        _fail(f"canary of v{version} in {env} not started: the data contracts fail: {e}; {env} unchanged", 2)
    except ReleaseError as e:
        keep = e.outcome.ollama_skipped
        _fail(f"canary of v{version} in {env} not started: {e.stage} failed: {e}; {env} unchanged")
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    if keep:
        typer.echo(f"ollama: {built.ollama}", err=True)
    typer.echo(json.dumps(state.to_dict(), indent=2, ensure_ascii=False))


@canary_app.command("status")
def canary_status(env: Optional[str] = EnvOpt, recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
                  as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """The environment's newest canary: status, weight, step, and every analysis, step, pause, abort."""
    from erpops.runtime import setup_process

    setup_process()
    r = _load(recipe)
    env = _canary_env(r, env)
    from deployment.canaries import CanaryLedger, format_canary

    state, events = CanaryLedger(_settings(mlflow_config)).latest(env)
    if as_json:
        typer.echo(json.dumps({"canary": state.to_dict() if state else None, "events": [e.to_dict() for e in events]},
                              indent=2, ensure_ascii=False))
        return
    typer.echo(format_canary(state, events))


@canary_app.command("promote")
def canary_promote(env: Optional[str] = EnvOpt, recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
                   full: bool = typer.Option(False, "--full", help="Skip the remaining steps: switch the environment to the canary's release now."),
                   reason: str = typer.Option("", "--reason", help="Why; recorded in the canary ledger.")):
    """Move a paused (or progressing) canary to its next step; at the last step, with --full, or for an A/B test,
    switch the environment to the canary's release (both halves and the registry alias, health-checked first)."""
    _setup()
    r = _load(recipe)
    settings = _settings(mlflow_config)
    env = _canary_env(r, env)
    from deployment.deploy import registry_gguf_fetcher
    from deployment.rollout import CanaryError, promote_canary
    from registry.ledger import current_actor

    try:
        state = promote_canary(r.deploy, settings, env, current_actor(), reason, full, registry_gguf_fetcher(settings))
    except CanaryError as e:
        _fail(str(e), 2)
    typer.echo(json.dumps(state.to_dict(), indent=2, ensure_ascii=False))


@canary_app.command("abort")
def canary_abort(env: Optional[str] = EnvOpt, recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
                 reason: str = typer.Option("", "--reason", help="Why; recorded in the canary and release ledgers.")):
    """Weight 0 now: every conversation goes to the stable release, which never stopped serving."""
    _setup()
    r = _load(recipe)
    env = _canary_env(r, env)
    from deployment.rollout import CanaryError, abort_canary
    from registry.ledger import current_actor

    try:
        state = abort_canary(r.deploy, _settings(mlflow_config), env, current_actor(), reason)
    except CanaryError as e:
        _fail(str(e), 2)
    typer.echo(json.dumps(state.to_dict(), indent=2, ensure_ascii=False))


bundle_app = typer.Typer(no_args_is_help=True, help="Offline bundles: a release as one verified file for a closed network.")
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("export")
def bundle_export(release: str = typer.Option(..., "--release", help="Release id (see `erpops releases`)."),
                  out: Optional[Path] = typer.Option(None, "--out", help="Bundle file (default <release>.tar.gz)."),
                  recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt):
    """Write a release as a tar.gz: GGUF, Modelfile, knowledge-base rows (text, metadata, vectors) and a manifest
    with the sha256 of every file."""
    from erpops.runtime import setup_process

    setup_process()
    r = _load(recipe)
    settings = _settings(mlflow_config)
    from deployment.bundle import BundleError, export_bundle
    from deployment.deploy import registry_gguf_fetcher
    from deployment.releases import ReleaseLedger

    try:
        rel = ReleaseLedger(settings).release(release)
    except KeyError as e:
        _fail(str(e.args[0]), 2)
    fetch = registry_gguf_fetcher(settings)
    try:
        gguf, spec = fetch(rel)
        path = export_bundle(rel, gguf, spec, r.deploy.milvus_uri, out or Path(f"{release}.tar.gz"))
    except BundleError as e:
        _fail(str(e))
    finally:  # the bundle holds the GGUF now, or the download failed half-way
        fetch.discard()
    typer.echo(json.dumps({"release": release, "bundle": str(path), "bytes": path.stat().st_size}, indent=2))


@bundle_app.command("import")
def bundle_import(bundle: Path = typer.Argument(..., help="A bundle written by `erpops bundle export`."),
                  env: Optional[str] = EnvOpt, recipe: str = RecipeOpt, mlflow_config: Optional[str] = MlflowOpt,
                  reason: str = typer.Option("", "--reason", help="Why; recorded in the release ledger.")):
    """Verify every checksum of a bundle, then serve it in the environment (collection from its rows, Ollama model
    from its GGUF, one switch). A bundle with a corrupted byte is refused, with the file named; nothing changes."""
    _setup()
    r = _load(recipe)
    settings = _settings(mlflow_config)
    from deployment.bundle import BundleError
    from deployment.deploy import ReleaseError, env_target, import_release
    from registry.ledger import current_actor

    try:
        env = env_target(r.deploy, env or r.deploy.release_env).name
        out = import_release(r.deploy, settings, env, bundle, current_actor(), reason)
    except (ValueError, BundleError) as e:
        _fail(str(e), 2 if not isinstance(e, BundleError) else 1)
    except ReleaseError as e:
        _fail(f"import into {env} failed at {e.stage}, {env} unchanged: {e}")
    typer.echo(json.dumps({"env": env, "release": out.release.release_id, "previous": out.previous,
                           "collection": out.release.collection, "ollama": out.ollama}, indent=2))


@app.command()
def status(mlflow_config: Optional[str] = MlflowOpt,
           as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
           history: bool = typer.Option(False, "--history", help="Print the promotion ledger: every alias move, newest last."),
           at: Optional[str] = typer.Option(None, "--at", help="Print the version that was champion at this time, e.g. 2026-11-21T10:00:00 (UTC unless an offset is given).")):
    """Registry state: versions, aliases, key metrics and lineage tags; or the alias history (--history), or
    the champion at a past time (--at)."""
    from erpops.runtime import setup_process

    setup_process()
    from registry import status as st

    settings = _settings(mlflow_config)
    if history and at:
        _fail("--history and --at do not go together", 2)
    if at:
        try:
            state = st.champion_at_state(settings, at)
        except ValueError as e:
            _fail(f"--at {at!r} is not an ISO 8601 time (e.g. 2026-11-21T10:00:00): {e}", 2)
        typer.echo(json.dumps(state, indent=2) if as_json else st.format_champion_at(state))
        return
    if history:
        state = st.history_state(settings)
        typer.echo(json.dumps(state, indent=2, ensure_ascii=False) if as_json else st.format_history(state))
        return
    state = st.registry_state(settings)
    typer.echo(json.dumps(state, indent=2, ensure_ascii=False) if as_json else st.format_state(state))


@app.command()
def ui(mlflow_config: Optional[str] = MlflowOpt, port: int = typer.Option(5000, help="Port on 127.0.0.1.")):
    """Start a real MLflow server on 127.0.0.1 over the same store and print its URL (Ctrl-C stops it)."""
    import os
    import subprocess

    settings = _settings(mlflow_config)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.tracking_uri,
           "--default-artifact-root", settings.artifact_location if "://" in settings.artifact_location
           else Path(settings.artifact_location).resolve().as_uri(),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    typer.echo(f"MLflow UI: http://127.0.0.1:{port}  (experiment {settings.experiment_name}, model {settings.registered_model_name})")
    raise typer.Exit(subprocess.call(cmd, env=env))


STACK_HOME = Path(".erpops/stack")


@app.command()
def up(mlflow_config: Optional[str] = MlflowOpt,
       prefect_port: int = typer.Option(4200, help="Prefect server port on 127.0.0.1 (the next free one if taken)."),
       mlflow_port: int = typer.Option(5000, help="MLflow server port on 127.0.0.1 (the next free one if taken)."),
       prefect_db: Optional[str] = typer.Option(None, "--prefect-db", envvar="ERPOPS_PREFECT_DB",
                                                help="Prefect database URL, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/prefect (default: SQLite under .erpops/stack)."),
       mlflow_backend: Optional[str] = typer.Option(None, "--mlflow-backend", envvar="ERPOPS_MLFLOW_BACKEND",
                                                    help="The MLflow server's backend store, e.g. postgresql://postgres@127.0.0.1:5432/mlflow; clients then use the server's URL (default: the mlflow.yaml store, which the CLI also reads directly)."),
       worker: bool = typer.Option(True, "--worker/--no-worker", help="Also start a process worker on the erpops-process pool."),
       milvus: bool = typer.Option(False, "--milvus", help="Also start a Milvus Lite server several processes can share (set deploy.milvus_uri to the printed ERPOPS_MILVUS_URI)."),
       milvus_port: int = typer.Option(19530, help="Port of that Milvus Lite server (the next free one if taken)."),
       home: Path = typer.Option(STACK_HOME, help="Where the stack keeps its pid file, logs and Prefect state."),
       timeout: float = typer.Option(120, help="Seconds to wait for each service to answer.")):
    """Start a Prefect server, an MLflow server (same store as the CLI) and a process worker on 127.0.0.1; print
    their URLs and what to export. `erpops down` stops them."""
    from erpops.orchestration import OrchestrationError, start_stack

    settings = _settings(mlflow_config)
    art = settings.artifact_location if "://" in settings.artifact_location else Path(settings.artifact_location).resolve().as_uri()
    try:
        stack = start_stack(home, mlflow_backend or settings.tracking_uri, art, Path.cwd(), prefect_port, mlflow_port,
                            prefect_db, worker, timeout, clients_use_server=mlflow_backend is not None,
                            milvus_port=milvus_port if milvus else None)
    except OrchestrationError as e:
        _fail(str(e))
    for svc in stack.services:
        typer.echo(f"{svc.name:<15} {svc.url:<28} pid {svc.pid}  log {svc.log}")
    typer.echo("export " + " ".join(f"{k}={v}" for k, v in stack.env.items()))
    typer.echo("then: prefect --no-prompt deploy --all   (deployments of prefect.yaml)")


@app.command()
def down(home: Path = typer.Option(STACK_HOME, help="The folder `erpops up` used.")):
    """Stop what `erpops up` started (by its pid file)."""
    from erpops.orchestration import stop_stack

    if not (home / "stack.json").exists():
        typer.echo(f"nothing to stop (no {home / 'stack.json'})")
        return
    stopped = stop_stack(home)
    typer.echo(f"stopped: {', '.join(stopped)}" if stopped else
               f"nothing to stop: the processes in {home / 'stack.json'} had exited (file removed)")


@app.command()
def trigger(deployment: str = typer.Option("train-and-gate/on-merge", "--deployment", "-d",
                                           help="flow-name/deployment-name, as `prefect deployment ls` shows it."),
            param: list[str] = typer.Option([], "--param", "-p", help="KEY=VALUE flow parameter (JSON values parsed); repeatable."),
            watch: bool = typer.Option(False, "--watch", help="Wait for the final state; exit 0 only if it completed."),
            timeout: float = typer.Option(3600, help="Seconds to wait with --watch; the run is cancelled after it."),
            summary_file: Optional[Path] = typer.Option(None, "--summary-file", help="Append a Markdown report (state, gate verdict, stages) to this file, e.g. $GITHUB_STEP_SUMMARY.")):
    """Run a Prefect deployment (CI: on merge). With --watch: exit 0 when the run completed, 1 when it failed,
    crashed, was cancelled or did not finish within --timeout; 2 when the server or the deployment is not there."""
    from erpops.orchestration import OrchestrationError, gate_verdict, parse_params, summary_markdown
    from erpops.orchestration import trigger as run_trigger

    try:
        params = parse_params(param)
    except ValueError as e:
        _fail(str(e), 2)
    try:
        result = run_trigger(deployment, params, watch, timeout)
    except OrchestrationError as e:
        _fail(str(e), 2)
    verdict = gate_verdict(result.summary) if result.summary else None
    typer.echo(json.dumps({"deployment": result.deployment, "flow_run_id": result.flow_run_id, "state": result.state,
                           "message": result.message, "gate_verdict": verdict,
                           "model_version": (result.summary or {}).get("outputs", {}).get("model_version"),
                           "no_change": (result.summary or {}).get("outputs", {}).get("no_change")}, indent=2))
    if summary_file:
        report = [f"## erpops: {deployment}", "", f"**state** {result.state}: {result.message}  ", ""]
        if result.summary:
            report.append(summary_markdown(result.summary).split("```json")[0])
        with open(summary_file, "a", encoding="utf-8") as f:
            f.write("\n".join(report) + "\n")
    if watch:
        raise typer.Exit(result.code)


ServeConfigOpt = typer.Option(None, "--config", help="serve.yaml to use (default ERPOPS_SERVE_CONFIG or ./serve.yaml).")


def _serve_settings(path: Optional[str], overrides: dict | None = None):
    from erpops.config import ConfigError
    from serving.settings import load_serve_settings

    try:
        return load_serve_settings(path, overrides)
    except ConfigError as e:
        _fail(str(e), 2)


@app.command("serve-api")
def serve_api(config: Optional[str] = ServeConfigOpt, mlflow_config: Optional[str] = MlflowOpt,
              host: Optional[str] = typer.Option(None, help="Interface (default serve.yaml's host, 127.0.0.1)."),
              port: Optional[int] = typer.Option(None, help="Port (default serve.yaml's port, 8600)."),
              env: Optional[str] = typer.Option(None, "--env", "-e", help="Environment the chat serves (default staging)."),
              recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe whose deploy section locates releases.")):
    """The model-management API, the RAG chat service and the dashboard (/ai-models), on uvicorn. OpenAPI at /docs,
    Prometheus at /metrics. Create a key first: `erpops api-key create --name me --role admin`."""
    _setup()
    settings = _serve_settings(config, {"host": host, "port": port, "env": env, "recipe": recipe})
    import uvicorn

    from serving.app import create_app
    from serving.service import Service

    try:
        service = Service.from_settings(settings, mlflow=_settings(mlflow_config))
    except ValueError as e:
        _fail(str(e), 2)
    if settings.auth and not any(k["revoked"] is None for k in service.keys.keys()):
        typer.secho(f"no API key yet in {service.keys.path}: `erpops api-key create --name me --role admin`", err=True)
    typer.echo(f"serving env {settings.env} on http://{settings.host}:{settings.port} (dashboard /ai-models, docs /docs)")
    uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level="info")


key_app = typer.Typer(no_args_is_help=True, help="API keys of the service (roles viewer, operator, admin).")
app.add_typer(key_app, name="api-key")


def _keystore(config: Optional[str]):
    from serving.keys import KeyStore

    return KeyStore(_serve_settings(config).data_dir / "serving.db")


@key_app.command("create")
def key_create(name: str = typer.Option(..., "--name", help="Who or what uses the key."),
               role: str = typer.Option("viewer", "--role", help="viewer (read), operator (+ tests), admin (+ start/stop, releases)."),
               config: Optional[str] = ServeConfigOpt):
    """Create a key and print it once; only its hash is stored."""
    try:
        key, who = _keystore(config).create(name, role)
    except ValueError as e:
        _fail(str(e), 2)
    typer.echo(json.dumps({"key": key, "key_id": who.key_id, "name": who.name, "role": who.role}, indent=2))


@key_app.command("list")
def key_list(config: Optional[str] = ServeConfigOpt):
    """Every key's id, name, role, creation and revocation (never the key)."""
    typer.echo(json.dumps(_keystore(config).keys(), indent=2))


@key_app.command("revoke")
def key_revoke(key_id: str = typer.Argument(..., help="Key id (the part after erpk_)."), config: Optional[str] = ServeConfigOpt):
    """Revoke a key at once."""
    if not _keystore(config).revoke(key_id):
        _fail(f"no valid key {key_id!r}", 2)
    typer.echo(json.dumps({"revoked": key_id}))


@app.command()
def audit(config: Optional[str] = ServeConfigOpt, limit: int = typer.Option(50, help="Newest entries shown.")):
    """The service's audit log: every mutating API call, who made it, when, and its result."""
    typer.echo(json.dumps([e.to_dict() for e in _keystore(config).audit_log(limit)], indent=2, ensure_ascii=False))


feedback_app = typer.Typer(no_args_is_help=True, help="Users' verdicts on chat answers (on their MLflow traces).")
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("list")
def feedback_list(since: Optional[str] = typer.Option(None, "--since", help="7d, 12h, 30m, or an ISO date (UTC)."),
                  model: Optional[str] = typer.Option(None, "--model", help="Only answers of this version (v3)."),
                  verdict: Optional[str] = typer.Option(None, "--verdict", help="up or down."),
                  config: Optional[str] = ServeConfigOpt, mlflow_config: Optional[str] = MlflowOpt,
                  as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """Verdicts given on chat answers, oldest first: when, up or down, version, environment, trace, the question
    and the corrected answer."""
    from erpops.runtime import setup_process

    setup_process()
    settings = _serve_settings(config)
    from serving.feedback import format_feedback, list_feedback, parse_since

    if verdict not in (None, "up", "down"):
        _fail(f"--verdict must be up or down, got {verdict!r}", 2)
    try:
        start = parse_since(since)
    except ValueError as e:
        _fail(str(e), 2)
    rows = list_feedback(_settings(mlflow_config).tracking_uri, settings.trace_experiment, start, model, verdict)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False))
        return
    typer.echo(format_feedback(rows))


@feedback_app.command("export")
def feedback_export(since: Optional[str] = typer.Option(None, "--since", help="Only verdicts since: 7d, 12h, or an ISO date."),
                    recipe: str = RecipeOpt, data: Optional[Path] = typer.Option(None, "--data", help="Data root (default: the recipe's data.root)."),
                    config: Optional[str] = ServeConfigOpt, mlflow_config: Optional[str] = MlflowOpt):
    """Users' corrected answers as a new curated feedback file of the corpus (<data root>/feedback/), through the
    data contracts (PII per data.pii_policy, template tokens, language, length, duplicates, no eval overlap), with
    a manifest of the traces that went in and of every refusal. Exit 1 when the corpus itself fails its contracts."""
    from erpops.runtime import setup_process

    setup_process()
    r = _load(recipe, {"data.root": str(data)} if data else None)
    settings = _serve_settings(config)
    from data_contracts.curation import land_feedback
    from data_contracts.report import DataContractError
    from registry.ledger import current_actor
    from serving.feedback import list_feedback, parse_since
    from training.base_model import MODELS_DIR, load_tokenizer

    try:
        start = parse_since(since)
    except ValueError as e:
        _fail(str(e), 2)
    rows = list_feedback(_settings(mlflow_config).tracking_uri, settings.trace_experiment, start)
    corrections = [{"trace_id": x.trace_id, "question": x.question, "correction": x.correction, "sources": x.sources}
                   for x in rows if x.correction]
    try:
        landed = land_feedback(r.data, corrections, current_actor(), load_tokenizer(r.model, MODELS_DIR))
    except DataContractError as e:
        _fail(f"the corpus fails its contracts before any feedback is added; nothing written:\n{e}")
    typer.echo(json.dumps(landed.to_dict(), indent=2, ensure_ascii=False))


@app.command()
def drift(env: Optional[str] = typer.Option(None, "--env", "-e", help="Environment whose serving release is judged (default serve.yaml's, staging)."),
          since: Optional[str] = typer.Option("7d", "--since", help="Traffic since: 7d, 12h, or an ISO date (UTC)."),
          emit: bool = typer.Option(False, "--emit", help="When it drifted, request a retrain (the same event as an alert, within the same window)."),
          recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe: its data are the reference, its deploy section locates the release."),
          config: Optional[str] = ServeConfigOpt, mlflow_config: Optional[str] = MlflowOpt,
          out: Path = typer.Option(Path(".erpops/drift"), "--out", help="Folder of the HTML report.")):
    """Drift of the release's live traffic (its chat traces) against the training data: question length, language
    mix, best retrieval score, unanswered share. The report (HTML with plots) and its figures go to the MLflow
    experiment erp-assistant-drift. Exit 3 when it drifted."""
    from erpops.runtime import setup_process

    setup_process()
    settings = _serve_settings(config, {"env": env, "recipe": recipe})
    r = _load(str(settings.recipe))
    from serving.alerting import RetrainWindow
    from serving.feedback import parse_since
    from serving.traffic import drift_job

    try:
        result = drift_job(settings, r.deploy, _settings(mlflow_config), r.data, parse_since(since), out)
    except ValueError as e:
        _fail(str(e), 2)
    rep = result.report
    typer.echo(f"{'figure':<28}{'value':>10}")
    for k, v in rep.metrics.items():
        typer.echo(f"{k:<28}{v:>10.4f}")
    typer.echo(f"{rep.questions} live questions of {result.release}, {rep.reference_questions} training questions; "
               f"report {result.html} (MLflow run {result.run_id})")
    typer.echo("drifted: " + "; ".join(rep.drifted) if rep.drifted else
               "no drift beyond the thresholds" if rep.judged else "too few questions to judge")
    if emit and rep.drifted:
        asked = RetrainWindow(settings.data_dir / "serving.db").request(
            rep.drifted, f"drift of {result.release}", settings.retrain_window_s, settings.env, str(settings.recipe),
            settings.retrain_mlflow_config)
        typer.echo(json.dumps(asked, ensure_ascii=False))
    raise typer.Exit(3 if rep.drifted else 0)


def main():
    import os

    from erpops.runtime import jemalloc_env

    env = jemalloc_env(sys.argv, dict(os.environ))
    if env is not None:  # the process starts over under jemalloc (same arguments); nothing has run yet
        if os.path.isfile(sys.argv[0]) and os.access(sys.argv[0], os.X_OK):  # the console script: `erpops` in usage
            os.execve(sys.argv[0], sys.argv, env)
        os.execve(sys.executable, [sys.executable, "-m", "erpops.cli", *sys.argv[1:]], env)
    app()


if __name__ == "__main__":
    main()
