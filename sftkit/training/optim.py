"""AdamW that steps a sparse-gradient embedding only on the rows it has ever seen.

In the full phase of a language SFT the MLM decoder is untied and frozen, so the word embeddings
(250 037 × 384 = 96 M entries for multilingual-e5-small, 192 M for XLM-R base) get gradient only on
the rows of the batch's tokens. ``torch.optim.AdamW`` over that matrix keeps two dense moments
(2 × 384 MB for e5-small in fp32) and on every step makes about ten passes over vocabulary-sized
tensors (a dense gradient, the moments, the weights, temporaries): gigabytes of memory traffic that
dominate a CPU step while only about a thousand rows have gradient. With
``nn.Embedding(sparse=True)`` the gradient is a COO tensor of rows, and ``RowSparseAdamW`` keeps
moments only for the rows touched so far (a sorted index + compact ``[n_rows, dim]`` moments), so
memory and time grow with the part of the vocabulary the corpus has used, not with the vocabulary.
A step costs about twice dense AdamW per touched row (gather, scatter, growing the moments), so it
pays while fewer than about half the rows have been touched (one language's corpus uses a fraction
of a vocabulary shared by a hundred languages).

Why this is exact with weight decay 0 (and only then): a row whose gradient has been zero on every
step so far has ``exp_avg = exp_avg_sq = 0``, so AdamW's update ``lr·m̂/(√v̂ + eps)`` is exactly 0 and
the row stays bit-identical. Once touched, a row's moments keep decaying on later steps even
without gradient, so every touched row is updated on every step, with the same element-wise
operations as torch's single-tensor AdamW on the same values and the same per-parameter step
count (the embedding has a gradient, however sparse, on every step). Decoupled weight decay would
shrink every row on every step, touched or not, which no row subset can reproduce; hence the
``ValueError``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class RowSparseAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (no amsgrad/maximize) that also takes sparse COO row gradients.

    Dense gradients get the plain AdamW update. A sparse gradient (``sparse_dim() == 1``, as from
    ``nn.Embedding(sparse=True)``) needs ``weight_decay == 0`` in its group; its state is ``step``,
    ``rows`` (int64, ascending: every row with a gradient so far) and ``exp_avg`` / ``exp_avg_sq``
    of shape ``[len(rows), *param.shape[1:]]``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # checked first, so that a refused step changes nothing
            if group["weight_decay"] != 0 and any(p.grad is not None and p.grad.is_sparse for p in group["params"]):
                raise ValueError(
                    "RowSparseAdamW needs weight_decay=0 for parameters with sparse gradients: decay would move "
                    "every row, so updating only the touched rows would no longer be exact"
                )
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    self._sparse_step(param, group)
                else:
                    self._dense_step(param, group)
        return loss

    def _dense_step(self, param: Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        elif "rows" in state:
            raise ValueError("a parameter's gradient switched from sparse to dense")
        state["step"] += 1
        _adamw(param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)

    def _sparse_step(self, param: Tensor, group: dict[str, Any]) -> None:
        grad = param.grad.coalesce()
        if grad.sparse_dim() != 1:
            raise ValueError(f"expected a sparse row gradient (sparse_dim 1), got sparse_dim {grad.sparse_dim()}")
        state = self.state[param]
        if not state:
            empty = param.new_zeros((0, *param.shape[1:]))
            state.update(step=0, rows=grad.indices().new_zeros(0), exp_avg=empty, exp_avg_sq=empty.clone())
        elif "rows" not in state:
            raise ValueError("a parameter's gradient switched from dense to sparse")
        grad_rows = grad.indices()[0]
        known = state["rows"]
        rows = torch.cat([known, grad_rows]).unique()  # sorted
        if len(rows) > len(known):
            kept = torch.searchsorted(rows, known)
            for key in ("exp_avg", "exp_avg_sq"):
                grown = state[key].new_zeros((len(rows), *param.shape[1:]))
                state[key] = grown.index_copy_(0, kept, state[key])
            state["rows"] = rows
        # Touched rows without gradient this step still decay their moments: they get a zero row.
        compact_grad = grad.values().new_zeros((len(rows), *param.shape[1:]))
        compact_grad.index_copy_(0, torch.searchsorted(rows, grad_rows), grad.values())
        touched = param.index_select(0, rows)
        state["step"] += 1
        _adamw(touched, compact_grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
        param.index_copy_(0, rows, touched)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads like torch, except that ``rows`` stays int64 (torch casts state to the parameter dtype)."""
        saved_rows = {key: value["rows"] for key, value in state_dict["state"].items() if "rows" in value}
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            if saved_id in saved_rows:
                self.state[param]["rows"] = saved_rows[saved_id].to(device=param.device, dtype=torch.long)


def _adamw(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, group: dict[str, Any]) -> None:
    """One AdamW update, operation for operation as torch's single-tensor (CPU) implementation."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = exp_avg_sq.sqrt().div_((1 - beta2**step) ** 0.5).add_(eps)  # torch divides out of place: same values
    param.addcdiv_(exp_avg, denom, value=-step_size)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) that also accepts sparse COO gradients.

    A sparse gradient is coalesced first (its duplicate indices are summands of one entry, so the
    norm of uncoalesced values would be wrong) and replaced by the coalesced, scaled tensor.
    Returns the total norm before clipping.
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    params = [param for param in params if param.grad is not None]
    if not params:
        return torch.tensor(0.0)
    for param in params:
        if param.grad.is_sparse:
            param.grad = param.grad.coalesce()
    grads = [param.grad.values() if param.grad.is_sparse else param.grad for param in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad) for grad in grads]))
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        grad.mul_(scale)
    return total
