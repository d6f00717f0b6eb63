"""Resolve device and precision once; stages receive the resolved values, never a mode flag."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Runtime:
    device: str
    """`cuda` or `cpu`."""
    compute_dtype: str
    """`bfloat16` or `float32`: the autocast dtype of forward passes."""

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != "float32"

    def torch_dtype(self):
        import torch

        return getattr(torch, self.compute_dtype)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls several times faster than fp32 on CPU; detect, don't assume."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_runtime(precision: str = "auto") -> Runtime:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "fp32":
        return Runtime(device, "float32")
    if precision == "bf16":
        return Runtime(device, "bfloat16")
    if device == "cuda":
        return Runtime(device, "bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    return Runtime(device, "bfloat16" if cpu_has_fast_bf16() else "float32")


@contextlib.contextmanager
def autocast_weights(module, runtime: Runtime):
    """Within the block, every nn.Linear under `module` holds its fp32 weight (and bias) as a copy in the
    runtime's autocast dtype, made once; on exit the fp32 parameters are back in place, untouched.

    Autocast rounds a Linear's fp32 weight to its dtype on every call, the same rounding as this copy, so
    the products are the same bit for bit; what goes is the cast per call (autocast caches it only within one
    autocast region: a quarter of a bf16 scoring pass on the CPU, which enters one per batch). A tied output
    head gets its own copy, so the
    embedding lookup it shares a tensor with stays fp32. Costs the copies' memory (half the Linears' fp32
    size) while the block runs. Nothing happens without autocast; quantized weights (tensor subclasses) and
    weights already in another dtype are left alone."""
    import torch

    dtype = runtime.torch_dtype()
    swapped = []
    if runtime.autocast and dtype != torch.float32:
        for m in module.modules():
            if not isinstance(m, torch.nn.Linear):
                continue
            for name in ("weight", "bias"):
                p = m._parameters.get(name)
                if p is not None and type(p.data) is torch.Tensor and p.dtype == torch.float32:
                    swapped.append((m, name, p))
                    m._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    try:
        yield len(swapped)
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def gram(x):
    """x^T x in fp32 for a 2-D x, as accurate as an IEEE fp32 product, and faster where that costs nothing.

    When x arrived in bf16 (the input of a Linear that reads a bf16 product: o_proj and down_proj under bf16
    autocast), every element is exact in bf16, so oneDNN may take the fp32 product through bf16 (AMX) with fp32
    accumulation and lose nothing: for 2,000 x 1,536 it took 20 ms against 48-67 ms, with a relative error to the
    float64 product of 3e-7 against MKL's 1e-6. Any other input keeps IEEE fp32 (the bf16 path would round it:
    3.5e-4). The result is fp32; the input's own dtype decides, so the caller passes it uncast."""
    import torch

    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    fast = (x.dtype == torch.bfloat16 and x.device.type == "cpu" and mkldnn_matmul is not None
            and cpu_has_fast_bf16())
    x = x.float()
    if not fast:
        return x.T @ x
    before = mkldnn_matmul.fp32_precision
    mkldnn_matmul.fp32_precision = "bf16"
    try:
        return x.T @ x
    finally:
        mkldnn_matmul.fp32_precision = before
