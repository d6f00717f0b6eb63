"""Stage 5, promote: register the shipped model as an MLflow model version and move aliases.

    erpops promote VERSION                          # manual promotion (its gate said `promote`)
    erpops promote VERSION --force --reason TEXT    # promote a version the gate did not pass
    erpops rollback --reason TEXT                   # champion back to the previous release
    erpops status --history                         # every alias move, from the promotion ledger

Every new version gets `candidate`. `champion` (and `previous`, the champion it replaced) move only on a
passing gate, and only while the champion is still the one the decision was based on: a compare-and-set
under the registry lock, so two promotions based on the same champion cannot both win. Every alias move is
appended to the promotion ledger (`registry/ledger.py`) under the same lock, after the MLflow call succeeded.
After each registration or promotion, versions older than the newest `KEEP_VERSIONS` that hold no alias,
and held none before that promotion's moves (a failed release puts those back), lose their heavy artifacts
(the logged GGUF model, the run's adapter and merged model); their version records, tags and ledger entries
stay. Rollback refuses to make a version so pruned champion again.

Decisions are pure functions (`plan_promotion`, `plan_rollback`, `plan_restore`, `stale_champion`,
`promotion_action`, `plan_retention`); the MLflow calls around them are thin, and a version whose
registration fails half-way is deleted again.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Union

from erpops.config import Aliases, MLflowSettings
from erpops.runtime import file_lock
from registry import ledger

log = logging.getLogger(__name__)

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.23,<6", "gguf>=0.19", "mlflow>=3.17,<4", "pydantic>=2.7",
                    "pyyaml>=6"]
PYFUNC_PACKAGES = ("registry", "training", "evaluation", "erpops")
"""Packages `registry.pyfunc_model` reaches when the model loads (GGUF loading, answer generation, device)."""
KEEP_VERSIONS = 3
"""Retention: the newest versions that keep their artifacts whatever their aliases."""
HEAVY_RUN_ARTIFACTS = ("adapter", "merged_model", "checkpoints", "gguf")
"""Top-level folders of a source run that retention deletes (metrics, reports and the recipe stay)."""
RETENTION_TAG = "retention.artifacts_deleted"
SKIPPED_TAG = "promotion.skipped"


class Unchecked(enum.Enum):
    """Type of `UNCHECKED`."""

    UNCHECKED = "unchecked"


UNCHECKED = Unchecked.UNCHECKED
"""`expected_champion` default: move the champion without comparing it first (the behaviour before
compare-and-set). Pass the champion the decision was based on instead, None meaning there was none."""
ExpectedChampion = Union[str, None, Literal[Unchecked.UNCHECKED]]


class PromotionRefused(Exception):
    """A promotion the rules do not allow; nothing was changed."""


class StaleChampionError(PromotionRefused):
    """The champion is no longer the one the promotion was decided against."""

    def __init__(self, expected: str | None, actual: str | None):
        self.expected, self.actual = expected, actual
        super().__init__(f"the champion changed since this promotion was decided: expected {_label(expected)}, "
                         f"found {_label(actual)}; check `erpops status` and decide again")


@dataclass(frozen=True)
class AliasPlan:
    """Aliases to set (alias -> version) and to delete, as decided from the current state."""

    set: dict[str, str]
    delete: tuple[str, ...] = ()
    before: dict[str, str] = field(default_factory=dict)
    """The aliases as they were when the plan was made (read under the registry lock)."""
    skipped: str = ""
    """Why the champion did not move although the gate passed (stale champion); empty when it was not refused."""


@dataclass(frozen=True)
class Champion:
    """The champion as one read: its version and the eval metrics a gate compares against."""

    version: str | None
    """Version holding the champion alias; None when there is no champion."""
    metrics: dict[str, float] | None
    """Its eval metrics (rouge_l, perplexity); None when there is no champion or it has none."""


def plan_promotion(aliases: dict[str, str], version: str, passed: bool, names: Aliases) -> AliasPlan:
    """candidate always moves to the new version; champion and previous only when the gate passed."""
    moves = {names.candidate: version}
    if passed and aliases.get(names.champion) != version:
        moves[names.champion] = version
        if names.champion in aliases:
            moves[names.previous] = aliases[names.champion]
    return AliasPlan(moves)


def plan_rollback(aliases: dict[str, str], parent_of: dict[str, str], names: Aliases,
                  pruned: Collection[str] = frozenset()) -> AliasPlan:
    """champion <- previous; previous <- the champion that preceded it (its parent), if any. Raises ValueError
    when no version holds `previous`, or when it is one of `pruned` (retention deleted its artifacts)."""
    if names.previous not in aliases:
        raise ValueError("nothing to roll back to: no version holds the 'previous' alias")
    target = aliases[names.previous]
    if target in pruned:
        raise ValueError(f"cannot roll back to version {target} (alias '{names.previous}'): retention deleted its "
                         "artifacts, so it has nothing to serve; promote a version that still has them")
    parent = parent_of.get(target)
    if parent:
        return AliasPlan({names.champion: target, names.previous: parent})
    return AliasPlan({names.champion: target}, (names.previous,))


def plan_restore(plan: AliasPlan, now: dict[str, str], aliases: Sequence[str]) -> AliasPlan:
    """Undo `plan`'s moves of the named aliases (its deployment failed): each goes back to `plan.before`, but
    only where it still stands as the plan left it; a move made since by someone else is kept."""
    put, drop = {}, []
    for alias in aliases:
        if alias in plan.delete:
            if alias not in now and alias in plan.before:
                put[alias] = plan.before[alias]
        elif alias in plan.set and now.get(alias) == plan.set[alias]:
            if alias in plan.before:
                put[alias] = plan.before[alias]
            else:
                drop.append(alias)
    return AliasPlan(put, tuple(drop), before=dict(now))


def stale_champion(aliases: dict[str, str], expected: ExpectedChampion, names: Aliases) -> str | None:
    """Why a champion move decided against `expected` must be refused, or None when the champion is still
    `expected` (or the check is off: `UNCHECKED`)."""
    if expected is UNCHECKED:
        return None
    actual = aliases.get(names.champion)
    if actual == (None if expected is None else str(expected)):
        return None
    return f"the gate compared against {_label(expected)}, but the champion is now {_label(actual)}"


def promotion_action(gate_verdict: str | None, force: bool, reason: str) -> str:
    """`promote` for a version its gate passed; `force-promote` for any other only with `force` and a reason."""
    if gate_verdict == "promote":
        return "promote"
    if not force:
        raise PromotionRefused(f"the gate verdict of this version is {gate_verdict or 'missing'!r}, not 'promote': "
                               "promote it anyway with --force --reason TEXT")
    if not reason.strip():
        raise PromotionRefused("a forced promotion needs a non-empty --reason")
    return "force-promote"


def plan_retention(versions: list[str], aliased: set[str], keep: int = KEEP_VERSIONS) -> list[str]:
    """Versions older than the newest `keep` that hold no alias, oldest first: their artifacts can go."""
    newest_first = sorted(versions, key=int, reverse=True)
    return sorted((v for v in newest_first[keep:] if v not in aliased), key=int)


def alias_moves(plan: AliasPlan) -> list[tuple[str, str | None, str | None]]:
    """(alias, from, to) per alias the plan changes, in the order `apply_plan` makes them; setting an alias
    where it already points is no move."""
    moves: list[tuple[str, str | None, str | None]] = [(a, plan.before.get(a), None) for a in plan.delete]
    moves += [(a, plan.before.get(a), v) for a, v in plan.set.items() if plan.before.get(a) != v]
    return moves


@contextlib.contextmanager
def registry_lock(settings: MLflowSettings):
    """Serialise alias moves between processes (MLflow alias writes are last-writer-wins). Not re-entrant."""
    if settings.tracking_uri.startswith("sqlite:///"):
        lock_path = Path(settings.tracking_uri[len("sqlite:///"):] + ".lock")
    else:
        lock_path = Path(".erpops/registry.lock")
    with file_lock(lock_path):
        yield


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


def pyfunc_code_paths() -> list[str]:
    """The erpops packages the pyfunc model imports when it loads, carried inside the model (`code/`), so
    `mlflow models serve -m models:/erp-assistant@champion` works where erpops is not installed."""
    root = Path(__file__).resolve().parents[1]
    return [str(root / pkg) for pkg in PYFUNC_PACKAGES]


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
                                       pip_requirements=PIP_REQUIREMENTS, code_paths=pyfunc_code_paths(),
                                       signature=mlflow.models.infer_signature(["question"], ["answer"],
                                                                               params={"max_new_tokens": 128}))
    return info.model_uri


def register_version(settings: MLflowSettings, model_uri: str, run_id: str, tags: dict[str, str], passed: bool,
                     expected_champion: ExpectedChampion = UNCHECKED) -> tuple[str, AliasPlan]:
    """Create the version with its lineage tags and move aliases; nothing is left half-written.

    `expected_champion` is the champion the gate compared against (None: there was none). If another
    promotion has moved the champion since, this version still gets `candidate` but not `champion`: it is
    tagged `promotion.skipped` with the reason, and the returned plan's `skipped` says so. `parent_champion`
    (lineage) is the champion at registration, or "none". Alias moves are recorded in the ledger (actions
    register / promote); then retention runs.
    """
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    name, names = settings.registered_model_name, settings.aliases
    with registry_lock(settings):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="ERP assistant LLM (GGUF for Ollama) built by erpops")
        aliases = current_aliases(client, name)
        skipped = (stale_champion(aliases, expected_champion, names) or "") if passed else ""
        lineage = {**{k: str(v) for k, v in tags.items()}, "parent_champion": aliases.get(names.champion, "none")}
        if skipped:
            lineage[SKIPPED_TAG] = skipped
        # a logged model's URI is models:/<model id>; a tracking server checks the source against model_id
        model_id = model_uri[len("models:/"):] if model_uri.startswith("models:/m-") else None
        mv = client.create_model_version(name, model_uri, run_id=run_id, tags=lineage, model_id=model_id)
        version = str(mv.version)
        plan = replace(plan_promotion(aliases, version, passed and not skipped, names), before=aliases, skipped=skipped)
        try:
            _move_and_record(client, settings, plan,
                             {names.candidate: "register", names.champion: "promote", names.previous: "promote"},
                             reason=skipped)
        except BaseException:
            try:
                client.delete_model_version(name, version)
            except MlflowException as e:
                log.error("could not delete the half-registered %s version %s: %s", name, version, e)
            raise
        _retain(client, settings, held=set(plan.before.values()))
    if skipped:
        log.warning("registered %s version %s as candidate only: %s", name, version, skipped)
    log.info("registered %s version %s; aliases set: %s", name, version, plan.set)
    return version, plan


def restore_aliases(settings: MLflowSettings, plan: AliasPlan, names: tuple[str, ...], reason: str = "") -> AliasPlan:
    """Undo a promotion's alias moves (when its deployment failed): each named alias goes back to what
    it was before, but only if it still points where this plan put it; a move made since by someone
    else is left alone. Recorded in the ledger as `restore`; returns the moves made."""
    client = _client(settings)
    with registry_lock(settings):
        undo = plan_restore(plan, current_aliases(client, settings.registered_model_name), names)
        _move_and_record(client, settings, undo, "restore", reason)
    return undo


def promote_version(settings: MLflowSettings, version: str, expected_champion: ExpectedChampion = UNCHECKED,
                    force: bool = False, reason: str = "") -> AliasPlan:
    """Manual promotion: the version becomes champion, the old champion previous.

    Only a version whose `gate_verdict` tag is "promote", unless `force` with a non-empty `reason` (ledger
    action force-promote; tags `promotion.forced_at`, `promotion.forced_by`, `promotion.force_reason`).
    With `expected_champion`, refused (StaleChampionError) unless that is still the champion. Raises
    PromotionRefused, or MlflowException for an unknown version; nothing changes then.
    """
    client = _client(settings)
    name, names = settings.registered_model_name, settings.aliases
    version = str(version)
    with registry_lock(settings):
        tags = dict(client.get_model_version(name, version).tags or {})  # a clear error for an unknown version
        if RETENTION_TAG in tags:
            raise PromotionRefused(f"version {version} cannot serve again: retention deleted its artifacts "
                                   f"({RETENTION_TAG}={tags[RETENTION_TAG]})")
        action = promotion_action(tags.get("gate_verdict"), force, reason)
        aliases = current_aliases(client, name)
        if stale_champion(aliases, expected_champion, names):
            raise StaleChampionError(expected_champion, aliases.get(names.champion))  # type: ignore[arg-type]
        proposed = plan_promotion(aliases, version, True, names)
        plan = AliasPlan({k: v for k, v in proposed.set.items() if k != names.candidate}, before=aliases)
        forced = {}
        if action == "force-promote":
            forced = {"promotion.forced_at": ledger.utc_now(), "promotion.forced_by": ledger.current_actor(),
                      "promotion.force_reason": reason}
        _move_and_record(client, settings, plan, action, reason, tags={version: forced} if forced else None)
        _retain(client, settings, held=set(plan.before.values()))
    return plan


def rollback_registry(settings: MLflowSettings, reason: str = "") -> tuple[str, AliasPlan]:
    """champion back to previous; returns the version now champion. Recorded in the ledger as `rollback`.

    The new `previous` is the champion the rolled-back-to version replaced when it was promoted (from the
    ledger; the `parent_champion` tag for versions promoted before the ledger existed), unless retention has
    deleted that version's artifacts. Raises ValueError (nothing changes) when there is no `previous`, or when
    retention deleted its artifacts."""
    client = _client(settings)
    names = settings.aliases
    with registry_lock(settings):
        aliases = current_aliases(client, settings.registered_model_name)
        parent_of, pruned = {}, set()
        if names.previous in aliases:
            target = aliases[names.previous]
            if RETENTION_TAG in (client.get_model_version(settings.registered_model_name, target).tags or {}):
                pruned.add(target)
            parent = _replaced_champion(client, settings, target)
            if parent:
                parent_of[target] = parent
        plan = replace(plan_rollback(aliases, parent_of, names, pruned), before=aliases)
        _move_and_record(client, settings, plan, "rollback", reason)
    return plan.set[names.champion], plan


def read_champion(settings: MLflowSettings) -> Champion:
    """The champion's version and eval metrics, read together: the gate compares against `metrics`, and the
    pipeline passes `version` to `register_version(..., expected_champion=version)`."""
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    version = current_aliases(client, settings.registered_model_name).get(settings.aliases.champion)
    if version is None:
        return Champion(None, None)
    try:
        mv = client.get_model_version(settings.registered_model_name, version)
        metrics = client.get_run(mv.run_id).data.metrics
    except MlflowException:
        return Champion(version, None)
    out = {k.split("/", 1)[1]: v for k, v in metrics.items() if k in ("eval/rouge_l", "eval/perplexity")}
    return Champion(version, out or None)


def champion_metrics(settings: MLflowSettings) -> dict[str, float] | None:
    """The gate's comparison point: eval metrics of the version that holds `champion`, if any."""
    return read_champion(settings).metrics


def tag_version(settings: MLflowSettings, version: str, tags: dict[str, str]) -> None:
    client = _client(settings)
    for k, v in tags.items():
        client.set_model_version_tag(settings.registered_model_name, version, k, str(v))


def registered_version(settings: MLflowSettings, version: str):
    """`version` of the registered model (its ModelVersion), or None only when the registry says there is none (no
    such version, or no such registered model); any other registry error is raised: a transient outage is not an
    answer, and a caller that took it for "gone" would forget a version that still exists (a cached promotion) or
    leave an alias behind what an environment serves."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(settings).get_model_version(settings.registered_model_name, version)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def version_exists(settings: MLflowSettings, version: str) -> bool:
    """Whether `version` exists (`registered_version`'s rule)."""
    return registered_version(settings, version) is not None


def no_change(candidate_sha256: str, champion_version: str | None, champion_tags: Mapping[str, str]) -> str | None:
    """Why gating the candidate is pointless: it is byte for byte the champion's shipped GGUF (a retrain with
    nothing changed); None otherwise. Pure."""
    if champion_version is not None and champion_tags.get("gguf_sha256") == candidate_sha256:
        return f"the candidate is champion v{champion_version}'s GGUF (sha256 {candidate_sha256[:12]}): no change"
    return None


def version_tags(settings: MLflowSettings, version: str) -> dict[str, str]:
    return dict(_client(settings).get_model_version(settings.registered_model_name, version).tags or {})


def _client(settings: MLflowSettings):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def _label(version: str | None) -> str:
    return "no champion" if version is None else f"champion v{version}"


def _move_and_record(client, settings: MLflowSettings, plan: AliasPlan, action: str | Mapping[str, str],
                     reason: str = "", tags: Mapping[str, Mapping[str, str]] | None = None) -> None:
    """Apply the plan, set `tags` (version -> tags), then append the moves to the ledger: the commit point.
    If any step fails, the aliases and tags go back to how they were and the error propagates, so the
    ledger never holds a move that did not happen. Call it under the registry lock."""
    name = settings.registered_model_name
    moves = alias_moves(plan)
    tags = tags or {}
    versions = {v for _, frm, to in moves for v in (to or frm,) if v} | set(tags)
    facts = {v: client.get_model_version(name, v) for v in versions}
    try:
        apply_plan(client, name, plan)
        for version, kv in tags.items():
            for k, v in kv.items():
                client.set_model_version_tag(name, version, k, v)
        at, actor = ledger.utc_now(), ledger.current_actor()
        ledger.append(settings, [
            ledger.LedgerEntry(at, name, alias, frm, to, action if isinstance(action, str) else action[alias], actor,
                               reason, (facts[to or frm].tags or {}).get("gate_verdict"), facts[to or frm].run_id)
            for alias, frm, to in moves])
    except BaseException:
        _put_back(client, name, plan.before, [*plan.delete, *plan.set])
        for version, kv in tags.items():
            old = facts[version].tags or {}
            for k in kv:
                with contextlib.suppress(Exception):
                    if k in old:
                        client.set_model_version_tag(name, version, k, old[k])
                    else:
                        client.delete_model_version_tag(name, version, k)
        raise


def _put_back(client, name: str, before: Mapping[str, str], aliases: Sequence[str]) -> None:
    """Each alias back to `before` (deleted where it did not exist); best effort, after a failure."""
    for alias in aliases:
        with contextlib.suppress(Exception):
            if alias in before:
                client.set_registered_model_alias(name, alias, before[alias])
            else:
                client.delete_registered_model_alias(name, alias)


def _replaced_champion(client, settings: MLflowSettings, version: str) -> str | None:
    """The champion `version` replaced when last promoted, if it still has its artifacts."""
    from mlflow.exceptions import MlflowException

    name = settings.registered_model_name
    promotion = ledger.last_promotion(ledger.read_ledger(settings), version, settings.aliases.champion)
    if promotion is not None:
        parent = promotion.from_version
    else:
        parent = (client.get_model_version(name, version).tags or {}).get("parent_champion")
    if not parent or parent in ("none", version):
        return None
    try:
        tags = client.get_model_version(name, parent).tags or {}
    except MlflowException:
        return None
    return None if RETENTION_TAG in tags else parent


def _retain(client, settings: MLflowSettings, keep: int = KEEP_VERSIONS,
            held: Collection[str] = frozenset()) -> list[str]:
    """Delete the heavy artifacts of the versions `plan_retention` gives up and tag them; returns those done.
    `held`: the versions that held an alias before the promotion just made; they count as aliased, as a failed
    release restores those aliases (a later promotion prunes them once no alias points at them). Never fails the
    promotion around it: a failure is logged and retried at the next one."""
    from mlflow.exceptions import MlflowException

    name = settings.registered_model_name
    try:
        by_version = {str(mv.version): mv for mv in client.search_model_versions(f"name='{name}'")}
        aliased = set(current_aliases(client, name).values()) | set(held)
    except MlflowException as e:
        log.warning("retention skipped: cannot list the versions of %s: %s", name, e)
        return []
    gone = {v for v, mv in by_version.items() if RETENTION_TAG in (mv.tags or {})}
    drop = [v for v in plan_retention(list(by_version), aliased, keep) if v not in gone]
    # artifacts shared with a version that keeps its own (same logged model or run) are left alone
    kept = [mv for v, mv in by_version.items() if v not in gone and v not in drop]
    kept_sources, kept_runs = {mv.source for mv in kept}, {mv.run_id for mv in kept}
    done = []
    for v in drop:
        try:
            _delete_artifacts(client, settings, by_version[v], kept_sources, kept_runs)
            client.set_model_version_tag(name, v, RETENTION_TAG, ledger.utc_now())
            done.append(v)
        except Exception as e:
            log.warning("retention: could not delete the artifacts of %s version %s: %s", name, v, e)
    if done:
        log.info("retention: deleted the artifacts of %s versions %s (keeping the newest %d and aliased ones)",
                 name, ", ".join(done), keep)
    return done


def _delete_artifacts(client, settings: MLflowSettings, mv, kept_sources: set[str], kept_runs: set[str]) -> None:
    """The version's model artifacts (in MLflow 3, the logged model's folder `models/<model_id>/artifacts`, which
    holds the GGUF) and its source run's heavy folders."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if mv.source not in kept_sources:
        uri = client.get_model_version_download_uri(mv.name, mv.version)
        get_artifact_repository(uri, tracking_uri=settings.tracking_uri).delete_artifacts()
    if mv.run_id and mv.run_id not in kept_runs:
        repo = get_artifact_repository(client.get_run(mv.run_id).info.artifact_uri, tracking_uri=settings.tracking_uri)
        for f in repo.list_artifacts():
            if f.path in HEAVY_RUN_ARTIFACTS:
                repo.delete_artifacts(f.path)
