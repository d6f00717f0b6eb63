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
from evaluation.answer_scores import METRICS_DIR, load_metric, score_answers  # noqa: F401 (re-exported)
from evaluation.gates import GateVerdict, decide
from evaluation.scoring import NLL, generate_answers, reference_answer, response_nll
from registry.champion import ChampionModel
from training.gguf import load_gguf_model  # noqa: F401 (re-exported: bench/eval_throughput.py)

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    verdict: GateVerdict
    report_path: Path
    """eval_report.json: metrics, gate verdict with intervals, per-example rows of both models."""
    html_path: Path | None = None
    """gate_report.html, the page users open from the MLflow UI (artifacts > evaluation)."""


def known_nll(scores: dict[str, list[float]] | None, examples: list[dict]) -> NLL | None:
    """The response NLL of `examples` from scores already taken on the same model file (per example id:
    [summed NLL, tokens], training.gguf.GGUFExport.example_nll); None when any example is missing."""
    if not scores or any(e.get("id") not in scores for e in examples):
        return None
    return NLL([float(scores[e["id"]][0]) for e in examples], [int(scores[e["id"]][1]) for e in examples])


def score_model(model, tokenizer, examples: list[dict], cfg: GateConfig, runtime: Runtime,
                nll: NLL | None = None) -> tuple[dict[str, float], list[dict]]:
    """Score greedy answers and reference likelihood; measure speed and latency. Returns (metrics, rows).
    `nll`: this model's response NLL on `examples` already taken (see `known_nll`): used, not recomputed.

    metrics: rouge_l, exact_match, keyword_coverage, language_agreement (means over examples);
    perplexity and nll (token-weighted over all assistant turns; nll = log perplexity, nats per token);
    answer_tokens_per_s (batched generation); latency_p50_s / latency_p95_s (the first
    cfg.latency_samples examples answered one at a time); examples; and module/<module>/<metric> for
    breakdown.MODULE_METRICS, with module/<module>/n.
    rows: one per example with id, module, lang, question, answer, reference and the per-example
    rouge_l, exact_match, keyword_coverage, language_agreement, perplexity and nll (the pairs the gate
    compares by id).
    """
    import math

    from evaluation.breakdown import MODULE_METRICS, per_module, percentiles
    from evaluation.scoring import answer_latencies, question_text

    t0 = time.perf_counter()
    answers = generate_answers(model, tokenizer, examples, runtime, cfg.max_new_tokens, cfg.batch_size)
    gen_s = time.perf_counter() - t0
    latencies = percentiles(answer_latencies(model, tokenizer, examples[: cfg.latency_samples], runtime,
                                             cfg.max_new_tokens))
    questions = [question_text(e) for e in examples]
    references = [reference_answer(e) for e in examples]
    means, per_example = score_answers(answers, references, questions)
    nll = nll if nll is not None else response_nll(model, tokenizer, examples, runtime)
    ppl = load_metric("perplexity").compute(nll=nll.nll, n_tokens=nll.tokens)
    new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)

    rows = [{"id": e["id"], "module": e["module"], "lang": e["lang"], "question": q, "answer": a, "reference": r, **scored}
            for e, q, a, r, scored in zip(examples, questions, answers, references, per_example)]
    for row, p, n in zip(rows, ppl["perplexity_per_example"], nll.per_token):
        row["perplexity"], row["nll"] = p, n

    metrics = dict(means)
    metrics |= {
        "perplexity": ppl["perplexity"],
        "nll": math.log(ppl["perplexity"]),
        "answer_tokens_per_s": new_tokens / gen_s,
        "latency_p50_s": latencies["p50"],
        "latency_p95_s": latencies["p95"],
        "examples": float(len(examples)),
    }
    for module, stats in per_module(rows, list(MODULE_METRICS)).items():
        metrics |= {f"module/{module}/{k}": v for k, v in stats.items()}
    return metrics, rows


def evaluate_candidate(cfg: GateConfig, gguf_path: Path, eval_examples: list[dict], champion: ChampionModel | None,
                       out_dir: Path, runtime: Runtime, tracker: Tracker | None = None,
                       candidate_nll: dict[str, list[float]] | None = None) -> EvalResult:
    """Score the candidate GGUF and, when there is a champion, the champion's GGUF on the same examples;
    gate with `evaluation.gates.decide` (paired bootstrap) and write the JSON and HTML gate reports.
    `candidate_nll`: the candidate file's per-example response NLL from the optimize stage
    (GGUFExport.example_nll); where it covers every example, the perplexity pass is not run again."""
    from evaluation.gate_report import render_gate_report

    examples = sorted(eval_examples, key=lambda e: e["id"])[: cfg.max_examples]
    if not examples:
        raise ValueError("the eval split is empty: nothing to gate on")
    known = known_nll(candidate_nll, examples)
    if known is not None:
        log.info("eval: the candidate's perplexity comes from the optimize stage's pass over the same file")
    metrics, rows = _score_gguf(gguf_path, examples, cfg, runtime, known)
    champion_metrics, champion_rows = None, None
    if champion is not None:
        if champion.gguf is not None:
            champion_metrics, champion_rows = _score_gguf(champion.gguf, examples, cfg, runtime)
        else:  # its artifacts are gone: the stored metrics are shown, and without rows the gate holds
            champion_metrics = champion.metrics or {}
    verdict = decide(metrics, champion_metrics, cfg, rows, champion_rows)
    log.info("eval: rouge_l %.4f perplexity %.2f -> %s", metrics["rouge_l"], metrics["perplexity"], verdict.verdict)
    for r in verdict.reasons:
        log.info("  gate: %s", r)
    report = {"model": str(gguf_path), "champion_version": champion.version if champion else None, "metrics": metrics,
              "perplexity_from": "optimize" if known is not None else "evaluate",
              "champion_metrics": champion_metrics, "gate": verdict.to_dict(), "examples": rows,
              "champion_examples": champion_rows}
    path = write_json(out_dir / "eval_report.json", report)
    html = render_gate_report(verdict, metrics, champion_metrics, rows, champion_rows, out_dir / "gate_report.html",
                              title=f"erpops gate: {gguf_path.name} vs "
                                    f"{'champion v' + champion.version if champion else 'no champion'}")
    if tracker:
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        if champion_metrics:
            tracker.log_metrics({f"eval_champion/{k}": v for k, v in champion_metrics.items()})
        for c in verdict.comparisons:
            tracker.log_metrics({f"gate/{c.metric}/delta": c.delta, f"gate/{c.metric}/low": c.low, f"gate/{c.metric}/high": c.high})
        tracker.set_tags({"gate.verdict": verdict.verdict, "gate.champion_version": champion.version if champion else "none"})
        tracker.log_artifact(path, "evaluation")
        tracker.log_artifact(html, "evaluation")
    return EvalResult(metrics, verdict, path, html)


def _score_gguf(gguf_path: Path, examples: list[dict], cfg: GateConfig, runtime: Runtime,
                nll: NLL | None = None) -> tuple[dict[str, float], list[dict]]:
    model, tokenizer = load_gguf_model(gguf_path)
    model.to(runtime.device)
    metrics, rows = score_model(model, tokenizer, examples, cfg, runtime, nll)
    metrics["size_mb"] = gguf_path.stat().st_size / 1e6
    return metrics, rows
