"""Merge methods: how the weighted φᵢ of one parameter become the delta added to θ0.

Each method is one entry of ``METHODS``: a *sparsifier* applied to every SFT's weighted entries (none,
TIES's trim, DARE's random drop) and whether a per-entry sign election follows (TIES's consensus) — the
two axes of mergekit's generalized task arithmetic. A new method (breadcrumbs, DELLA …) is one sparsifier
function and one table entry.

Everything works on the entries the SFTs store (sorted flat indices and their values), never on dense
per-parameter stacks, so memory scales with the stored entries. Both writers (``compose._compose`` and
``streaming._write_weights``) add what ``Merge.terms`` returns with ``index_add_``, so they write
bit-identical weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sftkit.errors import BadInputError

# (weight, sorted unique int64 flat indices, float32 values): one addend of θ0 + Σ weight · values.
Term = tuple[float, torch.Tensor, torch.Tensor]
# A sparsifier: (weighted values of one SFT's entries, density, that SFT's draw) → which entries stay and
# the factor the kept ones are scaled by.
Sparsifier = Callable[[torch.Tensor, float, "Draw"], tuple[torch.Tensor, float]]


@dataclass(frozen=True)
class Draw:
    """The random stream of one SFT in one parameter: the same whichever writer, order or thread asks."""

    seed: int
    position: int
    name: str

    def uniform(self, count: int) -> torch.Tensor:
        key = hashlib.sha256(f"{self.seed}\0{self.position}\0{self.name}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
        return torch.rand(count, generator=generator)


def trim(values: torch.Tensor, density: float, draw: Draw) -> tuple[torch.Tensor, float]:
    """TIES: keep the ⌊D·n⌋ entries of largest |value| (ties: the lower flat index first).

    Selects by the k-th largest magnitude in O(n) rather than sorting: only the entries equal to it need
    an order, and they are already in index order.
    """
    count = values.numel()
    keep = int(density * count)
    if keep >= count:
        return torch.ones(count, dtype=torch.bool), 1.0
    if keep == 0:
        return torch.zeros(count, dtype=torch.bool), 1.0
    magnitude = values.abs()
    threshold = torch.kthvalue(magnitude, count - keep + 1).values
    kept = magnitude > threshold
    missing = keep - int(kept.sum())
    kept[(magnitude == threshold).nonzero().flatten()[:missing]] = True
    return kept, 1.0


def dare(values: torch.Tensor, density: float, draw: Draw) -> tuple[torch.Tensor, float]:
    """DARE: keep each entry with probability D (the SFT's own draw) and rescale the kept ones by 1/D."""
    return draw.uniform(values.numel()) < density, 1.0 / density


@dataclass(frozen=True)
class Method:
    """One merge method: what each SFT keeps, and whether a per-entry sign election follows."""

    sparsify: Sparsifier | None
    elect_sign: bool


METHODS: dict[str, Method] = {
    "sum": Method(sparsify=None, elect_sign=False),
    "ties": Method(sparsify=trim, elect_sign=True),
    "dare-linear": Method(sparsify=dare, elect_sign=False),
    "dare-ties": Method(sparsify=dare, elect_sign=True),
}


@dataclass(frozen=True)
class Merge:
    """A merge method with its settings; ``None`` for a setting the method does not use."""

    method: str = "sum"
    density: float | None = None
    seed: int | None = None
    normalize: bool | None = None

    @classmethod
    def of(
        cls, method: str = "sum", density: float | None = None, seed: int | None = None, normalize: bool | None = None
    ) -> Merge:
        """Validate the user's settings and fill in the defaults (density 1 as in mergekit, seed 0, normalised)."""
        if method not in METHODS:
            raise BadInputError(f"merge method must be one of {', '.join(METHODS)}, not {method!r}")
        chosen = METHODS[method]
        if density is not None and chosen.sparsify is None:
            raise BadInputError(f"--density needs a merge method that sparsifies (not {method})")
        if density is not None and not 0 < density <= 1:
            raise BadInputError(f"--density must be in (0, 1], not {density:g}")
        if seed is not None and chosen.sparsify is not dare:
            raise BadInputError(f"--merge-seed only applies to DARE (dare-linear, dare-ties), not {method}")
        if normalize is not None and not chosen.elect_sign:
            raise BadInputError(f"normalisation only applies to ties and dare-ties, not {method}")
        return cls(
            method,
            None if chosen.sparsify is None else (1.0 if density is None else float(density)),
            None if chosen.sparsify is not dare else (0 if seed is None else int(seed)),
            None if not chosen.elect_sign else (True if normalize is None else bool(normalize)),
        )

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    def check_count(self, count: int) -> None:
        if self.spec.elect_sign and count < 2:
            raise BadInputError(f"--merge {self.method} elects signs between SFTs: it needs at least two, not {count}")

    def arguments(self) -> dict[str, object]:
        """The keyword arguments of ``compose`` / ``compose_to_directory`` that give this merge."""
        return {"merge": self.method, "density": self.density, "merge_seed": self.seed, "normalize": self.normalize}

    def record(self) -> dict[str, object]:
        return {"method": self.method, "density": self.density, "seed": self.seed, "normalize": self.normalize}

    def terms(self, name: str, deltas: Sequence[tuple[int, float, torch.Tensor, torch.Tensor]]) -> list[Term]:
        """What to add to parameter ``name``: ``deltas`` are (position, weight, indices, values) of the SFTs storing it.

        ``sum`` adds each SFT as it is (today's θ0 + Σ wᵢ φᵢ, bit for bit); the other methods add one merged delta.
        """
        if not deltas or (self.spec.sparsify is None and not self.spec.elect_sign):
            return [(weight, indices, values) for _, weight, indices, values in deltas]
        indices, values = self._merged(name, deltas)
        return [(1.0, indices, values)] if indices.numel() else []

    def _merged(
        self, name: str, deltas: Sequence[tuple[int, float, torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        every_index, every_value, every_weight = [], [], []
        for position, weight, indices, values in deltas:
            weighted = weight * values.float()
            if self.spec.sparsify is not None:
                assert self.density is not None
                draw = Draw(self.seed or 0, position, name)
                kept, scale = self.spec.sparsify(weighted, self.density, draw)
                indices, weighted = indices[kept], weighted[kept] * scale
            every_index.append(indices)
            every_value.append(weighted)
            every_weight.append(torch.full((indices.numel(),), float(weight)))
        indices, slot = torch.unique(torch.cat(every_index), sorted=True, return_inverse=True)
        values, weights = torch.cat(every_value), torch.cat(every_weight)
        total = torch.zeros(indices.numel()).index_add_(0, slot, values)
        if not self.spec.elect_sign:
            return indices, total
        elected = torch.where(total >= 0, 1.0, -1.0)
        agree = values.sign() == elected[slot]
        total = torch.zeros(indices.numel()).index_add_(0, slot[agree], values[agree])
        if self.normalize:
            divisor = torch.zeros(indices.numel()).index_add_(0, slot[agree], weights[agree])
            total /= torch.where(divisor.abs() < 1e-8, 1.0, divisor)
        return indices, total
