"""Model scoring shared by the optimize and evaluate stages: response NLL, batched greedy answers, and
one-at-a-time answer latency."""

from __future__ import annotations

from dataclasses import dataclass

from erpops.device import Runtime, autocast_weights
from training.data import IGNORE_INDEX, encode_example, pack_flat, pad_batch, prompt_text, stop_token_ids, to_device
from training.packed_attention import packed_attention


@dataclass
class NLL:
    nll: list[float]
    """Summed negative log-likelihood of the assistant tokens, per example."""
    tokens: list[int]
    """Assistant tokens scored, per example."""
    top: list | None = None
    """With `response_nll(..., top_tokens=True)`: per example, the model's most likely token at each scored
    position (1-D tensors, in position order); None otherwise."""

    @property
    def perplexity(self) -> float:
        import math

        return math.exp(sum(self.nll) / max(1, sum(self.tokens)))

    @property
    def per_token(self) -> list[float]:
        """Mean NLL per assistant token, per example (nats; NaN for an example with no scored token)."""
        return [x / n if n else float("nan") for x, n in zip(self.nll, self.tokens)]


def response_nll(model, tokenizer, examples: list[dict], runtime: Runtime, batch_size: int = 4,
                 top_tokens: bool = False) -> NLL:
    """Teacher-forced NLL of every assistant turn (the same tokens the training loss covers); with
    `top_tokens`, also the model's own next-token choice at those positions (from the same forward).

    `batch_size` examples run together. 4 rather than 8: a forward under bf16 autocast on the CPU spends most of its
    time in element-wise work (casts, norms, rotary, activations), and a batch of ~800 tokens keeps its tensors
    in cache: 48 eval examples of SmolLM2-135M took 6.2-6.7 s against 7.7-8.4 s at 8 (2 AMX cores). Batches
    change scores only by rounding (perplexity 8.0297 against 8.0279; 1.4% of top tokens differ under bf16), so
    every stage scores with the same batch size."""
    import torch
    import torch.nn.functional as F

    from training.lora import labelled_logits

    model.eval()
    encoded = [encode_example(tokenizer, e["messages"]) for e in examples]
    # batches of similar length pad less (a third less time on the eval split); results keep the input order
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    counts = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in encoded]
    nll = [0.0] * len(encoded)
    top: list = [None] * len(encoded)
    # where the model runs SDPA, each batch is one unpadded row with attention per example
    with torch.no_grad(), packed_attention(model) as flat, autocast_weights(model, runtime):
        for i in range(0, len(order), batch_size):
            members = order[i:i + batch_size]
            rows = [encoded[j] for j in members]
            batch = pack_flat(rows) if flat else pad_batch(rows, tokenizer.pad_token_id)
            batch = to_device(batch, runtime.device)
            with torch.autocast(runtime.device, dtype=runtime.torch_dtype(), enabled=runtime.autocast):
                logits, targets, _ = labelled_logits(model, **batch)
            # scored positions come in example order, each example's as one contiguous run
            sizes = [counts[j] for j in members]
            token_nll = F.cross_entropy(logits, targets, reduction="none")
            for j, value in zip(members, torch.stack([p.sum() for p in token_nll.split(sizes)]).tolist()):
                nll[j] = value
            if top_tokens:  # max's indices are argmax's (the first of equal maxima), in half the time on the CPU
                for j, part in zip(members, logits.max(-1).indices.cpu().split(sizes)):
                    top[j] = part
    return NLL(nll, counts, top if top_tokens else None)


def top_token_agreement(reference: NLL, other: NLL) -> float:
    """Share of scored positions, over all examples, where two models (scored with top_tokens=True on the
    same examples) choose the same next token."""
    if reference.top is None or other.top is None:
        raise ValueError("top_token_agreement needs both scores taken with top_tokens=True")
    same = sum(int((a == b).sum()) for a, b in zip(reference.top, other.top))
    return same / max(1, sum(a.numel() for a in reference.top))


def generate_answers(model, tokenizer, examples: list[dict], runtime: Runtime, max_new_tokens: int,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers to each example's last user turn, batched with left padding."""
    import torch

    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        prompts = [prompt_text(tokenizer, e["messages"]) for e in examples]
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = to_device(enc, runtime.device)
            with torch.no_grad(), torch.autocast(runtime.device, dtype=runtime.torch_dtype(), enabled=runtime.autocast):
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
            new = out[:, enc["input_ids"].shape[1]:]
            answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return answers


def answer_latencies(model, tokenizer, examples: list[dict], runtime: Runtime, max_new_tokens: int) -> list[float]:
    """Seconds to answer each example alone (batch of one, greedy): what a chat user waits for a reply."""
    import time

    latencies = []
    for example in examples:
        t0 = time.perf_counter()
        generate_answers(model, tokenizer, [example], runtime, max_new_tokens, batch_size=1)
        latencies.append(time.perf_counter() - t0)
    return latencies


def reference_answer(example: dict) -> str:
    """The last assistant turn: the reply the generated answer is compared with."""
    return [m for m in example["messages"] if m["role"] == "assistant"][-1]["content"]


def question_text(example: dict) -> str:
    """The last user turn before the last assistant turn: the question the generated answer replies to."""
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [m for m in messages[:last] if m["role"] == "user"][-1]["content"]
