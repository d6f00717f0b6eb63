"""training.lora.fast_paths: per-conversation attention over unpadded packed rows, LoRA dropout from random bits,
a bf16-held frozen base under CPU autocast. The same numbers as the plain computation (per example, loss and
gradient; for the bf16 base, those of the base loaded in bf16 as on a GPU), and the distribution nn.Dropout has."""

import pytest
import torch

from erpops.config import LoraConfig
from erpops.device import Runtime
from training.data import IGNORE_INDEX, encode_example, pack_batch, pack_flat

WORDS = ["전표", "입력", "결재", "재고", "move", "stock", "post", "invoice"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def gqa_model(tiny_model_dir):
    """The tiny Llama with grouped-query attention (2 query heads per key/value head), LoRA on q and v,
    its B matrices non-zero so that every adapter weight has a gradient."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_key_value_heads = config.num_attention_heads // 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _examples(tokenizer, n=5):
    return [encode_example(tokenizer, [{"role": "user", "content": " ".join(WORDS[i % 4: 3 + i])},
                                       {"role": "assistant", "content": " ".join(WORDS[i % 3:] * (1 + i))}])
            for i in range(n)]


def _per_example_nll(model, batch, counts):
    import torch.nn.functional as F

    from training.lora import labelled_logits

    logits, targets, _ = labelled_logits(model, **batch)
    return F.cross_entropy(logits, targets, reduction="none").split(counts)


def test_flat_packing_gives_each_example_its_own_loss_and_gradient(gqa_model, tokenizer):
    """Packed into one unpadded row, each example's per-token losses and the LoRA gradient are those of the
    examples run one at a time: no example attends to another."""
    from training.lora import assistant_token_nll
    from training.packed_attention import PACKED_SDPA, use_packed_attention

    examples = _examples(tokenizer)
    counts = [sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in examples]
    trainable = [p for p in gqa_model.parameters() if p.requires_grad]

    alone, grads = [], [torch.zeros_like(p) for p in trainable]
    for e, n in zip(examples, counts):
        gqa_model.zero_grad()
        (nll,) = _per_example_nll(gqa_model, pack_batch([e], tokenizer.pad_token_id, 512), [n])
        nll.sum().backward()
        alone.append(nll.detach())
        grads = [g + p.grad for g, p in zip(grads, trainable)]

    assert use_packed_attention(gqa_model) and gqa_model.get_base_model().config._attn_implementation == PACKED_SDPA
    flat = pack_flat(examples)
    assert flat["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    assert flat["doc_lengths"] == tuple(len(e.input_ids) for e in examples)
    gqa_model.zero_grad()
    packed = _per_example_nll(gqa_model, flat, counts)
    for a, b in zip(alone, packed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    total, n = assistant_token_nll(gqa_model, **flat)
    assert n == sum(counts)
    gqa_model.zero_grad()
    total.backward()
    for g, p in zip(grads, trainable):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_packed_attention_uses_the_doc_lengths_it_is_given(gqa_model, tokenizer):
    """The lengths decide the attention (a wrong total is refused, not silently masked); without them the
    same model still runs padded batches with transformers' masks."""
    from training.lora import assistant_token_loss
    from training.packed_attention import use_packed_attention

    examples = _examples(tokenizer, 3)
    padded = pack_batch(examples, tokenizer.pad_token_id, 16)  # one example per row: padding at row ends
    with torch.no_grad():
        before = assistant_token_loss(gqa_model, **padded)
        use_packed_attention(gqa_model)
        torch.testing.assert_close(assistant_token_loss(gqa_model, **padded), before)
        flat = pack_flat(examples)
        with pytest.raises(ValueError, match="do not cover"):
            assistant_token_loss(gqa_model, **{**flat, "doc_lengths": flat["doc_lengths"][:-1]})
        merged = (flat["doc_lengths"][0] + flat["doc_lengths"][1],) + flat["doc_lengths"][2:]
        # the first two examples as one document: the second now sees the first, so its loss changes
        assert not torch.allclose(assistant_token_loss(gqa_model, **{**flat, "doc_lengths": merged}),
                                  assistant_token_loss(gqa_model, **flat))


def test_packed_attention_leaves_other_attention_implementations_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from training.packed_attention import use_packed_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "eager"


def test_training_with_packed_attention_takes_the_padded_steps(tiny_model_dir, tokenizer):
    """Two optimizer steps on the same batches, flat-packed with per-example attention against padded: the same
    adapter (dropout off, fp32)."""
    from training.data import pad_batch
    from training.lora import assistant_token_nll, fast_paths, load_for_training

    examples = _examples(tokenizer, 6)
    adapters = []
    for flat in (False, True):
        torch.manual_seed(0)
        model, _ = load_for_training(tiny_model_dir, LoraConfig(r=4, alpha=8, dropout=0.0), Runtime("cpu", "float32"))
        assert fast_paths(model, Runtime("cpu", "float32"), packing=flat)["packed_attention"] is flat
        trainable = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in trainable]
        opt = torch.optim.AdamW(trainable, lr=1e-2)
        for part in (examples[:3], examples[3:]):
            batch = pack_flat(part) if flat else pad_batch(part, tokenizer.pad_token_id)
            loss, n = assistant_token_nll(model, **batch)
            (loss / n).backward()
            opt.step()
            opt.zero_grad()
        adapters.append([p.detach().clone() for p in trainable])
        assert all(not torch.equal(a, b) for a, b in zip(adapters[-1], start))  # both steps moved every weight
    for a, b in zip(*adapters):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bits_dropout_keeps_each_element_independently_with_probability_1_minus_p():
    from training.fast_dropout import BitsDropout

    torch.manual_seed(0)
    drop = BitsDropout(0.05).train()
    x = torch.ones(1_000_000, requires_grad=True)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.05) < 5 * (0.05 * 0.95 / x.numel()) ** 0.5  # within 5 standard deviations
    assert torch.allclose(y[y != 0], torch.tensor(65536 / (65536 - 3277)))  # kept ones scaled: mean stays 1
    assert abs(float(y.detach().mean()) - 1.0) < 0.002
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask, with the same scale
    # independent across elements: neighbours (which share a 64-bit draw) are not dropped together more often
    pairs = (y.view(-1, 2) == 0).all(dim=1).float().mean()
    assert abs(float(pairs) - 0.05 ** 2) < 0.0006
    torch.manual_seed(1)
    a = drop(torch.ones(4096))
    torch.manual_seed(1)
    assert torch.equal(a, drop(torch.ones(4096)))  # the seeded torch generator decides
    assert torch.equal(drop.eval()(x), x)


def test_install_swaps_every_lora_dropout_on_the_cpu_only(tiny_model_dir):
    from training.fast_dropout import BitsDropout
    from training.lora import fast_paths, load_for_training

    lora = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    model, _ = load_for_training(tiny_model_dir, lora, Runtime("cpu", "float32"))
    layers = model.get_base_model().config.num_hidden_layers
    assert fast_paths(model, Runtime("cpu", "float32"), packing=True)["bits_dropout"] == 2 * layers
    swapped = [m for m in model.modules() if isinstance(m, BitsDropout)]
    assert len(swapped) == 2 * layers and all(m.p == 0.1 for m in swapped)
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    model, _ = load_for_training(tiny_model_dir, lora, Runtime("cpu", "float32"))
    assert fast_paths(model, Runtime("cuda", "bfloat16"), packing=False) == {"packed_attention": False, "bits_dropout": 0,
                                                                          "bf16_frozen": 0}


def test_bf16_held_frozen_base_is_the_gpu_recipes_bf16_model(tiny_model_dir, tokenizer):
    """On the CPU under bf16 autocast the fast paths hold the frozen base in bf16 and feed the LoRA layers their bf16
    input: bit-for-bit the loss and LoRA gradients of the base loaded in bf16 (as `load_for_training` does on a GPU)
    with peft's own up-cast, and within bf16 rounding of the base held in fp32. The adapters stay fp32."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from training.lora import assistant_token_nll, fast_paths, load_for_training

    runtime = Runtime("cpu", "bfloat16")
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    batch = pack_batch(_examples(tokenizer, 4), tokenizer.pad_token_id, 512)

    def run(way):
        torch.manual_seed(0)
        if way == "loaded-bf16":
            base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
            model = get_peft_model(base, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
        else:
            model, _ = load_for_training(tiny_model_dir, lora, runtime)
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        if way == "fast":
            on = fast_paths(model, runtime, packing=False)
            frozen = [p for p in model.parameters() if not p.requires_grad]
            assert on["bf16_frozen"] == len(frozen) and all(p.dtype == torch.bfloat16 for p in frozen)
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = assistant_token_nll(model, **batch)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    fast, reference, fp32_held = run("fast"), run("loaded-bf16"), run("fp32")
    assert torch.equal(fast[0], reference[0])
    for x, y in zip(fast[1], reference[1]):
        assert torch.equal(x, y)
    torch.testing.assert_close(fast[0], fp32_held[0], rtol=2e-2, atol=0)
    for x, y in zip(fast[1], fp32_held[1]):
        assert (x - y).norm() <= 0.05 * y.norm()
    assert not torch.equal(fast[0], fp32_held[0])  # the residual stream really is bf16