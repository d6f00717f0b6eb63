"""The Ollama half of a release: upload the GGUF (sha256 checked), create `<name>:<release id>`, health-check
it on golden prompts, then move the environment's blue/green tags. Official `ollama` client, REST API only.

Tags: `<name>:<release id>` is what a release created; `<name>:<env>` is what the environment serves and
`<name>:<env>-previous` what it served before (both copies of release tags). After the tags move, the env tag
is unloaded: Ollama keeps a loaded model's template and weights until keep_alive ends, even when the tag now
names another model (ollama#2617), so the next request must load the new one. A release tag that fails to
create or fails its health check is deleted.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deployment.modelfile import ModelfileSpec
from erpops.stage_cache import digest_file

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
HEALTH_PROMPTS = (
    {"lang": "ko", "prompt": "ERP에서 구매 요청은 어떻게 등록하나요?"},
    {"lang": "en", "prompt": "How do I post a journal entry in the ERP?"},
)
"""Golden prompts of the health check when the recipe names none: one per language the assistant serves."""


class HealthCheckError(RuntimeError):
    pass


class UploadError(RuntimeError):
    pass


@dataclass(frozen=True)
class HealthResult:
    prompt: str
    lang: str
    answer: str
    latency_s: float
    problems: tuple[str, ...]


def ollama_host(configured: str | None) -> str:
    return configured or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST


def reachable(host: str, timeout: float = 3.0) -> bool:
    import ollama

    try:
        ollama.Client(host=host, timeout=timeout).list()
        return True
    except Exception:  # connection refused, DNS, timeout: all mean "no server here"
        return False


def answer_problems(lang: str, answer: str, latency_s: float, max_latency_s: float,
                    template_tokens: Sequence[str]) -> list[str]:
    """What is wrong with one health-check answer (empty: healthy). Pure.

    Non-empty; in the prompt's language (Hangul share of the letters, as the gate's language metric); no chat-
    template control token (a broken TEMPLATE or stop list shows there first); within the latency bound."""
    from data_contracts.rules import detect_language

    problems = []
    text = answer.strip()
    if not text:
        problems.append("empty answer")
    else:
        said = detect_language(text)
        if said != lang:
            problems.append(f"answered in {said or 'no language'}, asked in {lang}")
    leaked = [t for t in template_tokens if t in answer]
    if leaked:
        problems.append(f"template tokens in the answer: {leaked}")
    if latency_s > max_latency_s:
        problems.append(f"took {latency_s:.1f} s (bound {max_latency_s:.1f} s)")
    return problems


def health_check(client, tag: str, prompts: Sequence[dict], max_latency_s: float, num_predict: int = 32) -> list[HealthResult]:
    """Ask each golden prompt; raises HealthCheckError naming every failed prompt and why."""
    from data_contracts.checks import TEMPLATE_TOKENS

    results = []
    for p in prompts:
        t0 = time.perf_counter()
        out = client.generate(model=tag, prompt=p["prompt"], options={"num_predict": num_predict, "temperature": 0})
        latency = time.perf_counter() - t0
        text = (out.get("response") if isinstance(out, dict) else out.response) or ""
        results.append(HealthResult(p["prompt"], p["lang"], text, round(latency, 3),
                                    tuple(answer_problems(p["lang"], text, latency, max_latency_s, TEMPLATE_TOKENS))))
    bad = [r for r in results if r.problems]
    if bad:
        raise HealthCheckError(f"{tag} failed its health check: " +
                               "; ".join(f"{r.prompt!r}: {', '.join(r.problems)}" for r in bad))
    return results


def upload_gguf(client, host: str, gguf_path: Path, expected_sha256: str) -> str:
    """Upload the GGUF blob after checking the file is the one the release names, and check the server
    stored it under that digest. Returns `sha256:<hex>`."""
    import httpx

    local = digest_file(gguf_path)
    if local != expected_sha256:
        raise UploadError(f"{gguf_path}: sha256 {local} is not the release's {expected_sha256}; refusing to upload")
    digest = client.create_blob(gguf_path)
    if digest != f"sha256:{expected_sha256}":
        raise UploadError(f"{gguf_path} changed while it was uploaded ({digest} != sha256:{expected_sha256})")
    stored = httpx.head(f"{host.rstrip('/')}/api/blobs/{digest}", timeout=30)
    if stored.status_code != 200:
        raise UploadError(f"Ollama at {host} does not hold blob {digest} after the upload (HTTP {stored.status_code})")
    return digest


def tag_digest(client, tag: str) -> str | None:
    """The manifest digest of `tag` on the server, or None when it does not exist."""
    for m in client.list().models:
        if m.model == tag:
            return m.digest
    return None


def held_tags(host: str, timeout_s: float = 30.0) -> set[str]:
    """Every `name:tag` the server holds."""
    import ollama

    return {m.model for m in ollama.Client(host=host, timeout=timeout_s).list().models}


@dataclass(frozen=True)
class PreparedModel:
    tag: str
    health: list[HealthResult]
    seconds: dict
    """upload, create, health (0 for the first two when the server already had the tag)."""


def prepare_model(host: str, name: str, release_id: str, gguf_path: Path, gguf_sha256: str, spec: ModelfileSpec,
                  prompts: Sequence[dict], max_latency_s: float, timeout_s: float) -> PreparedModel:
    """Create `<name>:<release_id>` from the GGUF (unless the server already has it) and health-check it.
    On any failure the tag is deleted (if this call created it) and the error propagates."""
    import ollama

    client = ollama.Client(host=host, timeout=timeout_s)
    tag = f"{name}:{release_id}"
    created = False
    seconds = {"upload": 0.0, "create": 0.0}
    try:
        if tag_digest(client, tag) is None:
            t0 = time.perf_counter()
            digest = upload_gguf(client, host, gguf_path, gguf_sha256)
            t1 = time.perf_counter()
            created = True
            client.create(model=tag, files={gguf_path.name: digest}, template=spec.template, system=spec.system,
                          parameters=spec.ollama_parameters(), stream=False)
            seconds.update(upload=t1 - t0, create=time.perf_counter() - t1)
        t0 = time.perf_counter()
        health = health_check(client, tag, prompts, max_latency_s)
        seconds["health"] = time.perf_counter() - t0
    except BaseException:
        if created:
            delete_tag(host, tag)
        raise
    log.info("ollama: %s ready on %s, health check passed", tag, host)
    return PreparedModel(tag, health, {k: round(v, 3) for k, v in seconds.items()})


def delete_tag(host: str, tag: str, strict: bool = False, timeout_s: float = 60.0) -> bool:
    """Delete a tag if it exists; True when it was there. A tag that is not there is never an error; any other
    failure is logged and False (best effort on cleanup paths), or with `strict` raised."""
    import ollama

    client = ollama.Client(host=host, timeout=timeout_s)
    try:
        client.delete(tag)
        return True
    except ollama.ResponseError as e:
        if e.status_code == 404:
            return False
        if strict:
            raise
        log.warning("ollama: could not delete %s: %s", tag, e)
        return False
    except Exception as e:  # a cleanup must not hide the error that led to it
        if strict:
            raise
        log.warning("ollama: could not delete %s: %s", tag, e)
        return False


def set_env_tags(host: str, name: str, env: str, current: str | None, previous: str | None, timeout_s: float = 60.0) -> None:
    """Make `<name>:<env>` a copy of release tag `current` and `<name>:<env>-previous` one of `previous` (a
    None deletes the tag), then unload the env tag so the next request loads what it now names. Idempotent:
    every switch, rollback and reconcile goes through here. A tag that cannot be deleted (other than one that is
    not there) raises, as a failed copy does: `<name>:<env>` left naming the old model while the alias names the
    new release would be a switch only half made, so the caller's undo or the next reconcile has to see it."""
    import ollama

    client = ollama.Client(host=host, timeout=timeout_s)
    for dest, src in ((f"{name}:{env}-previous", previous), (f"{name}:{env}", current)):
        if src is None:
            delete_tag(host, dest, strict=True, timeout_s=timeout_s)
        else:
            client.copy(src, dest)
    if current is not None:
        unload(client, f"{name}:{env}")


def unload(client, tag: str) -> None:
    """Ask Ollama to drop `tag` from memory now (keep_alive 0 with no prompt)."""
    try:
        client.generate(model=tag, keep_alive=0)
    except Exception as e:  # not loaded, or a server that refuses: the switch has happened either way
        log.info("ollama: unload of %s: %s", tag, e)


def env_tags(host: str, name: str, env: str) -> dict[str, str | None]:
    """{`<env>`: digest, `<env>-previous`: digest} as the server has them (None: no such tag)."""
    import ollama

    client = ollama.Client(host=host, timeout=30)
    return {t: tag_digest(client, f"{name}:{t}") for t in (env, f"{env}-previous")}
