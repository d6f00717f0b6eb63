"""Data-parallel training across processes, launched by `accelerate launch` or `torchrun`.

    accelerate launch --multi_gpu --num_processes 4 -m erpops.cli train --recipe recipes/smollm2-1.7b/gpu.yaml

Both launchers set RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE unset or 1 everything here is a
no-op and training runs in one process. The same recipe runs either way: `train.batch_size` is the
global batch, split across processes, so the loss curve does not depend on the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """The process's place in a launch, read from the launcher's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def init(device: str) -> Dist:
    """Join the process group (NCCL on CUDA, gloo on CPU) and pin this process to its GPU; on CPU, share
    the cores between the processes of this machine unless OMP_NUM_THREADS says otherwise."""
    dist = from_env()
    if not dist.enabled:
        return dist
    import torch
    import torch.distributed as td

    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not td.is_initialized():
        td.init_process_group("nccl" if device == "cuda" else "gloo")
    return dist


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


def broadcast(dist: Dist, value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not dist.enabled:
        return value
    import torch.distributed as td

    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(dist: Dist, tensor):
    """Sum a tensor over all ranks, in place; returns it."""
    if dist.enabled:
        import torch.distributed as td

        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def all_sum_grads(dist: Dist, params) -> None:
    """Sum the gradients of `params` over all ranks in one flat bucket (LoRA gradients are a few MB, so
    one collective per step is cheaper than DDP's per-bucket overlap machinery)."""
    if not dist.enabled:
        return
    import torch

    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_sum(dist, flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def shard(dist: Dist, batch: list) -> list:
    """This rank's share of a global batch (strided, so each rank gets short and long examples alike)."""
    return batch[dist.rank::dist.world_size] if dist.enabled else batch


def close(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
