"""Resolve device and precision once; stages receive the resolved values, never a mode flag."""

from __future__ import annotations

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
