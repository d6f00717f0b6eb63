"""Stage 6, deploy: the knowledge base (Milvus) and the model (Ollama), staged and health-checked.

    erpops deploy --run-dir .erpops/runs/<run>
    erpops rollback

Staging order: the new collection is written and queried before its alias moves; the Ollama release
is created and answers before `latest` moves. If Ollama fails after the knowledge base switched, the
alias goes back. No Ollama server at the configured host is not a failure: that half is skipped, with
the reason and the bundle (GGUF + Modelfile) to import by hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

from deployment.modelfile import ModelfileSpec
from deployment.ollama_deploy import OllamaRelease, deploy_to_ollama, ollama_host, point_serving_tag, reachable
from deployment.vector_store import KBRelease, alias_target, deploy_knowledge_base, drop_alias, open_milvus, point_alias
from erpops.config import DeployConfig

log = logging.getLogger(__name__)


def registered_bundle(tracking_uri: str, model_name: str, version: str, dest: Path) -> tuple[Path, ModelfileSpec]:
    """A registered version's GGUF (downloaded under `dest`) and its Modelfile settings, read off the GGUF's own
    tokenizer: what a release deploys is what the registry holds, whoever built it."""
    import mlflow
    from transformers import AutoTokenizer

    from deployment.modelfile import modelfile_spec

    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dest)))
    found = sorted(local.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"{model_name} version {version} holds no GGUF among its model artifacts ({local})")
    gguf = found[0]
    return gguf, modelfile_spec(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def deploy_model(cfg: DeployConfig, version: str, gguf_path: Path, spec: ModelfileSpec) -> tuple[OllamaRelease | None, str | None]:
    """The Ollama half: (release, None), or (None, reason) when no server answers at the host."""
    host = ollama_host(cfg.ollama_host)
    if not reachable(host):
        reason = f"no Ollama server answered at {host}; bundle to import by hand: {gguf_path.parent} (ollama create -f Modelfile)"
        log.warning("ollama: %s", reason)
        return None, reason
    return deploy_to_ollama(host, cfg.ollama_model, version, gguf_path, spec, cfg.ollama_timeout_s), None


def revert_knowledge_base(kb: KBRelease) -> None:
    """Undo a knowledge-base switch: the alias goes back (the new collection stays for inspection)."""
    if kb.previous_collection:
        point_alias(kb.uri, kb.alias, kb.previous_collection)
    else:
        drop_alias(kb.uri, kb.alias)


def rollback_release(cfg: DeployConfig, version: str, tags: dict[str, str]) -> dict[str, str]:
    """Point the collection alias and the Ollama serving tag back at `version`'s release; if the Ollama
    half fails after the alias moved, the alias goes back too."""
    done = {}
    collection = tags.get("deploy.collection")
    before = None
    if collection:
        with open_milvus(cfg.milvus_uri) as client:
            before = alias_target(client, cfg.collection_alias)
        point_alias(cfg.milvus_uri, cfg.collection_alias, collection)
        done["collection"] = collection
    host = ollama_host(cfg.ollama_host)
    if tags.get("deploy.ollama_release") and reachable(host):
        try:
            done["ollama"] = point_serving_tag(host, cfg.ollama_model, version, cfg.ollama_timeout_s)
        except BaseException:
            if before and before != collection:
                point_alias(cfg.milvus_uri, cfg.collection_alias, before)
            raise
    else:
        done["ollama"] = f"skipped: no Ollama release recorded or no server at {host}"
    return done
