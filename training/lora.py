"""Stage 2, train: LoRA fine-tuning (peft) of the base model on the training split.

    erpops train --recipe recipes/smollm2-135m/cpu.yaml

A plain loop rather than `transformers.Trainer`: the stage owns batching (so padding can be removed
later), logs every step through one buffered MLflow call per flush, and writes the adapter with the
resolved recipe beside it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from erpops.config import LoraConfig, Recipe, TrainConfig
from erpops.device import Runtime
from erpops.tracking import Tracker
from training.data import Encoded, encode_example, pad_batch

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    first_loss: float
    final_loss: float
    """Mean loss of the last 5 steps (less noisy than the last step alone)."""
    tokens_per_s: float
    """Real (non-pad) tokens processed per second of training."""
    wall_s: float


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_for_training(base: Path | str, lora: LoraConfig, runtime: Runtime):
    """Base model (fp32 weights, frozen) with LoRA adapters, and its tokenizer."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(runtime.device)
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg), tokenizer


def batches(examples: list[Encoded], batch_size: int, steps: int, seed: int, window: int = 8):
    """`steps` batches, reshuffled each epoch by a seeded generator; within a window of `window` batches
    examples are grouped by length, so that little compute goes to padding."""
    rng = random.Random(seed)
    pending: list[list[Encoded]] = []
    order: list[int] = []
    for _ in range(steps):
        if not pending:
            while len(order) < batch_size * window:
                fresh = list(range(len(examples)))
                rng.shuffle(fresh)
                order += fresh
            take, order = order[: batch_size * window], order[batch_size * window:]
            take.sort(key=lambda i: len(examples[i].input_ids))
            pending = [[examples[i] for i in take[j:j + batch_size]] for j in range(0, len(take), batch_size)]
            rng.shuffle(pending)
        yield pending.pop()


def labelled_logits(model, input_ids, attention_mask, labels):
    """Logits and targets at the labelled (assistant) positions only.

    The vocabulary projection runs only where a target exists: the (batch x length x vocab) logits of
    prompt and padding positions, most of a chat batch, are never materialised.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(inner.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * (logits / cap).tanh()
    return logits.float(), targets[keep], keep


def assistant_token_loss(model, input_ids, attention_mask, labels):
    """Mean cross-entropy over assistant tokens: the model's own loss, computed without wasted logits."""
    import torch.nn.functional as F

    logits, targets, _ = labelled_logits(model, input_ids, attention_mask, labels)
    return F.cross_entropy(logits, targets)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then linear decay to zero at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    remaining = cfg.max_steps - cfg.warmup_steps
    return cfg.learning_rate * max(0.0, (cfg.max_steps - step) / max(1, remaining))


def train_lora(
    recipe: Recipe,
    base: Path | str,
    train_examples: list[dict],
    out_dir: Path,
    runtime: Runtime,
    tracker: Tracker | None = None,
) -> TrainResult:
    import torch

    cfg = recipe.train
    seed_everything(cfg.seed)
    model, tokenizer = load_for_training(base, recipe.lora, runtime)
    encoded = [encode_example(tokenizer, e["messages"]) for e in train_examples]
    encoded = [e for e in encoded if any(t != -100 for t in e.labels)]
    if not encoded:
        raise ValueError("no training example has assistant tokens to learn from")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if tracker:
        tracker.log_params({"train.trainable_params": n_trainable, "train.total_params": n_total,
                            "train.device": runtime.device, "train.compute_dtype": runtime.compute_dtype,
                            "train.examples": len(encoded)})
    log.info("training %d/%d params (%.2f%%) on %s/%s, %d examples, %d steps",
             n_trainable, n_total, 100 * n_trainable / n_total, runtime.device, runtime.compute_dtype,
             len(encoded), cfg.max_steps)

    model.train()
    losses: list[float] = []
    real_tokens = 0
    start = time.perf_counter()
    for step, batch in enumerate(batches(encoded, cfg.batch_size, cfg.max_steps, cfg.seed)):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        inputs = {k: v.to(runtime.device) for k, v in pad_batch(batch, tokenizer.pad_token_id).items()}
        with torch.autocast(runtime.device, dtype=runtime.torch_dtype(), enabled=runtime.autocast):
            loss = assistant_token_loss(model, **inputs)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_tokens = int(inputs["attention_mask"].sum())
        real_tokens += n_tokens
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}")
        losses.append(value)
        if tracker:
            tracker.log_metric("train/loss", value, step)
            tracker.log_metric("train/learning_rate", lr_at(step, cfg), step)
            tracker.log_metric("train/grad_norm", grad_norm, step)
            tracker.log_metric("train/tokens_per_s", n_tokens / (time.perf_counter() - t0), step)
        if step % 5 == 0 or step == cfg.max_steps - 1:
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg.max_steps, value, lr_at(step, cfg))
    wall = time.perf_counter() - start

    adapter_dir = out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    (adapter_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False))
    result = TrainResult(adapter_dir, len(losses), losses[0], sum(losses[-5:]) / len(losses[-5:]),
                         real_tokens / wall, wall)
    if tracker:
        tracker.log_metrics({"train/first_loss": result.first_loss, "train/final_loss": result.final_loss,
                             "train/mean_tokens_per_s": result.tokens_per_s, "train/wall_s": wall})
        tracker.log_artifact(adapter_dir, "adapter")
        _log_loss_curve(tracker, losses, out_dir)
    return result


def _log_loss_curve(tracker: Tracker, losses: list[float], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("LoRA training loss")
    fig.tight_layout()
    path = out_dir / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    tracker.log_artifact(path, "plots")
