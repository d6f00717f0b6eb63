"""The model catalogue of the API: registered versions joined with the release ledger and what Ollama holds.

A model id is a registered version (`v3`, or `3`) or an environment name (`staging`: whatever serves there).
Each id resolves to the Ollama tag that answers for it: the environment's tag where the version serves, else the
newest release built for it; a version never released has no tag (it cannot be started or tested until
`erpops deploy --env dev --version N` releases it).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from deployment.releases import Release, ReleaseEvent, ReleaseLedger, env_stack, pending_switch
from erpops.config import DeployConfig, MLflowSettings


class RegistryUnavailable(Exception):
    """The model registry did not answer (the API's 503): no version can be told known or unknown."""


class UnknownModel(LookupError):
    """No registered version or environment of that id."""


@dataclass
class ModelRef:
    id: str
    """As asked (`v3` or an environment name), normalised (`3` -> `v3`)."""
    version: str | None
    """Registered model version (None: an environment that serves nothing yet)."""
    tag: str | None
    """Ollama tag that answers for this id; None when no release of it exists."""
    release_id: str | None
    """Release behind that tag."""
    envs: dict[str, str] = field(default_factory=dict)
    """Environments where this version is the current or previous release: {env: "current" | "previous"}."""
    switching: bool = False
    """For an environment id: a switch of it is under way (the ledger's last event of it is `switching`), so its
    Ollama tag and collection alias may already be the next release's."""
    ledger_events: int = 0
    """For an environment id: how many ledger events it had when this ref was read (every switch adds some)."""
    embedding_model: str | None = None
    """Embedder of the release's knowledge base (its questions must be embedded with it); None: no release."""

    def to_dict(self) -> dict:
        return asdict(self)


def env_roles(events: list[ReleaseEvent], envs: list[str]) -> dict[str, tuple[str | None, str | None]]:
    """{env: (current release id, previous release id)} replayed from the ledger's events."""
    out = {}
    for env in envs:
        stack = env_stack(events, env)
        out[env] = (stack[-1] if stack else None, stack[-2] if len(stack) > 1 else None)
    return out


def _version_of(release_id: str | None, releases: dict[str, Release]) -> str | None:
    return releases[release_id].model_version if release_id in releases else None


def resolve(model_id: str, cfg: DeployConfig, releases: list[Release], events: list[ReleaseEvent],
            versions: set[str], prefer_env: str | None = None) -> ModelRef:
    """A pure function from the ledger (and the registry's version numbers) to the ref of `model_id`."""
    by_id = {r.release_id: r for r in releases}
    roles = env_roles(events, list(cfg.environments))
    if model_id in cfg.environments:
        current = roles[model_id][0]
        version = _version_of(current, by_id)
        return ModelRef(model_id, version, f"{cfg.ollama_model}:{model_id}" if current else None, current,
                        {model_id: "current"} if current else {}, pending_switch(events, model_id) is not None,
                        sum(e.env == model_id for e in events), _embedder_of(current, by_id))
    m = re.fullmatch(r"v?(\d+)", model_id.strip())
    if not m or m.group(1) not in versions:
        known = ", ".join(f"v{v}" for v in sorted(versions, key=int)) or "none registered"
        raise UnknownModel(f"unknown model id {model_id!r}: use a version ({known}) or an environment "
                           f"({', '.join(cfg.environments)})")
    version = m.group(1)
    envs = {}
    for env, (current, previous) in roles.items():
        if _version_of(current, by_id) == version:
            envs[env] = "current"
        elif _version_of(previous, by_id) == version:
            envs[env] = "previous"
    serving_in = [e for e, role in envs.items() if role == "current"]
    if serving_in:
        env = prefer_env if prefer_env in serving_in else serving_in[0]
        return ModelRef(f"v{version}", version, f"{cfg.ollama_model}:{env}", roles[env][0], envs,
                        embedding_model=_embedder_of(roles[env][0], by_id))
    own = [r for r in releases if r.model_version == version]
    newest = max(own, key=lambda r: r.release_id) if own else None
    return ModelRef(f"v{version}", version, newest.ollama_tag if newest else None,
                    newest.release_id if newest else None, envs,
                    embedding_model=newest.embedding_model if newest else None)


def _embedder_of(release_id: str | None, by_id: dict) -> str | None:
    release = by_id.get(release_id) if release_id else None
    return release.embedding_model if release else None


@dataclass
class Catalog:
    """Reads the registry, the ledger and Ollama on every call (they change under the service)."""

    cfg: DeployConfig
    settings: MLflowSettings

    def _ledger(self) -> tuple[list[Release], list[ReleaseEvent]]:
        ledger = ReleaseLedger(self.settings)
        return ledger.releases(), ledger.events()

    def registry(self) -> dict:
        from registry.status import registry_state

        return registry_state(self.settings)

    def version_numbers(self) -> set[str]:
        """The registered model's version numbers (one registry query; no run metrics); none for a model not
        registered yet. A registry that does not answer raises (the API's 503), so that a version that exists is
        never called unknown."""
        import mlflow
        from mlflow.exceptions import MlflowException

        client = mlflow.MlflowClient(tracking_uri=self.settings.tracking_uri, registry_uri=self.settings.tracking_uri)
        try:
            found = client.search_model_versions(f"name='{self.settings.registered_model_name}'")
        except MlflowException as e:
            raise RegistryUnavailable(f"the model registry did not answer ({e.error_code}); try again") from e
        return {str(mv.version) for mv in found}

    def resolve(self, model_id: str, prefer_env: str | None = None) -> ModelRef:
        """The ref of a model id; an environment needs only the ledger (the chat resolves one per question)."""
        releases, events = self._ledger()
        versions = set() if model_id in self.cfg.environments else self.version_numbers()
        return resolve(model_id, self.cfg, releases, events, versions, prefer_env)

    def models(self, loaded: set[str], present: set[str], prefer_env: str | None = None) -> list[dict]:
        """Every registered version, newest first, with its aliases, gate verdict, lineage, environments and
        Ollama state: loaded (in memory), available (a tag exists), absent (no release or its tag is gone)."""
        state = self.registry()
        releases, events = self._ledger()
        versions = {v["version"] for v in state["versions"]}
        out = []
        for v in state["versions"]:
            ref = resolve(v["version"], self.cfg, releases, events, versions, prefer_env)
            out.append(describe(v, ref, loaded, present))
        return out

    def detail(self, model_id: str, loaded: set[str], present: set[str], prefer_env: str | None = None) -> dict:
        state = self.registry()
        releases, events = self._ledger()
        ref = resolve(model_id, self.cfg, releases, events, {v["version"] for v in state["versions"]}, prefer_env)
        version = next((v for v in state["versions"] if v["version"] == ref.version), None)
        out = describe(version, ref, loaded, present) if version else {"id": ref.id, "version": None,
                                                                        "state": "absent", "envs": {}}
        out["releases"] = [r.to_dict() for r in releases if ref.version and r.model_version == ref.version]
        out["registry_aliases"] = state["aliases"]
        return out


LINEAGE_TAGS = ("dataset_digest", "recipe_digest", "recipe", "base_model", "git_commit", "parent_champion",
                "gguf_sha256", "run_name", "feedback_data")


def describe(version: dict, ref: ModelRef, loaded: set[str], present: set[str]) -> dict:
    tags = version.get("tags", {})
    tag = ref.tag
    state = "loaded" if tag in loaded else "available" if tag in present else "absent"
    return {"id": f"v{version['version']}", "version": version["version"], "aliases": version["aliases"],
            "gate_verdict": tags.get("gate_verdict"), "created": version["created"], "run_id": version["run_id"],
            "metrics": version["metrics"], "lineage": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
            "envs": ref.envs, "ollama_tag": tag, "release_id": ref.release_id, "state": state}
