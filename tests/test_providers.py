"""serving/providers.py: each provider against a local double of its API, the cooldown, and the failover router.

Contract tests: they assert what a provider sends (path, headers, body fields) to doubles that refuse what the real
APIs refuse (tests/provider_doubles.py, tests/ollama_double.py), and that it parses what they return. All on
127.0.0.1; no network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from dataclasses import dataclass, field

import ollama
import pytest
from ollama_double import OllamaDouble  # tests/ is on sys.path (rootdir "prepend" import mode)
from provider_doubles import (
    DEFAULT_ANSWER,
    GEMINI_IMAGE_TOKENS,
    OPENAI_IMAGE_TOKENS,
    GeminiDouble,
    OpenAIDouble,
    pieces,
    words,
)
from pydantic import ValidationError

from serving.providers import (
    AllProvidersFailed,
    Cooldown,
    Deployment,
    GeminiProvider,
    OllamaProvider,
    OpenAICompatibleProvider,
    ProviderConfig,
    ProviderError,
    ProviderHealth,
    Reply,
    Router,
    build_provider,
    image_mime,
    ollama_host,
    openai_options,
    sse_data,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(24)).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(24)).decode()
OPTIONS = {"temperature": 0.2, "top_p": 0.9, "num_predict": 64, "seed": 7, "stop": ["\n\n"], "num_ctx": 4096}
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "How do I raise a purchase request?"},
            {"role": "assistant", "content": "Which module?"},
            {"role": "user", "content": "Procurement, please."}]
PROMPT_WORDS = sum(words(m["content"]) for m in MESSAGES)
KEY = "sk-test-0123456789abcdef"


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect(stream) -> tuple[list[str], Reply]:
    """(deltas, final Reply) of a provider stream; checks there is exactly one Reply, last."""
    items = list(stream)
    assert isinstance(items[-1], Reply) and all(isinstance(x, str) for x in items[:-1])
    return items[:-1], items[-1]


def raises(fn, *args, **kw) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        result = fn(*args, **kw)
        if not isinstance(result, Reply):  # a stream: errors come while iterating
            list(result)
    return info.value


@pytest.fixture
def openai_double():
    with OpenAIDouble(required_key=KEY) as d:
        yield d


@pytest.fixture
def gemini_double():
    with GeminiDouble(required_key=KEY) as d:
        yield d


# ---- pure helpers -----------------------------------------------------------------------------------
def test_helpers_map_images_options_sse_and_hosts(monkeypatch):
    assert image_mime(PNG) == "image/png" and image_mime(JPEG) == "image/jpeg" and image_mime("AAAA") == "image/png"
    assert openai_options(OPTIONS) == {"temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n\n"], "max_tokens": 64}
    assert openai_options({"num_predict": -1, "temperature": None}) == {}  # Ollama's "no limit"; None is unset
    assert list(sse_data([": comment", "data: {\"a\": 1}", "", "data: x", "data: y", "", "data: [DONE]"])) == [
        '{"a": 1}', "x\ny", "[DONE]"]
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert ollama_host(None) == "http://127.0.0.1:11434"
    assert ollama_host("10.0.0.5") == "http://10.0.0.5:11434" and ollama_host(":9999") == "http://127.0.0.1:9999"
    assert ollama_host("https://ollama.example.com/") == "https://ollama.example.com"
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box:11500")
    assert ollama_host(None) == "http://gpu-box:11500"


# ---- OpenAI-compatible ------------------------------------------------------------------------------
def test_openai_chat_sends_the_contract_and_parses_the_reply(openai_double):
    p = OpenAICompatibleProvider("backup", openai_double.url, api_key=KEY)
    reply = p.chat("gpt-4o-mini", MESSAGES, OPTIONS)
    assert (reply.text, reply.model, reply.provider) == (DEFAULT_ANSWER, "gpt-4o-mini", "backup")
    assert (reply.prompt_tokens, reply.completion_tokens) == (PROMPT_WORDS, words(DEFAULT_ANSWER))
    assert reply.latency_s > 0
    assert openai_double.requests == [("POST", "/v1/chat/completions")]
    assert openai_double.bodies("/chat/completions") == [{
        "model": "gpt-4o-mini", "messages": MESSAGES,  # plain text messages go as they are
        "temperature": 0.2, "top_p": 0.9, "max_tokens": 64, "seed": 7, "stop": ["\n\n"]}]  # num_ctx dropped
    assert openai_double.headers("/chat/completions")[0]["authorization"] == f"Bearer {KEY}"


def test_openai_stream_yields_deltas_then_usage(openai_double):
    p = OpenAICompatibleProvider("backup", openai_double.url, api_key=KEY)
    deltas, reply = collect(p.stream("gpt-4o-mini", MESSAGES, {"num_predict": 32}))
    assert deltas == pieces(DEFAULT_ANSWER) and reply.text == DEFAULT_ANSWER == "".join(deltas)
    assert (reply.prompt_tokens, reply.completion_tokens) == (PROMPT_WORDS, words(DEFAULT_ANSWER))
    body = openai_double.bodies("/chat/completions")[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 32


def test_openai_images_become_data_url_parts(openai_double):
    p = OpenAICompatibleProvider("backup", openai_double.url, api_key=KEY, vision_models=["llava-v1.6"])
    msg = {"role": "user", "content": "What does this screen show?", "images": [PNG, JPEG]}
    reply = p.chat("llava-v1.6", [msg])
    assert reply.prompt_tokens == words(msg["content"]) + 2 * OPENAI_IMAGE_TOKENS  # the double saw both images
    assert openai_double.bodies("/chat/completions")[0]["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "What does this screen show?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{JPEG}"}}]}]
    assert p.supports_images("llava-v1.6") and not p.supports_images("gpt-4o-mini")


def test_openai_wrong_key_is_a_caller_error_and_never_echoed(openai_double):
    secret = "sk-wrong-SECRET-987654321"
    p = OpenAICompatibleProvider("backup", openai_double.url, api_key=secret)
    e = raises(p.chat, "gpt-4o-mini", MESSAGES)
    assert (e.status, e.retryable, e.provider) == (401, False, "backup")
    assert "Incorrect API key" in str(e) and secret not in str(e) and "***" in str(e)  # the double echoed it
    health = p.health()
    assert not health.ok and "401" in health.detail and secret not in health.detail
    e = raises(OpenAICompatibleProvider("anon", openai_double.url).chat, "gpt-4o-mini", MESSAGES)
    assert e.status == 401 and "didn't provide an API key" in str(e)
    assert "authorization" not in openai_double.headers("/chat/completions")[-1]


def test_openai_health(openai_double):
    p = OpenAICompatibleProvider("backup", openai_double.url, api_key=KEY)
    h = p.health()
    assert (h.provider, h.kind, h.ok, h.detail) == ("backup", "openai", True, "2 models")
    assert openai_double.requests[-1] == ("GET", "/v1/models")
    openai_double.stop()
    h = p.health()
    assert not h.ok and "cannot reach" in h.detail


# ---- Gemini -------------------------------------------------------------------------------------------
def test_gemini_chat_sends_the_contract_and_parses_the_reply(gemini_double):
    p = GeminiProvider("gemini", gemini_double.url, api_key=KEY)
    reply = p.chat("gemini-2.0-flash", MESSAGES, OPTIONS)
    assert (reply.text, reply.model, reply.provider) == (DEFAULT_ANSWER, "gemini-2.0-flash", "gemini")
    assert (reply.prompt_tokens, reply.completion_tokens) == (PROMPT_WORDS, words(DEFAULT_ANSWER))
    assert gemini_double.requests == [("POST", "/v1beta/models/gemini-2.0-flash:generateContent")]
    assert gemini_double.bodies(":generateContent") == [{
        "contents": [{"role": "user", "parts": [{"text": "How do I raise a purchase request?"}]},
                     {"role": "model", "parts": [{"text": "Which module?"}]},
                     {"role": "user", "parts": [{"text": "Procurement, please."}]}],
        "systemInstruction": {"parts": [{"text": "Answer briefly."}]},
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "seed": 7, "maxOutputTokens": 64,
                             "stopSequences": ["\n\n"]}}]
    headers = gemini_double.headers(":generateContent")[0]
    assert headers["x-goog-api-key"] == KEY and "authorization" not in headers


def test_gemini_stream_uses_sse_and_reads_usage_from_the_last_chunk(gemini_double):
    p = GeminiProvider("gemini", gemini_double.url, api_key=KEY)
    deltas, reply = collect(p.stream("models/gemini-2.0-flash", MESSAGES, {"stop": "END"}))
    assert deltas == pieces(DEFAULT_ANSWER) and reply.text == DEFAULT_ANSWER
    assert (reply.prompt_tokens, reply.completion_tokens) == (PROMPT_WORDS, words(DEFAULT_ANSWER))
    assert gemini_double.requests == [("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse")]
    assert gemini_double.bodies(":streamGenerateContent")[0]["generationConfig"] == {"stopSequences": ["END"]}


def test_gemini_images_become_inline_data(gemini_double):
    p = GeminiProvider("gemini", gemini_double.url, api_key=KEY)
    reply = p.chat("gemini-2.0-flash", [{"role": "user", "content": "Read this", "images": [JPEG]}])
    assert reply.prompt_tokens == 2 + GEMINI_IMAGE_TOKENS
    assert gemini_double.bodies(":generateContent")[0]["contents"] == [{"role": "user", "parts": [
        {"text": "Read this"}, {"inline_data": {"mime_type": "image/jpeg", "data": JPEG}}]}]
    assert p.supports_images("gemini-2.0-flash")


def test_gemini_key_errors_are_caller_errors_without_the_key(gemini_double):
    secret = "AIzaWRONG-secret-key"
    e = raises(GeminiProvider("gemini", gemini_double.url, api_key=secret).chat, "gemini-2.0-flash", MESSAGES)
    assert (e.status, e.retryable) == (400, False) and "API key not valid" in str(e) and secret not in str(e)
    e = raises(GeminiProvider("gemini", gemini_double.url).stream, "gemini-2.0-flash", MESSAGES)
    assert (e.status, e.retryable) == (403, False) and "unregistered callers" in str(e)


def test_gemini_blocked_prompt_and_health(gemini_double):
    p = GeminiProvider("gemini", gemini_double.url, api_key=KEY)
    gemini_double.block_reason = "SAFETY"
    e = raises(p.chat, "gemini-2.0-flash", MESSAGES)
    assert not e.retryable and "SAFETY" in str(e)
    h = p.health()
    assert (h.kind, h.ok, h.detail) == ("gemini", True, "1 models")
    assert GeminiProvider("gemini", gemini_double.url, api_key="bad").health().ok is False


# ---- error mapping, both HTTP providers ----------------------------------------------------------------
def http_provider(kind: str, double) -> tuple:
    if kind == "openai":
        return OpenAICompatibleProvider("p", double.url, api_key=KEY), "gpt-4o-mini"
    return GeminiProvider("p", double.url, api_key=KEY), "gemini-2.0-flash"


@pytest.fixture(params=["openai", "gemini"])
def any_double(request):
    with (OpenAIDouble if request.param == "openai" else GeminiDouble)(required_key=KEY) as d:
        yield request.param, d


@pytest.mark.parametrize("status, retryable", [(500, True), (503, True), (429, True), (400, False), (404, False)])
@pytest.mark.parametrize("streaming", [False, True])
def test_http_statuses_map_to_retryable_or_not(any_double, status, retryable, streaming):
    kind, double = any_double
    p, model = http_provider(kind, double)
    double.error_status = status
    e = raises(p.stream if streaming else p.chat, model, MESSAGES)
    assert (e.status, e.retryable, e.provider) == (status, retryable, "p")
    assert str(e).startswith(f"p: HTTP {status}: ")


def test_unknown_model_is_404_and_not_retryable(any_double):
    kind, double = any_double
    p, _ = http_provider(kind, double)
    e = raises(p.chat, "no-such-model", MESSAGES)
    assert (e.status, e.retryable) == (404, False) and "no-such-model" in str(e)


def test_connection_refused_and_timeouts_are_retryable(any_double):
    kind, double = any_double
    _, model = http_provider(kind, double)
    cls = OpenAICompatibleProvider if kind == "openai" else GeminiProvider
    dead = cls("p", f"http://127.0.0.1:{free_port()}/v1", api_key=KEY)
    for call in (dead.chat, dead.stream):
        e = raises(call, model, MESSAGES)
        assert (e.status, e.retryable) == (None, True) and "cannot reach" in str(e)
    p, _ = http_provider(kind, double)
    double.delay_s = 1.0
    e = raises(p.chat, model, MESSAGES, timeout_s=0.2)
    assert (e.status, e.retryable) == (None, True) and "timed out" in str(e)


def test_an_error_inside_a_stream_is_retryable_after_the_deltas(any_double):
    kind, double = any_double
    p, model = http_provider(kind, double)
    double.stream_error_after = 3
    got = []
    with pytest.raises(ProviderError) as info:
        for piece in p.stream(model, MESSAGES):
            got.append(piece)
    assert got and all(isinstance(x, str) for x in got) and "".join(got) == "".join(pieces(DEFAULT_ANSWER)[:len(got)])
    assert info.value.retryable and info.value.status is None and "error in reply" in str(info.value)


# ---- Ollama ---------------------------------------------------------------------------------------------
@pytest.fixture
def ollama_double(tmp_path):
    with OllamaDouble(answer="Open Purchasing and press New.") as d:
        blob = tmp_path / "m.gguf"
        blob.write_bytes(b"GGUF" + bytes(64))
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        client = ollama.Client(host=d.url)
        client.create_blob(blob)
        client.create(model="erp:staging", files={"m.gguf": digest}, stream=False)
        d.requests.clear()
        d.request_json.clear()
        yield d


def chat_bodies(d: OllamaDouble) -> list[dict]:
    return [b for m, p, b in d.request_json if (m, p) == ("POST", "/api/chat")]


def test_ollama_chat_passes_messages_options_and_keep_alive(ollama_double):
    p = OllamaProvider("ollama", ollama_double.url, keep_alive="30m")
    msgs = MESSAGES[:-1] + [{"role": "user", "content": "Look", "images": [PNG]}]
    reply = p.chat("erp:staging", msgs, OPTIONS)
    assert (reply.text, reply.model, reply.provider) == ("Open Purchasing and press New.", "erp:staging", "ollama")
    assert (reply.prompt_tokens, reply.completion_tokens) == (8, 5)  # the double's prompt_eval_count / eval_count
    body = chat_bodies(ollama_double)[0]
    assert body["model"] == "erp:staging" and body["stream"] is False and body["keep_alive"] == "30m"
    assert body["options"] == OPTIONS  # Ollama's own names, unknown ones (num_ctx) included
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][-1]["images"] == [PNG] and body["messages"][0]["content"] == "Answer briefly."


def test_ollama_stream(ollama_double):
    p = OllamaProvider("ollama", ollama_double.url)
    deltas, reply = collect(p.stream("erp:staging", MESSAGES))
    assert deltas == pieces("Open Purchasing and press New.") and reply.text == "Open Purchasing and press New."
    assert (reply.prompt_tokens, reply.completion_tokens) == (8, 5)
    assert chat_bodies(ollama_double)[0]["stream"] is True


def test_ollama_errors_map_to_retryable_or_not(ollama_double):
    p = OllamaProvider("ollama", ollama_double.url)
    e = raises(p.chat, "missing:latest", MESSAGES)
    assert (e.status, e.retryable) == (404, False) and "not found" in str(e)
    ollama_double.generate_error = "runner crashed"
    for call in (p.chat, p.stream):
        e = raises(call, "erp:staging", MESSAGES)
        assert (e.status, e.retryable) == (500, True) and "runner crashed" in str(e)
    ollama_double.generate_error = None
    ollama_double.generate_delay_s = 1.0
    e = raises(p.chat, "erp:staging", MESSAGES, timeout_s=0.2)
    assert (e.status, e.retryable) == (None, True) and "timed out" in str(e)
    # an error chunk after HTTP 200: the client raises ResponseError without a status
    e = p._error(ollama.ResponseError("model runner has unexpectedly stopped"))
    assert (e.status, e.retryable) == (None, True) and "error in stream" in str(e)
    e = raises(OllamaProvider("down", f"127.0.0.1:{free_port()}").chat, "erp:staging", MESSAGES)
    assert (e.status, e.retryable, e.provider) == (None, True, "down") and "cannot connect" in str(e)


def test_ollama_health_and_vision(ollama_double, monkeypatch):
    p = OllamaProvider("ollama", ollama_double.url)
    h = p.health()
    assert (h.kind, h.ok, h.detail) == ("ollama", True, "version 0.0.0-double")
    assert not p.supports_images("erp:staging")  # the double's capabilities: ["completion"]
    assert not p.supports_images("missing")  # show fails -> False
    shows = lambda: sum(1 for r in ollama_double.requests if r == ("POST", "/api/show"))  # noqa: E731
    before = shows()
    assert not p.supports_images("erp:staging") and shows() == before  # cached
    monkeypatch.setattr(ollama.Client, "show", lambda self, model: ollama.ShowResponse(
        capabilities=["completion", "vision"], model_info={}))
    assert OllamaProvider("o2", ollama_double.url).supports_images("llava:7b")
    ollama_double.stop()
    h = p.health()
    assert not h.ok and "cannot reach" in h.detail


# ---- configuration -------------------------------------------------------------------------------------
def test_provider_config_validates_and_builds(monkeypatch, openai_double):
    with pytest.raises(ValidationError, match="needs base_url"):
        ProviderConfig(name="x", kind="openai")
    with pytest.raises(ValidationError):
        ProviderConfig(name="x", api_key="sk-inline")  # keys never live in config files
    assert all(f.description for f in ProviderConfig.model_fields.values())
    monkeypatch.setenv("BACKUP_KEY", KEY)
    p = build_provider(ProviderConfig(name="backup", kind="openai", base_url=openai_double.url,
                                      api_key_env="BACKUP_KEY", vision_models=["llava-v1.6"]))
    assert isinstance(p, OpenAICompatibleProvider) and p.supports_images("llava-v1.6")
    assert p.chat("gpt-4o-mini", MESSAGES).text == DEFAULT_ANSWER  # the key from the environment was sent
    g = build_provider(ProviderConfig(name="g", kind="gemini"))
    assert isinstance(g, GeminiProvider) and g.base_url == "https://generativelanguage.googleapis.com/v1beta"
    o = build_provider(ProviderConfig(name="o", base_url="10.1.2.3:11434", timeout_s=7))
    assert isinstance(o, OllamaProvider) and (o.host, o.timeout_s) == ("http://10.1.2.3:11434", 7)


# ---- cooldown -------------------------------------------------------------------------------------------
def test_cooldown_after_allowed_fails_then_retried():
    cd = Cooldown(allowed_fails=3, cooldown_s=5.0)
    assert cd.available(0.0)
    assert cd.record_failure(0.0) is False and cd.record_failure(0.1) is False and cd.available(0.2)
    assert cd.record_failure(1.0) is True
    assert not cd.available(1.0) and not cd.available(5.99) and cd.remaining(3.0) == pytest.approx(3.0)
    assert cd.available(6.0)  # tried again once the cooldown ends
    assert cd.record_failure(6.5) is True and not cd.available(7.0)  # one more failure cools it down again
    cd.record_success()
    assert cd.available(7.0) and cd.failures == 0 and cd.remaining(7.0) == 0


def test_cooldown_success_resets_the_count():
    cd = Cooldown(allowed_fails=3, cooldown_s=5.0)
    cd.record_failure(0.0)
    cd.record_failure(0.0)
    cd.record_success()
    assert cd.record_failure(0.0) is False and cd.record_failure(0.0) is False and cd.available(0.0)


# ---- router ---------------------------------------------------------------------------------------------
@dataclass
class Scripted:
    """A provider that answers or fails as told: `fail` is None, or a ProviderError raised before (or, with
    `after_deltas`, after that many) deltas."""

    name: str
    kind: str = "openai"
    fail: ProviderError | None = None
    after_deltas: int = 0
    vision: bool = False
    calls: list[str] = field(default_factory=list)

    def chat(self, model, messages, options=None, timeout_s=None) -> Reply:
        self.calls.append(model)
        if self.fail:
            raise self.fail
        return Reply(f"{self.name} says hi", model, self.name, 3, 3, 0.01)

    def stream(self, model, messages, options=None, timeout_s=None):
        self.calls.append(model)
        for word in ("a ", "b ", "c")[: self.after_deltas if self.fail else 3]:
            yield word
        if self.fail:
            raise self.fail
        yield Reply("a b c", model, self.name, 3, 3, 0.01)

    def health(self) -> ProviderHealth:
        return ProviderHealth(self.name, self.kind, self.fail is None, "fine" if self.fail is None else "bad", 0.001)

    def supports_images(self, model) -> bool:
        return self.vision


def boom(name: str, status: int | None = 500) -> ProviderError:
    return ProviderError(f"{name}: HTTP {status}: boom", provider=name, status=status)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_router_fails_over_and_cools_the_primary_down():
    clock = Clock()
    primary, backup = Scripted("primary", fail=boom("primary")), Scripted("backup")
    r = Router([Deployment(primary, None), Deployment(backup, "backup-model")], clock=clock)
    for n in range(3):
        reply = r.chat("erp:staging", MESSAGES)
        assert (reply.provider, reply.model) == ("backup", "backup-model")
    assert primary.calls == ["erp:staging"] * 3 and len(backup.calls) == 3
    assert r.state()[0] == {"provider": "primary", "kind": "openai", "model": None, "failures": 3,
                            "cooling_down": True, "cooldown_left_s": 5.0}
    r.chat("erp:staging", MESSAGES)
    assert len(primary.calls) == 3  # skipped while cooling down
    clock.now += 5.0
    primary.fail = None
    assert r.chat("erp:staging", MESSAGES).provider == "primary"  # tried again, and a success resets it
    assert r.state()[0]["failures"] == 0 and not r.state()[0]["cooling_down"]


def test_router_does_not_fail_over_on_a_caller_error():
    primary, backup = Scripted("primary", fail=boom("primary", 400)), Scripted("backup")
    r = Router([Deployment(primary), Deployment(backup)])
    e = raises(r.chat, "m", MESSAGES)
    assert e.status == 400 and not isinstance(e, AllProvidersFailed)
    assert backup.calls == [] and r.state()[0]["failures"] == 0
    e = raises(r.stream, "m", MESSAGES)
    assert e.status == 400 and backup.calls == []


def test_router_all_failed_names_each_provider():
    clock = Clock()
    a, b = Scripted("ollama", kind="ollama", fail=boom("ollama", 503)), Scripted("gemini", fail=boom("gemini", 429))
    r = Router([Deployment(a), Deployment(b)], allowed_fails=1, cooldown_s=5.0, clock=clock)
    e = raises(r.chat, "m", MESSAGES)
    assert isinstance(e, AllProvidersFailed) and isinstance(e, ProviderError) and e.retryable
    assert list(e.errors) == ["ollama", "gemini"]
    assert "ollama: HTTP 503: boom" in str(e) and "gemini: HTTP 429: boom" in str(e)
    e = raises(r.chat, "m", MESSAGES)  # both cooling down now: nothing is called
    assert len(a.calls) == len(b.calls) == 1
    assert "cooling down, 5.0 s left" in e.errors["ollama"] and "HTTP 503" in e.errors["ollama"]


def test_router_stream_fails_over_before_the_first_delta_only():
    primary, backup = Scripted("primary", fail=boom("primary")), Scripted("backup")
    r = Router([Deployment(primary), Deployment(backup)])
    deltas, reply = collect(r.stream("m", MESSAGES))
    assert deltas == ["a ", "b ", "c"] and reply.provider == "backup"
    primary.after_deltas, backup.calls = 2, []
    got = []
    with pytest.raises(ProviderError) as info:
        for piece in r.stream("m", MESSAGES):
            got.append(piece)
    assert got == ["a ", "b "] and backup.calls == [] and not isinstance(info.value, AllProvidersFailed)
    assert r.state()[0]["failures"] == 2  # a failure after the first delta still counts


def test_router_with_real_doubles(openai_double, gemini_double):
    """Failover between real HTTP providers, chat and stream, and health() of both."""
    primary = OpenAICompatibleProvider("openai", openai_double.url, api_key=KEY)
    backup = GeminiProvider("gemini", gemini_double.url, api_key=KEY)
    r = Router([Deployment(primary, "gpt-4o-mini"), Deployment(backup, "gemini-2.0-flash")])
    openai_double.error_status = 503
    assert r.chat("erp:staging", MESSAGES).provider == "gemini"
    deltas, reply = collect(r.stream("erp:staging", MESSAGES))
    assert reply.provider == "gemini" and "".join(deltas) == DEFAULT_ANSWER
    openai_double.error_status, openai_double.stream_error_after = None, 2  # role chunk + 1 delta, then an error
    with pytest.raises(ProviderError):
        list(r.stream("erp:staging", MESSAGES))
    assert len(gemini_double.bodies(":streamGenerateContent")) == 1  # no failover after a delta
    health = r.health()
    assert [(h["provider"], h["kind"], h["model"], h["ok"], h["failures"], h["cooling_down"]) for h in health] == [
        ("openai", "openai", "gpt-4o-mini", True, 3, True), ("gemini", "gemini", "gemini-2.0-flash", True, 0, False)]
    assert set(health[0]) == {"provider", "kind", "model", "ok", "detail", "latency_s", "failures", "cooling_down",
                              "cooldown_left_s"}
    assert 0 < health[0]["cooldown_left_s"] <= 5.0
    r.close()


def test_router_images_skip_deployments_without_vision():
    blind, seeing = Scripted("blind"), Scripted("seeing", vision=True)
    r = Router([Deployment(blind), Deployment(seeing)])
    assert r.supports_images("m") and not Router([Deployment(blind)]).supports_images("m")
    assert r.chat("m", [{"role": "user", "content": "x", "images": [PNG]}]).provider == "seeing"
    assert blind.calls == [] and r.chat("m", MESSAGES).provider == "blind"
    assert json.dumps(r.state())  # plain JSON for /readyz


def test_router_counts_failures_exactly_under_threads():
    from concurrent.futures import ThreadPoolExecutor

    primary, backup = Scripted("primary", fail=boom("primary")), Scripted("backup")
    r = Router([Deployment(primary), Deployment(backup)], allowed_fails=10_000)
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(lambda _: r.chat("m", MESSAGES), range(400)))
    assert {x.provider for x in replies} == {"backup"}
    assert r.state()[0]["failures"] == 400 and r.state()[1]["failures"] == 0
