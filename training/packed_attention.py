"""Attention over packed conversations, one causal attention per conversation.

A packed row holds several conversations back to back, their position_ids restarting at each. Given the
conversations' lengths (`doc_lengths`, from `training.data.pack_flat`), every conversation's queries attend
causally to its own keys only: SDPA runs once per conversation with `is_causal=True`. That is the block-diagonal
causal mask transformers builds from the position_ids, without computing the blocks it masks out (the CPU and
GPU flash kernels skip the upper triangle of a causal call, but compute every block of a masked one), without
materialising the (tokens x tokens) mask, and with grouped-query heads left unrepeated.

    model.set_attn_implementation(PACKED_SDPA)   # after register(); training.lora does both

Without `doc_lengths` (generation, padded batches) and where the layer needs what this does not do (logit
soft-capping, a sliding window shorter than a conversation) it is transformers' own SDPA attention, with the
mask transformers built.
"""

from __future__ import annotations

from contextlib import contextmanager

PACKED_SDPA = "erpops_packed_sdpa"
CPU_FP32 = True
"""On the CPU the per-conversation attention runs in fp32 even under bf16 autocast: PyTorch's CPU flash kernel
took 27.5 ms forward and backward in bf16 against 15.8 ms in fp32 (9 heads, 3 kv heads, six conversations of
150-200 tokens, AVX512-BF16 CPU, torch 2.13), and fp32 is the more exact of the two."""


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          doc_lengths: tuple[int, ...] | None = None, **kwargs):
    """transformers' attention-function signature: query (batch, heads, tokens, dim), key and value
    (batch, kv heads, tokens, dim); returns ((batch, tokens, heads, dim), None). With `doc_lengths` the batch
    is one row and its tokens are those conversations in order."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = kwargs.get("sliding_window")
    if (doc_lengths is None or kwargs.get("softcap") is not None or dropout
            or (window is not None and max(doc_lengths) > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or sum(doc_lengths) != query.shape[2]:
        raise ValueError(f"doc_lengths {doc_lengths} do not cover one packed row of {query.shape[2]} tokens "
                         f"(batch {query.shape[0]})")
    gqa = key.shape[1] != query.shape[1]
    cpu = CPU_FP32 and query.device.type == "cpu"
    if cpu:  # fp32 on the CPU: its flash kernel's backward is 1.7x slower in bf16 (see CPU_FP32)
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast(query.device.type, enabled=not cpu and torch.is_autocast_enabled(query.device.type)):
        parts = [F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
                 for q, k, v in zip(query.split(doc_lengths, dim=2), key.split(doc_lengths, dim=2),
                                    value.split(doc_lengths, dim=2))]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make PACKED_SDPA a name `set_attn_implementation` accepts (idempotent); its masks are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextmanager
def packed_attention(model):
    """`use_packed_attention` for the duration of a `with` block, the model's own attention implementation
    restored after it; yields whether it switched (whether to feed it `pack_flat` batches)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(inner.config, "_attn_implementation", None)
    switched = use_packed_attention(model)
    try:
        yield switched
    finally:
        if switched and before != PACKED_SDPA:
            inner.set_attn_implementation(before)


def use_packed_attention(model) -> bool:
    """Switch a causal LM (or a peft model around one) to PACKED_SDPA where it runs SDPA now; False (and no
    change) for another attention implementation (eager, flash-attention kernels)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner.config, "_attn_implementation", None) not in ("sdpa", PACKED_SDPA):
        return False
    register()
    inner.set_attn_implementation(PACKED_SDPA)
    return inner.config._attn_implementation == PACKED_SDPA
