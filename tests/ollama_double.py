"""A test double of an Ollama server, for the unit tests of deployment/ollama_deploy.py.

This module lives only under tests/ and is never imported by erpops itself. It is a small, in-memory
HTTP server (stdlib only: http.server.ThreadingHTTPServer in a background thread, on a port picked by
the OS) that answers the parts of Ollama's REST API that erpops uses, as
https://github.com/ollama/ollama/blob/main/docs/api.md documents them and as the official `ollama`
Python client sends and parses them:

    HEAD   /api/blobs/<digest>   200 if the blob is stored, else 404
    POST   /api/blobs/<digest>   store the body; 400 unless sha256(body) equals the digest; 201
    POST   /api/create           {model, files, template, system, parameters, stream}
    POST   /api/show             {model}
    GET    /api/tags
    POST   /api/generate         {model, prompt, options, stream}; a canned, configurable answer
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
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    double: "OllamaDouble"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response has a length or is chunked
    server_version = "OllamaDouble"
    timeout = 30  # idle keep-alive connections do not hold a thread forever

    # ---- plumbing -------------------------------------------------------------------------------
    @property
    def double(self) -> "OllamaDouble":
        return self.server.double  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def _path(self) -> str:
        return self.path.split("?", 1)[0]

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _send_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_text(self, status: int, text: str) -> None:
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_stream(self, objects: list[dict]) -> None:
        """Newline-delimited JSON, chunked, as Ollama streams."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for obj in objects:
            line = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
            self.wfile.write(f"{len(line):x}\r\n".encode("ascii") + line + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _dispatch(self, method: str) -> None:
        path = self._path()
        raw = b"" if method == "HEAD" else self._read_body()
        payload: Any = None
        is_blob = path.startswith("/api/blobs/")
        bad_json = False
        if raw and not is_blob:
            try:
                payload = json.loads(raw)
            except ValueError:
                bad_json = True
        with self.double.lock:
            self.double.requests.append((method, path))
            self.double.request_json.append((method, path, payload))
        if bad_json:
            return self._send_error(400, "invalid JSON in request body")
        if payload is not None and not isinstance(payload, dict):
            return self._send_error(400, "request body must be a JSON object")
        payload = payload or {}

        routes = {
            ("GET", "/"): lambda: self._send_text(200, "Ollama is running"),
            ("HEAD", "/"): lambda: self._send_empty(200),
            ("GET", "/api/version"): lambda: self._send_json(200, {"version": DOUBLE_VERSION}),
            ("POST", "/api/create"): lambda: self._create(payload),
            ("POST", "/api/show"): lambda: self._show(payload),
            ("GET", "/api/tags"): self._tags,
            ("POST", "/api/generate"): lambda: self._generate(payload),
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
            return self._send_text(404, "404 page not found")
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
            return self._send_empty(200 if found else 404)
        if d.blob_delay_s:
            time.sleep(d.blob_delay_s)
        if hashlib.sha256(body).hexdigest() != m.group(1):
            return self._send_error(400, "digest mismatch")
        with d.lock:
            d.blobs[key] = body
        self._send_empty(201)

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
            self._send_json(200, {"status": "success"})

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
            "capabilities": ["completion"],
            "modified_at": rec["modified_at"],
        }
        if rec["system"]:
            out["system"] = rec["system"]
        self._send_json(200, out)

    def _tags(self) -> None:
        d = self.double
        with d.lock:
            models = [{"name": r["name"], "model": r["name"], "modified_at": r["modified_at"], "size": r["size"],
                       "digest": r["digest"], "details": copy.deepcopy(d.details)}
                      for r in sorted(d.models.values(), key=lambda r: r["name"])]
        self._send_json(200, {"models": models})

    def _generate(self, p: dict) -> None:
        d = self.double
        if not p.get("model"):
            return self._send_error(400, "model is required")
        raw, rec = self._lookup(p)
        if rec is None:
            return self._send_error(404, f"model '{raw}' not found")
        with d.lock:
            error = d.generate_error
            answer = d.answers.get(rec["name"], d.answer)
        if answer == DEFAULT_ANSWER and p.get("prompt") and not re.search("[\uac00-\ud7a3]", p["prompt"]):
            answer = DEFAULT_ANSWER_EN
        if error is not None:
            return self._send_error(500, error)
        created = _now()
        if not p.get("prompt"):  # Ollama: an empty prompt only loads the model, or unloads it with keep_alive 0
            unload = p.get("keep_alive") in (0, "0", "0s")
            with d.lock:
                (d.unloaded.append if unload else d.loaded_log.append)(rec["name"])
            answer, reason = "", ("unload" if unload else "load")
        else:
            reason = "stop"
            if d.generate_delay_s:
                time.sleep(d.generate_delay_s)
        stats = {"total_duration": 1_000_000, "load_duration": 100_000, "prompt_eval_count": 8,
                 "prompt_eval_duration": 200_000, "eval_count": len(answer.split()), "eval_duration": 700_000}
        if p.get("stream", True):
            pieces = re.findall(r"\S+\s*|\s+", answer)
            chunks = [{"model": raw, "created_at": created, "response": s, "done": False} for s in pieces]
            chunks.append({"model": raw, "created_at": created, "response": "", "done": True,
                           "done_reason": reason, "context": [1, 2, 3], **stats})
            return self._send_stream(chunks)
        self._send_json(200, {"model": raw, "created_at": created, "response": answer, "done": True,
                              "done_reason": reason, "context": [1, 2, 3], **stats})

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
        self._send_empty(200)

    def _delete(self, p: dict) -> None:
        d = self.double
        raw = p.get("model") or p.get("name")
        if not raw:
            return self._send_error(400, "model is required")
        with d.lock:
            if d.models.pop(normalize_name(raw), None) is None:
                return self._send_error(404, f"model '{raw}' not found")
        self._send_empty(200)


class OllamaDouble:
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
      unloaded        names a keep_alive=0 request without a prompt unloaded, in order
      loaded_log      names a request without a prompt loaded, in order
      details         the `details` object of /api/show and /api/tags
    """

    def __init__(self, answer: str = DEFAULT_ANSWER, host: str = "127.0.0.1") -> None:
        self.lock = threading.RLock()
        self.answer = answer
        self.answers: dict[str, str] = {}
        self.generate_error: str | None = None
        self.create_error: str | None = None
        self.blob_delay_s = 0.0
        self.generate_delay_s = 0.0
        self.unloaded: list[str] = []
        self.loaded_log: list[str] = []
        self.models: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.request_json: list[tuple[str, str, Any]] = []
        self.details: dict = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                              "parameter_size": "135M", "quantization_level": "Q8_0"}
        self._server = _Server((host, 0), _Handler)
        self._server.double = self
        self.host, self.port = self._server.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"ollama-double-{self.port}", daemon=True)
        self._thread.start()
        self._stopped = False

    def model(self, name: str) -> dict | None:
        """The stored record for `name` (":latest" implied), or None."""
        with self.lock:
            return self.models.get(normalize_name(name))

    def stop(self) -> None:
        """Stop serving and free the port; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "OllamaDouble":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"OllamaDouble(url={self.url!r}, models={sorted(self.models)})"
