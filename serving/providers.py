"""LLM chat providers behind one interface, and a failover router with cooldown.

    router = Router([Deployment(build_provider(ProviderConfig(name="ollama")), None),
                     Deployment(build_provider(ProviderConfig(name="backup", kind="openai", base_url="http://h:8000/v1",
                                                              api_key_env="BACKUP_KEY")), "qwen2.5-7b")])
    reply = router.chat("erp-assistant:staging", [{"role": "user", "content": "..."}], {"num_predict": 128})

Messages are Ollama-style (`role`, `content`, optional `images`: base64 strings); options use Ollama's names
(`temperature`, `top_p`, `num_predict`, `seed`, `stop`) and each provider maps them to its own API. Every failure
surfaces as a `ProviderError` that says whether it is worth failing over (connection, timeout, 429, 5xx) or is the
caller's fault (other 4xx). The router follows LiteLLM's cooldown: a deployment that fails `allowed_fails` times in
a row is skipped for `cooldown_s`. Everything is synchronous and thread-safe; API keys never appear in messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

GEMINI_URL = "https://generativelanguage.googleapis.com/v1beta"
HEALTH_TIMEOUT_S = 10.0
_ERROR_CHARS = 300


# ---- errors and results ---------------------------------------------------------------------------
def is_retryable(status: int | None) -> bool:
    """Worth another provider: no status (connection, timeout, broken reply), 408, 429 and 5xx."""
    return status is None or status in (408, 429) or status >= 500


class ProviderError(RuntimeError):
    """A provider call failed (connection, HTTP status >= 400, malformed reply, an error inside a stream).

    `provider` names the provider, `status` is the HTTP status if any, `retryable` is True for connection errors,
    timeouts, 429 and 5xx (by default derived from `status`) and False for other 4xx, which are the caller's fault:
    failover neither counts them nor fails over on them."""

    def __init__(self, message: str, *, provider: str = "", status: int | None = None,
                 retryable: bool | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        self.retryable = is_retryable(status) if retryable is None else retryable


class AllProvidersFailed(ProviderError):
    """Every deployment failed or is cooling down; `errors` maps each one to its (last) error."""

    def __init__(self, errors: dict[str, str]) -> None:
        detail = "; ".join(f"{label}: {text}" for label, text in errors.items()) or "no deployment configured"
        super().__init__(f"all providers failed: {detail}", provider="router", retryable=True)
        self.errors = errors


@dataclass
class Reply:
    text: str
    model: str
    """Model name as the provider reported it (or as it was asked for)."""
    provider: str
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    """Wall seconds of the call (for streams: until the final chunk)."""


@dataclass
class ProviderHealth:
    provider: str
    kind: str
    ok: bool
    detail: str
    latency_s: float


class Provider(Protocol):
    name: str
    kind: str

    def chat(self, model: str, messages: list[dict], options: dict | None = None,
             timeout_s: float | None = None) -> Reply: ...

    def stream(self, model: str, messages: list[dict], options: dict | None = None,
               timeout_s: float | None = None) -> Iterator[str | Reply]:
        """Yields text deltas (str) as they arrive, then exactly one final Reply (text = the whole answer)."""
        ...

    def health(self) -> ProviderHealth: ...

    def supports_images(self, model: str) -> bool: ...


# ---- pure helpers ---------------------------------------------------------------------------------
_MAGIC = (("/9j/", "image/jpeg"), ("iVBORw0KGgo", "image/png"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"))


def image_mime(b64: str) -> str:
    """MIME type of a base64 image from its magic bytes (JPEG, PNG, GIF, WebP); PNG when unknown."""
    return next((mime for prefix, mime in _MAGIC if b64.startswith(prefix)), "image/png")


def redact(text: str, secret: str | None) -> str:
    """`text` without `secret` in it (and cut to a readable length)."""
    if secret:
        text = text.replace(secret, "***")
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS] + "..."


def error_text(body: str) -> str:
    """The message of an error body: OpenAI/Google `{"error": {"message": ...}}`, Ollama `{"error": "..."}`, a list
    of those, or the raw text."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body.strip() or "(empty body)"
    if isinstance(obj, list) and obj:
        obj = obj[0]
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err.get("status") or err)
    return str(err) if err else body.strip()


def has_images(messages: Iterable[dict]) -> bool:
    return any(m.get("images") for m in messages)


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The `data` payload of each server-sent event (multi-line data joined by newlines; comments skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def openai_options(options: dict | None) -> dict:
    """Ollama option names -> OpenAI chat completion fields; unknown keys are dropped."""
    o = options or {}
    out = {k: o[k] for k in ("temperature", "top_p", "seed", "stop") if o.get(k) is not None}
    if isinstance(o.get("num_predict"), int) and o["num_predict"] > 0:  # Ollama's -1/-2 mean "no limit"
        out["max_tokens"] = o["num_predict"]
    return out


def openai_messages(messages: list[dict]) -> list[dict]:
    """Ollama messages -> OpenAI messages; one with images becomes text + image_url content parts (data URLs)."""
    out = []
    for m in messages:
        if not m.get("images"):
            out.append({"role": m["role"], "content": m.get("content") or ""})
            continue
        parts: list[dict] = [{"type": "text", "text": m["content"]}] if m.get("content") else []
        parts += [{"type": "image_url", "image_url": {"url": f"data:{image_mime(b)};base64,{b}"}} for b in m["images"]]
        out.append({"role": m["role"], "content": parts})
    return out


def gemini_config(options: dict | None) -> dict:
    """Ollama option names -> Gemini generationConfig; unknown keys are dropped."""
    o = options or {}
    names = {"temperature": "temperature", "top_p": "topP", "top_k": "topK", "seed": "seed"}
    out = {names[k]: o[k] for k in names if o.get(k) is not None}
    if isinstance(o.get("num_predict"), int) and o["num_predict"] > 0:
        out["maxOutputTokens"] = o["num_predict"]
    if o.get("stop"):
        out["stopSequences"] = [o["stop"]] if isinstance(o["stop"], str) else list(o["stop"])
    return out


def gemini_request(messages: list[dict], options: dict | None) -> dict:
    """Ollama messages -> a generateContent body: system messages become systemInstruction, assistant -> model."""
    system = [m["content"] for m in messages if m.get("role") == "system" and m.get("content")]
    contents = []
    for m in messages:
        if m.get("role") == "system":
            continue
        parts: list[dict] = [{"text": m["content"]}] if m.get("content") else []
        parts += [{"inline_data": {"mime_type": image_mime(b), "data": b}} for b in m.get("images") or []]
        if parts:
            contents.append({"role": "model" if m.get("role") == "assistant" else "user", "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    if config := gemini_config(options):
        body["generationConfig"] = config
    return body


def gemini_candidate(obj: dict) -> tuple[str, str | None]:
    """(text, finishReason) of the first candidate of a (chunk of a) generateContent reply; thoughts left out."""
    candidates = obj.get("candidates") or []
    if not candidates:
        return "", None
    parts = (candidates[0].get("content") or {}).get("parts") or []
    return "".join(p.get("text") or "" for p in parts if not p.get("thought")), candidates[0].get("finishReason")


def ollama_host(host: str | None) -> str:
    """A host as Ollama's CLI reads it (None -> OLLAMA_HOST, else 127.0.0.1:11434; bare host -> port 11434)."""
    host = (host or os.environ.get("OLLAMA_HOST") or "").strip().rstrip("/") or "127.0.0.1:11434"
    if "://" in host:
        return host
    netloc, sep, path = host.partition("/")
    if netloc.startswith(":"):
        netloc = "127.0.0.1" + netloc
    if not re.search(r":\d+$", netloc):
        netloc += ":11434"
    return f"http://{netloc}{sep}{path}"


# ---- providers --------------------------------------------------------------------------------------
class OllamaProvider:
    """An Ollama server, through the official `ollama` client (`/api/chat`, `/api/show`, `/api/version`)."""

    kind = "ollama"

    def __init__(self, name: str, host: str | None = None, timeout_s: float = 120.0,
                 keep_alive: str | float | None = None, api_key: str | None = None) -> None:
        self.name, self.host, self.timeout_s, self.keep_alive = name, ollama_host(host), timeout_s, keep_alive
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._key = api_key
        self._client = self._new_client(timeout_s)
        self._vision: dict[str, bool] = {}
        self._lock = threading.Lock()

    def _new_client(self, timeout_s: float):
        import ollama

        return ollama.Client(host=self.host, timeout=timeout_s, headers=self._headers)

    @contextmanager
    def _session(self, timeout_s: float | None):
        """The shared client, or a short-lived one for a timeout other than the provider's."""
        if timeout_s is None or timeout_s == self.timeout_s:
            yield self._client
            return
        client = self._new_client(timeout_s)
        try:
            yield client
        finally:
            client.close()

    def _error(self, e: Exception) -> ProviderError | None:
        """A ProviderError for what the ollama client (or httpx under it) raised; None for anything else."""
        import httpx
        import ollama
        import pydantic

        if isinstance(e, ollama.ResponseError):
            status = e.status_code if e.status_code and e.status_code > 0 else None  # -1: an error inside a stream
            where = f"HTTP {status}" if status else "error in stream"
            return self._fail(f"{where}: {e.error}", status)
        if isinstance(e, pydantic.ValidationError):
            return self._fail(f"invalid request: {e.error_count()} validation error(s)", retryable=False)
        if isinstance(e, ConnectionError):
            return self._fail(f"cannot connect to {self.host}")
        if isinstance(e, httpx.TimeoutException):
            return self._fail(f"timed out ({type(e).__name__})")
        if isinstance(e, httpx.TransportError):
            return self._fail(f"transport error ({type(e).__name__})")
        if isinstance(e, json.JSONDecodeError):
            return self._fail("malformed reply (not JSON)")
        return None

    def _fail(self, message: str, status: int | None = None, retryable: bool | None = None) -> ProviderError:
        return ProviderError(f"{self.name}: {redact(message, self._key)}", provider=self.name, status=status,
                             retryable=retryable)

    def chat(self, model: str, messages: list[dict], options: dict | None = None,
             timeout_s: float | None = None) -> Reply:
        t0 = time.perf_counter()
        try:
            with self._session(timeout_s) as client:
                r = client.chat(model=model, messages=messages, options=options or None, stream=False,
                                keep_alive=self.keep_alive)
        except Exception as e:
            if (err := self._error(e)) is None:
                raise
            raise err from None
        return Reply(r.message.content or "", r.model or model, self.name, r.prompt_eval_count, r.eval_count,
                     time.perf_counter() - t0)

    def stream(self, model: str, messages: list[dict], options: dict | None = None,
               timeout_s: float | None = None) -> Iterator[str | Reply]:
        t0 = time.perf_counter()
        parts: list[str] = []
        last = None
        try:
            with self._session(timeout_s) as client, closing(client.chat(
                    model=model, messages=messages, options=options or None, stream=True,
                    keep_alive=self.keep_alive)) as chunks:
                for chunk in chunks:
                    if delta := (chunk.message.content if chunk.message else None):
                        parts.append(delta)
                        yield delta
                    if chunk.done:
                        last = chunk
        except Exception as e:
            if (err := self._error(e)) is None:
                raise
            raise err from None
        if last is None:
            raise self._fail("stream ended before its final chunk")
        yield Reply("".join(parts), last.model or model, self.name, last.prompt_eval_count, last.eval_count,
                    time.perf_counter() - t0)

    def health(self) -> ProviderHealth:
        import httpx

        t0 = time.perf_counter()
        try:
            r = httpx.get(f"{self.host}/api/version", headers=self._headers,
                          timeout=min(self.timeout_s, HEALTH_TIMEOUT_S))
            ok, detail = r.status_code == 200, (f"version {r.json().get('version')}" if r.status_code == 200
                                                else f"HTTP {r.status_code}: {error_text(r.text)}")
        except (httpx.HTTPError, ValueError) as e:
            ok, detail = False, f"cannot reach {self.host} ({type(e).__name__})"
        return ProviderHealth(self.name, self.kind, ok, redact(detail, self._key), time.perf_counter() - t0)

    def supports_images(self, model: str) -> bool:
        """Whether `/api/show` lists the "vision" capability (cached per model once Ollama answered)."""
        with self._lock:
            if model in self._vision:
                return self._vision[model]
        try:
            with self._session(min(self.timeout_s, HEALTH_TIMEOUT_S)) as client:
                vision = "vision" in (client.show(model).capabilities or [])
        except Exception as e:
            if self._error(e) is None:
                raise
            return False  # not cached: Ollama may be back, or the model pulled, later
        with self._lock:
            self._vision[model] = vision
        return vision

    def close(self) -> None:
        self._client.close()


class _HttpProvider:
    """Plumbing shared by the providers spoken to with httpx: auth headers, errors, JSON and SSE."""

    kind = ""

    def __init__(self, name: str, base_url: str, api_key: str | None, timeout_s: float) -> None:
        import httpx

        self.name, self.base_url, self.timeout_s = name, base_url.rstrip("/"), timeout_s
        self._key = api_key
        self._http = httpx.Client(timeout=timeout_s, headers=self._auth(api_key) if api_key else {})

    def _auth(self, key: str) -> dict[str, str]:
        raise NotImplementedError

    def _fail(self, message: str, status: int | None = None, retryable: bool | None = None) -> ProviderError:
        return ProviderError(f"{self.name}: {redact(message, self._key)}", provider=self.name, status=status,
                             retryable=retryable)

    @contextmanager
    def _transport(self):
        """httpx failures (connection refused, timeouts, a cut stream) -> retryable ProviderErrors."""
        import httpx

        try:
            yield
        except httpx.TimeoutException as e:
            raise self._fail(f"timed out ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise self._fail(f"cannot reach {self.base_url} ({type(e).__name__})") from None

    def _status_error(self, r) -> ProviderError:
        return self._fail(f"HTTP {r.status_code}: {error_text(r.text)}", r.status_code)

    def _json(self, text: str) -> dict:
        try:
            obj = json.loads(text)
        except ValueError:
            raise self._fail("malformed reply (not JSON)") from None
        if not isinstance(obj, dict):
            raise self._fail("malformed reply (not a JSON object)")
        if obj.get("error"):
            raise self._fail(f"error in reply: {error_text(text)}")
        return obj

    def _post(self, path: str, body: dict, timeout_s: float | None, params: dict | None = None) -> dict:
        with self._transport():
            r = self._http.post(self.base_url + path, json=body, params=params, timeout=timeout_s or self.timeout_s)
        if r.status_code >= 400:
            raise self._status_error(r)
        return self._json(r.text)

    def _events(self, path: str, body: dict, timeout_s: float | None, params: dict | None = None) -> Iterator[str]:
        """The data of each server-sent event of a streamed POST."""
        with self._transport(), self._http.stream("POST", self.base_url + path, json=body, params=params,
                                                  timeout=timeout_s or self.timeout_s) as r:
            if r.status_code >= 400:
                r.read()
                raise self._status_error(r)
            yield from sse_data(r.iter_lines())

    def health(self) -> ProviderHealth:
        """GET {base_url}/models: ok on 200, with the number of models listed."""
        t0 = time.perf_counter()
        try:
            with self._transport():
                r = self._http.get(self.base_url + "/models", timeout=min(self.timeout_s, HEALTH_TIMEOUT_S))
            if r.status_code != 200:
                raise self._status_error(r)
            obj = self._json(r.text)
            ok, detail = True, f"{len(obj.get('data') or obj.get('models') or [])} models"
        except ProviderError as e:
            ok, detail = False, str(e).removeprefix(f"{self.name}: ")
        return ProviderHealth(self.name, self.kind, ok, detail, time.perf_counter() - t0)

    def close(self) -> None:
        self._http.close()


class OpenAICompatibleProvider(_HttpProvider):
    """Any OpenAI-compatible chat completions API (OpenAI, vLLM, llama.cpp server, LM Studio, ...)."""

    kind = "openai"

    def __init__(self, name: str, base_url: str, api_key: str | None = None, timeout_s: float = 120.0,
                 vision_models: Iterable[str] = ()) -> None:
        super().__init__(name, base_url, api_key, timeout_s)
        self.vision_models = frozenset(vision_models)

    def _auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def _body(self, model: str, messages: list[dict], options: dict | None) -> dict:
        return {"model": model, "messages": openai_messages(messages), **openai_options(options)}

    def chat(self, model: str, messages: list[dict], options: dict | None = None,
             timeout_s: float | None = None) -> Reply:
        t0 = time.perf_counter()
        obj = self._post("/chat/completions", self._body(model, messages, options), timeout_s)
        try:
            text = obj["choices"][0]["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise self._fail("malformed reply (no choices[0].message)") from None
        usage = obj.get("usage") or {}
        return Reply(text, obj.get("model") or model, self.name, usage.get("prompt_tokens"),
                     usage.get("completion_tokens"), time.perf_counter() - t0)

    def stream(self, model: str, messages: list[dict], options: dict | None = None,
               timeout_s: float | None = None) -> Iterator[str | Reply]:
        t0 = time.perf_counter()
        body = {**self._body(model, messages, options), "stream": True, "stream_options": {"include_usage": True}}
        parts: list[str] = []
        usage: dict = {}
        reported, done = model, False
        with closing(self._events("/chat/completions", body, timeout_s)) as events:
            for data in events:
                if data.strip() == "[DONE]":
                    done = True
                    break
                obj = self._json(data)
                reported, usage = obj.get("model") or reported, obj.get("usage") or usage
                for choice in obj.get("choices") or []:
                    if choice.get("index", 0) == 0 and (delta := (choice.get("delta") or {}).get("content")):
                        parts.append(delta)
                        yield delta
        if not done:
            raise self._fail("stream ended before [DONE]")
        yield Reply("".join(parts), reported, self.name, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                    time.perf_counter() - t0)

    def supports_images(self, model: str) -> bool:
        return model in self.vision_models


class GeminiProvider(_HttpProvider):
    """Google's Gemini API (generateContent / streamGenerateContent), key in the `x-goog-api-key` header."""

    kind = "gemini"

    def __init__(self, name: str, base_url: str = GEMINI_URL, api_key: str | None = None,
                 timeout_s: float = 120.0) -> None:
        super().__init__(name, base_url, api_key, timeout_s)

    def _auth(self, key: str) -> dict[str, str]:
        return {"x-goog-api-key": key}

    @staticmethod
    def _path(model: str, method: str) -> str:
        return f"/models/{model.removeprefix('models/')}:{method}"

    def chat(self, model: str, messages: list[dict], options: dict | None = None,
             timeout_s: float | None = None) -> Reply:
        t0 = time.perf_counter()
        obj = self._post(self._path(model, "generateContent"), gemini_request(messages, options), timeout_s)
        if not obj.get("candidates"):
            if reason := (obj.get("promptFeedback") or {}).get("blockReason"):
                raise self._fail(f"prompt blocked ({reason})", retryable=False)
            raise self._fail("malformed reply (no candidates)")
        usage = obj.get("usageMetadata") or {}
        return Reply(gemini_candidate(obj)[0], obj.get("modelVersion") or model, self.name,
                     usage.get("promptTokenCount"), usage.get("candidatesTokenCount"), time.perf_counter() - t0)

    def stream(self, model: str, messages: list[dict], options: dict | None = None,
               timeout_s: float | None = None) -> Iterator[str | Reply]:
        t0 = time.perf_counter()
        parts: list[str] = []
        usage: dict = {}
        reported, finished = model, False
        with closing(self._events(self._path(model, "streamGenerateContent"), gemini_request(messages, options),
                                  timeout_s, params={"alt": "sse"})) as events:
            for data in events:
                obj = self._json(data)
                if reason := (obj.get("promptFeedback") or {}).get("blockReason"):
                    raise self._fail(f"prompt blocked ({reason})", retryable=False)
                reported, usage = obj.get("modelVersion") or reported, obj.get("usageMetadata") or usage
                text, finish = gemini_candidate(obj)
                finished = finished or finish is not None
                if text:
                    parts.append(text)
                    yield text
        if not finished:
            raise self._fail("stream ended without a finishReason")
        yield Reply("".join(parts), reported, self.name, usage.get("promptTokenCount"),
                    usage.get("candidatesTokenCount"), time.perf_counter() - t0)

    def supports_images(self, model: str) -> bool:
        return True  # Gemini models are multimodal


# ---- configuration ----------------------------------------------------------------------------------
class ProviderConfig(BaseModel):
    """One LLM provider of the service, in failover order."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    name: str = Field(min_length=1)
    """Name used in metrics, logs and health."""
    kind: Literal["ollama", "openai", "gemini"] = "ollama"
    """API the provider speaks: Ollama's /api/chat, OpenAI-compatible chat completions, or Google's Gemini API."""
    base_url: str | None = None
    """ollama: the host (None: OLLAMA_HOST, else http://127.0.0.1:11434); openai: required, e.g.
    http://host:8000/v1; gemini: None for https://generativelanguage.googleapis.com/v1beta."""
    model: str | None = None
    """Model to ask this provider for; None: the model the caller asks for (the environment's Ollama tag)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (keys never live in config files); None: no key."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds a call may take before it counts as a failure (per read, for streams)."""
    vision_models: list[str] = []
    """openai: the models that accept images. Ollama asks /api/show; every Gemini model accepts them."""

    @model_validator(mode="after")
    def _needs_url(self) -> "ProviderConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError(f"provider {self.name!r}: kind 'openai' needs base_url (e.g. http://host:8000/v1)")
        return self


def build_provider(cfg: ProviderConfig) -> Provider:
    """The provider `cfg` describes, its key read from the environment variable it names."""
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not key:
        log.warning("provider %s: environment variable %s is not set; calling without a key", cfg.name, cfg.api_key_env)
    if cfg.kind == "ollama":
        return OllamaProvider(cfg.name, cfg.base_url, cfg.timeout_s, api_key=key)
    if cfg.kind == "openai":
        return OpenAICompatibleProvider(cfg.name, cfg.base_url or "", key, cfg.timeout_s, cfg.vision_models)
    return GeminiProvider(cfg.name, cfg.base_url or GEMINI_URL, key, cfg.timeout_s)


# ---- failover ---------------------------------------------------------------------------------------
@dataclass
class Deployment:
    """One provider and the model it serves."""

    provider: Provider
    model: str | None = None
    """None: the model the caller asks for."""


@dataclass
class Cooldown:
    """Consecutive failures of one deployment. `allowed_fails` in a row put it on cooldown for `cooldown_s`; once
    that ends it is tried again, and a single further failure cools it down again until a success resets it."""

    allowed_fails: int = 3
    cooldown_s: float = 5.0
    failures: int = 0
    until: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def available(self, now: float) -> bool:
        with self._lock:
            return now >= self.until

    def remaining(self, now: float) -> float:
        with self._lock:
            return max(0.0, self.until - now)

    def record_failure(self, now: float) -> bool:
        """Count a failure; True when it (re)starts the cooldown."""
        with self._lock:
            self.failures += 1
            if self.failures >= self.allowed_fails:
                self.until = now + self.cooldown_s
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self.failures, self.until = 0, float("-inf")


class Router:
    """Deployments in failover order, LiteLLM-style: a retryable error counts a failure and moves on to the next
    deployment, a caller error (other 4xx) is raised at once, a deployment on cooldown is skipped. A request with
    images skips the deployments whose model does not accept them."""

    def __init__(self, deployments: list[Deployment], allowed_fails: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not deployments:
            raise ValueError("Router needs at least one deployment")
        self.deployments = list(deployments)
        self._cooldowns = [Cooldown(allowed_fails, cooldown_s) for _ in self.deployments]
        self._last_error: list[str | None] = [None] * len(self.deployments)
        self._clock = clock
        self._lock = threading.Lock()

    def _label(self, i: int) -> str:
        d = self.deployments[i]
        return d.provider.name if d.model is None else f"{d.provider.name} ({d.model})"

    def _model(self, i: int, model: str) -> str:
        return self.deployments[i].model or model

    def _plan(self, model: str, messages: list[dict]) -> tuple[list[int], dict[int, str]]:
        """(indexes to try in order, {index: why skipped})."""
        now, images = self._clock(), has_images(messages)
        order, skipped = [], {}
        for i, d in enumerate(self.deployments):
            cd = self._cooldowns[i]
            if not cd.available(now):
                with self._lock:
                    last = self._last_error[i]
                skipped[i] = f"cooling down, {cd.remaining(now):.1f} s left (last error: {last})"
            elif images and not d.provider.supports_images(self._model(i, model)):
                skipped[i] = f"model {self._model(i, model)} does not accept images"
            else:
                order.append(i)
        return order, skipped

    def _failed(self, i: int, e: ProviderError) -> None:
        with self._lock:
            self._last_error[i] = str(e)
        if self._cooldowns[i].record_failure(self._clock()):
            log.warning("provider %s: cooling down for %.1f s after %d failures in a row: %s", self._label(i),
                        self._cooldowns[i].cooldown_s, self._cooldowns[i].failures, e)

    def _all_failed(self, errors: dict[int, str]) -> AllProvidersFailed:
        return AllProvidersFailed({self._label(i): errors[i] for i in sorted(errors)})

    def chat(self, model: str, messages: list[dict], options: dict | None = None,
             timeout_s: float | None = None) -> Reply:
        order, errors = self._plan(model, messages)
        for i in order:
            try:
                reply = self.deployments[i].provider.chat(self._model(i, model), messages, options, timeout_s)
            except ProviderError as e:
                if not e.retryable:
                    raise
                self._failed(i, e)
                errors[i] = str(e)
                continue
            self._cooldowns[i].record_success()
            return reply
        raise self._all_failed(errors)

    def stream(self, model: str, messages: list[dict], options: dict | None = None,
               timeout_s: float | None = None) -> Iterator[str | Reply]:
        """Fails over only until the first delta has been yielded; after that an error propagates."""
        order, errors = self._plan(model, messages)
        for i in order:
            started, final = False, None
            try:
                with closing(self.deployments[i].provider.stream(self._model(i, model), messages, options,
                                                                 timeout_s)) as pieces:
                    for piece in pieces:
                        if isinstance(piece, Reply):
                            final = piece
                            break
                        started = True
                        yield piece
                if final is None:
                    raise ProviderError(f"{self._label(i)}: stream ended without a final reply",
                                        provider=self.deployments[i].provider.name)
            except ProviderError as e:
                if e.retryable:
                    self._failed(i, e)
                if started or not e.retryable:
                    raise
                errors[i] = str(e)
                continue
            self._cooldowns[i].record_success()
            yield final
            return
        raise self._all_failed(errors)

    def supports_images(self, model: str) -> bool:
        """Whether any deployment's model accepts images."""
        return any(d.provider.supports_images(self._model(i, model)) for i, d in enumerate(self.deployments))

    def state(self) -> list[dict]:
        """Per deployment: provider, kind, model, consecutive failures, cooling_down, cooldown_left_s (no calls)."""
        now = self._clock()
        return [{"provider": d.provider.name, "kind": d.provider.kind, "model": d.model,
                 "failures": cd.failures, "cooling_down": not cd.available(now),
                 "cooldown_left_s": round(cd.remaining(now), 3)}
                for d, cd in zip(self.deployments, self._cooldowns)]

    def health(self) -> list[dict]:
        """state() plus each provider's own health check (ok, detail, latency_s), the checks run in parallel."""

        def check(p: Provider) -> ProviderHealth:
            try:
                return p.health()
            except Exception as e:  # a broken health check reads as down, it does not break /readyz
                return ProviderHealth(p.name, p.kind, False, f"health check failed ({type(e).__name__})", 0.0)

        with ThreadPoolExecutor(max_workers=len(self.deployments)) as pool:
            checks = list(pool.map(check, [d.provider for d in self.deployments]))
        out = []
        for s, h in zip(self.state(), checks):
            out.append({"provider": s["provider"], "kind": s["kind"], "model": s["model"], "ok": h.ok,
                        "detail": h.detail, "latency_s": round(h.latency_s, 4), "failures": s["failures"],
                        "cooling_down": s["cooling_down"], "cooldown_left_s": s["cooldown_left_s"]})
        return out

    def close(self) -> None:
        for d in self.deployments:
            if callable(close := getattr(d.provider, "close", None)):
                close()
