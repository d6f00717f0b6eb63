"""Ollama deployment: upload the GGUF blob, create a versioned model, health-check it, then switch the
serving tag. Uses the official `ollama` client against Ollama's REST API.

Releases are `<name>:v<version>`; users are served `<name>:latest`, which is a copy of one release.
A failed health check deletes the new release tag and leaves `latest` as it was.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from deployment.modelfile import ModelfileSpec

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
HEALTH_PROMPT = "ERP에서 구매 요청은 어떻게 등록하나요?"


class HealthCheckError(RuntimeError):
    pass


@dataclass
class OllamaRelease:
    host: str
    release_tag: str
    serving_tag: str
    digest: str
    health_answer: str


def ollama_host(configured: str | None) -> str:
    return configured or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST


def reachable(host: str, timeout: float = 3.0) -> bool:
    import ollama

    try:
        ollama.Client(host=host, timeout=timeout).list()
        return True
    except Exception:  # connection refused, DNS, timeout: all mean "no server here"
        return False


def health_check(client, tag: str) -> str:
    """A short generation must come back non-empty."""
    out = client.generate(model=tag, prompt=HEALTH_PROMPT, options={"num_predict": 24, "temperature": 0})
    text = (out.get("response") if isinstance(out, dict) else out.response) or ""
    if not text.strip():
        raise HealthCheckError(f"{tag}: empty answer to the health prompt")
    return text


def deploy_to_ollama(host: str, name: str, version: str, gguf_path: Path, spec: ModelfileSpec,
                     timeout_s: float = 300.0) -> OllamaRelease:
    import ollama

    client = ollama.Client(host=host, timeout=timeout_s)
    release = f"{name}:v{version}"
    serving = f"{name}:latest"
    digest = client.create_blob(gguf_path)
    client.create(model=release, files={gguf_path.name: digest}, template=spec.template, system=spec.system,
                  parameters=spec.ollama_parameters(), stream=False)
    try:
        answer = health_check(client, release)
    except Exception:
        client.delete(release)
        raise
    client.copy(release, serving)
    log.info("ollama: %s created, health check answered, %s now serves it", release, serving)
    return OllamaRelease(host, release, serving, digest, answer)


def point_serving_tag(host: str, name: str, version: str, timeout_s: float = 60.0) -> str:
    """Rollback: `latest` becomes a copy of an earlier release again (health-checked first)."""
    import ollama

    client = ollama.Client(host=host, timeout=timeout_s)
    release = f"{name}:v{version}"
    health_check(client, release)
    client.copy(release, f"{name}:latest")
    return release
