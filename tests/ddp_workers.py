"""Child processes of the two-process (gloo) tests, started by ``torch.multiprocessing.start_processes``.

Forked, not spawned: the children inherit the imported torch and transformers (a spawned child imports
them again, some 10 s on a loaded CI machine); the parent holds no process group and runs one thread."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sftkit.training.distributed import Dist

# Per step, per rank, per parameter: a gradient, or None where that process produced none.
Grads = Sequence[Sequence[Sequence[torch.Tensor | None]]]


def run_two(worker: Callable[..., None], *args: Any) -> None:
    """``worker(rank, port, *args)`` in two processes at once; a worker's exception fails the caller."""
    with socket.socket() as probe:  # a free port for the gloo rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(worker, args=(port, *args), nprocs=2, join=True, start_method="fork")


def step_adamw(rank: int, port: int, params: list[torch.Tensor], grads: Grads, out: str) -> None:
    """AdamW (with weight decay) over ``params``, each step's gradients averaged by ``Dist.average_gradients``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        params = [param.clone().requires_grad_(True) for param in params]
        optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
        for step_grads in grads:
            for param, grad in zip(params, step_grads[rank], strict=True):
                param.grad = None if grad is None else grad.clone()
            Dist(rank, 2).average_gradients(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.save([param.detach() for param in params], os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def train_sft(rank: int, port: int, config: Any, data: dict[str, Any], out: str) -> None:
    """``train(config, **data)`` as rank ``rank`` of a two-process run (as torchrun would set it up); rank 0 saves φ."""
    from sftkit.training import train  # here: only this worker needs transformers

    address = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ.update({"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), **address})
    result = train(config, **data)
    if rank == 0:
        result.sft.save(out)
