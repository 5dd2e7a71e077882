"""Where an SFT's tuned entries sit: counts and densities per parameter, layer and module.

Works on a loaded ``SparseFineTuning`` or straight from an SFT directory. For a directory only the
safetensors header is read (the length of every ``<param>.indices`` tensor is its number of tuned
entries, the ``shapes`` metadata gives the parameter sizes), so ``sftkit show`` needs neither torch
nor the tensor data. Density of a group = tuned entries / entries of the parameters the SFT records.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftkit.errors import BadInputError
from sftkit.params import MODULE_KINDS, layer_of, module_of

if TYPE_CHECKING:
    from sftkit.sft import SparseFineTuning

# File names of an SFT directory; mirror ``sftkit.sft`` (which imports torch, too slow for the CLI).
CONFIG_NAME = "sft_config.json"
WEIGHTS_NAME = "sft_model.safetensors"
CARD_NAME = "README.md"


@dataclass(frozen=True)
class ParameterCount:
    """Tuned entries (``entries``) out of all entries (``size``) of one sparsely stored parameter."""

    name: str
    entries: int
    size: int


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


@dataclass(frozen=True)
class WeightsSummary:
    """What the safetensors header of an SFT says, read without loading any tensor."""

    parameters: list[ParameterCount]
    full_tensors: dict[str, tuple[int, ...]]

    @property
    def num_entries(self) -> int:
        return sum(p.entries for p in self.parameters)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_MAX_HEADER = 100 << 20


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size (no tensor is read).

    Parsed here rather than with ``safetensors.safe_open``, which imports numpy or torch and would
    slow down ``sftkit show``. Raises ``BadInputError`` for a truncated or malformed file.
    """
    weights = Path(path)
    try:
        with weights.open("rb") as handle:
            prefix = handle.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < length <= _MAX_HEADER:
                raise ValueError("invalid header length")
            header = json.loads(handle.read(length))
        size = weights.stat().st_size - 8 - length
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadInputError(f"{weights} is corrupted or truncated: {exc}") from exc
    if not isinstance(header, dict):
        raise BadInputError(f"{weights} is corrupted: its header is not a JSON object")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            expected = math.prod(int(d) for d in info["shape"]) * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"{weights} is corrupted: bad header entry for {key!r}") from exc
        if end - begin != expected:
            raise BadInputError(f"{weights} is corrupted: {key!r} has {end - begin} bytes for {expected}")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise BadInputError(f"{weights} is corrupted: tensor data overlaps or leaves gaps")
        position = end
    if position != size:
        raise BadInputError(f"{weights} is corrupted or truncated: {size} data bytes, the header describes {position}")
    return header


def read_weights_summary(path: str | os.PathLike[str]) -> WeightsSummary:
    """Parse and check the header of ``sft_model.safetensors`` (a directory or the file itself).

    Raises ``BadInputError`` for a file that is missing, truncated or not laid out like an SFT.
    """
    weights = Path(path)
    if weights.is_dir():
        weights = weights / WEIGHTS_NAME
    if not weights.is_file():
        raise BadInputError(f"{weights} does not exist (an SFT directory holds {WEIGHTS_NAME})")
    header = read_safetensors_header(weights)
    metadata = header.pop("__metadata__", None) or {}
    try:
        shapes = json.loads(metadata.get("shapes", "{}"))
    except (AttributeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{weights}: the 'shapes' header is not valid JSON") from exc
    tensor_shapes = {key: tuple(info["shape"]) for key, info in header.items()}
    parameters, full = [], {}
    for key, shape in sorted(tensor_shapes.items()):
        name, _, suffix = key.rpartition(".")
        if suffix == "full":
            full[name] = shape
        elif suffix == "indices":
            if name not in shapes or tensor_shapes.get(f"{name}.values") != shape:
                raise BadInputError(f"{weights}: {name} has indices but no shape or no matching values")
            parameters.append(ParameterCount(name, math.prod(shape), math.prod(shapes[name])))
        elif suffix != "values":
            raise BadInputError(f"{weights}: unexpected tensor {key!r} (not an SFT weights file)")
    return WeightsSummary(parameters, full)


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
