"""What the service measures: Prometheus metrics (scraped from /metrics) and live per-model figures (the JSON of
/api/v1/ai-models/{id}/metrics and the dashboard's charts).

Prometheus series carry model, version, env and provider labels, so an alert can name the release that degrades
(serving/alerts.yml). Live figures are computed from a sliding window of the latest calls per model id.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
GEN_LABELS = ("model", "version", "env", "provider")


class Metrics:
    """The service's Prometheus collectors, in a registry of their own (two apps in one process do not clash)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("erpops_http_requests_total", "HTTP requests by route and status",
                                ("method", "route", "status"), registry=r)
        self.request_seconds = Histogram("erpops_http_request_duration_seconds", "HTTP request latency by route",
                                         ("method", "route"), buckets=LATENCY_BUCKETS, registry=r)
        self.generation_seconds = Histogram("erpops_generation_duration_seconds", "Model answer latency",
                                            GEN_LABELS, buckets=LATENCY_BUCKETS, registry=r)
        self.generations = Counter("erpops_generations_total", "Model calls by outcome (ok, error)",
                                   (*GEN_LABELS, "outcome"), registry=r)
        self.tokens = Counter("erpops_generated_tokens_total", "Tokens generated", GEN_LABELS, registry=r)
        self.tokens_per_s = Histogram("erpops_generation_tokens_per_second", "Generated tokens per second per answer",
                                      GEN_LABELS, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=r)
        self.language = Counter("erpops_answer_language_total",
                                "Sampled chat answers by whether they are in the question's language",
                                (*GEN_LABELS, "agrees"), registry=r)
        self.retrieval_hits = Histogram("erpops_retrieval_hits", "Knowledge-base chunks above the threshold per question",
                                        ("env",), buckets=(0, 1, 2, 3, 4, 5, 10), registry=r)
        self.retrieval_score = Histogram("erpops_retrieval_top_score", "Best retrieval score per question", ("env",),
                                         buckets=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=r)
        self.cache = Counter("erpops_response_cache_total", "Non-streamed chat answers by cache outcome (hit, miss, off)",
                             ("outcome",), registry=r)
        self.canary_weight = Gauge("erpops_canary_weight", "Percent of conversations on the running canary (0: none)",
                                   ("env",), registry=r)
        self.canary_answers = Counter("erpops_canary_answers_total",
                                      "Answers while a canary runs, by arm (canary, stable) and outcome (ok, bad, error)",
                                      ("env", "arm", "outcome"), registry=r)
        self.feedback = Counter("erpops_feedback_total", "Users' verdicts on chat answers (up, down)",
                                ("env", "version", "verdict"), registry=r)
        self.alerts = Counter("erpops_alerts_received_total", "Alerts received from Alertmanager by name and status",
                              ("alertname", "status"), registry=r)
        self.retrain_requests = Counter("erpops_retrain_requests_total",
                                        "Retrain requests by outcome (requested, rate-limited)", ("outcome",), registry=r)
        self.provider_up = Gauge("erpops_provider_up", "1 while a provider is not cooling down", ("provider",), registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


@dataclass(frozen=True)
class Call:
    at: float
    latency_s: float
    ok: bool
    tokens: int


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list; NaN for an empty one."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class LiveStats:
    """The calls of the last `window_s` seconds per model id (at most `max_calls` each)."""

    def __init__(self, window_s: float = 300.0, max_calls: int = 10_000, clock=time.time):
        self.window_s, self.clock = window_s, clock
        self._calls: dict[str, deque[Call]] = {}
        self._max = max_calls
        self._lock = threading.Lock()

    def record(self, model_id: str, latency_s: float, ok: bool, tokens: int = 0) -> None:
        with self._lock:
            self._calls.setdefault(model_id, deque(maxlen=self._max)).append(Call(self.clock(), latency_s, ok, tokens))

    def summary(self, model_id: str, buckets: int = 30) -> dict:
        """p50/p95/p99 latency, requests/s, error rate and tokens/s over the window, plus a per-bucket series for
        charts (oldest first)."""
        now = self.clock()
        start = now - self.window_s
        with self._lock:
            calls = [c for c in self._calls.get(model_id, ()) if c.at >= start]
        ok = [c for c in calls if c.ok]
        latencies = [c.latency_s for c in ok]
        busy = sum(latencies)
        width = self.window_s / buckets
        series = []
        for i in range(buckets):
            lo, hi = start + i * width, start + (i + 1) * width
            inside = [c for c in calls if lo <= c.at < hi or (i == buckets - 1 and c.at == hi)]
            good = [c.latency_s for c in inside if c.ok]
            series.append({"t": round(hi, 3), "requests": len(inside), "errors": len(inside) - len(good),
                           "p50_s": _round(percentile(good, 50)), "rps": round(len(inside) / width, 4)})
        return {
            "window_s": self.window_s,
            "requests": len(calls),
            "errors": len(calls) - len(ok),
            "error_rate": _round((len(calls) - len(ok)) / len(calls)) if calls else None,
            "latency_p50_s": _round(percentile(latencies, 50)),
            "latency_p95_s": _round(percentile(latencies, 95)),
            "latency_p99_s": _round(percentile(latencies, 99)),
            "throughput_rps": round(len(calls) / self.window_s, 4),
            "tokens_per_s": _round(sum(c.tokens for c in ok) / busy) if busy > 0 else None,
            "series": series,
        }


def _round(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, 4)
