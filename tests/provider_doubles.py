"""Test doubles of an OpenAI-compatible server and of Google's Gemini API, for tests/test_providers.py.

Like tests/ollama_double.py (the same plumbing, from tests/http_double.py: stdlib http.server.ThreadingHTTPServer
on 127.0.0.1, a port the OS picks, a daemon thread, keep-alive HTTP/1.1, bodies with a Content-Length or chunked),
these are small in-memory servers that answer the parts of each API serving/providers.py uses, with the request and
response shapes the providers' documentation gives, so the tests are contract tests of what a provider sends and
what it parses:

  OpenAIDouble (https://platform.openai.com/docs/api-reference/chat), under /v1:
    GET  /v1/models                  {"object": "list", "data": [{"id", "object": "model", ...}]}
    POST /v1/chat/completions        {model, messages, temperature, top_p, max_tokens, seed, stop, stream,
                                      stream_options}; a chat.completion, or with stream: SSE `data: {chunk}`
                                      events (delta.content), a usage-only chunk when stream_options.include_usage,
                                      then `data: [DONE]`
  GeminiDouble (https://ai.google.dev/api/generate-content), under /v1beta:
    GET  /v1beta/models              {"models": [{"name": "models/<id>", ...}]}
    POST /v1beta/models/<m>:generateContent          {contents, systemInstruction, generationConfig, ...}
    POST /v1beta/models/<m>:streamGenerateContent    ?alt=sse: SSE `data: {GenerateContentResponse}` chunks,
                                                     the last with finishReason and full usageMetadata;
                                                     without alt=sse a JSON array of the same chunks

Both refuse what the real APIs refuse: unknown request fields (OpenAI: "Unrecognized request argument"; Gemini:
"Unknown name ... Cannot find field", also inside generationConfig), malformed messages or parts, unknown models
(404), a wrong or missing key (OpenAI: 401 invalid_api_key; Gemini: 403 PERMISSION_DENIED without a key, 400
INVALID_ARGUMENT / API_KEY_INVALID with a wrong one, as Google answers). The OpenAI double echoes a wrong key in
its 401 message (some compatible servers do), so a test can check that the provider keeps it out of its errors.

Token counts are deterministic: prompt = whitespace-separated words of every text (system included) plus
IMAGE_TOKENS per image; completion = words of the answer.

    with OpenAIDouble(required_key="sk-test") as double:
        httpx.post(f"{double.url}/chat/completions", ...)      # double.url ends in /v1
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qs, unquote

from http_double import DoubleHandler, HTTPDouble  # tests/ is on sys.path, as for the tests' own imports

DEFAULT_ANSWER = "Open Purchasing > Purchase Request, enter the item and quantity, then press Save."
OPENAI_IMAGE_TOKENS = 85
"""Prompt tokens the OpenAI double counts per image (a low-detail image, as OpenAI bills it)."""
GEMINI_IMAGE_TOKENS = 258
"""Prompt tokens the Gemini double counts per image (what Gemini bills a small image)."""


def words(text: str) -> int:
    return len(text.split())


def pieces(text: str) -> list[str]:
    """The answer cut into streamed deltas (a word and its trailing space each); joined they give it back."""
    return re.findall(r"\S+\s*|\s+", text)


def _is_b64(data: Any) -> bool:
    try:
        base64.b64decode(data, validate=True)
        return isinstance(data, str) and bool(data)
    except (binascii.Error, ValueError, TypeError):
        return False


# ---- plumbing shared by both doubles (the HTTP side is http_double's) ------------------------------------
class _Handler(DoubleHandler):
    def send_sse(self, events: list[str], error_after: int | None = None, error_event: str | None = None) -> None:
        """`data: <event>` server-sent events, chunked; with error_after, `error_event` replaces the rest."""
        if error_after is not None:
            events = events[:error_after] + [error_event or "{}"]
        self.send_chunked("text/event-stream", (f"data: {event}\r\n\r\n".encode("utf-8") for event in events),
                          {"Cache-Control": "no-cache"})

    def _dispatch(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        payload, bad_json = self.decode_json(self.read_body())
        d = self.double
        with d.lock:
            d.requests.append((method, self.path))
            d.request_json.append((method, self.path, payload))
            d.request_headers.append((method, self.path, {k.lower(): v for k, v in self.headers.items()}))
        d.route(self, method, unquote(path), {k: v[-1] for k, v in parse_qs(query).items()}, payload, bad_json)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")


class _Double(HTTPDouble):
    """Start/stop and the knobs both doubles share (see the subclasses)."""

    def __init__(self, answer: str, models: tuple[str, ...], required_key: str | None) -> None:
        self.answer = answer
        self.models = list(models)
        self.required_key = required_key
        self.error_status: int | None = None
        self.error_message: str | None = None
        self.delay_s = 0.0
        self.stream_error_after: int | None = None
        self.requests: list[tuple[str, str]] = []
        self.request_json: list[tuple[str, str, Any]] = []
        self.request_headers: list[tuple[str, str, dict[str, str]]] = []
        super().__init__(_Handler)

    def route(self, h: _Handler, method: str, path: str, query: dict, payload: Any, bad_json: bool) -> None:
        raise NotImplementedError

    def bodies(self, suffix: str) -> list[Any]:
        """JSON bodies of the POSTs whose path (query left out) ends with `suffix`, in order."""
        with self.lock:
            return [b for m, p, b in self.request_json if m == "POST" and p.split("?", 1)[0].endswith(suffix)]

    def headers(self, suffix: str) -> list[dict[str, str]]:
        """Headers (lower-case names) of the requests whose path (query left out) ends with `suffix`, in order."""
        with self.lock:
            return [hd for _, p, hd in self.request_headers if p.split("?", 1)[0].endswith(suffix)]

    def _knobs(self) -> tuple[str, int | None, str | None, float, int | None]:
        with self.lock:
            return self.answer, self.error_status, self.error_message, self.delay_s, self.stream_error_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r}, models={self.models})"


# ---- OpenAI ---------------------------------------------------------------------------------------------
_OPENAI_FIELDS = {"model", "messages", "stream", "stream_options", "temperature", "top_p", "max_tokens",
                  "max_completion_tokens", "seed", "stop", "n", "presence_penalty", "frequency_penalty", "logit_bias",
                  "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls", "user",
                  "metadata", "store", "service_tier", "reasoning_effort", "modalities", "prediction", "audio"}
_OPENAI_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _openai_error(message: str, type_: str = "invalid_request_error", code: str | None = None,
                  param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _openai_content_error(content: Any) -> str | None:
    """Why a message's content is invalid, or None (a string, or a list of text / image_url parts)."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list) or not content:
        return "content must be a string or a non-empty array of content parts"
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image_url" and isinstance(part.get("image_url"), dict):
            url = part["image_url"].get("url")
            m = re.match(r"^data:(image/(?:png|jpeg|gif|webp));base64,(.*)$", url or "", re.S)
            if (m and _is_b64(m.group(2))) or (url or "").startswith("https://"):
                continue
            return "Invalid image_url: expected an https URL or a base64 data URL of a png, jpeg, gif or webp image"
        return f"Invalid content part: {json.dumps(part)[:80]}"
    return None


class OpenAIDouble(_Double):
    """An OpenAI-compatible server on http://127.0.0.1:<port>/v1, started by the constructor.

    Knobs (set between requests): answer; models (ids served; others 404 model_not_found); required_key (None:
    no auth; else `Authorization: Bearer <key>` or 401); error_status (None, or a status the chat endpoint answers
    with an OpenAI error body, e.g. 429 or 500) and error_message; delay_s (seconds each chat waits before
    answering); stream_error_after (None, or a number of events after which a stream sends an error event and
    ends without [DONE]). Records: requests [(method, path)], request_json [(method, path, body)],
    request_headers [(method, path, headers)]; bodies(suffix) / headers(suffix) filter them.
    """

    prefix = "/v1"

    def __init__(self, answer: str = DEFAULT_ANSWER, models: tuple[str, ...] = ("gpt-4o-mini", "llava-v1.6"),
                 required_key: str | None = None) -> None:
        super().__init__(answer, models, required_key)

    def _auth_error(self, h: _Handler) -> bool:
        if self.required_key is None:
            return False
        auth = h.headers.get("Authorization") or ""
        if auth == f"Bearer {self.required_key}":
            return False
        given = auth.removeprefix("Bearer ").strip()
        message = (f"Incorrect API key provided: {given}. You can find your API key at "
                   "https://platform.openai.com/account/api-keys." if given else
                   "You didn't provide an API key. You need to provide your API key in an Authorization header "
                   "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        h.send_json(401, _openai_error(message, code="invalid_api_key"))
        return True

    def route(self, h: _Handler, method: str, path: str, query: dict, payload: Any, bad_json: bool) -> None:
        if path == "/v1/models" and method == "GET":
            if not self._auth_error(h):
                h.send_json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 1700000000, "owned_by": "double"} for m in self.models]})
        elif path == "/v1/chat/completions" and method == "POST":
            if not self._auth_error(h):
                self._chat(h, payload, bad_json)
        else:
            h.send_json(404, _openai_error(f"Invalid URL ({method} {path})"))

    def _check(self, p: Any) -> tuple[int, dict] | None:
        """(status, error body) for a request the real API refuses, else None."""
        if not isinstance(p, dict):
            return 400, _openai_error("We could not parse the JSON body of your request.")
        unknown = sorted(set(p) - _OPENAI_FIELDS)
        if unknown:
            return 400, _openai_error(f"Unrecognized request argument supplied: {unknown[0]}")
        if not p.get("model"):
            return 400, _openai_error("you must provide a model parameter")
        messages = p.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _openai_error("'messages' must be a non-empty array", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _OPENAI_ROLES:
                return 400, _openai_error(f"Invalid value for 'messages[{i}].role'", param=f"messages[{i}].role")
            if why := _openai_content_error(m.get("content")):
                return 400, _openai_error(f"messages[{i}]: {why}", param=f"messages[{i}].content")
        if "stream_options" in p and not p.get("stream"):
            return 400, _openai_error("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                                      param="stream_options")
        if "max_tokens" in p and (not isinstance(p["max_tokens"], int) or p["max_tokens"] < 1):
            return 400, _openai_error("max_tokens must be a positive integer", param="max_tokens")
        if p["model"] not in self.models:
            return 404, _openai_error(f"The model `{p['model']}` does not exist or you do not have access to it.",
                                      code="model_not_found")
        return None

    @staticmethod
    def prompt_tokens(messages: list[dict]) -> int:
        total = 0
        for m in messages:
            content = m.get("content")
            if isinstance(content, str):
                total += words(content)
            else:
                for part in content:
                    total += words(part["text"]) if part["type"] == "text" else OPENAI_IMAGE_TOKENS
        return total

    def _chat(self, h: _Handler, p: Any, bad_json: bool) -> None:
        answer, error_status, error_message, delay_s, error_after = self._knobs()
        unparsable = (400, _openai_error("We could not parse the JSON body of your request."))
        refused = unparsable if bad_json else self._check(p)
        if refused:
            return h.send_json(*refused)
        if delay_s:
            time.sleep(delay_s)
        if error_status is not None:
            if error_status == 429:
                body = _openai_error(error_message or "Rate limit reached for requests", "requests",
                                     "rate_limit_exceeded")
            else:
                body = _openai_error(error_message or "The server had an error while processing your request.",
                                     "server_error" if error_status >= 500 else "invalid_request_error")
            return h.send_json(error_status, body)
        model, created, cid = p["model"], int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        usage = {"prompt_tokens": self.prompt_tokens(p["messages"]), "completion_tokens": words(answer)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not p.get("stream"):
            return h.send_json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer, "refusal": None},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": usage, "system_fingerprint": "fp_double"})
        with_usage = bool((p.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None, choices: bool = True, use: dict | None = None) -> str:
            obj: dict = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "system_fingerprint": "fp_double",
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                         if choices else []}
            if with_usage:
                obj["usage"] = use
            return json.dumps(obj, ensure_ascii=False)

        events = [chunk({"role": "assistant", "content": "", "refusal": None})]
        events += [chunk({"content": s}) for s in pieces(answer)]
        events.append(chunk({}, "stop"))
        if with_usage:
            events.append(chunk({}, choices=False, use=usage))
        events.append("[DONE]")
        error = json.dumps(_openai_error("The server had an error while processing your request.", "server_error"))
        h.send_sse(events, error_after, error)


# ---- Gemini ---------------------------------------------------------------------------------------------
_GEMINI_FIELDS = {"contents", "systemInstruction", "system_instruction", "generationConfig", "generation_config",
                  "safetySettings", "safety_settings", "tools", "toolConfig", "tool_config", "cachedContent",
                  "cached_content", "labels"}
_GENERATION_CONFIG = {"temperature", "topP", "top_p", "topK", "top_k", "candidateCount", "candidate_count",
                      "maxOutputTokens", "max_output_tokens", "stopSequences", "stop_sequences", "seed",
                      "presencePenalty", "presence_penalty", "frequencyPenalty", "frequency_penalty",
                      "responseMimeType", "response_mime_type", "responseSchema", "response_schema",
                      "responseLogprobs", "response_logprobs", "logprobs", "thinkingConfig", "thinking_config"}
_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                  500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_GOOGLE_MESSAGE = {429: "Resource has been exhausted (e.g. check quota).",
                   500: "An internal error has occurred. Please retry or report in "
                        "https://developers.generativeai.google/guide/troubleshooting",
                   503: "The model is overloaded. Please try again later."}


def _google_error(code: int, message: str, details: list | None = None) -> dict:
    err: dict = {"code": code, "message": message, "status": _GOOGLE_STATUS.get(code, "UNKNOWN")}
    if details:
        err["details"] = details
    return {"error": err}


def _gemini_parts_error(parts: Any, where: str) -> str | None:
    if not isinstance(parts, list) or not parts:
        return f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty."
    for part in parts:
        if not isinstance(part, dict):
            return f"Invalid JSON payload received. Invalid value at '{where}.parts'"
        blob = part.get("inline_data", part.get("inlineData"))
        if "text" in part:
            if not isinstance(part["text"], str):
                return f"Invalid value at '{where}.parts.text' (TYPE_STRING)"
        elif blob is not None:
            mime = blob.get("mime_type", blob.get("mimeType")) if isinstance(blob, dict) else None
            if not mime or not _is_b64(blob.get("data")):
                return f"* GenerateContentRequest.{where}.parts.inline_data: mime_type and base64 data are required"
        else:
            return f"* GenerateContentRequest.{where}.parts: contents.parts must have a text or inline_data field."
    return None


class GeminiDouble(_Double):
    """Google's Gemini API on http://127.0.0.1:<port>/v1beta, started by the constructor.

    Knobs (set between requests): answer; models (ids without "models/"; others 404); required_key (None: no auth;
    else header `x-goog-api-key` or query `key`: missing -> 403 PERMISSION_DENIED, wrong -> 400 API_KEY_INVALID);
    error_status / error_message (the generate endpoints answer a Google error body with that status);
    delay_s; stream_error_after (events before an error event ends the stream); block_reason (None, or e.g.
    "SAFETY": the reply has promptFeedback.blockReason and no candidates). Records as OpenAIDouble's; `requests`
    paths keep their query string (`?alt=sse`).
    """

    prefix = "/v1beta"

    def __init__(self, answer: str = DEFAULT_ANSWER, models: tuple[str, ...] = ("gemini-2.0-flash",),
                 required_key: str | None = None) -> None:
        super().__init__(answer, models, required_key)
        self.block_reason: str | None = None

    def _auth_error(self, h: _Handler, query: dict) -> bool:
        if self.required_key is None:
            return False
        given = h.headers.get("x-goog-api-key") or query.get("key")
        if given == self.required_key:
            return False
        if not given:
            h.send_json(403, _google_error(403, "Method doesn't allow unregistered callers (callers without "
                                                "established identity). Please use API Key or other form of API "
                                                "consumer identity to call this API."))
        else:
            h.send_json(400, _google_error(400, "API key not valid. Please pass a valid API key.", [
                {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]))
        return True

    def route(self, h: _Handler, method: str, path: str, query: dict, payload: Any, bad_json: bool) -> None:
        m = re.match(r"^/v1beta/models/([^/:]+):(generateContent|streamGenerateContent)$", path)
        if path == "/v1beta/models" and method == "GET":
            if not self._auth_error(h, query):
                h.send_json(200, {"models": [
                    {"name": f"models/{x}", "version": "001", "displayName": x, "inputTokenLimit": 1048576,
                     "outputTokenLimit": 8192, "supportedGenerationMethods": ["generateContent", "countTokens"]}
                    for x in self.models]})
        elif m and method == "POST":
            if not self._auth_error(h, query):
                self._generate(h, m.group(1), m.group(2) == "streamGenerateContent", query.get("alt") == "sse",
                               payload, bad_json)
        else:
            h.send_json(404, _google_error(404, f"Method not found: {method} {path}"))

    def _check(self, model: str, p: Any) -> tuple[int, dict] | None:
        if not isinstance(p, dict):
            return 400, _google_error(400, "Invalid JSON payload received.")
        for name in sorted(set(p) - _GEMINI_FIELDS):
            return 400, _google_error(400, f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
        config = p.get("generationConfig", p.get("generation_config")) or {}
        for name in sorted(set(config) - _GENERATION_CONFIG):
            return 400, _google_error(400, f'Invalid JSON payload received. Unknown name "{name}" at '
                                           f"'generation_config': Cannot find field.")
        stops = config.get("stopSequences", config.get("stop_sequences"))
        if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
            return 400, _google_error(400, "Invalid value at 'generation_config.stop_sequences' (TYPE_STRING)")
        contents = p.get("contents")
        if not isinstance(contents, list) or not contents:
            return 400, _google_error(400, "* GenerateContentRequest.contents: contents is not specified")
        for i, c in enumerate(contents):
            if not isinstance(c, dict) or c.get("role", "user") not in ("user", "model"):
                return 400, _google_error(400, "Please use a valid role: user, model.")
            if why := _gemini_parts_error(c.get("parts"), f"contents[{i}]"):
                return 400, _google_error(400, why)
        system = p.get("systemInstruction", p.get("system_instruction"))
        if system is not None and (why := _gemini_parts_error(system.get("parts") if isinstance(system, dict)
                                                              else None, "system_instruction")):
            return 400, _google_error(400, why)
        if model not in self.models:
            return 404, _google_error(404, f"models/{model} is not found for API version v1beta, or is not "
                                           "supported for generateContent. Call ListModels to see the list of "
                                           "available models and their supported methods.")
        return None

    @staticmethod
    def prompt_tokens(p: dict) -> int:
        system = p.get("systemInstruction", p.get("system_instruction"))
        total = 0
        for c in p["contents"] + ([system] if system else []):
            for part in c["parts"]:
                total += words(part["text"]) if "text" in part else GEMINI_IMAGE_TOKENS
        return total

    def _generate(self, h: _Handler, model: str, stream: bool, sse: bool, p: Any, bad_json: bool) -> None:
        answer, error_status, error_message, delay_s, error_after = self._knobs()
        refused = (400, _google_error(400, "Invalid JSON payload received.")) if bad_json else self._check(model, p)
        if refused:
            return h.send_json(*refused)
        if delay_s:
            time.sleep(delay_s)
        if error_status is not None:
            message = error_message or _GOOGLE_MESSAGE.get(error_status, "Request failed.")
            return h.send_json(error_status, _google_error(error_status, message))
        prompt, rid = self.prompt_tokens(p), uuid.uuid4().hex[:20]
        if self.block_reason:
            return h.send_json(200, {"promptFeedback": {"blockReason": self.block_reason},
                                     "usageMetadata": {"promptTokenCount": prompt, "totalTokenCount": prompt},
                                     "modelVersion": model, "responseId": rid})

        def response(text: str, finish: str | None, usage: dict) -> dict:
            candidate: dict = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
            if finish:
                candidate["finishReason"] = finish
            return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": rid}

        done = {"promptTokenCount": prompt, "candidatesTokenCount": words(answer),
                "totalTokenCount": prompt + words(answer),
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
        if not stream:
            return h.send_json(200, response(answer, "STOP", done))
        texts = pieces(answer) or [""]
        chunks = [response(t, None, {"promptTokenCount": prompt, "totalTokenCount": prompt}) for t in texts[:-1]]
        chunks.append(response(texts[-1], "STOP", done))
        if not sse:
            return h.send_json(200, chunks)
        error = json.dumps(_google_error(500, _GOOGLE_MESSAGE[500]))
        h.send_sse([json.dumps(c, ensure_ascii=False) for c in chunks], error_after, error)
