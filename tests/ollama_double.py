"""A test double of an Ollama server, for the unit tests of deployment/ollama_deploy.py.

This module lives only under tests/ and is never imported by erpops itself. It is a small, in-memory
HTTP server (stdlib only, through tests/http_double.py: http.server.ThreadingHTTPServer in a background
thread, on a port picked by the OS) that answers the parts of Ollama's REST API that erpops uses, as
https://github.com/ollama/ollama/blob/main/docs/api.md documents them and as the official `ollama`
Python client sends and parses them:

    HEAD   /api/blobs/<digest>   200 if the blob is stored, else 404
    POST   /api/blobs/<digest>   store the body; 400 unless sha256(body) equals the digest; 201
    POST   /api/create           {model, files, template, system, parameters, stream}
    POST   /api/show             {model}
    GET    /api/tags
    POST   /api/generate         {model, prompt, options, stream}; a canned, configurable answer
    POST   /api/chat             {model, messages, options, stream, keep_alive}; the same answer as `message`
    GET    /api/ps               the models loaded now (a prompt loads a model, keep_alive 0 unloads it)
    POST   /api/copy             {source, destination}
    DELETE /api/delete           {model}
    GET    /  and  GET /api/version

It does not parse GGUF and runs no model: `generate` answers `double.answer` (or a per-model entry of
`double.answers`), and `double.generate_error` makes `generate` fail with HTTP 500. Model names without a
tag mean ":latest". Every request is recorded in `double.requests` as (method, path), and its decoded
JSON body (None where there is none) in `double.request_json` as (method, path, body).

    with OllamaDouble() as double:
        ollama.Client(host=double.url).list()
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from datetime import datetime, timezone
from typing import Any

from http_double import DoubleHandler, HTTPDouble  # tests/ is on sys.path, as for the tests' own imports

DEFAULT_ANSWER = "ERP의 구매 메뉴에서 '구매 요청 등록'을 열고 품목과 수량을 입력한 뒤 저장하세요."
DEFAULT_ANSWER_EN = "Open Finance > Journal Entry, fill in the accounts and amounts, then press Post."
"""What the default answer becomes for a prompt without Hangul, so a healthy double agrees in language."""
DOUBLE_VERSION = "0.0.0-double"

_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")


def normalize_name(name: str) -> str:
    """`name` -> `name:latest`; a name that already has a tag is kept (a registry port is not a tag)."""
    name = (name or "").strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _model_digest(record: dict) -> str:
    """Like Ollama's manifest digest: the same content (a copy included) gives the same digest."""
    body = {k: record.get(k) for k in ("files", "template", "system", "parameters")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _format_parameters(parameters: dict) -> str:
    """The `parameters` text of /api/show: one `name value` line per value, lists one line per item."""
    lines = []
    for key in sorted(parameters):
        values = parameters[key] if isinstance(parameters[key], list) else [parameters[key]]
        for v in values:
            lines.append(f"{key:<30} {json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v}")
    return "\n".join(lines)


class _Handler(DoubleHandler):
    server_version = "OllamaDouble"

    # ---- plumbing (the rest is http_double.DoubleHandler's) ---------------------------------------
    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _send_error(self, status: int, message: str) -> None:
        self.send_json(status, {"error": message})

    def _send_stream(self, objects: list[dict]) -> None:
        """Newline-delimited JSON, chunked, as Ollama streams."""
        self.send_chunked("application/x-ndjson",
                          ((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8") for obj in objects))

    def _dispatch(self, method: str) -> None:
        path = self._path()
        raw = b"" if method == "HEAD" else self.read_body()
        is_blob = path.startswith("/api/blobs/")
        payload, bad_json = (None, False) if is_blob else self.decode_json(raw)
        with self.double.lock:
            self.double.requests.append((method, path))
            self.double.request_json.append((method, path, payload))
        if bad_json:
            return self._send_error(400, "invalid JSON in request body")
        if payload is not None and not isinstance(payload, dict):
            return self._send_error(400, "request body must be a JSON object")
        payload = payload or {}

        routes = {
            ("GET", "/"): lambda: self.send_text(200, "Ollama is running"),
            ("HEAD", "/"): lambda: self.send_empty(200),
            ("GET", "/api/version"): lambda: self.send_json(200, {"version": DOUBLE_VERSION}),
            ("POST", "/api/create"): lambda: self._create(payload),
            ("POST", "/api/show"): lambda: self._show(payload),
            ("GET", "/api/tags"): self._tags,
            ("POST", "/api/generate"): lambda: self._generate(payload),
            ("POST", "/api/chat"): lambda: self._chat(payload),
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/copy"): lambda: self._copy(payload),
            ("DELETE", "/api/delete"): lambda: self._delete(payload),
        }
        if is_blob and method in ("HEAD", "POST"):
            return self._blob(method, path[len("/api/blobs/"):], raw)
        handler = routes.get((method, path))
        if handler is None:
            known = {p for (_, p) in routes} | ({path} if is_blob else set())
            if path in known:
                return self._send_error(405, "method not allowed")
            return self.send_text(404, "404 page not found")
        handler()

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # ---- endpoints ------------------------------------------------------------------------------
    def _blob(self, method: str, digest: str, body: bytes) -> None:
        m = _DIGEST.match(digest)
        if not m:
            return self._send_error(400, f"invalid digest format: {digest!r}")
        key = f"sha256:{m.group(1)}"
        d = self.double
        if method == "HEAD":
            with d.lock:
                found = key in d.blobs
            return self.send_empty(200 if found else 404)
        if d.blob_delay_s:
            time.sleep(d.blob_delay_s)
        if hashlib.sha256(body).hexdigest() != m.group(1):
            return self._send_error(400, "digest mismatch")
        with d.lock:
            d.blobs[key] = body
        self.send_empty(201)

    def _create(self, p: dict) -> None:
        d = self.double
        if d.create_error is not None:
            return self._send_error(500, d.create_error)
        if not p.get("model") and not p.get("name"):
            return self._send_error(400, "model is required")
        if p.get("from"):
            return self._send_error(400, "OllamaDouble: create 'from' an existing model is not implemented")
        files = p.get("files")
        if not files or not isinstance(files, dict):
            return self._send_error(400, "neither 'from' or 'files' was specified")
        name = normalize_name(p.get("model") or p.get("name"))
        resolved = {}
        with d.lock:
            for fname, digest in files.items():
                m = _DIGEST.match(str(digest))
                if not m or f"sha256:{m.group(1)}" not in d.blobs:
                    return self._send_error(400, f"blob {digest} for file {fname!r} not found: upload it first")
                resolved[fname] = f"sha256:{m.group(1)}"
            record = {
                "name": name,
                "files": resolved,
                "template": p.get("template"),
                "system": p.get("system"),
                "parameters": copy.deepcopy(p.get("parameters") or {}),
                "copied_from": None,
                "modified_at": _now(),
                "size": sum(len(d.blobs[x]) for x in resolved.values()),
            }
            record["digest"] = _model_digest(record)
            d.models[name] = record
        if p.get("stream", True):  # Ollama streams unless told not to
            self._send_stream([{"status": "parsing GGUF"}]
                              + [{"status": f"using existing layer {x}"} for x in resolved.values()]
                              + [{"status": "writing manifest"}, {"status": "success"}])
        else:
            self.send_json(200, {"status": "success"})

    def _lookup(self, p: dict, key: str = "model") -> tuple[str, dict | None]:
        raw = p.get(key) or p.get("name") or ""
        name = normalize_name(raw)
        with self.double.lock:
            record = self.double.models.get(name)
            return raw, copy.deepcopy(record) if record else None

    def _show(self, p: dict) -> None:
        raw, rec = self._lookup(p)
        if rec is None:
            return self._send_error(404, f"model '{raw}' not found")
        lines = ['# Modelfile generated by "ollama show"', "# To build a new Modelfile based on this, replace FROM with:",
                 f"# FROM {rec['name']}", ""]
        lines += [f"FROM /blobs/{dg.replace(':', '-')}" for dg in rec["files"].values()]
        if rec["template"] is not None:
            lines.append(f'TEMPLATE """{rec["template"]}"""')
        if rec["system"]:
            lines.append(f'SYSTEM """{rec["system"]}"""')
        for k in sorted(rec["parameters"]):
            vs = rec["parameters"][k] if isinstance(rec["parameters"][k], list) else [rec["parameters"][k]]
            lines += [f"PARAMETER {k} {v}" for v in vs]
        out = {
            "modelfile": "\n".join(lines) + "\n",
            "parameters": _format_parameters(rec["parameters"]),
            "template": rec["template"] or "",
            "details": copy.deepcopy(self.double.details),
            "model_info": {},
            "capabilities": list(self.double.capabilities.get(rec["name"], ["completion"])),
            "modified_at": rec["modified_at"],
        }
        if rec["system"]:
            out["system"] = rec["system"]
        self.send_json(200, out)

    def _tags(self) -> None:
        d = self.double
        with d.lock:
            models = [{"name": r["name"], "model": r["name"], "modified_at": r["modified_at"], "size": r["size"],
                       "digest": r["digest"], "details": copy.deepcopy(d.details)}
                      for r in sorted(d.models.values(), key=lambda r: r["name"])]
        self.send_json(200, {"models": models})

    def _answer(self, p: dict, prompt: str) -> tuple[str, str, dict] | None:
        """(raw name, answer, stats) for a generate/chat request, or None after sending an error. An empty prompt
        only loads the model, or unloads it with keep_alive 0, as Ollama does."""
        d = self.double
        if not p.get("model"):
            self._send_error(400, "model is required")
            return None
        raw, rec = self._lookup(p)
        if rec is None:
            self._send_error(404, f"model '{raw}' not found")
            return None
        with d.lock:
            error = d.errors.get(rec["name"], d.generate_error)
            answer = d.answers.get(rec["name"], d.answer)
            delay = d.delays.get(rec["name"], d.generate_delay_s)
        if answer == DEFAULT_ANSWER and prompt and not re.search("[\uac00-\ud7a3]", prompt):
            answer = DEFAULT_ANSWER_EN
        if error is not None:
            self._send_error(500, error)
            return None
        unload = p.get("keep_alive") in (0, "0", "0s")
        if not prompt:
            with d.lock:
                (d.unloaded.append if unload else d.loaded_log.append)(rec["name"])
            answer, reason = "", ("unload" if unload else "load")
        else:
            reason = "stop"
            if delay:
                time.sleep(delay)
        with d.lock:
            (d.loaded.discard if unload else d.loaded.add)(rec["name"])
        stats = {"done_reason": reason, "total_duration": 1_000_000, "load_duration": 100_000, "prompt_eval_count": 8,
                 "prompt_eval_duration": 200_000, "eval_count": len(answer.split()), "eval_duration": 700_000}
        return raw, answer, stats

    def _reply(self, p: dict, raw: str, answer: str, stats: dict, text: Any, final: dict) -> None:
        """A generate/chat reply: `text(s)` gives the fields that carry s; streamed word by word unless stream is
        false, the last object done with `final` and the stats."""
        head = {"model": raw, "created_at": _now()}
        if p.get("stream", True):
            chunks = [{**head, **text(s), "done": False} for s in re.findall(r"\S+\s*|\s+", answer)]
            chunks.append({**head, **text(""), "done": True, **final, **stats})
            return self._send_stream(chunks)
        self.send_json(200, {**head, **text(answer), "done": True, **final, **stats})

    def _generate(self, p: dict) -> None:
        got = self._answer(p, p.get("prompt") or "")
        if got is not None:
            self._reply(p, *got, lambda s: {"response": s}, {"context": [1, 2, 3]})

    def _chat(self, p: dict) -> None:
        messages = p.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return self._send_error(400, "messages must be a list of objects")
        users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
        got = self._answer(p, users[-1] if users else "")
        if got is not None:
            self._reply(p, *got, lambda s: {"message": {"role": "assistant", "content": s}}, {})

    def _ps(self) -> None:
        d = self.double
        with d.lock:
            models = [{"name": r["name"], "model": r["name"], "size": r["size"], "digest": r["digest"],
                       "details": copy.deepcopy(d.details), "expires_at": _now(), "size_vram": 0}
                      for name, r in sorted(d.models.items()) if name in d.loaded]
        self.send_json(200, {"models": models})

    def _copy(self, p: dict) -> None:
        d = self.double
        if not p.get("source") or not p.get("destination"):
            return self._send_error(400, "source and destination are required")
        src, dst = normalize_name(p["source"]), normalize_name(p["destination"])
        with d.lock:
            if src not in d.models:
                return self._send_error(404, f"model '{p['source']}' not found")
            record = copy.deepcopy(d.models[src])
            record.update(name=dst, copied_from=src, modified_at=_now())
            d.models[dst] = record
        self.send_empty(200)

    def _delete(self, p: dict) -> None:
        d = self.double
        raw = p.get("model") or p.get("name")
        if not raw:
            return self._send_error(400, "model is required")
        with d.lock:
            if d.delete_failures > 0:
                d.delete_failures -= 1
                return self._send_error(500, "injected: the model store could not be written")
            if d.models.pop(normalize_name(raw), None) is None:
                return self._send_error(404, f"model '{raw}' not found")
            d.loaded.discard(normalize_name(raw))
        self.send_empty(200)


class OllamaDouble(HTTPDouble):
    """An in-memory Ollama server on http://127.0.0.1:<free port>, started by the constructor.

    Attributes (read them in assertions, set the knobs between requests):
      url             "http://127.0.0.1:PORT", the host to give `ollama.Client` / erpops
      port            the port the OS picked
      models          {"name:tag": record}; a record has name, files {file name: digest}, template, system,
                      parameters (dict as sent), copied_from (source name for /api/copy, else None),
                      modified_at, size, digest (same for a copy and its source)
      blobs           {"sha256:<hex>": bytes}
      requests        [(method, path)] in arrival order
      request_json    [(method, path, decoded JSON body or None)] in arrival order
      answer          the text /api/generate answers (set "" to act as a broken model); left at the default,
                      a prompt without Hangul gets DEFAULT_ANSWER_EN
      answers         {"name:tag": text} per-model overrides of `answer`
      generate_error  None, or a message: /api/generate then fails with HTTP 500 {"error": message}
      create_error    None, or a message: /api/create then fails with HTTP 500 {"error": message}
      blob_delay_s    seconds an upload waits before it is stored (a client timeout shorter than it fails)
      generate_delay_s seconds every answering /api/generate waits (a slow model)
      errors          {"name:tag": message}: per-model generate_error (a release that fails in service)
      delete_failures how many of the next /api/delete calls fail with HTTP 500 (a server that cannot write)
      delays          {"name:tag": seconds}: per-model generate_delay_s (a release that answers slowly)
      unloaded        names a keep_alive=0 request without a prompt unloaded, in order
      loaded_log      names a request without a prompt loaded, in order
      loaded          names loaded now (/api/ps): a generate or chat loads a model, keep_alive 0 unloads it
      details         the `details` object of /api/show and /api/tags
      capabilities    {"name:tag": [...]}: /api/show's capabilities per model (default ["completion"]; add
                      "vision" for a model that accepts images)
    """

    def __init__(self, answer: str = DEFAULT_ANSWER, host: str = "127.0.0.1") -> None:
        self.answer = answer
        self.answers: dict[str, str] = {}
        self.generate_error: str | None = None
        self.create_error: str | None = None
        self.blob_delay_s = 0.0
        self.generate_delay_s = 0.0
        self.errors: dict[str, str] = {}
        self.delete_failures = 0
        self.delays: dict[str, float] = {}
        self.unloaded: list[str] = []
        self.loaded_log: list[str] = []
        self.loaded: set[str] = set()
        self.models: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.request_json: list[tuple[str, str, Any]] = []
        self.capabilities: dict[str, list[str]] = {}
        self.details: dict = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                              "parameter_size": "135M", "quantization_level": "Q8_0"}
        super().__init__(_Handler, host)

    def _thread_name(self) -> str:
        return f"ollama-double-{self.port}"

    def model(self, name: str) -> dict | None:
        """The stored record for `name` (":latest" implied), or None."""
        with self.lock:
            return self.models.get(normalize_name(name))

    def __enter__(self) -> "OllamaDouble":
        return self

    def __repr__(self) -> str:
        return f"OllamaDouble(url={self.url!r}, models={sorted(self.models)})"
