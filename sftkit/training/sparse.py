"""The sparse phase with memory in proportion to k: optimiser state only for the selected entries.

The LT-SFT reference keeps a dense gradient, a dense mask, dense Adam moments and a dense copy of
the start point for every parameter, then multiplies most of the gradient by zero. Here each masked
parameter instead gets a flat vector ``values`` = θ at its selected entries. A post-accumulate-grad
hook gathers the parameter's dense gradient into ``values.grad`` the moment autograd produces it and
drops the dense gradient immediately, so at most one dense gradient is alive at a time; AdamW then
steps ``values`` (state ∝ k) and the entries are written back into the parameter. Parameters
without selected entries do not require grad at all, which also spares autograd their weight
gradients, and embeddings switch to sparse (row) gradients, so a lookup never builds a dense
vocabulary-sized gradient. The result equals dense masked-gradient AdamW on the same batches (tests
check this), except that weight decay never moves a frozen entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from sftkit.params import encoder_of, head_parameters, maskable_parameters
from sftkit.sft import SparseDelta


@dataclass
class _Entries:
    """The selected entries of one parameter."""

    name: str
    param: nn.Parameter
    indices: torch.Tensor  # int64, ascending flat indices
    start: torch.Tensor  # θ_start at the indices
    values: nn.Parameter  # θ at the indices (what the optimiser trains)


def unique_head_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Head parameters once each (an MLM head lists its tied bias under two names)."""
    seen: set[int] = set()
    unique = []
    for name, param in head_parameters(model):
        if id(param) not in seen:
            seen.add(id(param))
            unique.append((name, param))
    return unique


class SparseUpdater:
    """Makes only ``masks``' entries of the maskable parameters (and the head) trainable.

    Use: ``loss = out.loss + updater.regularisation(); loss.backward(); optimiser.step()`` over
    ``updater.parameters()``, then ``updater.write_back()``. ``l1`` adds λ·Σ|θ − θ_start| / ``l1_scale``
    over the trainable entries (LT-SFT normalises its L1 term by the parameter count). ``head``: the
    head parameters to train (default: all of them; the trainer leaves out a frozen MLM decoder).
    """

    def __init__(
        self,
        model: nn.Module,
        masks: Mapping[str, torch.Tensor],
        l1: float = 0.0,
        l1_scale: int = 1,
        head: list[tuple[str, nn.Parameter]] | None = None,
    ) -> None:
        self.model = model
        self.l1, self.l1_scale = l1, max(1, l1_scale)
        self.entries: list[_Entries] = []
        self._hooks = []
        for param in encoder_of(model).parameters():
            param.requires_grad_(False)
        for name, param in maskable_parameters(model):
            mask = masks.get(name)
            if mask is None or not bool(mask.any()):
                continue
            indices = mask.reshape(-1).nonzero().flatten().to(param.device)
            flat = param.detach().reshape(-1)
            start = flat.index_select(0, indices)
            entries = _Entries(name, param, indices, start, nn.Parameter(start.clone()))
            param.requires_grad_(True)
            self._hooks.append(param.register_post_accumulate_grad_hook(self._gatherer(entries)))
            self.entries.append(entries)
        self.head = unique_head_parameters(model) if head is None else head
        for _, param in self.head:
            param.requires_grad_(True)
        trained = {id(e.param) for e in self.entries}
        self._dense_embeddings = [
            module
            for module in encoder_of(model).modules()
            if isinstance(module, nn.Embedding) and id(module.weight) in trained and not module.sparse
        ]
        for module in self._dense_embeddings:
            module.sparse = True

    @staticmethod
    def _gatherer(entries: _Entries):
        def gather(param: torch.Tensor) -> None:
            grad = _gather(param.grad, entries.indices)
            param.grad = None  # free the dense gradient at once: memory stays ∝ k
            if entries.values.grad is None:
                entries.values.grad = grad
            else:
                entries.values.grad.add_(grad)

        return gather

    # ------------------------------------------------------------------ training interface
    def parameters(self) -> list[torch.Tensor]:
        """Everything the optimiser steps: the selected entries, then the head."""
        return [e.values for e in self.entries] + [param for _, param in self.head]

    @property
    def num_entries(self) -> int:
        return sum(int(e.indices.numel()) for e in self.entries)

    def regularisation(self) -> torch.Tensor:
        """λ · Σ|θ − θ_start| / scale over the trainable entries (zero when λ = 0)."""
        if not self.l1 or not self.entries:
            return torch.zeros((), device=self.entries[0].values.device if self.entries else None)
        total = sum((e.values - e.start).abs().sum() for e in self.entries)
        return total * (self.l1 / self.l1_scale)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained entries into the model's parameters (after every optimiser step)."""
        for e in self.entries:
            e.param.view(-1).index_copy_(0, e.indices, e.values.to(e.param.dtype))

    def close(self) -> None:
        """Remove the gradient hooks (the model trains normally again)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module in self._dense_embeddings:
            module.sparse = False
        self._dense_embeddings.clear()

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, torch.Tensor]:
        """Trained state (entries by encoder name, head by full name): checkpoints and best snapshots."""
        state = {f"sparse::{e.name}": e.values.detach().cpu().clone() for e in self.entries}
        state.update({f"head::{name}": param.detach().cpu().clone() for name, param in self.head})
        return state

    @torch.no_grad()
    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for e in self.entries:
            e.values.copy_(state[f"sparse::{e.name}"].to(e.values.device))
        for name, param in self.head:
            param.copy_(state[f"head::{name}"].to(param.device))
        self.write_back()

    def deltas(self) -> dict[str, SparseDelta]:
        """φ = θ − θ_start at the selected entries, keyed by encoder-relative name."""
        return {
            e.name: SparseDelta(tuple(e.param.shape), e.indices.cpu(), (e.values.detach() - e.start).float().cpu())
            for e in self.entries
        }


def _gather(grad: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``grad`` at flat ``indices``; a sparse (row) gradient of an embedding is read without densifying it."""
    if not grad.is_sparse:
        return grad.reshape(-1).index_select(0, indices)
    grad = grad.coalesce()
    rows, values = grad.indices()[0], grad.values()
    width = values.shape[1]
    position = torch.full((grad.shape[0],), -1, dtype=torch.long, device=grad.device)
    position[rows] = torch.arange(rows.numel(), device=grad.device)
    where = position[indices // width]
    found = where >= 0
    gathered = torch.zeros(indices.numel(), dtype=values.dtype, device=values.device)
    gathered[found] = values[where[found], indices[found] % width]
    return gathered
