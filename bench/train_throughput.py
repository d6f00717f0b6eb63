"""Benchmark: erpops' training stage against the plain Hugging Face recipe, same model, data and
hyperparameters.

    .venv/bin/python bench/train_throughput.py                 # SmolLM2-135M, 10 steps each
    .venv/bin/python bench/train_throughput.py --steps 20 --model tiny
    .venv/bin/python bench/train_throughput.py --steps 5 --only erpops-plain    # baseline, erpops, erpops-plain
    .venv/bin/python bench/train_throughput.py --repeat 3                       # three rounds (default 2)

(a) baseline: `transformers.Trainer` + peft LoRA, batches padded to the longest, the model's own loss;
(b) erpops: training.lora.train_lora as the recipe sets it (the default: micro-batches of 1024 tokens, each one
    unpadded row with attention per example, vocabulary projection only at assistant positions, length-grouped
    batches, and on the CPU cheaper dropout masks and the frozen base held in bf16: train.fast_paths);
(c) erpops-plain: (b) with train.fast_paths off (rows of max_seq_len with transformers' block-diagonal mask,
    peft's own dropout, fp32 weights cast by autocast): what the fast paths add;
(d) erpops-whole: (b) with the whole batch at once (no micro-batches): micro-batching's cost or gain;
(e) erpops-gc: (b) with gradient checkpointing (train.gradient_checkpointing), a memory-saving option;
(f) baseline-same-order: (a) fed erpops' batches in erpops' order, so that the two loss curves can be compared
    step by step (`same_order_max_loss_delta`); (a) keeps the Trainer's own random order for the ratio;
(g) baseline-erpops-malloc: (a) under erpops' allocator set-up (what the allocator alone is worth).
The erpops variants run in the process environment `erpops train` runs in (`erpops.runtime.jemalloc_env`:
jemalloc where the system has it, freed pages kept under a resident budget, `erpops.allocator`); the baselines
(a) and (f) in the default one (glibc's malloc), as a plain Trainer script runs.
All use the recipe's LoRA settings, batch size, learning rate, warm-up, seed and precision. Tokens/s
counts real (non-pad) tokens. Each variant runs in its own process so peak memory is its own.
Shared machines change speed by up to 2x within minutes, so the variants run in `--repeat` rounds, one after
another within a round; the table shows each variant's median tok/s, and `ratio` is the median over the rounds of
erpops / baseline (run back to back), with its range.
Prints a table and, as its last line, name=value pairs. On a GPU it also prints MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("baseline", "erpops", "erpops-plain", "erpops-whole", "erpops-gc", "baseline-same-order",
            "baseline-erpops-malloc")
sys.path.insert(0, str(REPO))

from erpops.allocator import Jemalloc  # noqa: E402
from erpops.runtime import jemalloc_env  # noqa: E402


def _setup(args):
    from data_contracts.dataset import read_examples
    from data_contracts.validate import validate_data
    from erpops.config import load_recipe
    from erpops.device import resolve_runtime
    from erpops.runtime import setup_process
    from training.base_model import MODELS_DIR, resolve_base_model

    setup_process()
    overrides = {"train.max_steps": args.steps}
    if args.model == "tiny":
        overrides["model.source"] = "tiny"
    recipe = load_recipe(REPO / args.recipe, overrides)
    out = Path(args.out)
    data = validate_data(recipe.data, out / "data")
    base = resolve_base_model(recipe.model, REPO / MODELS_DIR)
    return recipe, base, read_examples(data.train_path), resolve_runtime(recipe.train.precision), out


def run_baseline(args) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from training.data import encode_example
    from training.lora import load_for_training

    recipe, base, examples, runtime, out = _setup(args)
    cfg = recipe.train
    model, tokenizer = load_for_training(base, recipe.lora, runtime)
    rows = [encode_example(tokenizer, e["messages"]) for e in examples]
    same_order = args.variant == "baseline-same-order"
    if same_order:  # erpops' batches (training.lora.batches over the examples it keeps), one after another
        from training.data import with_targets
        from training.lora import batches

        rows = with_targets(rows)
        rows = [r for batch in batches(rows, cfg.batch_size, cfg.max_steps, cfg.seed) for r in batch]
    dataset = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    per_batch: list[int] = []  # the loader fetches one batch ahead: count only the ones trained on
    clock: dict[str, float] = {}

    def counting_collate(features):
        batch = collate(features)
        per_batch.append(int(batch["attention_mask"].sum()))
        return batch

    class Clock(TrainerCallback):  # time the steps, not Trainer's set-up
        def on_step_begin(self, args, state, control, **kw):
            clock.setdefault("start", time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            clock["end"] = time.perf_counter()

    targs = TrainingArguments(
        output_dir=str(out / "baseline"), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear",
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=runtime.device == "cpu", bf16=runtime.autocast,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            from torch.utils.data import SequentialSampler

            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    trainer = (InOrder if same_order else Trainer)(model=model, args=targs, train_dataset=dataset,
                                                   data_collator=counting_collate, callbacks=[Clock()])
    trainer.train()
    wall = clock["end"] - clock["start"]
    tokens = sum(per_batch[: cfg.max_steps])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "real_tokens": tokens,
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "params": sum(p.numel() for p in model.parameters())}


def run_erpops(args) -> dict:
    from training.lora import train_lora

    recipe, base, examples, runtime, out = _setup(args)
    update = {"checkpoint_every": 0, "gradient_checkpointing": args.variant == "erpops-gc",
              "fast_paths": args.variant != "erpops-plain"}
    if args.variant == "erpops-whole":
        update["micro_batch_tokens"] = None
    elif args.micro_batch_tokens:
        update["micro_batch_tokens"] = args.micro_batch_tokens
    recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update=update)})
    r = train_lora(recipe, base, examples, out / args.variant, runtime)
    return {"tokens_per_s": r.tokens_per_s, "wall_s": r.wall_s, "real_tokens": round(r.tokens_per_s * r.wall_s),
            "first_loss": r.first_loss, "last_loss": r.losses[-1], "losses": r.losses,
            "micro_batch_tokens": recipe.train.micro_batch_tokens}


def _median_run(rs: list[dict]) -> dict:
    """The round with the median tokens/s (the lower middle one of an even count), with the highest peak RSS of
    all rounds."""
    ordered = sorted(rs, key=lambda r: r["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}


def peak_flops(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4000 Ada": 26.7e12}
    return next((v for k, v in table.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="recipes/smollm2-135m/cpu.yaml")
    ap.add_argument("--model", choices=["recipe", "tiny"], default="recipe")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / ".erpops" / "bench" / "train"))
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="override train.micro_batch_tokens (0: the recipe's)")
    ap.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="variants to run (baseline and erpops are always run: the ratio needs both)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of all the variants (medians are reported)")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.variant:
        result = (run_baseline if args.variant.startswith("baseline") else run_erpops)(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["allocator"] = "jemalloc" if Jemalloc.loaded() else "default"
        print("RESULT " + json.dumps(result))
        return

    runs: dict[str, list[dict]] = {}
    for _ in range(max(1, args.repeat)):
        for variant in (v for v in VARIANTS if v in {"baseline", "erpops", *args.only}):
            cmd = [sys.executable, __file__, "--variant", variant, "--recipe", args.recipe, "--model", args.model,
                   "--steps", str(args.steps), "--out", args.out, "--micro-batch-tokens", str(args.micro_batch_tokens)]
            env = {k: v for k, v in os.environ.items() if k != "ERPOPS_JEMALLOC"}
            if variant.startswith("erpops") or variant == "baseline-erpops-malloc":
                env = jemalloc_env(["erpops", "train"], env) or env
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            runs.setdefault(variant, []).append(json.loads(line[7:]))
    results = {name: _median_run(rs) for name, rs in runs.items()}
    ratios = sorted(e["tokens_per_s"] / b["tokens_per_s"] for e, b in zip(runs["erpops"], runs["baseline"]))

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = peak_flops(device)
    print(f"{'variant':<21}{'tok/s':>10}{'wall s':>9}{'real tokens':>13}{'first loss':>12}{'last loss':>11}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<21}{r['tokens_per_s']:>10.1f}{r['wall_s']:>9.1f}{r['real_tokens']:>13}{r['first_loss']:>12.3f}"
              f"{r['last_loss']:>11.3f}{r['peak_rss_mb']:>13.0f}")
    ratio = statistics.median(ratios)
    pairs = (f"ratio={ratio:.2f} ratio_min={ratios[0]:.2f} ratio_max={ratios[-1]:.2f} rounds={len(ratios)} "
             f"baseline_tokens_per_s={results['baseline']['tokens_per_s']:.1f} "
             f"erpops_tokens_per_s={results['erpops']['tokens_per_s']:.1f} "
             f"baseline_peak_rss_mb={results['baseline']['peak_rss_mb']:.0f} erpops_peak_rss_mb={results['erpops']['peak_rss_mb']:.0f}")
    erp = results["erpops"]
    pairs += f" micro_batch_tokens={erp['micro_batch_tokens']}"
    for name, key in (("erpops-plain", "plain"), ("erpops-whole", "whole"), ("erpops-gc", "gc")):
        if name in results:
            r = results[name]
            pairs += (f" {key}_tokens_per_s={r['tokens_per_s']:.1f} {key}_peak_rss_mb={r['peak_rss_mb']:.0f}"
                      f" {key}_last_loss_delta={r['last_loss'] - erp['last_loss']:+.4f}")
    if "baseline-same-order" in results:
        r = results["baseline-same-order"]
        delta = max(abs(a - b) for a, b in zip(r["losses"], erp["losses"]))
        pairs += f" same_order_tokens_per_s={r['tokens_per_s']:.1f} same_order_max_loss_delta={delta:.4f}"
    if "baseline-erpops-malloc" in results:
        pairs += f" baseline_erpops_malloc_tokens_per_s={results['baseline-erpops-malloc']['tokens_per_s']:.1f}"
    pairs += f" allocator={runs['erpops'][0]['allocator']}"
    if "erpops-plain" in results:
        pairs += f" fast_paths_speedup={erp['tokens_per_s'] / results['erpops-plain']['tokens_per_s']:.2f}"
    if peak and results["baseline"].get("params"):
        n = results["baseline"]["params"]
        for name, r in results.items():
            pairs += f" {name.replace('-', '_')}_mfu={r['tokens_per_s'] * 4 * n / peak:.4f}"
    print(pairs)


if __name__ == "__main__":
    main()
