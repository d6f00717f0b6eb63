"""Benchmark: batched against one-by-one answer generation on the eval split (what the gate does).

    .venv/bin/python bench/eval_throughput.py                      # SmolLM2-135M-Instruct, 48 eval examples
    .venv/bin/python bench/eval_throughput.py --gguf .erpops/runs/<run>/gguf/model-q8_0.gguf
    .venv/bin/python bench/eval_throughput.py --model tiny         # seconds; numbers mean nothing

Both answer the same questions greedily with the same max_new_tokens through
evaluation.scoring.generate_answers: once with the gate's batch size (left padding), once with batch
size 1. Tokens/s counts the answer tokens kept (up to the stop token), so padding and the tokens a
finished row idles through in a batch do not count. Prints a table and, as its last line,
name=value pairs. Goal (issue 6): ratio >= 4.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/smollm2-135m/cpu.yaml")
    ap.add_argument("--model", choices=["recipe", "tiny"], default="recipe")
    ap.add_argument("--gguf", help="score this GGUF (read back by transformers) instead of the base model")
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the recipe's gate.batch_size")
    ap.add_argument("--out", default=str(REPO / ".erpops" / "bench" / "eval"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from erpops.config import load_recipe
    from erpops.device import resolve_runtime
    from erpops.runtime import setup_process
    from evaluation.evaluate import load_gguf_model
    from evaluation.scoring import generate_answers
    from training.base_model import MODELS_DIR, resolve_base_model

    setup_process()
    recipe = load_recipe(REPO / args.recipe, {"model.source": "tiny"} if args.model == "tiny" else {})
    data = validate_data(recipe.data, Path(args.out) / "data")
    examples = sorted(read_examples(data.eval_path), key=lambda e: e["id"])[: args.examples]
    runtime = resolve_runtime(recipe.train.precision)
    if args.gguf:
        model, tokenizer = load_gguf_model(Path(args.gguf))
        what = Path(args.gguf).name
    else:
        base = resolve_base_model(recipe.model, REPO / MODELS_DIR)
        model, tokenizer = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), AutoTokenizer.from_pretrained(base)
        what = recipe.model.source
    model.to(runtime.device)
    batch = args.batch_size or recipe.gate.batch_size
    new_tokens = recipe.gate.max_new_tokens

    generate_answers(model, tokenizer, examples[:2], runtime, 4, 2)  # warm-up (first-call allocations)
    results = {}
    for name, size in (("batched", batch), ("one_by_one", 1)):
        t0 = time.perf_counter()
        answers = generate_answers(model, tokenizer, examples, runtime, new_tokens, size)
        seconds = time.perf_counter() - t0
        tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        results[name] = {"batch": size, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                         "answers": answers}
        print(f"  {name}: {tokens} tokens in {seconds:.1f} s", file=sys.stderr, flush=True)

    same = sum(a == b for a, b in zip(results["batched"]["answers"], results["one_by_one"]["answers"]))
    print(f"model: {what}  device: {runtime.device}/{runtime.compute_dtype}  examples: {len(examples)}  "
          f"max_new_tokens: {new_tokens}")
    print(f"{'mode':<12}{'batch':>7}{'seconds':>10}{'tokens':>9}{'tok/s':>9}")
    for name, r in results.items():
        print(f"{name:<12}{r['batch']:>7}{r['seconds']:>10.1f}{r['tokens']:>9}{r['tokens_per_s']:>9.1f}")
    ratio = results["batched"]["tokens_per_s"] / results["one_by_one"]["tokens_per_s"]
    print(f"identical answers in both modes: {same}/{len(examples)} (left padding can flip near-ties)")
    print(f"ratio={ratio:.2f} batched_tokens_per_s={results['batched']['tokens_per_s']:.1f} "
          f"one_by_one_tokens_per_s={results['one_by_one']['tokens_per_s']:.1f} batch_size={batch} "
          f"examples={len(examples)} identical_answers={same}")


if __name__ == "__main__":
    main()
