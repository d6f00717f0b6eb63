"""Stage 6, release: the model (Ollama) and its knowledge base (Milvus) built as one release and switched into
an environment together; rolled back together.

    erpops deploy --env staging [--version V]        # build a release of V (default: the champion), switch
    erpops promote-env staging prod --reason "..."   # prod gets the release staging serves; nothing rebuilt
    erpops rollback --env prod [--reason "..."]      # prod back to what it served before
    erpops releases [--env prod]                     # what serves where; every switch

Order: prepare both halves (a new collection written in full, loaded and scored on the golden queries; the
GGUF uploaded with its sha256 checked, `<model>:<release>` created and answering the golden prompts), then
switch both (the env's collection alias, then its Ollama tags `:<env>` / `:<env>-previous`, then the env's
alias in the MLflow registry). A failure while preparing drops what was built; a failure in the second or
third switch puts the earlier ones back. Each switch is written to the release ledger as `switching` first,
so a process that dies between the two halves leaves a trace that `reconcile` undoes at the next command.
No Ollama server at the environment's host is not a failure: that half is skipped and said so. A release whose
Ollama half was skipped has no model on the server: switching to it creates one from the registered GGUF first
(`gguf_for`), and until then a switch, undo or reconcile deletes the env tag it would have copied. Work after a
switch that happened (retention) is never a failed release: it is a warning on the outcome.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from deployment.canaries import CanaryLedger
from deployment.modelfile import ModelfileSpec
from deployment.ollama_deploy import (HEALTH_PROMPTS, delete_tag, held_tags, ollama_host, prepare_model, reachable,
                                      set_env_tags)
from deployment.releases import (Release, ReleaseLedger, collection_name, corpus_digest, env_stack, new_release_id,
                                 pending_switch, utc_now)
from deployment.vector_store import (KBBuild, alias_target, build_collection, collect_collections, drop_alias, drop_collection,
                                     open_milvus, point_alias)
from erpops.config import DeployConfig, MLflowSettings
from erpops.runtime import file_lock
from erpops.stage_cache import digest_file

log = logging.getLogger(__name__)


class ReleaseError(RuntimeError):
    """A release step that failed; `stage` says which (deploy_kb, deploy_ollama, switch), `outcome` what was done."""

    def __init__(self, stage: str, message: str, outcome: "ReleaseOutcome"):
        super().__init__(message)
        self.stage, self.outcome = stage, outcome


@dataclass(frozen=True)
class EnvTarget:
    """One environment, resolved: where its model is served and which alias its RAG service reads."""

    name: str
    host: str
    alias: str
    requires_reason: bool


@dataclass
class ReleaseOutcome:
    env: str
    action: str
    release: Release | None = None
    previous: str | None = None
    """Release the environment served before."""
    kb: KBBuild | None = None
    ollama: str | None = None
    """The release tag, or `skipped: <why>`."""
    health: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    collected: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    """What failed after the switch happened (retention): the release serves all the same."""

    @property
    def ollama_skipped(self) -> bool:
        """No Ollama server answered: the knowledge base switched alone and `ollama` says where the files are."""
        return (self.ollama or "").startswith("skipped")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kb"] = asdict(self.kb) if self.kb else None
        return d


def env_target(cfg: DeployConfig, env: str) -> EnvTarget:
    if env not in cfg.environments:
        raise ValueError(f"unknown environment {env!r}; configured: {', '.join(cfg.environments)}")
    e = cfg.environments[env]
    return EnvTarget(env, ollama_host(e.ollama_host or cfg.ollama_host), e.collection_alias or f"{cfg.collection_alias}_{env}",
                     e.requires_reason)


@contextlib.contextmanager
def release_lock(settings: MLflowSettings):
    """One release operation at a time per store (a build never races another command's clean-up)."""
    from registry.ledger import ledger_path

    with file_lock(Path(str(ledger_path(settings)) + ".release.lock")):
        yield


def registered_bundle(tracking_uri: str, model_name: str, version: str, dest: Path) -> tuple[Path, ModelfileSpec]:
    """A registered version's GGUF (downloaded under `dest`) and its Modelfile settings, read off the GGUF's own
    tokenizer: what a release deploys is what the registry holds, whoever built it."""
    import mlflow
    from transformers import AutoTokenizer

    from deployment.modelfile import modelfile_spec

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)  # else an inherited MLFLOW_REGISTRY_URI names another store
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dest)))
    found = sorted(local.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"{model_name} version {version} holds no GGUF among its model artifacts ({local})")
    gguf = found[0]
    return gguf, modelfile_spec(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def modelfile_digest(spec: ModelfileSpec, gguf_name: str) -> str:
    return hashlib.sha256(spec.render(gguf_name).encode()).hexdigest()


def release_version(cfg: DeployConfig, settings: MLflowSettings, env: str, version: str, gguf: Path, spec: ModelfileSpec,
                    docs: list[dict], golden: list[dict] | None, actor: str, reason: str = "",
                    expected_sha256: str | None = None) -> ReleaseOutcome:
    """Build a release of `version` (its GGUF and Modelfile settings given) with a new knowledge-base collection
    from `docs`, then switch `env` to it. Raises ReleaseError; then what serves `env` is what served before."""
    target = env_target(cfg, env)
    ledger = ReleaseLedger(settings)
    with release_lock(settings):
        out = _build(cfg, settings, target, ledger, version, gguf, spec, docs, golden, actor, expected_sha256)
        try:
            _switch(cfg, settings, target, ledger, out, "deploy", actor, reason)
        except ReleaseError:
            _drop_if_put_back(cfg, target, ledger, out)
            raise
        _collect_after_switch(cfg, settings, out)
    return out


def prepare_release(cfg: DeployConfig, settings: MLflowSettings, env: str, version: str, gguf: Path,
                    spec: ModelfileSpec, docs: list[dict], golden: list[dict] | None, actor: str,
                    expected_sha256: str | None = None) -> ReleaseOutcome:
    """Build a release of `version` for `env` exactly as `release_version` does (collection scored on the golden
    queries, Ollama tag answering the health prompts, the release in the ledger) and switch nothing: `env` keeps
    serving what it served. A canary (deployment/rollout.py) routes part of the traffic to it, then
    `switch_release` makes it the environment's release."""
    target = env_target(cfg, env)
    ledger = ReleaseLedger(settings)
    with release_lock(settings):
        out = _build(cfg, settings, target, ledger, version, gguf, spec, docs, golden, actor, expected_sha256)
        out.action = "prepare"
    return out


def switch_release(cfg: DeployConfig, settings: MLflowSettings, env: str, release_id: str, actor: str,
                   reason: str = "", gguf_for=None) -> ReleaseOutcome:
    """Switch `env` to a release already built (a canary's): its collection must exist and its Ollama tag answer
    the health prompts on env's host first; then both halves and the registry alias move, as for `deploy`."""
    target = env_target(cfg, env)
    ledger = ReleaseLedger(settings)
    with release_lock(settings):
        reconcile(cfg, settings, target, actor)
        current, _ = ledger.serving(env)
        if current == release_id:
            raise ValueError(f"{env} already serves {release_id}")
        out = ReleaseOutcome(env, "deploy", release=ledger.release(release_id), previous=current)
        _ensure_model(cfg, target, out, gguf_for, _failer(ledger, out, target, release_id, current, actor))
        _switch(cfg, settings, target, ledger, out, "deploy", actor, reason)
        _collect_after_switch(cfg, settings, out)
    return out


def _build(cfg: DeployConfig, settings: MLflowSettings, target: EnvTarget, ledger: ReleaseLedger, version: str,
           gguf: Path, spec: ModelfileSpec, docs: list[dict], golden: list[dict] | None, actor: str,
           expected_sha256: str | None) -> ReleaseOutcome:
    """Both halves of a new release, prepared and recorded in the ledger (called under the release lock)."""
    reconcile(cfg, settings, target, actor)
    current, _ = ledger.serving(target.name)
    out = ReleaseOutcome(target.name, "deploy", previous=current)
    sha = digest_file(gguf)
    release_id = new_release_id(version)
    coll = collection_name(cfg.collection_alias, release_id)
    fail = _failer(ledger, out, target, release_id, current, actor)
    if expected_sha256 and sha != expected_sha256:
        fail("deploy_kb", f"{gguf}: sha256 {sha} is not the registered version's {expected_sha256}")
    t0 = time.perf_counter()
    try:
        out.kb = build_collection(cfg, docs, coll, golden)
    except Exception as e:
        fail("deploy_kb", f"knowledge base {coll}: {e}")
    out.seconds.update({f"kb_{k}": v for k, v in (out.kb.seconds or {}).items()}, kb=time.perf_counter() - t0)
    t0 = time.perf_counter()
    try:
        tag = _prepare_ollama(cfg, target, release_id, gguf, sha, spec, out)
    except Exception as e:
        drop_collection(cfg.milvus_uri, coll)
        fail("deploy_ollama", f"Ollama release {cfg.ollama_model}:{release_id} on {target.host}: {e}")
    out.seconds["ollama"] = time.perf_counter() - t0
    out.release = Release(release_id, settings.registered_model_name, version, sha, modelfile_digest(spec, gguf.name),
                          coll, cfg.embedding_model, corpus_digest(docs), tag or f"{cfg.ollama_model}:{release_id}",
                          _now(), actor)
    ledger.add_release(out.release)
    return out


def _drop_built(cfg: DeployConfig, target: EnvTarget, out: ReleaseOutcome) -> None:
    drop_collection(cfg.milvus_uri, out.release.collection)
    if out.ollama and not out.ollama_skipped and reachable(target.host):
        delete_tag(target.host, out.release.ollama_tag)


def _drop_if_put_back(cfg: DeployConfig, target: EnvTarget, ledger: ReleaseLedger, out: ReleaseOutcome) -> None:
    """After a switch that failed: when it was put back, what was built for it serves nowhere and is dropped. When
    its undo failed too (the `switching` event is still last) the alias may still point at it: the next command's
    reconcile puts the environment back and retention drops it then. Best effort: the switch's error is the one
    the caller reports."""
    if pending_switch(ledger.events(), target.name) is not None:
        return
    try:
        _drop_built(cfg, target, out)
    except Exception as e:
        log.warning("release %s: could not drop %s after its switch failed (%s); retention drops it later",
                    target.name, out.release.release_id, e)


def _collect_after_switch(cfg: DeployConfig, settings: MLflowSettings, out: ReleaseOutcome) -> None:
    """Retention after a switch that happened: a failure here is a warning on the outcome, never a failed release
    (the new release serves; the next release collects again)."""
    try:
        out.collected = collect(cfg, settings)
    except Exception as e:
        out.warnings.append(f"retention after the switch failed: {type(e).__name__}: {e}")
        log.warning("release %s: %s", out.env, out.warnings[-1])


def import_release(cfg: DeployConfig, settings: MLflowSettings, env: str, bundle: Path, actor: str,
                   reason: str = "") -> ReleaseOutcome:
    """Serve a release carried in as a bundle (deployment.bundle): every checksum verified first, then its
    collection written from the bundled rows (no embedding run), its GGUF created in Ollama, and `env` switched."""
    import dataclasses

    from deployment.bundle import BundleError, open_bundle, read_kb_rows
    from deployment.milvus import EMBEDDERS
    from deployment.vector_store import nearest_self_check, write_collection

    target = env_target(cfg, env)
    ledger = ReleaseLedger(settings)
    with tempfile.TemporaryDirectory(prefix="erpops-bundle-") as tmp:
        release, spec, manifest, folder = open_bundle(bundle, Path(tmp))  # BundleError before anything is written
        if release.embedding_model not in EMBEDDERS and not Path(release.embedding_model).is_dir():
            raise BundleError(f"{bundle}: its knowledge base was embedded with {release.embedding_model!r}, which this "
                              f"machine does not have (one of {', '.join(EMBEDDERS)}, or a local SentenceTransformer "
                              f"folder): the chat could not embed questions for it; nothing imported")
        release = dataclasses.replace(release, model=settings.registered_model_name,
                                      ollama_tag=f"{cfg.ollama_model}:{release.release_id}")
        with release_lock(settings):
            reconcile(cfg, settings, target, actor)
            current, _ = ledger.serving(env)
            out = ReleaseOutcome(env, "deploy", release=release, previous=current)
            fail = _failer(ledger, out, target, release.release_id, current, actor)
            known = {r.release_id for r in ledger.releases()}
            with open_milvus(cfg.milvus_uri) as client:
                exists = client.has_collection(release.collection)
            t0 = time.perf_counter()
            built = False
            if not exists:
                rows = read_kb_rows(folder)
                try:
                    write_collection(cfg.milvus_uri, release.collection, rows, nearest_self_check(release.collection, rows))
                    built = True
                except Exception as e:
                    fail("deploy_kb", f"knowledge base {release.collection} from {bundle}: {e}")
            elif release.release_id not in known:
                fail("deploy_kb", f"collection {release.collection} exists but no release of this store owns it")
            out.seconds["kb"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                _prepare_ollama(cfg, target, release.release_id, folder / "model.gguf", release.gguf_sha256, spec, out,
                                where=bundle)  # the unpacked folder goes when this returns; the bundle stays
            except Exception as e:
                if built:
                    drop_collection(cfg.milvus_uri, release.collection)
                fail("deploy_ollama", f"Ollama release {release.ollama_tag} on {target.host}: {e}")
            out.seconds["ollama"] = time.perf_counter() - t0
            if release.release_id not in known:
                ledger.add_release(release)
            why = f"bundle {bundle.name}: {reason}".rstrip(": ")
            try:
                _switch(cfg, settings, target, ledger, out, "deploy", actor, why)
            except ReleaseError:
                if built:
                    _drop_if_put_back(cfg, target, ledger, out)
                raise
    return out


def promote_env(cfg: DeployConfig, settings: MLflowSettings, source: str, env: str, actor: str, reason: str,
                gguf_for: "callable | None" = None) -> ReleaseOutcome:
    """Switch `env` to the release `source` serves: the same collection, the same GGUF (created on env's Ollama
    host if it lacks it, from `gguf_for(release)` -> (path, spec)), health-checked there first."""
    target, src = env_target(cfg, env), env_target(cfg, source)
    if target.requires_reason and not reason.strip():
        raise ValueError(f"switching {env} needs --reason (recorded with who approved it)")
    ledger = ReleaseLedger(settings)
    with release_lock(settings):
        reconcile(cfg, settings, src, actor)
        reconcile(cfg, settings, target, actor)
        release_id, _ = ledger.serving(source)
        if release_id is None:
            raise ValueError(f"{source} serves no release yet; nothing to promote to {env}")
        current, _ = ledger.serving(env)
        if current == release_id:
            raise ValueError(f"{env} already serves {release_id}")
        out = ReleaseOutcome(env, "promote-env", release=ledger.release(release_id), previous=current)
        _ensure_model(cfg, target, out, gguf_for, _failer(ledger, out, target, release_id, current, actor))
        _switch(cfg, settings, target, ledger, out, "promote-env", actor, f"approved by {actor}: {reason}".strip())
    return out


def rollback_env(cfg: DeployConfig, settings: MLflowSettings, env: str, actor: str, reason: str = "",
                 gguf_for=None) -> ReleaseOutcome:
    """Switch `env` back to the release it served before the current one (model, collection, registry alias)."""
    target = env_target(cfg, env)
    ledger = ReleaseLedger(settings)
    with release_lock(settings):
        reconcile(cfg, settings, target, actor)
        stack = env_stack(ledger.events(), env)
        if len(stack) < 2:
            raise ValueError(f"{env} has no earlier release to roll back to (releases: {stack or 'none'})")
        out = ReleaseOutcome(env, "rollback", release=ledger.release(stack[-2]), previous=stack[-1])
        _ensure_model(cfg, target, out, gguf_for, _failer(ledger, out, target, stack[-2], stack[-1], actor))
        _switch(cfg, settings, target, ledger, out, "rollback", actor, reason)
    return out


def rollback_serving(cfg: DeployConfig, settings: MLflowSettings, env: str, actor: str, reason: str = "",
                     gguf_for=None) -> tuple[ReleaseOutcome, str | None, str | None]:
    """`rollback_env`, and in the release environment (where champions go) the champion goes back with it when it
    is what the environment serves. Returns (outcome, champion after, why the champion stayed or None). If
    serving cannot follow, whatever the error, the registry's aliases are put back and the error re-raised."""
    from registry.promote import read_champion, restore_aliases, rollback_registry

    target = env_target(cfg, env)
    plan, stayed = None, None
    ledger = ReleaseLedger(settings)
    current, _ = ledger.serving(target.name)
    serving_version = ledger.release(current).model_version if current else None
    if target.name == cfg.release_env and serving_version and read_champion(settings).version == serving_version:
        try:
            _, plan = rollback_registry(settings, reason)
        except ValueError as e:
            stayed = str(e)
    try:
        out = rollback_env(cfg, settings, target.name, actor, reason, gguf_for=gguf_for)
    except BaseException as e:
        if plan is not None:
            try:
                restore_aliases(settings, plan, (settings.aliases.champion, settings.aliases.previous),
                                reason=f"rollback of {target.name} undone: serving could not follow: {e}")
            except Exception as undo:
                log.error("registry: could not put the aliases back after the rollback of %s failed (%s)",
                          target.name, undo)
        raise
    return out, read_champion(settings).version, stayed


@dataclass
class RegistryGGUF:
    """A `gguf_for` that fetches from the registry: for a release whose Ollama tag an environment's host lacks, its
    GGUF and Modelfile settings, downloaded into a temporary folder. `_ensure_model` discards the folder once the
    model is created from it (or failed to be); a caller that uses the files itself calls `discard()` when done."""

    settings: MLflowSettings
    folders: list[Path] = field(default_factory=list)

    def __call__(self, release: Release) -> tuple[Path, ModelfileSpec]:
        folder = Path(tempfile.mkdtemp(prefix=f"release-{release.release_id}-"))
        self.folders.append(folder)
        return registered_bundle(self.settings.tracking_uri, self.settings.registered_model_name,
                                 release.model_version, folder)

    def discard(self) -> None:
        """Remove every folder fetched into so far."""
        while self.folders:
            shutil.rmtree(self.folders.pop(), ignore_errors=True)


def registry_gguf_fetcher(settings: MLflowSettings) -> RegistryGGUF:
    """For a release whose Ollama tag an environment's host lacks: a function fetching its GGUF from the registry."""
    return RegistryGGUF(settings)


def reconcile(cfg: DeployConfig, settings: MLflowSettings, target: EnvTarget, actor: str) -> str | None:
    """If a switch of this environment stopped half-way (a `switching` event with nothing after it), put the
    collection alias, the Ollama tags and the registry alias back to what the ledger says serves. Returns what
    was done, or None when there was nothing to do."""
    ledger = ReleaseLedger(settings)
    events = ledger.events()
    pending = pending_switch(events, target.name)
    if pending is None:
        return None
    stack = env_stack(events, target.name)
    current = ledger.release(stack[-1]) if stack else None
    previous = ledger.release(stack[-2]) if len(stack) > 1 else None
    _apply(cfg, settings, target, current, previous)
    note = (f"switch to {pending.release_id} stopped half-way ({pending.at}); "
            f"put back to {current.release_id if current else 'nothing'}")
    ledger.event(target.name, "reconcile", current.release_id if current else None, pending.release_id, actor, note)
    log.warning("release %s: %s", target.name, note)
    return note


PREPARED_GRACE_S = 900.0
"""A release built and never named by any event since (`prepare_release`: a canary about to start) is kept this
long: `start_canary` writes the canary's start under the canary lock, after the build let go of the release lock,
and a retention run in between must not drop what the canary is about to route to."""


def collect(cfg: DeployConfig, settings: MLflowSettings) -> dict[str, list[str]]:
    """Drop what no environment can go back to: collections (and Ollama release tags) of releases that are neither
    the current nor the previous one of any environment, beyond the newest `keep_releases`; and leftovers of
    builds that never switched (a crashed run, an aborted canary); a running canary's release is kept, and so is
    a build no event names yet for PREPARED_GRACE_S (a canary's, about to start). Unloads
    collections no alias points at except each env's previous one, which stays loaded: requests in flight drain
    from it and a rollback switches back at once."""
    ledger, canaries = ReleaseLedger(settings), CanaryLedger(settings)
    events, releases = ledger.events(), ledger.releases()
    stacks = {env: env_stack(events, env) for env in cfg.environments}
    keep_ids = {rid for stack in stacks.values() for rid in stack[-2:]}
    switched_ids = {e.release_id for e in events if e.action in ("deploy", "promote-env", "rollback")}
    switched = [r for r in releases if r.release_id in switched_ids]
    keep_ids.update(r.release_id for r in switched[-cfg.keep_releases:])
    keep_ids.update(s.release_id for s in (canaries.state(env) for env in cfg.environments) if s and s.active)
    named = {e.release_id for e in events} | {e.from_release for e in events}
    now = utc_now()
    keep_ids.update(r.release_id for r in releases if r.release_id not in named and
                    (now - datetime.fromisoformat(r.created_at)).total_seconds() < PREPARED_GRACE_S)
    keep_collections = {r.collection for r in releases if r.release_id in keep_ids}
    dropped = collect_collections(cfg.milvus_uri, cfg.collection_alias, keep_collections, keep_newest=0)
    hosts = {env_target(cfg, env).host for env in cfg.environments}
    tags = []
    for r in releases:
        if r.release_id not in keep_ids and r.collection in dropped:
            for host in hosts:
                if reachable(host) and delete_tag(host, r.ollama_tag):
                    tags.append(f"{host}/{r.ollama_tag}")
    by_id = {r.release_id: r for r in releases}
    previous_collections = {by_id[stack[-2]].collection for stack in stacks.values() if len(stack) > 1}
    unloaded = _unload_idle(cfg.milvus_uri, cfg.collection_alias, previous_collections)
    return {"collections_dropped": dropped, "ollama_tags_deleted": tags, "collections_unloaded": unloaded}


# ---- internals ------------------------------------------------------------------------------------------------

def _now() -> str:
    return utc_now().isoformat(timespec="seconds")


def _prompts(cfg: DeployConfig) -> list[dict]:
    return [p.model_dump() for p in cfg.health_prompts] or list(HEALTH_PROMPTS)


def _failer(ledger: ReleaseLedger, out: ReleaseOutcome, target: EnvTarget, release_id: str, current: str | None, actor: str):
    def fail(stage: str, message: str):
        ledger.event(target.name, "failed", release_id, current, actor, f"{stage}: {message}")
        raise ReleaseError(stage, message, out)
    return fail


def _prepare_ollama(cfg: DeployConfig, target: EnvTarget, release_id: str, gguf: Path, sha: str, spec: ModelfileSpec,
                    out: ReleaseOutcome, where: Path | None = None) -> str | None:
    """`where`: what to point the user at when the server does not answer (default: the GGUF's folder)."""
    if not reachable(target.host):
        out.ollama = (f"skipped: no Ollama server answered at {target.host}; bundle to import by hand: "
                      f"{where or gguf.parent}")
        log.warning("ollama: %s", out.ollama)
        return None
    prepared = prepare_model(target.host, cfg.ollama_model, release_id, gguf, sha, spec,
                             _prompts(cfg), cfg.health_max_latency_s, cfg.ollama_timeout_s)
    out.ollama, out.health = prepared.tag, [asdict(h) for h in prepared.health]
    out.seconds.update({f"ollama_{k}": v for k, v in prepared.seconds.items()})
    return prepared.tag


def _ensure_model(cfg: DeployConfig, target: EnvTarget, out: ReleaseOutcome, gguf_for, fail) -> None:
    """Before switching to an existing release: its collection must still exist and its Ollama tag must exist and
    answer on the env's host (created there from the registered GGUF when missing)."""
    r = out.release
    with open_milvus(cfg.milvus_uri) as client:
        if not client.has_collection(r.collection):
            fail("deploy_kb", f"collection {r.collection} of release {r.release_id} no longer exists")
    if not reachable(target.host):
        out.ollama = f"skipped: no Ollama server answered at {target.host}"
        return
    try:
        import ollama

        from deployment.ollama_deploy import health_check, tag_digest

        if tag_digest(ollama.Client(host=target.host, timeout=30), r.ollama_tag) is None:
            if gguf_for is None:
                raise RuntimeError(f"{r.ollama_tag} is not on {target.host} and no GGUF was given to create it")
            try:
                gguf, spec = gguf_for(r)
                prepare_model(target.host, cfg.ollama_model, r.release_id, gguf, r.gguf_sha256, spec,
                              _prompts(cfg), cfg.health_max_latency_s, cfg.ollama_timeout_s)
            finally:  # the model is on the server now (or failed): the downloaded GGUF is not needed
                if isinstance(gguf_for, RegistryGGUF):
                    gguf_for.discard()
        else:
            health_check(ollama.Client(host=target.host, timeout=cfg.ollama_timeout_s), r.ollama_tag,
                         _prompts(cfg), cfg.health_max_latency_s)
        out.ollama = r.ollama_tag
    except Exception as e:
        fail("deploy_ollama", f"{r.ollama_tag} on {target.host}: {e}")


def _switch(cfg: DeployConfig, settings: MLflowSettings, target: EnvTarget, ledger: ReleaseLedger, out: ReleaseOutcome,
            action: str, actor: str, reason: str) -> None:
    """Both halves and the registry alias, or none: the ledger gets `switching` first and the switch last."""
    t0 = time.perf_counter()
    events = ledger.events()
    stack = env_stack(events, target.name)
    current = ledger.release(stack[-1]) if stack else None
    if action == "rollback":
        previous = ledger.release(stack[-3]) if len(stack) > 2 else None
    else:
        previous = current
    ledger.event(target.name, "switching", out.release.release_id, current.release_id if current else None, actor, reason)
    try:
        _apply(cfg, settings, target, out.release, previous, ollama=not out.ollama_skipped)
    except BaseException as e:
        try:
            _apply(cfg, settings, target, current, ledger.release(stack[-2]) if len(stack) > 1 else None)
            ledger.event(target.name, "failed", out.release.release_id, current.release_id if current else None, actor,
                         f"switch: {e}; put back to {current.release_id if current else 'nothing'}")
        except BaseException as undo:  # the next command's reconcile tries again (the `switching` event stays last)
            log.error("release %s: could not put the switch back (%s); `erpops releases` will reconcile", target.name, undo)
        if isinstance(e, Exception):
            raise ReleaseError("switch", f"switch of {target.name} to {out.release.release_id}: {e}", out) from e
        raise
    ledger.event(target.name, action, out.release.release_id, current.release_id if current else None, actor, reason)
    out.seconds["switch"] = time.perf_counter() - t0
    log.info("release %s: %s -> %s (%s)", target.name, current.release_id if current else "-", out.release.release_id, action)


def _apply(cfg: DeployConfig, settings: MLflowSettings, target: EnvTarget, current: Release | None,
           previous: Release | None, ollama: bool = True) -> None:
    """Make the environment serve `current` (None: nothing): alias, Ollama tags, registry alias, in that order.
    `<env>` and `<env>-previous` become copies of the two releases' tags where the env's server holds them, and are
    deleted where it does not (a release whose Ollama half was skipped, a tag retention dropped): a tag that is not
    there is never copied, so no switch, undo or reconcile fails on it."""
    if current is None:
        drop_alias(cfg.milvus_uri, target.alias)
    else:
        point_alias(cfg.milvus_uri, target.alias, current.collection)
    if ollama and reachable(target.host):
        held = held_tags(target.host, cfg.ollama_timeout_s)
        current_tag, previous_tag = (r.ollama_tag if r is not None and r.ollama_tag in held else None
                                     for r in (current, previous))
        set_env_tags(target.host, cfg.ollama_model, target.name, current_tag, previous_tag, cfg.ollama_timeout_s)
    _set_registry_alias(settings, target.name, current.model_version if current else None,
                        current.gguf_sha256 if current else None)


def _set_registry_alias(settings: MLflowSettings, alias: str, version: str | None, gguf_sha256: str | None = None) -> None:
    """The registry alias `<env>` follows what the environment serves. A bundle imported into a store whose registry
    lacks its version (a closed network) leaves the alias alone: there is nothing there to point at; so does one
    whose version number this registry gave to another model (its `gguf_sha256` tag names another GGUF)."""
    from registry.promote import _client, registered_version

    client = _client(settings)
    found = registered_version(settings, version) if version is not None else None
    if version is not None and found is None:
        log.info("registry: %s has no version %s; alias %s not moved", settings.registered_model_name, version, alias)
        return
    if found is not None and gguf_sha256 is not None and (found.tags or {}).get("gguf_sha256", gguf_sha256) != gguf_sha256:
        log.warning("registry: %s version %s here is another model than the release's (gguf_sha256 differs); alias "
                    "%s not moved", settings.registered_model_name, version, alias)
        return
    if version is None:
        with contextlib.suppress(Exception):
            client.delete_registered_model_alias(settings.registered_model_name, alias)
    else:
        client.set_registered_model_alias(settings.registered_model_name, alias, version)


def _unload_idle(uri: str, prefix: str, keep_loaded: set[str]) -> list[str]:
    unloaded = []
    with open_milvus(uri) as client:
        for name in client.list_collections():
            if not name.startswith(f"{prefix}_") or name in keep_loaded:
                continue
            if client.list_aliases(collection_name=name).get("aliases"):
                continue
            state = str(client.get_load_state(name).get("state", ""))
            if "Loaded" in state:
                client.release_collection(name)
                unloaded.append(name)
    return unloaded


def current_collections(cfg: DeployConfig, envs: Sequence[str]) -> dict[str, str | None]:
    """env -> the collection its alias points at now (what the RAG service reads)."""
    with open_milvus(cfg.milvus_uri) as client:
        return {env: alias_target(client, env_target(cfg, env).alias) for env in envs}
