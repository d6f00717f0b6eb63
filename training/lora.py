"""Stage 2, train: LoRA fine-tuning (peft) of the base model on the training split.

    erpops train --recipe recipes/smollm2-135m/cpu.yaml

A plain loop rather than `transformers.Trainer`: the stage owns batching (so padding can be removed
later), logs every step through one buffered MLflow call per flush, and writes the adapter with the
resolved recipe beside it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from erpops import distributed
from erpops.config import LoraConfig, Recipe, TrainConfig
from erpops.device import Runtime
from erpops.distributed import SINGLE, Dist
from erpops.tracking import Tracker
from training.data import Encoded, encode_example, pack_batch, pack_flat, pad_batch, to_device, with_targets

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
    step_seconds: list[float] = field(default_factory=list)
    """Wall seconds of each step this process ran (not those before a resume): the first ones carry warm-up."""
    step_tokens: list[int] = field(default_factory=list)
    """Real tokens of each of those steps (all ranks)."""
    losses: list[float] = field(default_factory=list)
    """The loss of every step, those before a resume included."""

    def steady_tokens_per_s(self, skip: int) -> float:
        """Tokens/s over the steps after the first `skip` (kernel selection, allocator and cache warm-up);
        all steps when there are no more than `skip`."""
        skip = skip if len(self.step_seconds) > skip else 0
        return sum(self.step_tokens[skip:]) / max(sum(self.step_seconds[skip:]), 1e-9)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_for_training(base: Path | str, lora: LoraConfig, runtime: Runtime, gradient_checkpointing: bool = False):
    """Base model (frozen) with LoRA adapters, and its tokenizer. The base is held in fp32 on the CPU, and in the
    compute dtype on a GPU (bf16: half the memory and no weight cast in every forward; a frozen weight needs no fp32
    master copy); QLoRA holds it in 4-bit. The LoRA weights are fp32 everywhere (peft upcasts adapters)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if lora.qlora:
        if runtime.device != "cuda":
            raise ValueError("lora.qlora needs a CUDA GPU (bitsandbytes 4-bit); use plain LoRA on CPU")
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=runtime.torch_dtype())
        # this process's GPU (distributed.init set it per local rank), not GPU 0 for every rank
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant,
                                                     device_map={"": torch.cuda.current_device()})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        dtype = runtime.torch_dtype() if runtime.device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(runtime.device)
    if gradient_checkpointing:  # recompute each layer's activations in backward: less memory, ~30% more compute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg), tokenizer


def fast_paths(model, runtime: Runtime, packing: bool, enabled: bool = True) -> dict[str, bool | int]:
    """What the training loop switches on beyond plain peft, each the same computation done cheaper:
    - with `packing`, attention within each conversation of an unpadded row (`training.packed_attention`,
      where the model runs SDPA);
    - on the CPU, LoRA dropout masks from random bits (`training.fast_dropout`; CUDA's fused dropout is cheap);
    - on the CPU under bf16 autocast, the frozen base held in bf16, as the GPU recipes load it
      (`load_for_training`): autocast rounds every frozen Linear weight to bf16 for its product anyway, and
      a frozen weight needs no fp32 master copy, so there is no weight cast per forward and half the memory.
      The embeddings and norms go too, so the hidden states are bf16 between layers (as on a GPU) instead of
      fp32 that autocast casts down again in front of every product; and the LoRA layers take that bf16
      input as it is instead of peft casting it up to their fp32 weights' dtype for autocast to cast it back
      (the same products: a test checks loss and gradients bit for bit against the base loaded in bf16 with
      peft's cast). The adapters stay fp32.
    Returns which are on (dropout: how many layers; bf16_frozen: how many frozen tensors); none with
    `enabled` False (train.fast_paths)."""
    import torch

    from training import fast_dropout
    from training.packed_attention import use_packed_attention

    on = {"packed_attention": bool(enabled and packing and use_packed_attention(model)), "bits_dropout": 0,
          "bf16_frozen": 0}
    if not enabled or runtime.device != "cpu":
        return on
    on["bits_dropout"] = fast_dropout.install(model)
    if runtime.autocast and runtime.torch_dtype() == torch.bfloat16:
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
                on["bf16_frozen"] += 1
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled") and hasattr(module, "lora_A"):
                module.cast_input_dtype_enabled = False  # peft's switch (peft.helpers.disable_input_dtype_casting)
    return on


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


def micro_batches(batch: list[Encoded], max_tokens: int | None) -> list[list[Encoded]]:
    """The batch in order, cut into runs of at most `max_tokens` tokens (an example longer than that alone);
    None: the whole batch as one."""
    if not max_tokens:
        return [batch]
    out, current, size = [], [], 0
    for e in batch:
        if current and size + len(e.input_ids) > max_tokens:
            out.append(current)
            current, size = [], 0
        current.append(e)
        size += len(e.input_ids)
    return out + [current] if current else out


def scale_grads(params, factor: float) -> None:
    """Multiply every gradient in place (the summed loss's gradient -> the mean's)."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


def labelled_logits(model, input_ids, labels, attention_mask=None, position_ids=None, doc_lengths=None):
    """Logits and targets at the labelled (assistant) positions only.

    The vocabulary projection runs only where a target exists: the (batch x length x vocab) logits of
    prompt and padding positions, most of a chat batch, are never materialised. `doc_lengths` (a
    `pack_flat` batch) goes to the attention function (`training.packed_attention`).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    extra = {"doc_lengths": doc_lengths} if doc_lengths is not None else {}
    hidden = inner.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False, **extra).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(inner.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * (logits / cap).tanh()
    return logits.float(), targets[keep], keep


def assistant_token_nll(model, input_ids, labels, attention_mask=None, position_ids=None, doc_lengths=None):
    """(summed cross-entropy over the assistant tokens, how many there are): the training loop divides the
    sum by the count over all processes."""
    import torch.nn.functional as F

    logits, targets, _ = labelled_logits(model, input_ids, labels, attention_mask, position_ids, doc_lengths)
    return F.cross_entropy(logits, targets, reduction="sum"), targets.numel()


def assistant_token_loss(model, input_ids, labels, attention_mask=None, position_ids=None, doc_lengths=None):
    """Mean cross-entropy over assistant tokens: the model's own loss, computed without wasted logits."""
    loss_sum, n = assistant_token_nll(model, input_ids, labels, attention_mask, position_ids, doc_lengths)
    return loss_sum / n


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
    resume: bool = False,
    dist: Dist = SINGLE,
) -> TrainResult:
    """Train LoRA adapters; with `resume`, continue from the newest checkpoint in out_dir/checkpoints.

    Under a multi-process launch (`dist`), every process holds the same model and takes its share of each
    global batch; gradients are summed across processes with the loss normalised by the global count of
    assistant tokens, so each step is the single-process step. Only rank 0 logs and writes files (give
    the other ranks `tracker=None`)."""
    import torch

    cfg = recipe.train
    if dist.enabled and cfg.batch_size < dist.world_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} is the global batch; it must be at least the "
                         f"number of processes ({dist.world_size})")
    seed_everything(cfg.seed)  # the same on every rank: LoRA initialisation and data order must agree
    model, tokenizer = load_for_training(base, recipe.lora, runtime, cfg.gradient_checkpointing)
    speedups = fast_paths(model, runtime, cfg.packing, cfg.fast_paths)
    encoded = [encode_example(tokenizer, e["messages"]) for e in train_examples]
    encoded = with_targets(encoded)
    if not encoded:
        raise ValueError("no training example has assistant tokens to learn from")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if tracker:
        tracker.log_params({"train.trainable_params": n_trainable, "train.total_params": n_total,
                            "train.device": runtime.device, "train.compute_dtype": runtime.compute_dtype,
                            "train.examples": len(encoded), "train.processes": dist.world_size,
                            "train.gradient_checkpointing": cfg.gradient_checkpointing,
                            "train.packed_attention": speedups["packed_attention"],
                            "train.bits_dropout": speedups["bits_dropout"],
                            "train.bf16_frozen_tensors": speedups["bf16_frozen"]})
    log.info("training %d/%d params (%.2f%%) on %s/%s, %d examples, %d steps",
             n_trainable, n_total, 100 * n_trainable / n_total, runtime.device, runtime.compute_dtype,
             len(encoded), cfg.max_steps)

    model.train()
    losses: list[float] = []
    real_tokens = 0
    done = 0
    ckpt_root = out_dir / "checkpoints"
    fingerprint = run_fingerprint(recipe, train_examples)
    prior_wall = 0.0
    latest = latest_checkpoint(ckpt_root, fingerprint) if resume else None
    if latest is not None:
        done, losses, real_tokens, prior_wall = load_checkpoint(latest, model, optimizer, dist)
        log.info("resuming from %s: %d/%d steps done", latest.name, done, cfg.max_steps)
        if tracker:
            tracker.set_tags({"train.resumed_from_step": done})
    else:
        clear_checkpoints(ckpt_root, dist)
    monitor = None
    if tracker:  # CPU, memory (and GPU when present) sampled into the run as system/* metrics
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(tracker.run_id, sampling_interval=5, tracking_uri=tracker.tracking_uri)
        monitor.start()
    try:
        losses, real_tokens, wall, step_seconds, step_tokens = _loop(
            model, tokenizer, optimizer, trainable, encoded, recipe, runtime, tracker, ckpt_root, done, losses,
            real_tokens, fingerprint, prior_wall, dist, speedups["packed_attention"])
    finally:
        if monitor:
            monitor.finish()

    adapter_dir = out_dir / "adapter"
    result = TrainResult(adapter_dir, len(losses), losses[0], sum(losses[-5:]) / len(losses[-5:]),
                         real_tokens / max(wall, 1e-9), wall, step_seconds, step_tokens, list(losses))
    if not dist.is_main:
        return result
    # whole or not at all: written beside, then put in place (a crash mid-save, or a rerun into the same run
    # folder, never leaves new weights beside an old tokenizer or recipe)
    partial = out_dir / "adapter.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), allow_unicode=True, sort_keys=False))
    shutil.rmtree(adapter_dir, ignore_errors=True)
    partial.rename(adapter_dir)
    if tracker:
        tracker.log_metrics({"train/first_loss": result.first_loss, "train/final_loss": result.final_loss,
                             "train/mean_tokens_per_s": result.tokens_per_s, "train/wall_s": wall})
        tracker.log_artifact(adapter_dir, "adapter")
        _log_loss_curve(tracker, losses, out_dir)
    return result


def _loop(model, tokenizer, optimizer, trainable, encoded, recipe, runtime, tracker, ckpt_root, done, losses, real_tokens,
          fingerprint, prior_wall, dist: Dist = SINGLE, flat: bool = False):
    """The optimisation steps from `done` to max_steps; returns (losses, real_tokens, wall seconds of
    all steps, those before a resume included, and the seconds and real tokens of each step run here).
    Losses and token counts are global (all ranks). `flat`: micro-batches go in as one unpadded row each
    (`pack_flat`, for `training.packed_attention`)."""
    import torch

    cfg = recipe.train
    start = time.perf_counter()
    step_seconds: list[float] = []
    step_tokens: list[int] = []
    for step, batch in enumerate(batches(encoded, cfg.batch_size, cfg.max_steps, cfg.seed)):
        if step < done:  # replay the seeded data order up to the checkpoint, without computing
            continue
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        mine = distributed.shard(dist, batch)
        loss_total, n_labelled = 0.0, 0
        for micro in micro_batches(mine, cfg.micro_batch_tokens):
            collated = (pack_flat(micro) if flat
                        else pack_batch(micro, tokenizer.pad_token_id, recipe.data.max_seq_len) if cfg.packing
                        else pad_batch(micro, tokenizer.pad_token_id))
            inputs = to_device(collated, runtime.device)
            with torch.autocast(runtime.device, dtype=runtime.torch_dtype(), enabled=runtime.autocast):
                loss_sum, n = assistant_token_nll(model, **inputs)
            loss_sum.backward()  # gradients of the summed loss accumulate over the micro-batches
            loss_total, n_labelled = loss_total + loss_sum.item(), n_labelled + n
            del loss_sum, inputs, collated
        # [assistant tokens, all real tokens, summed loss] over every rank, in one collective
        totals = distributed.all_sum(dist, torch.tensor([n_labelled, sum(len(e.input_ids) for e in mine),
                                                         loss_total], dtype=torch.float64,
                                                        device=runtime.device))  # NCCL reduces CUDA tensors only
        if totals[0].item() == 0:
            raise FloatingPointError(f"step {step}: the batch has no assistant tokens to learn from")
        scale_grads(trainable, 1.0 / totals[0].item())  # the global per-token mean once gradients are summed
        distributed.all_sum_grads(dist, trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_tokens = int(totals[1].item())  # .item() waits for the device: the step is over
        step_seconds.append(time.perf_counter() - t0)
        step_tokens.append(n_tokens)
        real_tokens += n_tokens
        value = totals[2].item() / totals[0].item()
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {step}")
        losses.append(value)
        if tracker:
            tracker.log_metric("train/loss", value, step)
            tracker.log_metric("train/learning_rate", lr_at(step, cfg), step)
            tracker.log_metric("train/grad_norm", grad_norm, step)
            tracker.log_metric("train/tokens_per_s", n_tokens / step_seconds[-1], step)
        if step % 5 == 0 or step == cfg.max_steps - 1:
            log.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg.max_steps, value, lr_at(step, cfg))
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(ckpt_root, step + 1, model, optimizer, losses, real_tokens, cfg.keep_checkpoints,
                            fingerprint, prior_wall + time.perf_counter() - start, dist)
            if tracker:
                tracker.flush()
    wall = prior_wall + time.perf_counter() - start
    return losses, real_tokens, wall, step_seconds, step_tokens


def latest_checkpoint(root: Path, fingerprint: str | None = None) -> Path | None:
    """The newest complete checkpoint (a folder is renamed into place only once fully written); given a
    `fingerprint` (run_fingerprint), the newest one written for it."""
    found = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []
    for path in reversed(found):
        if fingerprint is None or _fingerprint_of(path) == fingerprint:
            return path
    return None


def _fingerprint_of(checkpoint: Path) -> str | None:
    try:  # another rank may be clearing it (clear_checkpoints)
        return json.loads((checkpoint / "progress.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def clear_checkpoints(root: Path, dist: Dist = SINGLE) -> None:
    """Before training from scratch: the checkpoints there are another run's (another recipe or other data, or a
    run not resumed), and higher-numbered ones would make `save_checkpoint` drop each new one as it is written."""
    import shutil

    if dist.is_main and root.is_dir():
        stale = sorted(p.name for p in root.glob("step-*"))
        if stale:
            log.warning("training from scratch: removing the checkpoints of an earlier run in %s: %s", root,
                        ", ".join(stale))
        for name in stale:
            shutil.rmtree(root / name, ignore_errors=True)
    distributed.barrier(dist)


def run_fingerprint(recipe: Recipe, train_examples: list[dict]) -> str:
    """What a checkpoint must match to be resumed: the resolved recipe and the training data."""
    import hashlib

    from data_contracts.dataset import content_digest

    return hashlib.sha256(f"{recipe.digest()}:{content_digest(train_examples)}".encode()).hexdigest()


def save_checkpoint(root: Path, step: int, model, optimizer, losses: list[float], real_tokens: int, keep: int,
                    fingerprint: str = "", wall_s: float = 0.0, dist: Dist = SINGLE) -> Path:
    """Adapter weights, optimizer state, each rank's RNG states and the loss history; written atomically
    (into a hidden folder renamed into place by rank 0 once every rank has written its part)."""
    import shutil

    import torch
    from peft import get_peft_model_state_dict

    final = root / f"step-{step}"
    tmp = root / f".step-{step}.partial"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier(dist)
    torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")
    distributed.barrier(dist)
    if dist.is_main:
        torch.save({"adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                    "world_size": dist.world_size}, tmp / "state.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses, "real_tokens": real_tokens,
                                                       "fingerprint": fingerprint, "wall_s": wall_s}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(dist)
    return final


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_checkpoint(path: Path, model, optimizer, dist: Dist = SINGLE) -> tuple[int, list[float], int, float]:
    """Restore a checkpoint; a rank with no RNG file of its own (resumed with more processes than it was
    written with) keeps its fresh seeded state, which only changes dropout masks."""
    import numpy as np
    import torch
    from peft import set_peft_model_state_dict

    state = torch.load(path / "state.pt", weights_only=False)
    set_peft_model_state_dict(model, state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    rng_file = path / f"rng-{dist.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    progress = json.loads((path / "progress.json").read_text())
    return progress["step"], progress["losses"], progress["real_tokens"], progress.get("wall_s", 0.0)


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
