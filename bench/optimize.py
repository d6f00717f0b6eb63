"""Benchmark: every optimization variant of the default model, measured the same way.

    .venv/bin/python bench/optimize.py                  # SmolLM2-135M-Instruct, sample corpus eval split
    .venv/bin/python bench/optimize.py --model tiny     # seconds; numbers mean nothing

Variants: fp32 and bf16; int8 by each backend available here (torchao and optimum-quanto on CPU,
bitsandbytes LLM.int8 on CUDA only); 30% pruning by magnitude, wanda and sparsegpt (the last two
calibrated on the training split); GGUF f16 and Q8_0 from llama.cpp's converter, read back by transformers. Perplexity is the
response perplexity of the eval split (the gate's measure); tokens/s is greedy decoding one request at
a time; memory is what the weights take once loaded (CUDA: peak allocated). GGUF tokens/s needs
llama-cpp-python (the optional extra); without it the column shows '-'.

Prints a table and, as its last line, name=value pairs. Goals (issue 5): Q8_0/f16 size <= 0.55 and
perplexity ratio <= 1.01; 30% pruning perplexity ratio <= 1.10 with the best method.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/smollm2-135m/cpu.yaml")
    ap.add_argument("--model", choices=["recipe", "tiny"], default="recipe")
    ap.add_argument("--eval-examples", type=int, default=48)
    ap.add_argument("--calibration-examples", type=int, default=32)
    ap.add_argument("--speed-prompts", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / ".erpops" / "bench" / "optimize"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from erpops.config import load_recipe
    from erpops.device import Runtime
    from erpops.runtime import setup_process
    from training.base_model import MODELS_DIR, resolve_base_model
    from training.gguf import export_and_verify
    from training.optimize import calibration_inputs, measure_variant, overall_sparsity, prune, quantize_int8

    setup_process()
    overrides = {"model.source": "tiny"} if args.model == "tiny" else {}
    recipe = load_recipe(REPO / args.recipe, overrides)
    out = Path(args.out)
    data = validate_data(recipe.data, out / "data")
    evals = sorted(read_examples(data.eval_path), key=lambda e: e["id"])[: args.eval_examples]
    train = read_examples(data.train_path)
    base = resolve_base_model(recipe.model, REPO / MODELS_DIR)
    tokenizer = AutoTokenizer.from_pretrained(base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runtime = Runtime(device, "float32")
    speed = evals[: args.speed_prompts]
    fp32 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)

    rows: list[dict] = []

    scores = {}

    def measure(name: str, model, sparsity: float | None = None, note: str = "") -> dict:
        v, scores[name] = measure_variant(name, model, tokenizer, evals, speed, runtime, time.perf_counter(), sparsity=sparsity)
        row = {"variant": v.name, "ppl": v.perplexity, "size_mb": v.size_mb, "sparsity": v.sparsity,
               "tokens_per_s": v.tokens_per_s, "memory_mb": v.memory_mb, "seconds": v.seconds, "note": note}
        rows.append(row)
        print(f"  {name}: ppl {v.perplexity:.3f}", file=sys.stderr, flush=True)
        return row

    ref = measure("fp32", fp32)
    measure("bf16", copy.deepcopy(fp32).to(torch.bfloat16))
    backends = ["torchao", "quanto"] + (["bitsandbytes"] if device == "cuda" else [])
    merged_dir = out / "fp32"
    fp32.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    for backend in backends:
        try:
            measure(f"int8_{backend}", quantize_int8(fp32, backend, merged_dir), overall_sparsity(fp32))
        except Exception as e:  # an unavailable backend is a row that says why, not a crash
            rows.append({"variant": f"int8_{backend}", "note": f"failed: {str(e).splitlines()[0][:60]}"})
    if device != "cuda":
        rows.append({"variant": "int8_bitsandbytes", "note": "CUDA only (LLM.int8); no GPU here"})

    calibration = calibration_inputs(tokenizer, train[: args.calibration_examples], 256)
    for method in PRUNE_METHODS:
        pruned = copy.deepcopy(fp32)
        t0 = time.perf_counter()
        prune(pruned, method, 0.3, calibration if method != "magnitude" else None)
        measure(f"pruned_{method}_30pct", pruned, note=f"pruning took {time.perf_counter() - t0:.1f} s")
        del pruned

    exports = export_and_verify(merged_dir, tokenizer, out / "gguf", ["f16", "q8_0"], evals, scores["fp32"],
                                {"f16": 0.0, "q8_0": 0.0}, Runtime("cpu", "float32"))
    for kind, g in exports.items():
        tps = _llama_cpp_tokens_per_s(g.path, tokenizer, speed)
        rows.append({"variant": f"gguf_{kind}", "ppl": g.perplexity, "size_mb": g.size_mb, "sparsity": 0.0,
                     "tokens_per_s": tps, "memory_mb": None,
                     "note": f"agreement {g.agreement:.3f}" + ("" if tps else "; tok/s needs llama-cpp-python")})

    print(f"{'variant':<22}{'ppl':>9}{'ratio':>8}{'size MB':>10}{'sparsity':>10}{'tok/s':>9}{'mem MB':>9}  note")
    for r in rows:
        ratio = r["ppl"] / ref["ppl"] if r.get("ppl") else None
        r["ratio"] = ratio
        print(f"{r['variant']:<22}{_f(r.get('ppl'), '.3f'):>9}{_f(ratio, '.3f'):>8}{_f(r.get('size_mb'), '.1f'):>10}"
              f"{_f(r.get('sparsity'), '.3f'):>10}{_f(r.get('tokens_per_s'), '.1f'):>9}{_f(r.get('memory_mb'), '.0f'):>9}  {r['note']}")
    by = {r["variant"]: r for r in rows}
    f16, q8 = exports["f16"], exports["q8_0"]
    prune_ratios = {m: by[f"pruned_{m}_30pct"]["ppl"] / ref["ppl"] for m in PRUNE_METHODS}
    best = min(prune_ratios, key=prune_ratios.get)
    pairs = {"q8_0_over_f16_size": q8.size_mb / f16.size_mb, "q8_0_over_f16_ppl": q8.perplexity / f16.perplexity,
             **{f"{m}_ppl_ratio": r for m, r in prune_ratios.items()},
             "best_prune": best, "best_prune_ppl_ratio": prune_ratios[best]}
    for backend in backends:
        r = by.get(f"int8_{backend}", {})
        if r.get("ppl"):
            pairs[f"{backend}_ppl_ratio"] = r["ppl"] / ref["ppl"]
            pairs[f"{backend}_tokens_per_s"] = r["tokens_per_s"]
    pairs["fp32_tokens_per_s"] = ref["tokens_per_s"]
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs.items()))


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _llama_cpp_tokens_per_s(path: Path, tokenizer, examples: list[dict], new_tokens: int = 32) -> float | None:
    """Greedy decoding speed of the GGUF under llama.cpp, when llama-cpp-python is installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from training.data import prompt_text

    llm = Llama(model_path=str(path), n_ctx=1024, verbose=False)
    tokens, seconds = 0, 0.0
    for e in examples:
        t0 = time.perf_counter()
        out = llm(prompt_text(tokenizer, e["messages"]), max_tokens=new_tokens, temperature=0.0)
        seconds += time.perf_counter() - t0
        tokens += out["usage"]["completion_tokens"]
    return tokens / max(seconds, 1e-9)


if __name__ == "__main__":
    main()
