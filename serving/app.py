"""The HTTP face of the service: routes, request models, API-key roles, audit, limits and error shapes. What a
route does lives in serving/service.py.

    erpops serve-api                     # http://127.0.0.1:8600/docs (OpenAPI), /ai-models (dashboard)

Every error is JSON `{"detail": "..."}` with a 4xx status that says what was wrong, or 502/503 when a provider
failed; an unexpected fault answers 500 with a request id and is logged, never a traceback in the body.

No `from __future__ import annotations` here: FastAPI reads the annotations of the routes, and the request models
are local to `create_app` (they carry the service's limits).
"""

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.routing import Match

from serving.catalog import RegistryUnavailable, UnknownModel
from serving.keys import Principal
from serving.providers import AllProvidersFailed, ProviderError
from serving.feedback import AlreadyRated, UnknownTrace
from serving.service import ChatInput, FeedbackOff, ImagesRefused, NotReleased, Service, TracingUnavailable

log = logging.getLogger("erpops.serving")

WEB_DIR = Path(__file__).parent / "web"
API = "/api/v1"
LOCAL = Principal("local", "local (auth off)", "admin")
"""Who calls when the service runs with `auth: false`."""


class Error(BaseModel):
    detail: str


ERRORS = {s: {"model": Error, "description": d} for s, d in {
    400: "malformed request (e.g. JSON that does not parse)", 401: "missing or invalid API key",
    403: "the key's role may not do this", 404: "unknown model id or environment",
    409: "the model cannot do this now: it has no release, or it accepts no images", 413: "request body too large",
    422: "a field is missing, of the wrong type or beyond a limit",
    502: "the model provider refused the request (e.g. the model tag is gone)",
    503: "no provider could answer (each failed or is cooling down)"}.items()}


class _App(FastAPI):
    """FastAPI with a body-size limit in front of everything: a body larger than `max_body` bytes (by its
    Content-Length, or counted as it arrives when chunked) is answered 413 before any route sees it. Bodies within
    the limit are read here and handed on whole (routes parse JSON bodies whole anyway)."""

    max_body: int = 8 * 1024 * 1024
    on_too_large: Callable[[dict], None] | None = None
    """Called with the scope of each request answered 413 here (the routes and the audit middleware never see it)."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await super().__call__(scope, receive, send)
        limit = self.max_body
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._too_large(scope, send, limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(scope, send, limit)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await super().__call__(scope, replay, send)

    async def _too_large(self, scope, send, limit: int) -> None:
        if self.on_too_large is not None:
            self.on_too_large(scope)
        await _send_413(send, limit)


async def _send_413(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def request_key(headers: Headers) -> str:
    """The API key a request carries: `Authorization: Bearer <key>`, else `X-API-Key`; "" without one."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    key = credentials.strip() if scheme.lower() == "bearer" else ""
    return key or headers.get("x-api-key", "").strip()


def create_app(service: Service) -> FastAPI:
    """The FastAPI app over a Service; request models carry the service's limits, so OpenAPI states them."""
    s = service.settings

    class _Body(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Parameters(_Body):
        """Generation parameters in Ollama's names."""

        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=1, le=1000)
        num_predict: int | None = Field(None, ge=1, le=s.max_new_tokens)
        seed: int | None = Field(None, ge=0, le=2**31 - 1)
        repeat_penalty: float | None = Field(None, ge=0, le=10)
        stop: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=8)

    Prompt = Annotated[str, Field(min_length=1, max_length=s.max_prompt_chars)]

    class TestRequest(_Body):
        prompt: Prompt
        parameters: Parameters = Parameters()

    class Case(_Body):
        id: Annotated[str, Field(min_length=1, max_length=128)]
        question: Prompt
        reference: Annotated[str, Field(max_length=20_000)]

    Cases = Annotated[list[Case], Field(min_length=1, max_length=s.max_batch_cases)]
    Jsonl = Annotated[str, Field(min_length=1, description="The cases as JSON lines: one {id, question, reference} a line.")]

    class BatchCases(_Body):
        model: str = Field(description="Model id: a version (v3) or an environment (staging).")
        cases: Cases
        parameters: Parameters = Parameters()

    class BatchJsonl(_Body):
        model: str = Field(description="Model id: a version (v3) or an environment (staging).")
        jsonl: Jsonl
        parameters: Parameters = Parameters()

    class CompareCases(_Body):
        baseline: str = Field(description="Model id of the baseline (e.g. the version serving in prod).")
        candidate: str = Field(description="Model id of the candidate; positive deltas favour it.")
        cases: Cases
        parameters: Parameters = Parameters()

    class CompareJsonl(_Body):
        baseline: str = Field(description="Model id of the baseline (e.g. the version serving in prod).")
        candidate: str = Field(description="Model id of the candidate; positive deltas favour it.")
        jsonl: Jsonl
        parameters: Parameters = Parameters()

    class ChatRequest(_Body):
        message: Prompt
        session_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")] | None = None
        stream: bool = False
        images: list[Annotated[str, Field(min_length=4, pattern=r"^[A-Za-z0-9+/]+={0,2}$")]] = Field(
            default_factory=list, max_length=4, description="Base64 images, for models that accept them (else 409).")
        parameters: Parameters = Parameters()

    class SwitchRequest(_Body):
        reason: Annotated[str, Field(max_length=500)] = ""

    class FeedbackRequest(_Body):
        verdict: Literal["up", "down"] = Field(description="Thumbs up or down.")
        correction: Annotated[str, Field(min_length=1, max_length=s.max_prompt_chars * 2)] | None = Field(
            None, description="The answer that should have been given (becomes a training example once curated).")
        comment: Annotated[str, Field(max_length=2000)] | None = None

    class CanaryCompareRequest(_Body):
        limit: int = Field(100, ge=5, le=s.max_batch_cases, description="Most logged questions to ask again.")

    class CanaryPromoteRequest(SwitchRequest):
        full: bool = Field(False, description="Skip the remaining steps: switch to the canary's release now.")

    class PromoteRequest(SwitchRequest):
        source: str = Field(description="Environment whose release is promoted, e.g. staging.")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = _App(title="erpops model management and ERP chat API", version="1", lifespan=lifespan,
                  description="Model management (registry versions, releases, Ollama) and the RAG chat service of "
                              "the ERP assistant. Send an API key as `Authorization: Bearer <key>` or `X-API-Key`.")
    app.state.service = service
    app.max_body = s.max_body_bytes

    # ---- limits, request log, metrics -------------------------------------------------------------
    def audited(method: str, path: str) -> bool:
        """Calls the audit log records: every mutating API call but the chat."""
        return method in ("POST", "PUT", "PATCH", "DELETE") and path.startswith(API) and path != f"{API}/chat"

    def caller(headers: Headers) -> Principal | None:
        """Who a request's key names (LOCAL with auth off); None without a valid key. As `role` reads it."""
        if not s.auth:
            return LOCAL
        key = request_key(headers)
        return service.keys.verify(key) if key else None

    def audit_too_large(scope: dict) -> None:
        """A body refused 413 before routing, audited as the route it was sent to would be."""
        for route in app.router.routes:
            match, child = route.matches(scope)
            if match == Match.FULL:
                break
        else:
            return
        if audited(scope["method"], route.path):
            params = child.get("path_params", {})
            service.keys.audit(caller(Headers(scope=scope)), f"{scope['method']} {route.path}",
                               params.get("model_id") or params.get("env"), 413, f"body over {app.max_body} bytes")

    app.on_too_large = audit_too_large

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # anything not handled below: no traceback leaves the service
            rid = uuid.uuid4().hex[:12]
            log.exception("unhandled error, request %s", rid)
            response = JSONResponse({"detail": f"internal error (request {rid}); see the service log"}, 500)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        service.metrics.requests.labels(request.method, path, str(response.status_code)).inc()
        service.metrics.request_seconds.labels(request.method, path).observe(time.perf_counter() - started)
        if audited(request.method, path):
            target = request.path_params.get("model_id") or request.path_params.get("env")
            outcome = getattr(request.state, "outcome", "")
            service.keys.audit(getattr(request.state, "principal", None), f"{request.method} {path}", target,
                               response.status_code, outcome)
        return response

    # ---- errors -------------------------------------------------------------------------------------
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON body: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"]))
                                                                               for e in errors)}, 400)
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors]
        return JSONResponse({"detail": "; ".join(parts)}, 422)

    def fail(status: int, detail: str):
        return JSONResponse({"detail": detail}, status)

    @app.exception_handler(UnknownModel)
    async def unknown(request: Request, exc: UnknownModel):
        return fail(404, str(exc))

    @app.exception_handler(NotReleased)
    async def not_released(request: Request, exc: NotReleased):
        return fail(409, str(exc))

    @app.exception_handler(ImagesRefused)
    async def images_refused(request: Request, exc: ImagesRefused):
        return fail(409, str(exc))

    @app.exception_handler(RegistryUnavailable)
    @app.exception_handler(TracingUnavailable)
    async def unavailable(request: Request, exc: Exception):
        return fail(503, str(exc))

    @app.exception_handler(ProviderError)
    async def provider_failed(request: Request, exc: ProviderError):
        return fail(503 if isinstance(exc, AllProvidersFailed) else 502, str(exc))

    # ---- auth ---------------------------------------------------------------------------------------
    bearer = HTTPBearer(auto_error=False, description="An erpops API key: `Authorization: Bearer erpk_...`")
    header_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key in `X-API-Key`.")

    def role(required: str):
        # the two schemes are declared for the OpenAPI document; the key is read as `caller` reads it
        def check(request: Request, _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                  _header: Annotated[str | None, Depends(header_key)]) -> Principal:
            if not s.auth:
                principal = LOCAL
            else:
                key = request_key(request.headers)
                if not key:
                    raise HTTPException(401, "missing API key: send `Authorization: Bearer <key>` or `X-API-Key`",
                                        headers={"WWW-Authenticate": "Bearer"})
                principal = service.keys.verify(key)
                if principal is None:
                    raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
            request.state.principal = principal
            if not principal.may(required):
                raise HTTPException(403, f"role {principal.role} may not do this; it needs {required}")
            return principal
        return Depends(check)

    viewer, operator, admin = role("viewer"), role("operator"), role("admin")

    def cases_of(body) -> list[dict]:
        if hasattr(body, "cases"):
            cases = [c.model_dump() for c in body.cases]
        else:
            cases = []
            for n, line in enumerate(body.jsonl.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    cases.append(Case.model_validate_json(line).model_dump())
                except ValueError as e:
                    raise HTTPException(422, f"jsonl line {n}: not a case {{id, question, reference}}: "
                                             f"{str(e).splitlines()[0]}") from None
        if not cases:
            raise HTTPException(422, "no cases")
        if len(cases) > s.max_batch_cases:
            raise HTTPException(422, f"{len(cases)} cases: at most {s.max_batch_cases} per request")
        ids = [c["id"] for c in cases]
        if len(set(ids)) != len(ids):
            raise HTTPException(422, "case ids repeat: they pair the answers of two models")
        return cases

    # ---- health and metrics -------------------------------------------------------------------------
    @app.get("/livez", tags=["health"])
    def livez() -> dict:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"model": dict, "description": "not ready"}})
    def readyz():
        """Ready to answer: the context store answers and a provider is available."""
        checks = service.readiness()
        ready = all(c["ok"] for c in checks.values() if c.get("required", True))
        return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics():
        """Prometheus metrics."""
        body, content_type = service.render_metrics()
        return Response(body, media_type=content_type)

    @app.get(f"{API}/providers", tags=["health"], responses=ERRORS)
    def providers(_: Principal = viewer) -> dict:
        """Each provider's health, asked now (version or model list), with its failure count and cooldown."""
        return {"providers": service.router.health()}

    # ---- models ------------------------------------------------------------------------------------
    models = f"{API}/ai-models"

    @app.get(f"{models}/list", tags=["models"], responses=ERRORS)
    def list_models(_: Principal = viewer) -> dict:
        """Registered versions with aliases, gate verdict, lineage, per-environment state and Ollama state."""
        loaded, present = service.ollama_state()
        return {"env": s.env, "models": service.catalog.models(loaded, present, s.env),
                "providers": service.router.state()}

    @app.post(f"{models}/batch-test", tags=["models"], responses=ERRORS)
    def batch_test(body: BatchCases | BatchJsonl, request: Request, _: Principal = operator) -> dict:
        """Answer every case and score the answers with the gate's metric code."""
        cases = cases_of(body)
        out = service.batch_test(service.resolve(body.model), cases, body.parameters.model_dump())
        request.state.outcome = f"{len(cases)} cases on {out['id']}"
        return out

    @app.post(f"{models}/compare", tags=["models"], responses=ERRORS)
    def compare(body: CompareCases | CompareJsonl, request: Request, _: Principal = operator) -> dict:
        """Two models on the same cases, paired by case id, with the gate's paired bootstrap intervals."""
        from erpops.config import load_recipe

        cases = cases_of(body)
        a, b = service.resolve(body.baseline), service.resolve(body.candidate)
        out = service.compare(a, b, cases, body.parameters.model_dump(), load_recipe(s.recipe).gate)
        request.state.outcome = f"{len(cases)} cases, {a.id} vs {b.id}"
        return out

    @app.get(f"{models}/{{model_id}}", tags=["models"], responses=ERRORS)
    def model_detail(model_id: str, _: Principal = viewer) -> dict:
        """One model: versions' aliases, lineage, gate verdict, releases and where it serves."""
        loaded, present = service.ollama_state()
        return service.catalog.detail(model_id, loaded, present, s.env)

    @app.post(f"{models}/{{model_id}}/start", tags=["models"], responses=ERRORS)
    def start(model_id: str, request: Request, _: Principal = admin) -> dict:
        """Load the model into Ollama's memory (kept for 30 minutes after its last use)."""
        out = service.set_loaded(service.resolve(model_id), True)
        request.state.outcome = f"{out['tag']} {out['state']}"
        return out

    @app.post(f"{models}/{{model_id}}/stop", tags=["models"], responses=ERRORS)
    def stop(model_id: str, request: Request, _: Principal = admin) -> dict:
        """Unload the model from Ollama's memory (keep_alive 0); its tag stays."""
        out = service.set_loaded(service.resolve(model_id), False)
        request.state.outcome = f"{out['tag']} {out['state']}"
        return out

    @app.post(f"{models}/{{model_id}}/test", tags=["models"], responses=ERRORS)
    def test(model_id: str, body: TestRequest, request: Request, _: Principal = operator) -> dict:
        """One prompt with JSON parameters: the answer, latency and token counts."""
        out = service.test(service.resolve(model_id), body.prompt, body.parameters.model_dump())
        request.state.outcome = f"{out['completion_tokens']} tokens in {out['latency_s']} s"
        return out

    @app.get(f"{models}/{{model_id}}/metrics", tags=["models"], responses=ERRORS)
    def model_metrics(model_id: str, _: Principal = viewer) -> dict:
        """Live latency p50/p95/p99, throughput, error rate and tokens/s over the last window."""
        ref = service.resolve(model_id)
        return {"id": ref.id, **service.live.summary(ref.id)}

    # ---- environments (releases) --------------------------------------------------------------------
    @app.get(f"{API}/environments", tags=["releases"], responses=ERRORS)
    def environments(_: Principal = viewer) -> dict:
        """What each environment serves and would roll back to."""
        from deployment.releases import ReleaseLedger
        from serving.catalog import env_roles

        ledger = ReleaseLedger(service.mlflow)
        roles = env_roles(ledger.events(), list(service.deploy.environments))
        by_id = {r.release_id: r for r in ledger.releases()}
        return {"environments": {env: {"current": cur and by_id[cur].to_dict(), "previous": prev and by_id[prev].to_dict()}
                                 for env, (cur, prev) in roles.items()}}

    def env_guard(env: str) -> None:
        if env not in service.deploy.environments:
            raise HTTPException(404, f"unknown environment {env!r}: one of {', '.join(service.deploy.environments)}")

    @app.post(f"{API}/environments/{{env}}/rollback", tags=["releases"], responses=ERRORS)
    def rollback(env: str, body: SwitchRequest, request: Request, who: Principal = admin) -> dict:
        """Switch the environment back to its previous release (model, knowledge base, registry alias together)."""
        from deployment.deploy import ReleaseError, registry_gguf_fetcher, rollback_serving

        env_guard(env)
        try:
            out, champion, stayed = rollback_serving(service.deploy, service.mlflow, env, f"api:{who.actor}",
                                                     body.reason, gguf_for=registry_gguf_fetcher(service.mlflow))
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        except ReleaseError as e:
            raise HTTPException(502, f"rollback of {env} failed at {e.stage}, nothing changed: {e}") from None
        request.state.outcome = f"{env}: {out.previous} -> {out.release.release_id}"
        return {"env": env, "release": out.release.release_id, "version": out.release.model_version,
                "rolled_back": out.previous, "champion": champion, "champion_stayed": stayed}

    @app.post(f"{API}/environments/{{env}}/promote", tags=["releases"], responses=ERRORS)
    def promote(env: str, body: PromoteRequest, request: Request, who: Principal = admin) -> dict:
        """Switch the environment to the release `source` serves (nothing rebuilt), with the approval recorded."""
        from deployment.deploy import ReleaseError, promote_env, registry_gguf_fetcher

        env_guard(env)
        env_guard(body.source)
        try:
            out = promote_env(service.deploy, service.mlflow, body.source, env, f"api:{who.actor}", body.reason,
                              gguf_for=registry_gguf_fetcher(service.mlflow))
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        except ReleaseError as e:
            raise HTTPException(502, f"promote {body.source} -> {env} failed at {e.stage}, {env} unchanged: {e}") from None
        request.state.outcome = f"{env}: {out.previous} -> {out.release.release_id}"
        return {"env": env, "release": out.release.release_id, "version": out.release.model_version,
                "previous": out.previous}

    @app.get(f"{API}/environments/{{env}}/canary", tags=["releases"], responses=ERRORS)
    def canary(env: str, _: Principal = viewer) -> dict:
        """The environment's newest canary (or A/B test): status, weight, step, policy, and its events."""
        env_guard(env)
        state, events = service.canaries.latest(env)
        return {"env": env, "canary": state.to_dict() if state else None, "events": [e.to_dict() for e in events]}

    @app.post(f"{API}/environments/{{env}}/canary/promote", tags=["releases"], responses=ERRORS)
    def canary_promote(env: str, body: CanaryPromoteRequest, request: Request, who: Principal = admin) -> dict:
        """A paused or progressing canary to its next step; at the last step (or `full`) the environment switches
        to the canary's release."""
        from deployment.deploy import registry_gguf_fetcher
        from deployment.rollout import CanaryError, promote_canary

        env_guard(env)
        try:
            state = promote_canary(service.deploy, service.mlflow, env, f"api:{who.actor}", body.reason, body.full,
                                   registry_gguf_fetcher(service.mlflow))
        except CanaryError as e:
            raise HTTPException(409, str(e)) from None
        request.state.outcome = f"{env}: canary {state.canary_id} {state.status} at {state.weight:g}%"
        return {"env": env, "canary": state.to_dict()}

    @app.post(f"{API}/environments/{{env}}/canary/compare", tags=["releases"], responses=ERRORS)
    def canary_compare(env: str, body: CanaryCompareRequest, _: Principal = operator) -> dict:
        """A/B: the canary's logged questions asked again of both releases, paired by question, compared with the
        gate's paired bootstrap (good answers, language agreement, latency). Positive deltas favour B (the canary)."""
        from erpops.config import load_recipe

        env_guard(env)
        if env != s.env:
            raise HTTPException(409, f"this service serves {s.env}; ask a service of {env}")
        try:
            return service.ab_compare(load_recipe(s.recipe).gate, body.limit)
        except ValueError as e:
            raise HTTPException(409, str(e)) from None

    @app.post(f"{API}/environments/{{env}}/canary/abort", tags=["releases"], responses=ERRORS)
    def canary_abort(env: str, body: SwitchRequest, request: Request, who: Principal = admin) -> dict:
        """Weight 0 now: the stable release (which never stopped serving) answers every conversation."""
        from deployment.rollout import CanaryError, abort_canary

        env_guard(env)
        try:
            state = abort_canary(service.deploy, service.mlflow, env, f"api:{who.actor}", body.reason)
        except CanaryError as e:
            raise HTTPException(409, str(e)) from None
        request.state.outcome = f"{env}: canary {state.canary_id} aborted"
        return {"env": env, "canary": state.to_dict()}

    @app.get(f"{API}/audit", tags=["releases"], responses=ERRORS)
    def audit(limit: Annotated[int, Field(ge=1, le=1000)] = 100, _: Principal = admin) -> dict:
        """The newest audit entries (who did what, when, with what result)."""
        return {"entries": [e.to_dict() for e in service.keys.audit_log(limit)]}

    # ---- chat -------------------------------------------------------------------------------------
    @app.post(f"{API}/chat", tags=["chat"], responses={**ERRORS, 200: {
        "description": "The answer; with `stream: true`, NDJSON events (start, delta..., done or error)",
        "content": {"application/x-ndjson": {}}}})
    def chat(body: ChatRequest, who: Principal = viewer) -> Any:
        """Ask the ERP assistant: retrieval over the environment's knowledge base, the session's last turns, the
        answer with its sources. A session id names a conversation of the asking key only."""
        req = ChatInput(body.message, body.session_id, body.images, body.parameters.model_dump(), who.key_id)
        if body.stream:
            events = service.chat_stream(req)
            return StreamingResponse((json.dumps(e, ensure_ascii=False) + "\n" for e in events),
                                     media_type="application/x-ndjson")
        return service.chat(req).__dict__

    @app.post(f"{API}/chat/{{trace_id}}/feedback", tags=["chat"], responses=ERRORS)
    def feedback(trace_id: Annotated[str, FPath(max_length=64)], body: FeedbackRequest, who: Principal = viewer) -> dict:
        """A verdict on an answer (thumbs up or down), with an optional corrected answer and comment, recorded on
        the answer's MLflow trace (the MLflow UI shows it beside the trace). One verdict per key and answer."""
        try:
            return service.feedback(trace_id, body.verdict, who.actor, body.correction, body.comment)
        except UnknownTrace as e:
            raise HTTPException(404, str(e)) from None
        except (AlreadyRated, FeedbackOff) as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/hooks/alertmanager", tags=["health"], status_code=202, responses={
        400: {"model": Error, "description": "not an Alertmanager payload"},
        401: {"model": Error, "description": "no valid bearer secret or signature"},
        409: {"model": Error, "description": "a replayed or stale signed webhook"},
        403: {"model": Error, "description": "no alert secret configured: webhooks are off"}})
    async def alertmanager(request: Request) -> dict:
        """Alertmanager's webhook (bearer secret), or a signed one (X-Erpops-Timestamp, X-Erpops-Signature): a
        firing alert labelled action=retrain requests a retrain (a Prefect event), at most once per window."""
        from starlette.concurrency import run_in_threadpool

        from serving.alerting import WebhookRefused

        body = await request.body()
        try:
            return await run_in_threadpool(service.receive_alert, dict(request.headers), body)
        except WebhookRefused as e:
            log.warning("alert webhook refused (%s): %s", e.status, e)
            raise HTTPException(e.status, str(e)) from None

    # ---- dashboard -------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    @app.get("/ai-models", include_in_schema=False)
    def dashboard() -> HTMLResponse:
        return HTMLResponse((WEB_DIR / "ai-models.html").read_text(encoding="utf-8"))

    return app

