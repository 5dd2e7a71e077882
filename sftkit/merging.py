"""Merge methods: how the weighted φᵢ of one parameter become the delta added to θ0.

Each method is one entry of ``METHODS``: a *sparsifier* applied to every SFT's weighted entries (none,
TIES's trim, DARE's random drop) and whether a per-entry sign election follows (TIES's consensus) — the
two axes of mergekit's generalized task arithmetic. A new method (breadcrumbs, DELLA …) is one sparsifier
function and one table entry.

Everything works on the entries the SFTs store (sorted flat indices and their values), never on dense
per-parameter stacks, so memory scales with the stored entries. Both writers (``compose._compose`` and
``streaming._write_weights``) add what ``Merge.addition`` returns with ``index_add_``, so they write
bit-identical weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy
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

    Selects by the k-th largest magnitude (``numpy.partition``, linear) rather than sorting: only the entries
    equal to it need an order, and they are already in index order.
    """
    count = values.numel()
    keep = int(density * count)
    if keep >= count or keep == 0:
        return torch.full((count,), keep > 0, dtype=torch.bool), 1.0
    magnitude = numpy.abs(values.numpy())
    threshold = numpy.partition(magnitude, count - keep)[count - keep]
    kept = magnitude > threshold
    missing = keep - numpy.count_nonzero(kept)
    kept[numpy.flatnonzero(magnitude == threshold)[:missing]] = True
    return torch.from_numpy(kept), 1.0


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

    def addition(self, name: str, deltas: Sequence[tuple[int, float, torch.Tensor, torch.Tensor]]) -> Addition:
        """What to add to parameter ``name``: ``deltas`` are (position, weight, indices, values) of the SFTs storing it.

        ``sum`` adds each SFT as it is (today's θ0 + Σ wᵢ φᵢ, bit for bit); the other methods weight and sparsify
        each SFT here (trim and DARE look at all of an SFT's entries), then add them as they are or, after a sign
        election, merged entry by entry.
        """
        if self.spec.sparsify is None and not self.spec.elect_sign:
            return Addition([(weight, indices, values) for _, weight, indices, values in deltas])
        kept: list[Term] = []
        for position, weight, indices, values in deltas:
            weighted = values.float() if weight == 1 else weight * values.float()  # never written to
            if self.spec.sparsify is not None:
                assert self.density is not None
                chosen, scale = self.spec.sparsify(weighted, self.density, Draw(self.seed or 0, position, name))
                mask = chosen.numpy()  # numpy's boolean gathers are several times torch's on CPU
                indices, weighted = torch.from_numpy(indices.numpy()[mask]), torch.from_numpy(weighted.numpy()[mask])
                weighted = weighted * scale if scale != 1.0 else weighted
            kept.append((weight, indices, weighted))
        if not self.spec.elect_sign:
            return Addition([(1.0, indices, weighted) for _, indices, weighted in kept])
        return Addition(kept, elect_sign=True, normalize=bool(self.normalize))


@dataclass(frozen=True)
class Addition:
    """The addends of one parameter, (scale, sorted flat indices, values) each, or — with ``elect_sign`` — the
    kept wᵢ φᵢ of every SFT (wᵢ, indices, weighted values), merged entry by entry when added.

    Sign election and normalisation only look at one entry's values, so ``add_to`` merges just the entries of
    the range it is given: the streamed writer merges chunk by chunk on its worker threads, and both writers
    get the same values, as each entry sums its values in SFT order either way.
    """

    addends: list[Term]
    elect_sign: bool = False
    normalize: bool = False

    def terms(self, first: int = 0, last: int | None = None) -> list[Term]:
        """(scale, indices − first, values) to ``index_add_`` in order, for the entries in [first, last)."""
        ranged = [_within(addend, first, last) for addend in self.addends]
        if not self.elect_sign:
            return [addend for addend in ranged if addend[1].numel()]
        indices, values = _elect(ranged, self.normalize)
        return [(1.0, indices, values)] if indices.numel() else []

    def add_to(self, flat: torch.Tensor, first: int, last: int) -> None:
        """Add the entries in [first, last) to ``flat``, which holds that range of the parameter."""
        for scale, indices, values in self.terms(first, last):
            flat.index_add_(0, indices, values.to(flat.dtype), alpha=scale)


def _within(addend: Term, first: int, last: int | None) -> Term:
    scale, indices, values = addend
    if first == 0 and last is None:
        return addend
    lo, hi = torch.searchsorted(indices, torch.tensor([first, last if last is not None else 2**62])).tolist()
    return scale, indices[lo:hi] - first, values[lo:hi]


def _elect(kept: Sequence[Term], normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry: the sign of Σ wᵢ φᵢ (≥ 0 is +), the sum of the values of that sign, divided by their wᵢ's sum.

    Sums run in SFT order, (0 + δ₁) + δ₂ + …, as ``index_add_`` would, so every range of entries merges the
    same way. The union of the SFTs' sorted indices comes from a stable argsort of their concatenation
    (numpy's timsort merges sorted runs in linear time). numpy, not torch: its argsort and gathers are several
    times faster here on CPU.
    """
    sizes = [indices.numel() for _, indices, _ in kept]
    if not sum(sizes):
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    every = numpy.concatenate([indices.numpy() for _, indices, _ in kept])
    order = numpy.argsort(every, kind="stable")
    ordered = every[order]
    first = numpy.empty(every.size, dtype=bool)
    first[0] = True
    numpy.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    starts = numpy.flatnonzero(first)
    slot = numpy.empty(every.size, dtype=numpy.int64)
    slot[order] = numpy.repeat(numpy.arange(starts.size), numpy.diff(starts, append=every.size))
    ends = numpy.cumsum(sizes)
    slots = [slot[end - size : end] for size, end in zip(sizes, ends, strict=True)]
    values = [values.numpy() for _, _, values in kept]
    total = numpy.zeros(starts.size, dtype=numpy.float32)
    for where, value in zip(slots, values, strict=True):
        total[where] += value  # unique within one SFT: a plain gather-add-scatter
    merged = numpy.zeros_like(total)
    divisor = numpy.zeros_like(total)
    elected = numpy.where(total >= 0, numpy.float32(1), numpy.float32(-1))
    for (weight, _, _), where, value in zip(kept, slots, values, strict=True):
        agree = value * elected[where] > 0  # its sign is the elected one (a zero has none)
        merged[where] += value * agree  # a disagreeing value adds ±0, which changes no sum
        divisor[where] += numpy.float32(weight) * agree
    if normalize:
        merged /= numpy.where(numpy.abs(divisor) < 1e-8, numpy.float32(1), divisor)
    return torch.from_numpy(ordered[starts]), torch.from_numpy(merged)
