"""Data-parallel training through PyTorch's own engine (torchrun + DistributedDataParallel).

``run_bench.py train ... --nproc N`` re-launches itself with ``torch.distributed.run`` (the
module behind ``torchrun``), which starts N processes and sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. Each process sees those variables here: it joins the process group
(NCCL on CUDA, gloo on CPU), wraps the model in DDP and trains on its slice of every global
batch — every rank draws the same global batch from the task's seeded stream and takes rows
[rank·b, (rank+1)·b), b = batch / world_size — so N processes compute the same steps as one
process with the same global batch (gradients are averaged by DDP's all-reduce). Only rank 0
writes the store row, which records ``world_size``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in a torchrun launch (a single process when not launched so)."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device, global_batch: int) -> tuple[World, torch.device]:
    """Join the process group if launched by torchrun; returns the world and this rank's device."""
    here = world()
    if not here.is_distributed:
        return here, device
    if global_batch % here.size:
        raise ValueError(f"batch={global_batch} must be divisible by the {here.size} processes")
    if device.type == "cuda":
        device = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return here, device


def shard(tensor: torch.Tensor, here: World) -> torch.Tensor:
    """This rank's rows of a global batch."""
    if not here.is_distributed:
        return tensor
    rows = tensor.shape[0] // here.size
    return tensor[here.rank * rows : (here.rank + 1) * rows]


def mean_over_ranks(value: torch.Tensor, here: World) -> torch.Tensor:
    """The mean of a (detached) scalar across ranks, for logging the global loss."""
    if not here.is_distributed:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / here.size
