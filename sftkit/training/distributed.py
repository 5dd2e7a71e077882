"""Just enough torch.distributed for ``torchrun --nproc_per_node=N``: ranks, barriers, reductions.

Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything is a no-op on one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_environment(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def device(self, requested: str) -> torch.device:
        """``auto`` → this process's GPU when CUDA is present, else the CPU."""
        if requested != "auto":
            return torch.device(requested)
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Mean of each gradient over the processes, in one flat all-reduce (sizes ∝ k in the sparse phase).

        The processes first agree (one small all-reduce) on which parameters have a gradient anywhere:
        those one process on all the items would have. A process without one contributes zeros; a
        parameter with none anywhere keeps ``grad = None``, so AdamW skips it as one process would (a zero
        gradient would still decay its moments into an update, and apply weight decay).
        """
        if not self.active or not params:
            return
        flags = [int(param.grad is not None) for param in params]
        present = torch.tensor(flags, dtype=torch.int32, device=params[0].device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        grads = []
        for param, anywhere in zip(params, present.tolist(), strict=True):
            if not anywhere:
                continue
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (small Python objects: paths, decisions)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self, synchronise: bool = True) -> None:
        """Destroy the process group; after success all ranks first meet at a barrier.

        Tearing down together matters: a rank that destroys its gloo group while a peer is still inside
        a collective aborts that peer ("terminate called without an active exception"). After a failure
        there is no barrier, since a peer may never arrive (torchrun then stops the others).
        """
        if self.owns_group and dist.is_initialized():
            if synchronise:
                dist.barrier()
            dist.destroy_process_group()
