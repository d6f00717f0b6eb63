"""Stage 3, optimize: merge LoRA into the full-precision base, prune, quantize to int8, export GGUF.

    erpops optimize --run-dir .erpops/runs/<run>

Order matters: merge first (never into a quantized base), prune and make it permanent, then quantize
(int8 formats keep the zeros; GGUF K-quants would not). Every variant is scored with the same
response perplexity on held-out examples, and sizes are what the files take on disk.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from erpops.config import OptimizeConfig
from erpops.device import Runtime, gram
from erpops.summary import PhaseClock
from erpops.tracking import Tracker, write_json
from evaluation.scoring import NLL, response_nll
from deployment.modelfile import ModelfileSpec, write_modelfile
from training.gguf import GGUFExport, GGUFVerificationError, export_and_verify

log = logging.getLogger(__name__)


@dataclass
class Variant:
    name: str
    perplexity: float | None
    """Response perplexity on held-out examples; None where not measured."""
    size_mb: float
    """Size on disk (the state dict as torch.save writes it; the file itself for GGUF)."""
    sparsity: float
    seconds: float
    """Time spent building and scoring the variant."""
    tokens_per_s: float | None = None
    """Greedy decoding speed, one request at a time (None where not measured)."""
    memory_mb: float | None = None
    """Memory the weights take once loaded (CUDA: peak allocated while generating)."""
    ppl_ratio: float | None = None
    """Perplexity relative to the full-precision model it was made from."""


@dataclass
class OptimizeResult:
    merged_dir: Path
    """HF folder of the model that ships (merged, and pruned when pruning is on)."""
    variants: list[Variant] = field(default_factory=list)
    int8_backend: str = ""
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    gguf: dict[str, GGUFExport] = field(default_factory=dict)
    pruning: Decision | None = None
    """Whether the pruned model was kept, and why (None when pruning is off)."""
    modelfile: Path | None = None
    """Ollama Modelfile written beside the shipped GGUF."""
    modelfile_spec: ModelfileSpec | None = None
    int8: Decision | None = None
    """Whether the int8 model was accepted (and saved), and why."""
    int8_dir: Path | None = None
    shipped: str = ""
    """The GGUF kind that ships (the recipe's, or f16 after a fallback)."""
    ship_reason: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per phase of the stage (merge, prune, int8, gguf_convert_q8_0, ...), in the order run; prune
    includes its parts, listed before it (prune_capture, prune_solve, prune_forward)."""

    def table(self) -> str:
        def cell(v, fmt):
            return "-" if v is None else format(v, fmt)

        rows = [f"{'variant':<24}{'ppl':>9}{'ratio':>8}{'size MB':>10}{'sparsity':>10}{'tok/s':>9}{'mem MB':>9}"]
        rows += [f"{v.name:<24}{cell(v.perplexity, '.2f'):>9}{cell(v.ppl_ratio, '.3f'):>8}{v.size_mb:>10.1f}"
                 f"{v.sparsity:>10.3f}{cell(v.tokens_per_s, '.1f'):>9}{cell(v.memory_mb, '.0f'):>9}" for v in self.variants]
        return "\n".join(rows)


@dataclass(frozen=True)
class Decision:
    keep: bool
    ratio: float
    reason: str


def decide_variant(what: str, fallback: str, reference_ppl: float, variant_ppl: float, max_ratio: float) -> Decision:
    """Keep an optimized variant only when its perplexity stays within max_ratio of its full-precision source."""
    import math

    ratio = variant_ppl / reference_ppl if reference_ppl > 0 else math.inf
    keep = math.isfinite(ratio) and ratio <= max_ratio
    outcome = f"{what} kept" if keep else f"falling back to the {fallback}"
    return Decision(keep, ratio, f"{what} perplexity {variant_ppl:.2f} is {ratio:.3f}x the {reference_ppl:.2f} of its source "
                                 f"(allowed {max_ratio}): {outcome}")


def decide_pruning(merged_ppl: float, pruned_ppl: float, max_ratio: float) -> Decision:
    """Keep the pruned model only when its perplexity stays within max_ratio of the merged model's."""
    return decide_variant("pruned model", "unpruned model", merged_ppl, pruned_ppl, max_ratio)


def choose_gguf(ship: str, exports: dict[str, GGUFExport], source_ppl: float, max_ratio: float) -> tuple[str | None, str]:
    """Which verified GGUF ships, and why: the recipe's choice when it passed verification and (q8_0) its
    perplexity stays within max_ratio of `source_ppl`, the HF model it was converted from (f16 is judged by
    verification alone); else f16 when it was exported and passed. (None, why) when no export so far can
    ship: the caller exports f16 and asks again, or stops."""
    problems = []
    wanted = exports.get(ship)
    if wanted is None:
        problems.append(f"{ship} was not exported")
    elif not wanted.passed:
        problems.append(f"{ship} failed verification: {wanted.problem}")
    else:
        ratio = (wanted.perplexity / source_ppl if ship != "f16" and wanted.perplexity is not None and source_ppl > 0
                 else None)
        if ratio is None or ratio <= max_ratio:
            extra = f", perplexity {ratio:.4f}x its HF source" if ratio is not None else ""
            return ship, f"{ship} verified (agreement {wanted.agreement:.3f}{extra}): it ships"
        problems.append(f"{ship} perplexity {wanted.perplexity:.3f} is {ratio:.4f}x the {source_ppl:.3f} of its HF "
                        f"source (allowed {max_ratio})")
    f16 = exports.get("f16")
    if ship != "f16" and f16 is not None:
        if f16.passed:
            return "f16", "; ".join(problems) + ": the f16 GGUF ships instead"
        problems.append(f"f16 failed verification: {f16.problem}")
    return None, "no GGUF export can ship: " + "; ".join(problems)


def merge_lora(base: Path | str, adapter_dir: Path):
    """PeftModel on a full-precision (fp32) base, merged and unloaded to a plain model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def prunable_linears(model):
    """(name, module) of every nn.Linear inside the decoder blocks; embeddings and lm_head stay dense."""
    import torch

    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"]


def magnitude_prune(model, amount: float) -> dict[str, float]:
    """L1-unstructured pruning of each decoder Linear, made permanent; returns achieved sparsity per layer."""
    import torch.nn.utils.prune as prune

    sparsity = {}
    for name, module in prunable_linears(model):
        prune.l1_unstructured(module, "weight", amount=amount)
        prune.remove(module, "weight")
        sparsity[name] = float((module.weight == 0).float().mean())
    return sparsity


def calibration_inputs(tokenizer, examples: list[dict], max_tokens: int) -> list:
    """Token ids (1 x T tensors) of whole training conversations, the activations wanda and sparsegpt calibrate on."""
    from training.data import encode_example

    import torch

    return [torch.tensor([encode_example(tokenizer, e["messages"]).input_ids[:max_tokens]]) for e in examples]


def wanda_prune(model, amount: float, calibration: list, runtime: Runtime | None = None,
                clock: PhaseClock | None = None) -> dict[str, float]:
    """Wanda (Sun et al., 2024): in each output row of each decoder Linear, zero the `amount` share of
    weights with the smallest |W_ij| * ||X_j||, where ||X_j|| is the L2 norm of input feature j over the
    calibration tokens. Returns the achieved sparsity per layer."""
    import torch

    def prune_linears(linears, sq):
        for m in linears:
            score = m.weight.abs() * sq.sqrt().to(m.weight.dtype)[None, :]
            k = int(m.in_features * amount)
            if k:
                m.weight.scatter_(1, torch.topk(score, k, dim=1, largest=False, sorted=False).indices, 0.0)

    return _calibrated_prune(model, calibration, "norms", prune_linears, runtime, clock)


def sparsegpt_prune(model, amount: float, calibration: list, block: int = 128, damp: float = 0.01,
                    runtime: Runtime | None = None, clock: PhaseClock | None = None) -> dict[str, float]:
    """SparseGPT (Frantar & Alistarh, 2023): prune with the inverse Hessian H = X^T X of each Linear's
    calibration inputs, and update the weights not pruned to make up for the ones that were (optimal
    brain surgeon, column by column; the mask is chosen per block of `block` columns by w^2 / [H^-1]_jj^2).
    Returns the achieved sparsity per layer."""
    import torch

    def prune_linears(linears, H):
        # the Linears of one input (q, k, v; gate, up) share H: one factorisation, and their rows are pruned in
        # one pass, each Linear's mask still chosen among its own weights (rows never mix in the update)
        Hinv, dead = _damped_inverse(H, damp)
        W = torch.cat([m.weight.data for m in linears]).double()
        sizes = [m.out_features for m in linears]
        for m, w in zip(linears, sparsegpt_weights(W, Hinv, dead, amount, block, groups=sizes).split(sizes)):
            m.weight.data.copy_(w.to(m.weight.dtype))

    return _calibrated_prune(model, calibration, "hessian", prune_linears, runtime, clock)


def sparsegpt_weights(W, Hinv, dead, amount: float, block: int = 128, groups: list[int] | None = None, sub: int = 16):
    """A Linear's weights (float64, changed in place and returned) pruned by SparseGPT, given the upper
    Cholesky factor of its damped inverse Hessian and its dead input features (_damped_inverse).

    `groups`: row counts of Linears stacked in W that share this Hessian; each one's mask is chosen among its
    own rows, as if pruned alone (default: W is one Linear). Within a block of `block` columns the update is
    applied `sub` columns at a time and then, for the rest of the block, as one product (the result is the
    column-by-column update's up to rounding). The work is done on W transposed, so that a column of W is a
    contiguous row: a block's columns and the columns after it are each one contiguous slice, updated in place."""
    import torch

    groups = groups or [W.shape[0]]
    W[:, dead] = 0
    Wt = W.T.contiguous()
    diag = torch.diag(Hinv)
    for i1 in range(0, Wt.shape[0], block):
        i2 = min(i1 + block, Wt.shape[0])
        n = i2 - i1
        U = Hinv[i1:i2, i1:i2]
        d = diag[i1:i2, None]
        W1t = Wt[i1:i2]  # the block's columns, one row each (a view: updated in place)
        score = W1t ** 2 / d ** 2
        mask = torch.zeros_like(W1t, dtype=torch.bool)
        r0 = 0
        for g in groups:
            k = int(g * n * amount)
            if k:  # the set of the k smallest of this Linear's block; unsorted, it is found ~3x faster
                part = torch.zeros(g, n, dtype=torch.bool, device=W1t.device)
                part.view(-1)[torch.topk(score[:, r0:r0 + g].T.reshape(-1), k, largest=False, sorted=False).indices] = True
                mask[:, r0:r0 + g] = part.T
            r0 += g
        scale = mask / d  # err = w / [H^-1]_ii where pruned
        errs = torch.empty_like(W1t)  # row i: column i's error
        for j1 in range(0, n, sub):
            j2 = min(j1 + sub, n)
            for i in range(j1, j2):  # the optimal brain surgeon update, column by column: two ops a column
                torch.mul(W1t[i], scale[i], out=errs[i])
                W1t[i:j2].addr_(U[i, i:j2], errs[i], alpha=-1)
            if j2 < n:  # the sub-block's errors reach the block's later columns in one product
                W1t[j2:].addmm_(U[j1:j2, j2:].T, errs[j1:j2], alpha=-1)
        W1t.masked_fill_(mask, 0)  # exact zeros (the update leaves the pruned weights at rounding error)
        if i2 < Wt.shape[0]:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, errs, alpha=-1)
    W.copy_(Wt.T)
    return W


def _damped_inverse(H, damp: float):
    """(the upper Cholesky factor U of the damped H^-1, i.e. H^-1 = U^T U; the input features never seen: H_jj = 0).

    One factorisation: the Cholesky factor of H with rows and columns reversed, reversed back, is an upper V
    with H = V V^T, so H^-1 = V^-T V^-1 and U = V^-1 (the factor is unique, so this is the
    cholesky(cholesky_inverse(cholesky(H)), upper=True) of SparseGPT's code, up to rounding)."""
    import torch

    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    V = torch.linalg.cholesky(H.flip(0, 1)).flip(0, 1)
    return upper_inverse(V), dead


def upper_inverse(V, leaf: int = 192):
    """The inverse of an upper triangular V, by halves: [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]],
    down to `leaf` columns, where a triangular solve takes over. Most of the work becomes two matrix products,
    which run at the CPU's full rate; a triangular solve against the identity does three times the arithmetic
    (76 against 146 ms for SparseGPT's 1,536-column Hessians, fp64, 2 cores; the same inverse to 2e-15)."""
    import torch

    n = V.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(V, torch.eye(n, dtype=V.dtype, device=V.device), upper=True)
    h = n // 2
    A_inv, C_inv = upper_inverse(V[:h, :h], leaf), upper_inverse(V[h:, h:], leaf)
    out = torch.zeros_like(V)
    out[:h, :h] = A_inv
    out[h:, h:] = C_inv
    out[:h, h:] = (A_inv @ V[:h, h:]) @ C_inv
    out[:h, h:].neg_()
    return out


def calibration_batch(calibration: list, flat: bool) -> dict:
    """All calibration sequences (1 x T tensors) as one model input: one packed row with no padding at all
    (`flat`: position_ids restarting at each sequence and `doc_lengths` for `training.packed_attention`), else
    one right-padded batch with its attention_mask."""
    import torch

    if flat:
        return {"input_ids": torch.cat([ids.reshape(-1) for ids in calibration])[None],
                "position_ids": torch.cat([torch.arange(ids.shape[-1]) for ids in calibration])[None],
                "doc_lengths": tuple(ids.shape[-1] for ids in calibration)}
    width = max(ids.shape[-1] for ids in calibration)
    ids = torch.zeros(len(calibration), width, dtype=calibration[0].dtype)
    mask = torch.zeros(len(calibration), width, dtype=torch.long)
    for row, seq in enumerate(calibration):
        ids[row, :seq.shape[-1]] = seq.reshape(-1)
        mask[row, :seq.shape[-1]] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _calibrated_prune(model, calibration: list, stat: str, prune_linears, runtime: Runtime | None = None,
                      clock: PhaseClock | None = None) -> dict[str, float]:
    """Prune decoder blocks one after another, as Wanda and SparseGPT do, and within a block each Linear just
    before it first runs (the "true sequential" order of GPTQ's and SparseGPT's reference code): the calibration
    tokens go through a block in one forward, and where that forward reaches a Linear, the statistic of its input
    (`norms`: per-feature sum of squares; `hessian`: X^T X) is taken from the tokens in hand, which the block's
    Linears before it produced already pruned, and `prune_linears(linears, statistic)` prunes every Linear that
    reads that input (q, k and v; gate and up; o; down) before any of them runs. The block's output, computed
    with its pruned weights, is the next block's input, so each block runs once (pruning a block from its
    unpruned forward and running it again for the next block's inputs is a forward more per block).

    All sequences go through a block together (`calibration_batch`): one packed row where the model runs SDPA,
    else one padded batch whose padding is left out of the statistics; activation memory grows with the
    calibration tokens. With a bf16 `runtime` the blocks run under its autocast (the statistics are fp32
    products). `clock` gets prune_capture (the decoder run once to record the first block's inputs), prune_forward
    (the blocks' forwards and the statistics, the solve not counted) and prune_solve (`prune_linears`)."""
    import torch

    from training.packed_attention import packed_attention

    clock = clock if clock is not None else PhaseClock()
    layers = _decoder_layers(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model  # the LM head is not needed

    def autocast():  # the runtime's, where one is given
        return (torch.autocast(runtime.device, dtype=runtime.torch_dtype(), enabled=runtime.autocast)
                if runtime is not None else contextlib.nullcontext())

    captured: list = [None] * len(layers)  # per layer: the (args, kwargs) it was called with

    def capture(i):
        def forward(*args, **kwargs):  # record the block's inputs and pass the hidden states through unchanged:
            captured[i] = (args, kwargs)  # the blocks are run below, one at a time, so none runs here
            return _hidden_of(args, kwargs)
        return forward

    model.eval()
    with torch.no_grad(), packed_attention(model) as flat:
        batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                 for k, v in calibration_batch(calibration, flat).items()}
        for i, layer in enumerate(layers):
            layer.forward = capture(i)  # an instance attribute: shadows the class's forward until deleted
        try:
            with autocast(), clock("prune_capture"):
                decoder(**batch, use_cache=False)
        finally:
            for layer in layers:
                del layer.forward
        # the real (not padding) positions, flattened; None where there is no padding
        mask = batch.get("attention_mask")
        keep = None if mask is None or bool(mask.all()) else mask.reshape(-1).bool()
        with autocast():
            groups = _input_groups(layers[0], captured[0])

        sparsity: dict[str, float] = {}
        names = {id(m): n for n, m in model.named_modules()}
        hidden = _hidden_of(*captured[0])
        for i, layer in enumerate(layers):
            readers = {layer.get_submodule(g[0]): [layer.get_submodule(n) for n in g] for g in groups}
            pruned: set[int] = set()
            last: list = [None]  # the input the running group's Linears read

            def prune_first(module, args, i=i, readers=readers, pruned=pruned, last=last):
                if module not in readers:  # a later reader of the input its group's first Linear pruned for
                    if args[0] is not last[0]:
                        raise RuntimeError(f"decoder block {i}: {names[id(module)]} did not read the input of the "
                                           "Linears it was grouped with in block 0")
                    return
                last[0] = args[0]
                x = args[0].detach().reshape(-1, module.in_features)
                x = x if keep is None else x[keep]
                with torch.autocast(x.device.type, enabled=False):  # fp32 products, as SparseGPT's code
                    s = x.float().pow(2).sum(0) if stat == "norms" else gram(x)
                with clock("prune_solve"):
                    prune_linears(readers[module], s.double())
                pruned.update(id(m) for m in readers[module])

            linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            hooks = [m.register_forward_pre_hook(prune_first) for m in linears]
            try:
                with autocast(), clock("prune_forward", excluding="prune_solve"):
                    args, kwargs = captured[i]
                    hidden = _run_layer(layer, hidden, args, kwargs)
                    if keep is not None:  # padding is never attended to; zeros keep it finite block after block
                        hidden = hidden.masked_fill(~keep.reshape(hidden.shape[:-1])[..., None], 0.0)
            finally:
                for h in hooks:
                    h.remove()
            missed = [names[id(m)] for m in linears if id(m) not in pruned]
            if missed:
                raise RuntimeError(f"decoder block {i}: {missed} never ran on the calibration tokens")
            for m in linears:
                sparsity[names[id(m)]] = float((m.weight == 0).float().mean())
    return sparsity


def _input_groups(layer, call) -> list[list[str]]:
    """The block's Linears (names within the block) grouped by the input they read, in the order they run: one
    forward of the block (`call`: its captured (args, kwargs)) with hooks that only look."""
    import torch

    names = {id(m): n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    groups: list[list[str]] = []
    last: list = [None]

    def look(module, args):
        if args[0] is last[0]:
            groups[-1].append(names[id(module)])
        else:
            last[0] = args[0]
            groups.append([names[id(module)]])

    hooks = [m.register_forward_pre_hook(look) for m in layer.modules() if id(m) in names]
    try:
        _run_layer(layer, _hidden_of(*call), *call)
    finally:
        for h in hooks:
            h.remove()
    return groups


def _decoder_layers(model):
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return list(inner.layers)


def _hidden_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _run_layer(layer, hidden, args, kwargs):
    """One decoder block on `hidden`, with the other inputs it received in the calibration forward."""
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


def prune(model, method: str, amount: float, calibration: list | None = None,
          runtime: Runtime | None = None, clock: PhaseClock | None = None) -> dict[str, float]:
    """Prune `amount` of each decoder Linear's weights in place; wanda and sparsegpt calibrate on `calibration`
    (token id tensors, all in one forward per block), running the blocks under `runtime`'s autocast when given.
    Returns the sparsity per layer; `clock` gets the calibrated methods' parts (`_calibrated_prune`)."""
    if method == "magnitude":
        return magnitude_prune(model, amount)
    if method in ("wanda", "sparsegpt"):
        if not calibration:
            raise ValueError(f"{method} pruning needs calibration examples from the training split")
        if method == "wanda":
            return wanda_prune(model, amount, calibration, runtime, clock)
        return sparsegpt_prune(model, amount, calibration, runtime=runtime, clock=clock)
    raise ValueError(f"unknown pruning method {method!r}")


def overall_sparsity(model) -> float:
    zeros = total = 0
    for _, m in prunable_linears(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(1, total)


def pick_int8_backend(cfg: OptimizeConfig, runtime: Runtime) -> str:
    """auto: bitsandbytes LLM.int8 on CUDA; torchao int8 weight-only on CPU (most accurate and fastest
    of the CPU int8 backends measured here, see README)."""
    if cfg.int8_backend != "auto":
        return cfg.int8_backend
    return "bitsandbytes" if runtime.device == "cuda" else "torchao"


def quantize_int8(model, backend: str, merged_dir: Path):
    """An int8 copy of the model by the named backend (the input model is left untouched).

    The output head is kept as it is: with tied embeddings (SmolLM2, Gemma) quantizing it would split
    the tie and store the vocabulary matrix twice.
    """
    if backend == "torchao":
        import torch
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        q = copy.deepcopy(model)
        quantize_(q, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
        return q
    if backend == "quanto":
        from optimum.quanto import freeze, qint8, quantize

        q = copy.deepcopy(model)
        quantize(q, weights=qint8, exclude=["lm_head"])
        freeze(q)
        return q
    if backend == "bitsandbytes":  # GPU path: LLM.int8 loads from the saved fp folder
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
        return AutoModelForCausalLM.from_pretrained(merged_dir, quantization_config=bnb, device_map={"": 0})
    raise ValueError(f"unknown int8 backend {backend!r}")


class _ByteCounter:
    """A write-only file object that keeps nothing but the count of bytes written to it."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def saved_size_mb(model) -> float:
    """Bytes torch.save writes for the state dict: the honest on-disk size of a quantized model. They are counted
    as torch.save streams them, never written: the size of a file named archive.pt (a file's name is in each record
    of its zip archive: a few hundred bytes either way), without writing and deleting hundreds of MB once per
    variant."""
    import torch

    sink = _ByteCounter()
    torch.save(model.state_dict(), sink)
    return sink.size / 1e6


INT8_STATE = "int8_state.pt"


def save_int8(qmodel, backend: str, tokenizer, out_dir: Path) -> Path:
    """An int8 model as a folder: HF config + tokenizer + the quantized state dict + which backend made it.

    bitsandbytes models save as a normal HF folder (transformers serialises LLM.int8); torchao and quanto
    tensors are subclasses that safetensors cannot hold, so their state dict is saved with torch.save.
    """
    import json

    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    if backend == "bitsandbytes":
        qmodel.save_pretrained(out_dir)
    else:
        qmodel.config.save_pretrained(out_dir)
        torch.save(qmodel.state_dict(), out_dir / INT8_STATE)
    meta = {"backend": backend, "excluded": ["lm_head"]}
    if backend == "quanto":
        from optimum.quanto import quantization_map

        meta["quantization_map"] = quantization_map(qmodel)
    (out_dir / "erpops_int8.json").write_text(json.dumps(meta))
    return out_dir


def load_int8(path: Path):
    """Read back a folder written by `save_int8`: the same quantized modules, weights and outputs."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = json.loads((path / "erpops_int8.json").read_text())
    backend = meta["backend"]
    if backend == "bitsandbytes":
        return AutoModelForCausalLM.from_pretrained(path, device_map={"": 0})
    config = AutoConfig.from_pretrained(path)
    state = torch.load(path / INT8_STATE, weights_only=False, map_location="cpu")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if backend == "quanto":
        from optimum.quanto import requantize

        requantize(model, state, meta["quantization_map"], device=torch.device("cpu"))
    elif backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig(),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
        model.load_state_dict(state, assign=True)
    else:
        raise ValueError(f"unknown int8 backend {backend!r} in {path}")
    model.tie_weights()
    return model.eval()


def measure_speed(model, tokenizer, examples: list[dict], runtime: Runtime, new_tokens: int = 32) -> tuple[float, float]:
    """(tokens/s of greedy decoding, one request at a time, and memory MB): the bytes this model's parameters
    and buffers take (int8 tensor subclasses counted by their int8 payload and scales), plus on CUDA the peak
    memory its generation added."""
    import time as _time

    import torch

    from training.data import prompt_text

    model.eval()
    weights = sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers()))
    if runtime.device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    tokens, seconds = 0, 0.0
    for e in examples:
        enc = tokenizer(prompt_text(tokenizer, e["messages"]), return_tensors="pt", add_special_tokens=False).to(model.device)
        t0 = _time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        seconds += _time.perf_counter() - t0
        tokens += out.shape[1] - enc["input_ids"].shape[1]
    memory = weights  # other models held by the process (the fp32 source) are not counted
    if runtime.device == "cuda":
        memory += torch.cuda.max_memory_allocated() - before  # plus this model's activations and KV cache
    return tokens / max(seconds, 1e-9), memory / 1e6


_INT8_PARTS = ("qdata", "int_data", "_data", "scale", "_scale")
"""Attributes holding the int8 payload and scales of torchao / quanto tensor subclasses."""


def _nbytes(t) -> int:
    inner = getattr(t, "data", t)
    if any(hasattr(inner, a) for a in _INT8_PARTS[:3]):
        return sum(_nbytes(getattr(inner, a)) for a in _INT8_PARTS if hasattr(inner, a))
    try:
        return inner.untyped_storage().nbytes()
    except Exception:
        return inner.numel() * inner.element_size()


def measure_variant(name: str, model, tokenizer, eval_examples: list[dict], speed_examples: list[dict], runtime: Runtime,
                    started: float, reference_ppl: float | None = None, sparsity: float | None = None,
                    clock: PhaseClock | None = None) -> tuple[Variant, NLL]:
    """Score one variant the way every variant is scored: response perplexity on `eval_examples` (and its ratio
    to `reference_ppl`), size on disk, sparsity, and greedy tokens/s and memory on `speed_examples`. Also returns
    the scores themselves, with the model's next-token choices (a GGUF made from it is checked against them)."""
    clock = clock if clock is not None else PhaseClock()
    with clock(f"perplexity_{name}"):
        scored = response_nll(model, tokenizer, eval_examples, runtime, top_tokens=True)
        ppl = scored.perplexity
    with clock(f"speed_{name}"):
        tps, mem = measure_speed(model, tokenizer, speed_examples, runtime) if speed_examples else (None, None)
    v = Variant(name, ppl, saved_size_mb(model), overall_sparsity(model) if sparsity is None else sparsity,
                time.perf_counter() - started, tps, mem, ppl / reference_ppl if reference_ppl else 1.0)
    log.info("%s: perplexity %.3f (%.3fx), %.1f MB, %s tok/s", name, ppl, v.ppl_ratio, v.size_mb,
             f"{tps:.1f}" if tps else "-")
    return v, scored


def optimize_model(cfg: OptimizeConfig, base: Path | str, adapter_dir: Path, eval_examples: list[dict],
                   out_dir: Path, runtime: Runtime, tracker: Tracker | None = None,
                   calibration_examples: list[dict] | None = None) -> OptimizeResult:
    """Merge, prune (kept only within max_prune_ppl_ratio), quantize to int8 (kept only within
    max_quant_ppl_ratio), export and verify GGUF files and pick the one that ships; every variant is
    measured (perplexity, ratio, size, sparsity, tokens/s, memory) and logged."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    speed_examples = eval_examples[: cfg.speed_prompts]
    (out_dir / "optimize.json").unlink(missing_ok=True)  # a stale decision must not outlive a failed rerun

    clock = PhaseClock()

    def measured(name: str, model, t0: float, reference: float | None, sparsity: float | None = None,
                 timed: bool = True) -> tuple[Variant, NLL]:
        return measure_variant(name, model, tokenizer, eval_examples, speed_examples if timed else [], runtime, t0,
                               reference, sparsity, clock)

    t0 = time.perf_counter()
    with clock("merge"):
        model = merge_lora(base, adapter_dir).to(runtime.device)
    merged, source_scores = measured("merged_fp32", model, t0, None)
    variants = [merged]

    layer_sparsity: dict[str, float] = {}
    decision = None
    if cfg.prune_method != "none" and cfg.prune_amount > 0:
        t0 = time.perf_counter()
        with clock("prune"):
            unpruned = copy.deepcopy(model)
            calibration = (calibration_inputs(tokenizer, (calibration_examples or [])[: cfg.calibration_examples],
                                              cfg.calibration_max_tokens) if cfg.prune_method != "magnitude" else None)
            layer_sparsity = prune(model, cfg.prune_method, cfg.prune_amount, calibration, runtime, clock)
        # not timed: dense kernels multiply its zeros like any weight, so its speed and memory are the merged
        # model's (bench/optimize.py: 21.2 against 21.6 tok/s)
        pruned, pruned_scores = measured(f"pruned_{cfg.prune_method}_{round(cfg.prune_amount * 100)}pct", model, t0,
                                         merged.perplexity, timed=False)
        variants.append(pruned)
        decision = decide_pruning(merged.perplexity, pruned.perplexity, cfg.max_prune_ppl_ratio)
        log.info("pruning decision: %s", decision.reason)
        if decision.keep:
            source_scores = pruned_scores
        else:
            model = unpruned
            layer_sparsity = {}
        del unpruned
    source_ppl = variants[-1].perplexity if decision is not None and decision.keep else merged.perplexity

    merged_dir = out_dir / "merged"
    with clock("save_merged"):
        model.save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)

    sparsity = overall_sparsity(model)
    backend = pick_int8_backend(cfg, runtime)
    t0 = time.perf_counter()
    with clock("int8"):
        qmodel = quantize_int8(model, backend, merged_dir)
    qvariant, _ = measured(f"int8_{backend}", qmodel, t0, source_ppl, sparsity)  # int8 keeps exact zeros
    variants.append(qvariant)
    int8 = decide_variant(f"int8 ({backend})", "full-precision model", source_ppl, qvariant.perplexity, cfg.max_quant_ppl_ratio)
    log.info("int8 decision: %s", int8.reason)
    with clock("save_int8"):
        int8_dir = save_int8(qmodel, backend, tokenizer, out_dir / f"int8-{backend}") if int8.keep and cfg.save_int8 else None
    del qmodel, model  # from here on the model is the merged folder on disk: the GGUF checks hold its read-back instead

    texts = [tokenizer.apply_chat_template(e["messages"], tokenize=False) for e in eval_examples[: cfg.verify_prompts]]

    def exported(kinds: list[str]) -> dict[str, GGUFExport]:
        return export_and_verify(merged_dir, tokenizer, out_dir / "gguf", kinds, eval_examples, source_scores,
                                 dict(cfg.min_agreement), runtime, clock, texts)

    gguf = exported(list(cfg.gguf_types))
    shipped, ship_reason = choose_gguf(cfg.ship, gguf, source_ppl, cfg.max_quant_ppl_ratio)
    if shipped is None and "f16" not in gguf:  # the fallback is exported only when it is needed
        log.info("%s: exporting the f16 fallback", ship_reason)
        gguf |= exported(["f16"])
        shipped, ship_reason = choose_gguf(cfg.ship, gguf, source_ppl, cfg.max_quant_ppl_ratio)
    if shipped is None:
        raise GGUFVerificationError(ship_reason)
    log.info("GGUF decision: %s", ship_reason)
    for g in gguf.values():  # ratio to the HF model the files were converted from
        ratio = g.perplexity / source_ppl if g.perplexity else None
        variants.append(Variant(f"gguf_{g.kind}", g.perplexity, g.size_mb, sparsity, 0.0, None, None, ratio))
    modelfile, spec = write_modelfile(tokenizer, gguf[shipped].path)

    result = OptimizeResult(merged_dir, variants, backend, layer_sparsity, gguf, decision, modelfile, spec, int8, int8_dir,
                            shipped, ship_reason, dict(clock))
    log.info("optimize phases (s): %s", ", ".join(f"{k} {v:.1f}" for k, v in clock.items()))
    summary = {"seconds": dict(clock), "int8_backend": backend, "variants": [asdict(v) for v in variants], "layer_sparsity": layer_sparsity,
               "overall_sparsity": sparsity, "pruning": asdict(decision) if decision else None,
               "int8": asdict(int8), "shipped": shipped, "ship_reason": ship_reason,
               "gguf": {k: asdict(g) for k, g in gguf.items()}}
    write_json(out_dir / "optimize.json", summary)
    (out_dir / "variants.txt").write_text(result.table() + "\n")
    if tracker:
        _log_optimize(tracker, result, out_dir)
    return result


def _log_optimize(tracker: Tracker, result: OptimizeResult, out_dir: Path) -> None:
    decision, int8 = result.pruning, result.int8
    metrics: dict[str, float] = {}
    for v in result.variants:
        for key in ("perplexity", "ppl_ratio", "size_mb", "sparsity", "tokens_per_s", "memory_mb"):
            value = getattr(v, key)
            if value is not None:
                metrics[f"optimize/{v.name}/{key}"] = value
    for g in result.gguf.values():
        metrics[f"optimize/gguf_{g.kind}/agreement"] = g.agreement
        tracker.set_tags({f"gguf.{g.kind}.sha256": g.sha256})
    if "f16" in result.gguf and "q8_0" in result.gguf:
        metrics["optimize/gguf_q8_0_over_f16_size"] = result.gguf["q8_0"].size_mb / result.gguf["f16"].size_mb
        if result.gguf["q8_0"].perplexity and result.gguf["f16"].perplexity:
            metrics["optimize/gguf_q8_0_over_f16_ppl"] = result.gguf["q8_0"].perplexity / result.gguf["f16"].perplexity
    if decision:
        metrics["optimize/prune_ppl_ratio"] = decision.ratio
    metrics["optimize/int8_ppl_ratio"] = int8.ratio
    metrics.update({f"optimize/seconds/{phase}": seconds for phase, seconds in result.seconds.items()})
    tracker.log_metrics(metrics)
    tracker.set_tags({"optimize.int8_backend_resolved": result.int8_backend,
                      "optimize.pruning": ("kept" if decision.keep else "fallback") if decision else "off",
                      "optimize.int8": "kept" if int8.keep else "fallback",
                      "optimize.gguf_shipped": result.shipped})
    tracker.log_artifact(out_dir / "optimize.json", "optimize")
    tracker.log_artifact(out_dir / "variants.txt", "optimize")
    tracker.log_artifact(result.merged_dir, "merged_model")  # plain HF folder: from_pretrained loads it as is
