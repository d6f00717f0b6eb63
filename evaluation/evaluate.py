"""Stage 4, evaluate: score the model that ships (the GGUF, read back by transformers) and gate it.

    erpops evaluate --run-dir .erpops/runs/<run>

Metrics go through `evaluate` with the local modules in evaluation/metrics/ (hub loading fails
offline). The gate decision itself is evaluation.gates.decide, a pure function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from erpops.config import GateConfig
from erpops.device import Runtime
from erpops.tracking import Tracker, write_json
from evaluation.gates import GateVerdict, decide
from evaluation.scoring import generate_answers, reference_answer, response_nll

log = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).parent / "metrics"


@dataclass
class EvalResult:
    metrics: dict[str, float]
    verdict: GateVerdict
    report_path: Path


def load_metric(name: str):
    """A local evaluate module by path (evaluation/metrics/<name>.py)."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / f"{name}.py"))


def load_gguf_model(gguf_path: Path):
    """The shipped GGUF, dequantized by transformers' GGUF loader, with the tokenizer it carries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model, tokenizer


def score_model(model, tokenizer, examples: list[dict], cfg: GateConfig, runtime: Runtime) -> tuple[dict[str, float], list[dict]]:
    """ROUGE-L of greedy answers and response perplexity, plus speed; and per-example rows."""
    t0 = time.perf_counter()
    answers = generate_answers(model, tokenizer, examples, runtime, cfg.max_new_tokens, cfg.batch_size)
    gen_s = time.perf_counter() - t0
    references = [reference_answer(e) for e in examples]
    rouge = load_metric("rouge_l").compute(predictions=answers, references=references)
    nll = response_nll(model, tokenizer, examples, runtime)
    ppl = load_metric("perplexity").compute(nll=nll.nll, n_tokens=nll.tokens)
    new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    metrics = {
        "rouge_l": rouge["rouge_l"],
        "perplexity": ppl["perplexity"],
        "answer_tokens_per_s": new_tokens / gen_s,
        "examples": float(len(examples)),
    }
    rows = [{"id": e["id"], "module": e["module"], "lang": e["lang"], "answer": a, "reference": r,
             "rouge_l": s, "perplexity": p}
            for e, a, r, s, p in zip(examples, answers, references, rouge["rouge_l_per_example"], ppl["perplexity_per_example"])]
    return metrics, rows


def evaluate_candidate(cfg: GateConfig, gguf_path: Path, eval_examples: list[dict], champion: dict[str, float] | None,
                       out_dir: Path, runtime: Runtime, tracker: Tracker | None = None) -> EvalResult:
    examples = sorted(eval_examples, key=lambda e: e["id"])[: cfg.max_examples]
    if not examples:
        raise ValueError("the eval split is empty: nothing to gate on")
    model, tokenizer = load_gguf_model(gguf_path)
    model.to(runtime.device)
    metrics, rows = score_model(model, tokenizer, examples, cfg, runtime)
    metrics["size_mb"] = gguf_path.stat().st_size / 1e6
    verdict = decide(metrics, champion, cfg)
    log.info("eval: rouge_l %.4f perplexity %.2f -> %s", metrics["rouge_l"], metrics["perplexity"], verdict.verdict)
    for r in verdict.reasons:
        log.info("  gate: %s", r)
    report = {"model": str(gguf_path), "metrics": metrics, "champion_metrics": champion, "gate": verdict.to_dict(),
              "examples": rows}
    path = write_json(out_dir / "eval_report.json", report)
    if tracker:
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        tracker.set_tags({"gate.verdict": verdict.verdict})
        tracker.log_dict(report, "evaluation/eval_report.json")
    return EvalResult(metrics, verdict, path)
