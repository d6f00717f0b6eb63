"""Stage 3, optimize: merge LoRA into the full-precision base, prune, quantize to int8, export GGUF.

    erpops optimize --run-dir .erpops/runs/<run>

Order matters: merge first (never into a quantized base), prune and make it permanent, then quantize
(int8 formats keep the zeros; GGUF K-quants would not). Every variant is scored with the same
response perplexity on held-out examples, and sizes are what the files take on disk.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from erpops.config import OptimizeConfig
from erpops.device import Runtime
from erpops.tracking import Tracker, write_json
from evaluation.scoring import response_nll
from deployment.modelfile import ModelfileSpec, write_modelfile
from training.gguf import GGUFExport, export_and_verify

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    perplexity: float | None
    """Response perplexity on held-out examples; None where not measured here (GGUF: see evaluate)."""
    size_mb: float
    sparsity: float
    seconds: float
    """Time spent building and scoring the variant."""


@dataclass
class OptimizeResult:
    merged_dir: Path
    """HF folder of the model that ships (merged, and pruned when pruning is on)."""
    variants: list[Variant] = field(default_factory=list)
    int8_backend: str = ""
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    gguf: dict[str, GGUFExport] = field(default_factory=dict)
    pruning: PruneDecision | None = None
    """Whether the pruned model was kept, and why (None when pruning is off)."""
    modelfile: Path | None = None
    """Ollama Modelfile written beside the shipped GGUF."""
    modelfile_spec: ModelfileSpec | None = None

    def table(self) -> str:
        rows = [f"{'variant':<22}{'ppl':>10}{'size MB':>10}{'sparsity':>10}"]
        rows += [f"{v.name:<22}{'-' if v.perplexity is None else f'{v.perplexity:.2f}':>10}{v.size_mb:>10.1f}{v.sparsity:>10.3f}"
                 for v in self.variants]
        return "\n".join(rows)


@dataclass(frozen=True)
class PruneDecision:
    keep: bool
    ratio: float
    reason: str


def decide_pruning(merged_ppl: float, pruned_ppl: float, max_ratio: float) -> PruneDecision:
    """Keep the pruned model only when its perplexity stays within max_ratio of the merged model's."""
    import math

    ratio = pruned_ppl / merged_ppl if merged_ppl > 0 else math.inf
    if math.isfinite(ratio) and ratio <= max_ratio:
        return PruneDecision(True, ratio, f"pruned perplexity {pruned_ppl:.2f} is {ratio:.3f}x the merged {merged_ppl:.2f} "
                                          f"(allowed {max_ratio}): pruned model ships")
    return PruneDecision(False, ratio, f"pruned perplexity {pruned_ppl:.2f} is {ratio:.3f}x the merged {merged_ppl:.2f} "
                                       f"(allowed {max_ratio}): falling back to the unpruned model")


def merge_lora(base: Path | str, adapter_dir: Path):
    """PeftModel on a full-precision (fp32) base, merged and unloaded to a plain model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def prunable_linears(model):
    """(name, module) of every nn.Linear inside the decoder blocks; embeddings and lm_head stay dense."""
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def magnitude_prune(model, amount: float) -> dict[str, float]:
    """L1-unstructured pruning of each decoder Linear, made permanent; returns achieved sparsity per layer."""
    import torch.nn.utils.prune as prune

    sparsity = {}
    for name, module in prunable_linears(model):
        prune.l1_unstructured(module, "weight", amount=amount)
        prune.remove(module, "weight")
        sparsity[name] = float((module.weight == 0).float().mean())
    return sparsity


def overall_sparsity(model) -> float:
    zeros = total = 0
    for _, m in prunable_linears(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(1, total)


def pick_int8_backend(cfg: OptimizeConfig, runtime: Runtime) -> str:
    """auto: bitsandbytes LLM.int8 on CUDA; torchao int8 weight-only on CPU (most accurate and fastest
    of the CPU int8 backends measured here, see README)."""
    if cfg.int8_backend != "auto":
        return cfg.int8_backend
    return "bitsandbytes" if runtime.device == "cuda" else "torchao"


def quantize_int8(model, backend: str, merged_dir: Path):
    """An int8 copy of the model by the named backend (the input model is left untouched).

    The output head is kept as it is: with tied embeddings (SmolLM2, Gemma) quantizing it would split
    the tie and store the vocabulary matrix twice.
    """
    if backend == "torchao":
        import torch
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        q = copy.deepcopy(model)
        quantize_(q, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
        return q
    if backend == "quanto":
        from optimum.quanto import freeze, qint8, quantize

        q = copy.deepcopy(model)
        quantize(q, weights=qint8, exclude=["lm_head"])
        freeze(q)
        return q
    if backend == "bitsandbytes":  # GPU path: LLM.int8 loads from the saved fp folder
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        return AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=bnb, device_map={"": 0})
    raise ValueError(f"unknown int8 backend {backend!r}")


def saved_size_mb(model) -> float:
    """Bytes torch.save writes for the state dict: the honest on-disk size of a quantized model."""
    import os

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.pt")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path) / 1e6


def optimize_model(cfg: OptimizeConfig, base: Path | str, adapter_dir: Path, eval_examples: list[dict],
                   out_dir: Path, runtime: Runtime, tracker: Tracker | None = None) -> OptimizeResult:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    t0 = time.perf_counter()
    model = merge_lora(base, adapter_dir).to(runtime.device)
    ppl = response_nll(model, tokenizer, eval_examples, runtime).perplexity
    variants = [Variant("merged_fp32", ppl, saved_size_mb(model), overall_sparsity(model), time.perf_counter() - t0)]
    log.info("merged: perplexity %.2f", ppl)

    layer_sparsity: dict[str, float] = {}
    decision = None
    if cfg.prune_method == "magnitude" and cfg.prune_amount > 0:
        t0 = time.perf_counter()
        merged_ppl = ppl
        unpruned = copy.deepcopy(model)
        layer_sparsity = magnitude_prune(model, cfg.prune_amount)
        ppl = response_nll(model, tokenizer, eval_examples, runtime).perplexity
        variants.append(Variant(f"pruned_{round(cfg.prune_amount * 100)}pct_fp32", ppl, saved_size_mb(model), overall_sparsity(model),
                                time.perf_counter() - t0))
        log.info("pruned %.0f%%: perplexity %.2f (sparsity %.3f)", 100 * cfg.prune_amount, ppl, overall_sparsity(model))
        decision = decide_pruning(merged_ppl, ppl, cfg.max_prune_ppl_ratio)
        log.info("pruning decision: %s", decision.reason)
        if not decision.keep:
            model = unpruned
        del unpruned

    merged_dir = out_dir / "merged"
    model.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)

    backend = pick_int8_backend(cfg, runtime)
    t0 = time.perf_counter()
    qmodel = quantize_int8(model, backend, merged_dir)
    qppl = response_nll(qmodel, tokenizer, eval_examples, runtime).perplexity
    variants.append(Variant(f"int8_{backend}", qppl, saved_size_mb(qmodel), overall_sparsity(model), time.perf_counter() - t0))
    log.info("int8 (%s): perplexity %.2f", backend, qppl)
    del qmodel

    prompts = [tokenizer.apply_chat_template(e["messages"], tokenize=False) for e in eval_examples[: cfg.verify_prompts]]
    gguf = export_and_verify(model.cpu(), tokenizer, merged_dir, out_dir / "gguf", list(cfg.gguf_types), prompts,
                             dict(cfg.min_agreement))
    for g in gguf.values():
        variants.append(Variant(f"gguf_{g.kind}", None, g.size_mb, overall_sparsity(model), 0.0))
    modelfile, spec = write_modelfile(tokenizer, gguf[cfg.ship].path)

    result = OptimizeResult(merged_dir, variants, backend, layer_sparsity, gguf, decision, modelfile, spec)
    write_json(out_dir / "optimize.json", {"int8_backend": backend, "variants": [asdict(v) for v in variants],
                                          "layer_sparsity": layer_sparsity,
                                          "pruning": asdict(decision) if decision else None,
                                          "gguf": {k: asdict(g) for k, g in gguf.items()}})
    if tracker:
        for g in gguf.values():
            tracker.log_metrics({f"optimize/gguf_{g.kind}/size_mb": g.size_mb, f"optimize/gguf_{g.kind}/agreement": g.agreement})
            tracker.set_tags({f"gguf.{g.kind}.sha256": g.sha256})
        for v in variants:
            if v.perplexity is not None:
                tracker.log_metrics({f"optimize/{v.name}/perplexity": v.perplexity, f"optimize/{v.name}/size_mb": v.size_mb,
                                     f"optimize/{v.name}/sparsity": v.sparsity})
        tracker.set_tags({"optimize.int8_backend_resolved": backend,
                          "optimize.pruning": ("kept" if decision.keep else "fallback") if decision else "off"})
        if decision:
            tracker.log_metrics({"optimize/prune_ppl_ratio": decision.ratio})
        tracker.log_artifact(out_dir / "optimize.json", "optimize")
        tracker.log_artifact(merged_dir, "merged_model")  # plain HF folder: from_pretrained loads it as is
        tracker.log_text(result.table(), "optimize/variants.txt")
    return result
