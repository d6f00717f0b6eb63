"""What the service does, as plain functions on a `Service` (the FastAPI app in serving/app.py only routes to it):
the RAG chat with conversation context, model tests, batch tests and paired comparisons with the gate's code,
loading and unloading models in Ollama, and the release switches an admin may make.

    service = Service.from_settings(load_serve_settings())
    service.chat(ChatInput(message="재고 이동은 어떻게 등록하나요?", session_id="s1"))
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from data_contracts.checks import TEMPLATE_TOKENS
from data_contracts.rules import detect_language
from deployment.canaries import CanaryLedger, CanaryState
from deployment.ollama_deploy import answer_problems
from deployment.releases import Release, ReleaseLedger
from deployment.rollout import analyze
from erpops.config import DeployConfig, GateConfig, MLflowSettings
from serving.alerting import RetrainWindow, SeenSignatures, WebhookRefused, payload_problems, retrain_reasons, verify
from serving.batching import DynamicBatcher
from serving.cache import ResponseCache, cache_key, response_cache
from serving.canary import Call, route
from serving.canary_log import CallLog, MemoryCallLog, call_log
from serving.catalog import Catalog, ModelRef
from serving.context import ContextStore, context_store, conversation_key
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
    owner: str = "local"
    """Id of the API key asking: the conversation's turns are kept under it and the session id together, so a
    session id names a conversation of this key only ("local": in-process callers, the API with auth off)."""


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
    release: str | None = None
    """The release that answered."""
    arm: str | None = None
    """While a canary or A/B test runs: "canary" or "stable", the side this conversation is on; else None."""


@dataclass(frozen=True)
class Arm:
    """The side of a running canary one question went to."""

    canary_id: str
    name: str
    """"canary" or "stable"."""
    stable: ModelRef
    """The stable release's ref (a failed canary answer is asked again there)."""
    collection: str | None = None
    """The canary release's own collection (None: the environment's alias)."""


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
    calls: CallLog = field(default_factory=MemoryCallLog)
    """Answers of a running canary, per arm, for its analysis."""

    def __post_init__(self):
        if self.batcher is None and self.settings.batch_wait_s > 0:
            self.batcher = DynamicBatcher(self._generate_batch, self.settings.batch_max, self.settings.batch_wait_s,
                                          name="erpops-batcher", max_in_flight=self.settings.batch_in_flight)
        self._signatures = SeenSignatures()
        self._retrain_window = RetrainWindow(self.settings.data_dir / "serving.db")
        self.canaries = CanaryLedger(self.mlflow)
        self._releases: dict[str, Release] = {}
        self._stop = threading.Event()
        self._analyzer = None
        if self.settings.canary_analysis:
            self._analyzer = threading.Thread(target=self._analyze_loop, name="erpops-canary-analysis", daemon=True)
            self._analyzer.start()

    def close(self) -> None:
        """The app's shutdown (and tests'): stop the canary analysis thread, let the batcher send what waits, and
        close the providers' HTTP clients and the Redis connections."""
        self._stop.set()
        if self._analyzer is not None:
            self._analyzer.join(timeout=10)
        if self.batcher is not None:
            self.batcher.close()
        self.router.close()
        for store in (self.context, self.cache, self.calls):
            client = getattr(store, "client", None) or getattr(store, "r", None)
            if client is not None and callable(getattr(client, "close", None)):
                client.close()

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
                   response_cache(settings.redis_url, settings.cache_entries, settings.cache_ttl_s) if settings.cache else None,
                   calls=call_log(settings.redis_url))

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
        """The Prometheus exposition, with each provider's up gauge read from the router and the canary's weight
        from the canary ledger at scrape time."""
        for state in self.router.state():
            self.metrics.provider_up.labels(provider=state["provider"]).set(0 if state["cooling_down"] else 1)
        canary = self._canary_state()
        self.metrics.canary_weight.labels(env=self.settings.env).set(canary.weight if canary and canary.active else 0)
        return self.metrics.render()

    # ---- canary -----------------------------------------------------------------------------------
    def canary(self) -> CanaryState | None:
        return self.canaries.state(self.settings.env)

    def _release(self, release_id: str) -> Release:
        if release_id not in self._releases:
            self._releases[release_id] = ReleaseLedger(self.mlflow).release(release_id)
        return self._releases[release_id]

    def _canary_state(self) -> CanaryState | None:
        """The running canary, or None; a canary ledger that cannot be read routes everyone to the stable release."""
        try:
            return self.canaries.state(self.settings.env)
        except Exception as e:
            log.error("canary ledger unreadable (%s: %s): every conversation goes to the stable release",
                      type(e).__name__, e)
            return None

    def _route(self, ref: ModelRef, session: str) -> tuple[ModelRef, Arm | None]:
        """The ref that answers this conversation: the canary's release for its share of sessions (sticky: a
        hash of the session id) while a canary of the serving release runs, else the environment's own."""
        state = self._canary_state()
        if state is None or not state.active or state.stable_release != ref.release_id:
            return ref, None
        if route(session, state.weight) == "stable":
            return ref, Arm(state.canary_id, "stable", ref)
        r = self._release(state.release_id)
        return (ModelRef(self.settings.env, r.model_version, r.ollama_tag, r.release_id, {},
                         embedding_model=r.embedding_model),
                Arm(state.canary_id, "canary", ref, r.collection))

    def _record(self, arm: Arm | None, question: str, reply: Reply | None, seconds: float) -> None:
        """One answer of a running canary's arm, for its analysis (serving.canary.judge)."""
        if arm is None:
            return
        problems: tuple[str, ...] = ()
        if reply is not None:
            lang = detect_language(question)
            problems = tuple(p for p in answer_problems(lang or "", reply.text, seconds, float("inf"), TEMPLATE_TOKENS)
                             if lang or not p.startswith("answered in"))
        self.calls.record(arm.canary_id, arm.name, Call(reply is not None, seconds, problems))
        outcome = "error" if reply is None else "bad" if problems else "ok"
        self.metrics.canary_answers.labels(env=self.settings.env, arm=arm.name, outcome=outcome).inc()

    def canary_tick(self, now: datetime | None = None) -> dict | None:
        """Judge the running canary on the calls of its current step so far (deployment.rollout.analyze): abort,
        pause, next step or promote. None when no canary progresses or nothing was decided."""
        state = self.canaries.state(self.settings.env)
        if state is None or state.status != "progressing":
            return None
        since = state.step_started().timestamp()
        return analyze(self.deploy, self.mlflow, self.settings.env, self.calls.calls(state.canary_id, "canary", since),
                       self.calls.calls(state.canary_id, "stable", since), f"serve-api@{socket.gethostname()}",
                       now=now, expected=(state.canary_id, state.step_started_at))

    def logged_questions(self, canary_id: str, limit: int = 100) -> list[str]:
        """The distinct questions of a canary's traffic (both arms), newest first, from the chat traces in MLflow."""
        import mlflow

        if not self.tracer.enabled:
            raise ValueError("tracing is off (serve with trace: true): there is no logged traffic to compare on")
        if not self.tracer.available:
            raise TracingUnavailable(f"the MLflow tracking server at {self.tracer.tracking_uri} does not answer: the "
                                     f"logged traffic cannot be read now; try again")
        traces = mlflow.search_traces(locations=[self.tracer.experiment_id], filter_string=f"tag.canary = '{canary_id}'",
                                      max_results=limit, order_by=["timestamp_ms DESC"], return_type="list", flush=True)
        questions = []
        for t in traces:
            root = next((sp for sp in t.data.spans if sp.parent_id is None), None)
            question = (root.inputs or {}).get("question") if root is not None else None
            if isinstance(question, str) and question.strip():
                questions.append(question)
        return list(dict.fromkeys(questions))

    def ab_compare(self, gate: GateConfig, limit: int = 100, questions: list[str] | None = None) -> dict:
        """The running (or last) canary's two releases on the same questions: its logged traffic, each question
        asked again of A (stable) and B (canary) with each release's own knowledge base, the answers paired by
        question and compared with the gate's paired bootstrap (evaluation.gates.compare) on the policy's
        `ab_tolerances`. Positive deltas favour B."""
        from evaluation.answer_scores import load_metric
        from evaluation.gates import DIRECTION, MIN_PAIRED, compare, pair_rows

        state = self.canary()
        if state is None:
            raise ValueError(f"{self.settings.env} has had no canary or A/B test to compare")
        questions = questions if questions is not None else self.logged_questions(state.canary_id, limit)
        if len(questions) < MIN_PAIRED:
            raise ValueError(f"{len(questions)} distinct questions logged for {state.canary_id}; the paired "
                             f"comparison needs at least {MIN_PAIRED}")
        arms = {}
        for name, release_id in (("A", state.stable_release), ("B", state.release_id)):
            r = self._release(release_id)
            arms[name] = (ModelRef(self.settings.env, r.model_version, r.ollama_tag, r.release_id, {},
                                   embedding_model=r.embedding_model), r.collection)
        language = load_metric("language_agreement")

        def rows(ref: ModelRef, collection: str) -> list[dict]:
            from concurrent.futures import ThreadPoolExecutor

            def one(item):
                i, q = item
                sources, _ = self.retriever.retrieve(q, collection, ref.embedding_model)
                reply = self.generate_batched(ref, build_messages(self.settings.system_prompt, [], q, sources), {})
                problems = answer_problems(detect_language(q) or "", reply.text, reply.latency_s, float("inf"),
                                           TEMPLATE_TOKENS)
                return {"id": i, "question": q, "answer": reply.text, "latency_s": reply.latency_s,
                        "good_answer": 0.0 if problems else 1.0}

            with ThreadPoolExecutor(max(1, min(len(questions), self.settings.batch_max))) as pool:
                out = list(pool.map(one, enumerate(questions)))
            scores = language.compute(predictions=[r["answer"] for r in out], questions=questions)
            for row, value in zip(out, scores["language_agreement_per_example"]):
                row["language_agreement"] = value
            return out

        a, b = rows(*arms["A"]), rows(*arms["B"])
        cfg = gate.model_copy(update={"tolerances": dict(state.policy.ab_tolerances)})
        comparisons = compare(pair_rows(b, a), cfg, {**DIRECTION, "good_answer": "higher", "latency_s": "lower"})
        means = {name: {m: round(sum(r[m] for r in rs) / len(rs), 4) for m in cfg.tolerances}
                 for name, rs in (("A", a), ("B", b))}
        return {"canary": state.canary_id, "mode": state.mode, "A": state.stable_release, "B": state.release_id,
                "questions": len(questions), "confidence": gate.confidence, "means": means,
                "comparisons": [c.__dict__ for c in comparisons],
                "rows": [{"id": x["id"], "question": x["question"], "A": x["answer"], "B": y["answer"]}
                         for x, y in zip(a, b)]}

    def _analyze_loop(self) -> None:
        delay = self.settings.canary_poll_s
        while not self._stop.wait(delay):
            try:
                self.canary_tick()
                state = self.canaries.state(self.settings.env)
                delay = state.policy.interval_s if state and state.status == "progressing" else self.settings.canary_poll_s
            except Exception:  # the next tick tries again; a failing analysis must not stop the service
                log.exception("canary analysis of %s failed", self.settings.env)
                delay = self.settings.canary_poll_s

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
        ref = served = self.resolve(self.settings.env)
        self._tag(ref)  # nothing released here yet: 409 before any retrieval or trace
        if ref.release_id != self.serving_release:
            if self.cache is not None and self.serving_release is not None:
                self.cache.invalidate(self.serving_release)
            self.serving_release = ref.release_id
        session = req.session_id or uuid.uuid4().hex
        ref, arm = self._route(ref, session)
        tags = {"env": self.settings.env, "model_version": ref.version or "none", "release": ref.release_id or "none"}
        if arm is not None:
            tags.update(canary=arm.canary_id, arm=arm.name)
        root = self.tracer.start("chat", {"question": req.message, "session_id": session, "images": len(req.images)},
                                 tags, session)
        span = self.tracer.child(root, "retrieval", "RETRIEVER", {"query": req.message})
        collection = arm.collection if arm else None
        try:
            try:
                sources, top = self.retriever.retrieve(req.message, collection, ref.embedding_model)
            except Exception:
                if arm is None or arm.name != "canary":
                    raise
                # the canary's knowledge base failed: counted against it, the stable release answers
                log.warning("canary %s: retrieval from %s failed; the stable release answers", arm.canary_id,
                            collection)
                self._record(arm, req.message, None, 0.0)
                ref, arm, collection = arm.stable, None, None
                sources, top = self.retriever.retrieve(req.message, None, ref.embedding_model)
        except Exception as e:
            self.tracer.end(span, error=type(e).__name__)
            self.tracer.end(root, error=type(e).__name__)
            raise
        self.tracer.end(span, [{"page_content": s.text, "metadata": {"doc": s.doc, "title": s.title, "score": s.score}}
                               for s in sources], {"collection_alias": collection or self.retriever.alias, "top_score": top})
        self.metrics.retrieval_hits.labels(env=self.settings.env).observe(len(sources))
        if top is not None:
            self.metrics.retrieval_score.labels(env=self.settings.env).observe(top)
        history = self.context.history(conversation_key(req.owner, session))
        messages = build_messages(self.settings.system_prompt, history, req.message, sources, req.images)
        return ref, arm, session, root, sources, messages, served

    def _served_throughout(self, served: ModelRef) -> bool:
        """The environment served `served`'s release for the whole of an answer begun when `served` was read: no
        switch was under way then, and its ledger has no event since. A switch moves the Ollama tag and the
        collection alias before it writes its event (and a failed one moves them back), so an answer made across
        one may come from either release. A ledger that cannot be read confirms nothing."""
        if served.switching:
            return False
        try:
            now = self.resolve(self.settings.env)
        except Exception as e:
            log.warning("release ledger unreadable after an answer (%s): the answer is not cached", type(e).__name__)
            return False
        return (now.release_id, now.ledger_events, now.switching) == (served.release_id, served.ledger_events, False)

    def _finish_chat(self, ref: ModelRef, arm: Arm | None, session: str, root, req: ChatInput, sources: list[Source],
                     reply: Reply, cached: bool = False) -> ChatOutput:
        self.context.append(conversation_key(req.owner, session), req.message, reply.text)
        if random.random() < self.settings.language_sample_rate:
            agrees = detect_language(reply.text) == detect_language(req.message)
            self.metrics.language.labels(**self._labels(ref, reply.provider), agrees=str(agrees).lower()).inc()
        self.tracer.end(root, {"answer": reply.text, "sources": [s.public() for s in sources]},
                        {"provider": reply.provider, "model": reply.model})
        return ChatOutput(reply.text, session, [s.public() for s in sources], reply.model, ref.version,
                          self.settings.env, reply.provider, trace_id(root), round(reply.latency_s, 4),
                          reply.prompt_tokens, reply.completion_tokens, cached, ref.release_id, arm and arm.name)

    def _check_images(self, ref: ModelRef, req: ChatInput) -> None:
        if req.images and not self.router.supports_images(self._tag(ref)):
            raise ImagesRefused(f"{ref.tag} does not accept images (no vision capability); send the question alone")

    def _answer(self, ref: ModelRef, arm: Arm | None, req: ChatInput, messages: list[dict]) -> tuple[Reply, ModelRef, Arm | None]:
        """The model's answer, recorded for a running canary's analysis; a canary release that fails to answer is
        recorded as failed and the question is asked of the stable release (the user never sees the canary's
        fault)."""
        t0 = time.perf_counter()
        try:
            reply = self.generate_batched(ref, messages, req.parameters)
        except ProviderError:
            self._record(arm, req.message, None, time.perf_counter() - t0)
            if arm is None or arm.name != "canary":
                raise
            log.warning("canary %s: %s failed to answer; asked the stable release", arm.canary_id, ref.tag)
            return self.generate_batched(arm.stable, messages, req.parameters), arm.stable, None
        self._record(arm, req.message, reply, reply.latency_s)
        return reply, ref, arm

    def chat(self, req: ChatInput) -> ChatOutput:
        """The answer, from the response cache when the same release answered the same conversation, context and
        parameters before; an answer is stored only when `_served_throughout` confirms its release, so the cache
        never serves an answer of another release (a rollback within the TTL included)."""
        ref, arm, session, root, sources, messages, served = self._prepare_chat(req)
        key = (cache_key(ref.release_id, messages, self._options(req.parameters))
               if self.cache is not None and ref.release_id and not req.images else None)
        hit = self.cache.get(key) if key else None
        self.metrics.cache.labels(outcome="off" if key is None else "hit" if hit else "miss").inc()
        if hit is not None:
            reply = Reply(hit["text"], hit["model"], hit["provider"], hit["prompt_tokens"], hit["completion_tokens"], 0.0)
            self.tracer.end(self.tracer.child(root, "cache", "UNKNOWN", {"key": key}), {"hit": True})
            return self._finish_chat(ref, arm, session, root, req, sources, reply, cached=True)
        try:
            self._check_images(ref, req)
            gen = self.tracer.child(root, "generation", "LLM", {"messages": len(messages)}, {"tag": ref.tag})
            try:
                asked = ref
                reply, ref, arm = self._answer(ref, arm, req, messages)
                if ref is not asked:  # the stable release answered for a failed canary: not the canary's answer
                    key = None
            except Exception as e:
                self.tracer.end(gen, error=type(e).__name__)
                raise
            self.tracer.end(gen, {"answer": reply.text}, _usage(reply))
        except Exception as e:
            self.tracer.end(root, error=type(e).__name__)
            raise
        if key and self._served_throughout(served):
            self.cache.put(key, {"text": reply.text, "model": reply.model, "provider": reply.provider,
                                 "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens})
        return self._finish_chat(ref, arm, session, root, req, sources, reply)

    def chat_stream(self, req: ChatInput) -> Iterator[dict]:
        """NDJSON events: `start` (session, sources, trace id, the release and canary arm answering), `delta`
        (text) ..., then `done` (the whole answer, tokens, latency) or `error` (a failure after the stream began;
        HTTP already said 200). `start` comes with the first piece of the answer: a canary release that fails before
        it is recorded as failed and the stable release answers, as in `_answer` (the user never sees the canary's
        fault); one that fails after its first piece is an `error`, since what was sent cannot be taken back."""
        ref, arm, session, root, sources, messages, _ = self._prepare_chat(req)
        try:
            self._check_images(ref, req)
            tag = self._tag(ref)
        except Exception as e:
            self.tracer.end(root, error=type(e).__name__)
            raise
        gen = self.tracer.child(root, "generation", "LLM", {"messages": len(messages)}, {"tag": tag, "stream": True})

        def events() -> Iterator[dict]:
            ended, started = False, False
            answering, side, asked = ref, arm, tag

            def start() -> dict:
                return {"type": "start", "session_id": session, "sources": [s.public() for s in sources],
                        "trace_id": trace_id(root), "env": self.settings.env, "version": answering.version,
                        "release": answering.release_id, "arm": side and side.name}
            try:
                while True:
                    t0 = time.perf_counter()
                    try:
                        for piece in self.router.stream(asked, messages, self._options(req.parameters)):
                            if not started:
                                started = True
                                yield start()
                            if isinstance(piece, str):
                                yield {"type": "delta", "text": piece}
                            else:
                                reply = piece
                        break
                    except ProviderError as e:
                        self._observe(answering, None, time.perf_counter() - t0, True, _ids(answering))
                        self._record(side, req.message, None, time.perf_counter() - t0)
                        if not started and side is not None and side.name == "canary":
                            log.warning("canary %s: %s failed to answer; asked the stable release", side.canary_id,
                                        asked)
                            answering, side = side.stable, None
                            asked = self._tag(answering)
                            continue
                        self.tracer.end(gen, error=type(e).__name__)
                        self.tracer.end(root, error=type(e).__name__)
                        ended = True
                        if not started:
                            yield start()
                        yield {"type": "error", "detail": public_error(e)}
                        return
                if not started:
                    yield start()
                self._observe(answering, reply, reply.latency_s, False, _ids(answering))
                self._record(side, req.message, reply, reply.latency_s)
                self.tracer.end(gen, {"answer": reply.text}, _usage(reply))
                out = self._finish_chat(answering, side, session, root, req, sources, reply)
                ended = True
                yield {"type": "done", "answer": out.answer, "latency_s": out.latency_s, "provider": out.provider,
                       "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}
            finally:
                if not ended:  # the client went away mid-answer: the trace still ends, marked so
                    self.tracer.end(gen, error="client disconnected")
                    self.tracer.end(root, error="client disconnected")

        return events()

    def feedback(self, trace_id: str, verdict: str, actor: str, correction: str | None = None,
                 comment: str | None = None) -> dict:
        """A user's verdict (and corrected answer) on a chat answer, on its MLflow trace (serving.feedback)."""
        from serving.feedback import record_feedback

        if not self.tracer.enabled:
            raise FeedbackOff("tracing is off (serve with trace: true): answers have no trace to rate")
        if not self.tracer.available:
            raise TracingUnavailable(f"the MLflow tracking server at {self.tracer.tracking_uri} does not answer: the "
                                     f"verdict cannot be recorded now; try again")
        out = record_feedback(trace_id, self.tracer.experiment_id, verdict, actor, correction, comment)
        self.metrics.feedback.labels(env=out["env"] or self.settings.env, version=out["version"] or "none",
                                     verdict=verdict).inc()
        return out

    def receive_alert(self, headers: dict, body: bytes) -> dict:
        """Alertmanager's webhook (serving.alerting): verified, counted, and when an alert labelled action=retrain
        fires, a retrain requested as a Prefect event, at most once per `retrain_window_s`."""
        import json
        import os

        verify(headers, body, os.environ.get(self.settings.alert_secret_env), time.time(), self._signatures)
        try:
            payload = json.loads(body)
        except ValueError:
            raise WebhookRefused(400, "the webhook body is not JSON") from None
        problems = payload_problems(payload)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise WebhookRefused(400, f"the webhook body is not an Alertmanager payload: {shown}")
        for a in payload["alerts"]:
            self.metrics.alerts.labels(alertname=(a.get("labels") or {}).get("alertname", "unknown"),
                                       status=a.get("status", "unknown")).inc()
        reasons = retrain_reasons(payload)
        if not reasons:
            return {"alerts": len(payload["alerts"]), "retrain": "not asked"}
        s = self.settings
        out = self._retrain_window.request(reasons, "alert", s.retrain_window_s, s.env, str(s.recipe),
                                           s.retrain_mlflow_config)
        self.metrics.retrain_requests.labels(outcome=out["retrain"]).inc()
        return {"alerts": len(payload["alerts"]), **out}

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
        if self.tracer.enabled:  # answers go on untraced while it fails: feedback and A/B comparison wait for it
            checks["tracing"] = {"ok": self.tracer.available, "required": False,
                                 "detail": self.tracer.experiment_id or f"{self.tracer.tracking_uri} does not answer"}
        return checks


class ImagesRefused(ValueError):
    """Images sent to a model that does not accept them."""


class FeedbackOff(RuntimeError):
    """Feedback asked of a service that does not trace its answers."""


class TracingUnavailable(RuntimeError):
    """Tracing is on, but the MLflow tracking server does not answer now (the API's 503)."""


def _ids(ref: ModelRef) -> tuple[str, ...]:
    return tuple(dict.fromkeys([ref.id] + ([f"v{ref.version}"] if ref.version else [])))


def _usage(reply: Reply) -> dict:
    return {"provider": reply.provider, "model": reply.model, "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens, "latency_s": reply.latency_s}


def public_error(e: ProviderError) -> str:
    """A provider failure as the API tells it: which provider, the status; never a key or a prompt."""
    return str(e)
