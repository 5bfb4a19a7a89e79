"""Distributed fine-tuning under torchrun: join the process group and sum across ranks.

One process per device; rank 0 alone logs and writes files (see finetune.py).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(values: list[float], d: Dist, device) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def finish() -> None:
    """Wait for every rank (the output exists before any process exits), then leave the group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # DistributedDataParallel's reducer sits in reference cycles: collect it while the group
        # still exists, not at interpreter exit, where gloo's threads can abort the process
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
