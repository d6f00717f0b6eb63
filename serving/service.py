"""What the service does, as plain functions on a `Service` (the FastAPI app in serving/app.py only routes to it):
the RAG chat with conversation context, model tests, batch tests and paired comparisons with the gate's code,
loading and unloading models in Ollama, and the release switches an admin may make.

    service = Service.from_settings(load_serve_settings())
    service.chat(ChatInput(message="재고 이동은 어떻게 등록하나요?", session_id="s1"))
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from data_contracts.rules import detect_language
from erpops.config import DeployConfig, GateConfig, MLflowSettings
from serving.batching import DynamicBatcher
from serving.cache import ResponseCache, cache_key, response_cache
from serving.catalog import Catalog, ModelRef
from serving.context import ContextStore, context_store
from serving.keys import KeyStore
from serving.providers import Deployment, ProviderConfig, ProviderError, Reply, Router, build_provider
from serving.rag import Retriever, Source, build_messages
from serving.settings import ServeSettings
from serving.telemetry import LiveStats, Metrics
from serving.tracing import Tracer, trace_id

log = logging.getLogger(__name__)


class NotReleased(RuntimeError):
    """The model id exists but has no Ollama tag to answer with (never released)."""


@dataclass
class ChatInput:
    message: str
    session_id: str | None = None
    images: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)


@dataclass
class ChatOutput:
    answer: str
    session_id: str
    sources: list[dict]
    model: str
    version: str | None
    env: str
    provider: str
    trace_id: str | None
    latency_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    cached: bool = False
    """The answer came from the response cache (same release, conversation, context and parameters)."""


@dataclass
class Service:
    settings: ServeSettings
    deploy: DeployConfig
    mlflow: MLflowSettings
    keys: KeyStore
    context: ContextStore
    router: Router
    retriever: Retriever
    catalog: Catalog
    metrics: Metrics
    live: LiveStats
    tracer: Tracer
    ollama_host: str
    cache: ResponseCache | None = None
    serving_release: str | None = None
    """The environment's release at the last question (a change invalidates the old release's cached answers)."""
    batcher: DynamicBatcher | None = None
    """Non-streamed answers go through it (settings.batch_max / batch_wait_s); None: one by one."""

    def __post_init__(self):
        if self.batcher is None and self.settings.batch_wait_s > 0:
            self.batcher = DynamicBatcher(self._generate_batch, self.settings.batch_max, self.settings.batch_wait_s,
                                          name="erpops-batcher")

    @classmethod
    def from_settings(cls, settings: ServeSettings, deploy: DeployConfig | None = None,
                      mlflow: MLflowSettings | None = None) -> "Service":
        from deployment.deploy import env_target
        from erpops.config import load_mlflow_settings, load_recipe

        deploy = deploy or load_recipe(settings.recipe).deploy
        mlflow = mlflow or load_mlflow_settings()
        target = env_target(deploy, settings.env)
        providers = settings.providers or [ProviderConfig(name="ollama", kind="ollama", base_url=target.host)]
        router = Router([Deployment(build_provider(p), p.model) for p in providers], settings.allowed_fails,
                        settings.cooldown_s)
        threshold = settings.rag_threshold if settings.rag_threshold is not None else deploy.retrieval_threshold
        return cls(settings, deploy, mlflow, KeyStore(settings.data_dir / "serving.db"),
                   context_store(settings.redis_url, settings.context_turns, settings.context_ttl_s), router,
                   Retriever(deploy.milvus_uri, target.alias, deploy.embedding_model, settings.rag_k, threshold),
                   Catalog(deploy, mlflow), Metrics(), LiveStats(settings.metrics_window_s),
                   Tracer(mlflow.tracking_uri, settings.trace_experiment, settings.trace), target.host,
                   response_cache(settings.redis_url, settings.cache_entries, settings.cache_ttl_s) if settings.cache else None)

    # ---- models ---------------------------------------------------------------------------------
    def resolve(self, model_id: str) -> ModelRef:
        return self.catalog.resolve(model_id, self.settings.env)

    def _tag(self, ref: ModelRef) -> str:
        if ref.tag is None:
            raise NotReleased(f"{ref.id} has no release to answer with: `erpops deploy --env dev --version "
                              f"{ref.version}` releases it" if ref.version else f"{ref.id} serves no release yet")
        return ref.tag

    def ollama_state(self) -> tuple[set[str], set[str]]:
        """(tags loaded in memory, tags present) on the environment's Ollama host; empty sets when it is down."""
        import ollama

        client = ollama.Client(host=self.ollama_host, timeout=10)
        try:
            present = {m.model for m in client.list().models}
            loaded = {m.model for m in client.ps().models}
        except Exception as e:  # Ollama down: the catalogue still answers, every model reads absent
            log.warning("Ollama at %s does not answer: %s", self.ollama_host, type(e).__name__)
            return set(), set()
        return loaded, present

    def set_loaded(self, ref: ModelRef, load: bool, keep_alive: str = "30m") -> dict:
        """Load (start) or unload (stop) a model in Ollama: a request without a prompt, keep_alive 0 to unload."""
        import ollama

        tag = self._tag(ref)
        client = ollama.Client(host=self.ollama_host, timeout=self.deploy.ollama_timeout_s)
        try:
            client.generate(model=tag, prompt="", keep_alive=keep_alive if load else 0)
        except ollama.ResponseError as e:
            raise ProviderError(f"Ollama could not {'load' if load else 'unload'} {tag}: {e.error}", provider="ollama",
                                status=e.status_code, retryable=False) from None
        except Exception as e:  # connection refused, timeout: Ollama is not there
            raise ProviderError(f"Ollama at {self.ollama_host} did not answer ({type(e).__name__})", provider="ollama",
                                retryable=True) from None
        loaded, _ = self.ollama_state()
        return {"id": ref.id, "tag": tag, "state": "loaded" if tag in loaded else "available"}

    # ---- answering --------------------------------------------------------------------------------
    def _labels(self, ref: ModelRef, provider: str) -> dict:
        return {"model": self.deploy.ollama_model, "version": ref.version or "none", "env": self.settings.env,
                "provider": provider}

    def _observe(self, ref: ModelRef, reply: Reply | None, seconds: float, error: bool, ids: tuple[str, ...]) -> None:
        labels = self._labels(ref, reply.provider if reply else "none")
        self.metrics.generations.labels(**labels, outcome="error" if error else "ok").inc()
        tokens = (reply.completion_tokens or 0) if reply else 0
        if reply and not error:
            self.metrics.generation_seconds.labels(**labels).observe(seconds)
            self.metrics.tokens.labels(**labels).inc(tokens)
            if tokens and seconds > 0:
                self.metrics.tokens_per_s.labels(**labels).observe(tokens / seconds)
        for model_id in ids:
            self.live.record(model_id, seconds, not error, tokens)

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus exposition, with each provider's up gauge read from the router at scrape time."""
        for state in self.router.state():
            self.metrics.provider_up.labels(provider=state["provider"]).set(0 if state["cooling_down"] else 1)
        return self.metrics.render()

    def generate(self, ref: ModelRef, messages: list[dict], parameters: dict) -> Reply:
        """One answer from the model behind `ref`, through the providers (failover), measured."""
        tag = self._tag(ref)
        t0 = time.perf_counter()
        try:
            reply = self.router.chat(tag, messages, self._options(parameters))
        except ProviderError:
            self._observe(ref, None, time.perf_counter() - t0, True, _ids(ref))
            raise
        self._observe(ref, reply, reply.latency_s, False, _ids(ref))
        return reply

    def generate_batched(self, ref: ModelRef, messages: list[dict], parameters: dict) -> Reply:
        """`generate` through the dynamic batcher: requests close in time are sent to the providers together."""
        if self.batcher is None:
            return self.generate(ref, messages, parameters)
        out = self.batcher.submit((ref, messages, parameters))
        if isinstance(out, BaseException):
            raise out
        return out

    def _generate_batch(self, items: list[tuple]) -> list:
        """A batch at once: each member on its own thread (Ollama batches concurrent requests itself, up to its
        OLLAMA_NUM_PARALLEL); a member's failure is that member's result, not the batch's."""
        from concurrent.futures import ThreadPoolExecutor

        def one(item):
            try:
                return self.generate(*item)
            except Exception as e:
                return e

        if len(items) == 1:
            return [one(items[0])]
        with ThreadPoolExecutor(len(items), thread_name_prefix="erpops-batch") as pool:
            return list(pool.map(one, items))

    def _options(self, parameters: dict) -> dict:
        options = {k: v for k, v in parameters.items() if v is not None}
        options.setdefault("num_predict", min(256, self.settings.max_new_tokens))
        return options

    def test(self, ref: ModelRef, prompt: str, parameters: dict) -> dict:
        reply = self.generate(ref, [{"role": "user", "content": prompt}], parameters)
        tokens_per_s = (reply.completion_tokens / reply.latency_s) if reply.completion_tokens and reply.latency_s > 0 else None
        return {"id": ref.id, "tag": ref.tag, "answer": reply.text, "latency_s": round(reply.latency_s, 4),
                "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "tokens_per_s": round(tokens_per_s, 2) if tokens_per_s else None, "provider": reply.provider,
                "language": detect_language(reply.text)}

    def batch_test(self, ref: ModelRef, cases: list[dict], parameters: dict) -> dict:
        """Answer every case, then score the answers with the gate's metric code (evaluation.answer_scores)."""
        from evaluation.answer_scores import score_answers
        from evaluation.breakdown import percentiles

        from concurrent.futures import ThreadPoolExecutor

        def answer(case: dict) -> Reply:
            return self.generate_batched(ref, [{"role": "user", "content": case["question"]}], parameters)

        with ThreadPoolExecutor(max(1, min(len(cases), self.settings.batch_max))) as pool:  # arrive together: batched
            replies = list(pool.map(answer, cases))
        latencies = [r.latency_s for r in replies]
        rows = [{"id": c["id"], "question": c["question"], "reference": c["reference"], "answer": r.text,
                 "latency_s": round(r.latency_s, 4)} for c, r in zip(cases, replies)]
        means, scored = score_answers([r["answer"] for r in rows], [r["reference"] for r in rows],
                                      [r["question"] for r in rows])
        for row, s in zip(rows, scored):
            row.update(s)
        lat = percentiles(latencies)
        return {"id": ref.id, "tag": ref.tag, "cases": len(rows),
                "metrics": {**means, "latency_p50_s": lat["p50"], "latency_p95_s": lat["p95"]}, "rows": rows}

    def compare(self, a: ModelRef, b: ModelRef, cases: list[dict], parameters: dict, gate: GateConfig) -> dict:
        """Both models on the same cases, paired by case id, with the gate's paired bootstrap per answer metric
        (`b` is the candidate, `a` the baseline; positive deltas favour `b`)."""
        from evaluation.answer_scores import ANSWER_METRICS
        from evaluation.gates import compare, pair_rows

        base, cand = self.batch_test(a, cases, parameters), self.batch_test(b, cases, parameters)
        cfg = gate.model_copy(update={"tolerances": {k: v for k, v in gate.tolerances.items() if k in ANSWER_METRICS}})
        comparisons = compare(pair_rows(cand["rows"], base["rows"]), cfg)
        return {"baseline": {"id": a.id, "metrics": base["metrics"]}, "candidate": {"id": b.id, "metrics": cand["metrics"]},
                "paired_cases": len(cases), "confidence": gate.confidence,
                "comparisons": [c.__dict__ for c in comparisons],
                "rows": [{"id": x["id"], "baseline": x["answer"], "candidate": y["answer"]}
                         for x, y in zip(base["rows"], cand["rows"])]}

    # ---- chat -----------------------------------------------------------------------------------
    def _prepare_chat(self, req: ChatInput):
        ref = self.resolve(self.settings.env)
        self._tag(ref)  # nothing released here yet: 409 before any retrieval or trace
        if ref.release_id != self.serving_release:
            if self.cache is not None and self.serving_release is not None:
                self.cache.invalidate(self.serving_release)
            self.serving_release = ref.release_id
        session = req.session_id or uuid.uuid4().hex
        root = self.tracer.start("chat", {"question": req.message, "session_id": session, "images": len(req.images)},
                                 {"env": self.settings.env, "model_version": ref.version or "none"}, session)
        span = self.tracer.child(root, "retrieval", "RETRIEVER", {"query": req.message})
        try:
            sources, top = self.retriever.retrieve(req.message)
        except Exception as e:
            self.tracer.end(span, error=type(e).__name__)
            self.tracer.end(root, error=type(e).__name__)
            raise
        self.tracer.end(span, [{"page_content": s.text, "metadata": {"doc": s.doc, "title": s.title, "score": s.score}}
                               for s in sources], {"collection_alias": self.retriever.alias, "top_score": top})
        self.metrics.retrieval_hits.labels(env=self.settings.env).observe(len(sources))
        if top is not None:
            self.metrics.retrieval_score.labels(env=self.settings.env).observe(top)
        messages = build_messages(self.settings.system_prompt, self.context.history(session), req.message, sources,
                                  req.images)
        return ref, session, root, sources, messages

    def _finish_chat(self, ref: ModelRef, session: str, root, req: ChatInput, sources: list[Source], reply: Reply,
                     cached: bool = False) -> ChatOutput:
        self.context.append(session, req.message, reply.text)
        if random.random() < self.settings.language_sample_rate:
            agrees = detect_language(reply.text) == detect_language(req.message)
            self.metrics.language.labels(**self._labels(ref, reply.provider), agrees=str(agrees).lower()).inc()
        self.tracer.end(root, {"answer": reply.text, "sources": [s.public() for s in sources]},
                        {"provider": reply.provider, "model": reply.model})
        return ChatOutput(reply.text, session, [s.public() for s in sources], reply.model, ref.version,
                          self.settings.env, reply.provider, trace_id(root), round(reply.latency_s, 4),
                          reply.prompt_tokens, reply.completion_tokens, cached)

    def _check_images(self, ref: ModelRef, req: ChatInput) -> None:
        if req.images and not self.router.supports_images(self._tag(ref)):
            raise ImagesRefused(f"{ref.tag} does not accept images (no vision capability); send the question alone")

    def chat(self, req: ChatInput) -> ChatOutput:
        ref, session, root, sources, messages = self._prepare_chat(req)
        key = (cache_key(ref.release_id, messages, self._options(req.parameters))
               if self.cache is not None and ref.release_id and not req.images else None)
        hit = self.cache.get(key) if key else None
        self.metrics.cache.labels(outcome="off" if key is None else "hit" if hit else "miss").inc()
        if hit is not None:
            reply = Reply(hit["text"], hit["model"], hit["provider"], hit["prompt_tokens"], hit["completion_tokens"], 0.0)
            self.tracer.end(self.tracer.child(root, "cache", "UNKNOWN", {"key": key}), {"hit": True})
            return self._finish_chat(ref, session, root, req, sources, reply, cached=True)
        try:
            self._check_images(ref, req)
            gen = self.tracer.child(root, "generation", "LLM", {"messages": len(messages)}, {"tag": ref.tag})
            try:
                reply = self.generate_batched(ref, messages, req.parameters)
            except Exception as e:
                self.tracer.end(gen, error=type(e).__name__)
                raise
            self.tracer.end(gen, {"answer": reply.text}, _usage(reply))
        except Exception as e:
            self.tracer.end(root, error=type(e).__name__)
            raise
        if key:
            self.cache.put(key, {"text": reply.text, "model": reply.model, "provider": reply.provider,
                                 "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens})
        return self._finish_chat(ref, session, root, req, sources, reply)

    def chat_stream(self, req: ChatInput) -> Iterator[dict]:
        """NDJSON events: `start` (session, sources, trace id), `delta` (text) ..., then `done` (the whole answer,
        tokens, latency) or `error` (a failure after the stream began; HTTP already said 200)."""
        ref, session, root, sources, messages = self._prepare_chat(req)
        try:
            self._check_images(ref, req)
            tag = self._tag(ref)
        except Exception as e:
            self.tracer.end(root, error=type(e).__name__)
            raise
        gen = self.tracer.child(root, "generation", "LLM", {"messages": len(messages)}, {"tag": tag, "stream": True})

        def events() -> Iterator[dict]:
            ended = False
            try:
                yield {"type": "start", "session_id": session, "sources": [s.public() for s in sources],
                       "trace_id": trace_id(root), "env": self.settings.env, "version": ref.version}
                t0 = time.perf_counter()
                try:
                    for piece in self.router.stream(tag, messages, self._options(req.parameters)):
                        if isinstance(piece, str):
                            yield {"type": "delta", "text": piece}
                        else:
                            reply = piece
                except ProviderError as e:
                    self._observe(ref, None, time.perf_counter() - t0, True, _ids(ref))
                    self.tracer.end(gen, error=type(e).__name__)
                    self.tracer.end(root, error=type(e).__name__)
                    ended = True
                    yield {"type": "error", "detail": public_error(e)}
                    return
                self._observe(ref, reply, reply.latency_s, False, _ids(ref))
                self.tracer.end(gen, {"answer": reply.text}, _usage(reply))
                out = self._finish_chat(ref, session, root, req, sources, reply)
                ended = True
                yield {"type": "done", "answer": out.answer, "latency_s": out.latency_s, "provider": out.provider,
                       "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}
            finally:
                if not ended:  # the client went away mid-answer: the trace still ends, marked so
                    self.tracer.end(gen, error="client disconnected")
                    self.tracer.end(root, error="client disconnected")

        return events()

    # ---- health -----------------------------------------------------------------------------------
    def readiness(self) -> dict[str, dict]:
        """Each dependency: ok and a detail. The service is ready when the context store answers and at least one
        provider is not cooling down; a missing knowledge base or model is reported, not fatal."""
        checks = {"context": {"ok": self.context.ping(), "detail": type(self.context).__name__}}
        states = self.router.state()
        checks["providers"] = {"ok": any(not s["cooling_down"] for s in states), "detail": states}
        try:
            collection = self.retriever.collection()
            checks["knowledge_base"] = {"ok": collection is not None, "required": False,
                                        "detail": collection or f"alias {self.retriever.alias} points nowhere yet"}
        except Exception as e:
            checks["knowledge_base"] = {"ok": False, "required": False, "detail": type(e).__name__}
        return checks


class ImagesRefused(ValueError):
    """Images sent to a model that does not accept them."""


def _ids(ref: ModelRef) -> tuple[str, ...]:
    return tuple(dict.fromkeys([ref.id] + ([f"v{ref.version}"] if ref.version else [])))


def _usage(reply: Reply) -> dict:
    return {"provider": reply.provider, "model": reply.model, "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens, "latency_s": reply.latency_s}


def public_error(e: ProviderError) -> str:
    """A provider failure as the API tells it: which provider, the status; never a key or a prompt."""
    return str(e)
