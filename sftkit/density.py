"""Where an SFT's tuned entries sit: counts and densities per parameter, layer and module.

Works on a loaded ``SparseFineTuning`` or straight from an SFT directory. For a directory only the
safetensors header is read (the length of every ``<param>.indices`` tensor is its number of tuned
entries, the ``shapes`` metadata gives the parameter sizes), so ``sftkit show`` needs neither torch
nor the tensor data. Density of a group = tuned entries / entries of the parameters the SFT records.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sftkit.artifact import ParameterCount, read_weights_summary
from sftkit.params import MODULE_KINDS, layer_of, module_of

if TYPE_CHECKING:
    from sftkit.sft import SparseFineTuning


@dataclass(frozen=True)
class DensityRow:
    group: str
    entries: int
    size: int

    @property
    def density(self) -> float:
        return self.entries / self.size if self.size else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"group": self.group, "entries": self.entries, "size": self.size, "density": self.density}


def parameter_counts(source: SparseFineTuning | str | os.PathLike[str]) -> list[ParameterCount]:
    """Tuned and total entries of every sparsely stored parameter, sorted by name."""
    if isinstance(source, (str, os.PathLike)):
        return read_weights_summary(source).parameters
    return [ParameterCount(name, delta.nnz, delta.numel) for name, delta in sorted(source.diffs.items())]


def _group(counts: Iterable[ParameterCount], key: Callable[[str], str]) -> dict[str, DensityRow]:
    totals: dict[str, list[int]] = {}
    for count in counts:
        entry = totals.setdefault(key(count.name), [0, 0])
        entry[0] += count.entries
        entry[1] += count.size
    return {group: DensityRow(group, entries, size) for group, (entries, size) in totals.items()}


def _layer_label(name: str) -> str:
    layer = layer_of(name)
    if layer is not None:
        return f"layer {layer}"
    return "embeddings" if module_of(name) == "embeddings" else "other"


def density_by_layer(source: SparseFineTuning | str | os.PathLike[str]) -> list[DensityRow]:
    """Rows ``embeddings``, ``layer 0`` … ``layer N``, then ``other`` (only groups that occur)."""
    rows = _group(parameter_counts(source), _layer_label)

    def order(group: str) -> tuple[int, int]:
        if group == "embeddings":
            return (0, 0)
        if group.startswith("layer "):
            return (1, int(group.split()[1]))
        return (2, 0)

    return [rows[group] for group in sorted(rows, key=order)]


def density_by_module(source: SparseFineTuning | str | os.PathLike[str]) -> list[DensityRow]:
    """Rows in ``sftkit.params.MODULE_KINDS`` order (only kinds that occur)."""
    rows = _group(parameter_counts(source), module_of)
    return [rows[kind] for kind in MODULE_KINDS if kind in rows]
