"""Stage 5, promote: register the shipped model as an MLflow model version and move aliases.

    erpops promote VERSION          # manual promotion
    erpops rollback                 # champion back to the previous release

Every new version gets `candidate`. `champion` (and `previous`, the champion it replaced) move only on
a passing gate. Alias decisions are pure functions (`plan_promotion`, `plan_rollback`); the MLflow calls
around them are thin, and a version whose registration fails half-way is deleted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from erpops.config import MLflowSettings

log = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.23,<6", "gguf>=0.19", "mlflow>=3.17,<4"]


@dataclass(frozen=True)
class AliasPlan:
    """Aliases to set (alias -> version) and to delete, as decided from the current state."""

    set: dict[str, str]
    delete: tuple[str, ...] = ()
    before: dict[str, str] = field(default_factory=dict)
    """The aliases as they were when the plan was made (read under the registry lock)."""


def plan_promotion(aliases: dict[str, str], version: str, passed: bool, names) -> AliasPlan:
    """candidate always moves to the new version; champion and previous only when the gate passed."""
    moves = {names.candidate: version}
    if passed and aliases.get(names.champion) != version:
        moves[names.champion] = version
        if names.champion in aliases:
            moves[names.previous] = aliases[names.champion]
    return AliasPlan(moves)


def plan_rollback(aliases: dict[str, str], parent_of: dict[str, str], names) -> AliasPlan:
    """champion <- previous; previous <- the champion that preceded it (its parent), if any."""
    if names.previous not in aliases:
        raise ValueError("nothing to roll back to: no version holds the 'previous' alias")
    target = aliases[names.previous]
    parent = parent_of.get(target)
    if parent:
        return AliasPlan({names.champion: target, names.previous: parent})
    return AliasPlan({names.champion: target}, (names.previous,))


@contextlib.contextmanager
def registry_lock(settings: MLflowSettings):
    """Serialise alias moves between processes (MLflow alias writes are last-writer-wins)."""
    if settings.tracking_uri.startswith("sqlite:///"):
        lock_path = Path(settings.tracking_uri[len("sqlite:///"):] + ".lock")
    else:
        lock_path = Path(".erpops/registry.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current_aliases(client, model_name: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(model_name)
    except MlflowException:
        return {}
    return {a: str(v) for a, v in (rm.aliases or {}).items()}


def apply_plan(client, model_name: str, plan: AliasPlan) -> None:
    for alias in plan.delete:
        client.delete_registered_model_alias(model_name, alias)
    for alias, version in plan.set.items():
        client.set_registered_model_alias(model_name, alias, version)


def log_shipped_model(run_id: str, tracking_uri: str, gguf_path: Path, modelfile: Path | None) -> str:
    """Log the GGUF (+ Modelfile) as a pyfunc model in the run; returns its model URI."""
    import mlflow

    from registry.pyfunc_model import ERPAssistantModel

    artifacts = {"gguf": str(gguf_path)}
    if modelfile is not None:
        artifacts["modelfile"] = str(modelfile)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=ERPAssistantModel(), artifacts=artifacts,
                                       pip_requirements=PIP_REQUIREMENTS)
    return info.model_uri


def register_version(settings: MLflowSettings, model_uri: str, run_id: str, tags: dict[str, str], passed: bool) -> tuple[str, AliasPlan]:
    """Create the version with its lineage tags and move aliases; nothing is left half-written."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    name = settings.registered_model_name
    from mlflow.exceptions import MlflowException

    with registry_lock(settings):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="ERP assistant LLM (GGUF for Ollama) built by erpops")
        aliases = current_aliases(client, name)
        mv = client.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
        version = str(mv.version)
        try:
            if passed and settings.aliases.champion in aliases:
                client.set_model_version_tag(name, version, "parent_champion", aliases[settings.aliases.champion])
            plan = replace(plan_promotion(aliases, version, passed, settings.aliases), before=aliases)
            apply_plan(client, name, plan)
        except BaseException:
            # put back any alias already moved, then remove the half-registered version
            for alias in (settings.aliases.candidate, settings.aliases.champion, settings.aliases.previous):
                with contextlib.suppress(MlflowException):
                    if alias in aliases:
                        client.set_registered_model_alias(name, alias, aliases[alias])
                    else:
                        client.delete_registered_model_alias(name, alias)
            client.delete_model_version(name, version)
            raise
    log.info("registered %s version %s; aliases set: %s", name, version, plan.set)
    return version, plan


def restore_aliases(settings: MLflowSettings, plan: AliasPlan, names: tuple[str, ...]) -> None:
    """Undo a promotion's alias moves (when its deployment failed): each named alias goes back to what
    it was before, but only if it still points where this plan put it; a move made since by someone
    else is left alone."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    name = settings.registered_model_name
    with registry_lock(settings):
        now = current_aliases(client, name)
        for alias in names:
            if alias in plan.delete and alias not in now and alias in plan.before:
                client.set_registered_model_alias(name, alias, plan.before[alias])
                continue
            if alias not in plan.set or now.get(alias) != plan.set[alias]:
                continue
            if alias in plan.before:
                client.set_registered_model_alias(name, alias, plan.before[alias])
            else:
                with contextlib.suppress(MlflowException):
                    client.delete_registered_model_alias(name, alias)


def promote_version(settings: MLflowSettings, version: str) -> AliasPlan:
    """Manual promotion: the version becomes champion, the old champion previous."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    name = settings.registered_model_name
    with registry_lock(settings):
        client.get_model_version(name, version)  # raises a clear error for an unknown version
        aliases = current_aliases(client, name)
        plan = plan_promotion(aliases, version, True, settings.aliases)
        plan = AliasPlan({k: v for k, v in plan.set.items() if k != settings.aliases.candidate})
        if settings.aliases.champion in aliases and aliases[settings.aliases.champion] != version:
            client.set_model_version_tag(name, version, "parent_champion", aliases[settings.aliases.champion])
        apply_plan(client, name, plan)
    return plan


def rollback_registry(settings: MLflowSettings) -> tuple[str, AliasPlan]:
    """champion back to previous; returns the version now champion."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    name = settings.registered_model_name
    with registry_lock(settings):
        aliases = current_aliases(client, name)
        parent_of = {}
        if settings.aliases.previous in aliases:
            prev = aliases[settings.aliases.previous]
            parent = client.get_model_version(name, prev).tags.get("parent_champion")
            if parent:
                parent_of[prev] = parent
        plan = replace(plan_rollback(aliases, parent_of, settings.aliases), before=aliases)
        apply_plan(client, name, plan)
    return plan.set[settings.aliases.champion], plan


def champion_metrics(settings: MLflowSettings) -> dict[str, float] | None:
    """The gate's comparison point: eval metrics of the version that holds `champion`, if any."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    aliases = current_aliases(client, settings.registered_model_name)
    version = aliases.get(settings.aliases.champion)
    if version is None:
        return None
    try:
        mv = client.get_model_version(settings.registered_model_name, version)
        metrics = client.get_run(mv.run_id).data.metrics
    except MlflowException:
        return None
    out = {k.split("/", 1)[1]: v for k, v in metrics.items() if k in ("eval/rouge_l", "eval/perplexity")}
    return out or None


def tag_version(settings: MLflowSettings, version: str, tags: dict[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    for k, v in tags.items():
        client.set_model_version_tag(settings.registered_model_name, version, k, str(v))


def version_tags(settings: MLflowSettings, version: str) -> dict[str, str]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    return dict(client.get_model_version(settings.registered_model_name, version).tags or {})
