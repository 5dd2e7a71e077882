"""Overlap statistics between SFTs: how many parameter entries two sparse fine-tunings both touch.

The paper's key diagnostic (DEFT-X, Figs. 2–3): a language SFT and a task SFT that change the same
entries interfere when composed. Everything here is computed from the per-parameter sorted index
arrays of the sparse deltas (a merge of two sorted arrays per parameter, O(|A| + |B|)); no model and
no dense tensor is ever built. Only the sparse encoder deltas count: dense head tensors
(``SparseFineTuning.full``) are ignored.

Statistics of a pair (A, B) — entry sets of the sparse deltas, keyed by (parameter, flat index):

- ``shared`` = |A ∩ B|; ``union`` = |A ∪ B|
- ``frac_of_a`` = shared / |A|; ``frac_of_b`` = shared / |B|
- ``jaccard`` = shared / |A ∪ B|
- ``overlap`` = shared / min(|A|, |B|) — the "overlap %" of the paper's figures: 1.0 when the smaller
  SFT lies entirely inside the larger one
- ``sign_agreement`` = fraction of shared entries where sign(φ_A) = sign(φ_B)
- ``mean_abs_a`` / ``mean_abs_b`` = mean |φ| over the shared entries; ``abs_ratio`` = mean_abs_a / mean_abs_b

Fractions are in [0, 1] (the command line shows percentages); a statistic whose denominator is 0 is
``None`` (JSON ``null``). Breakdowns group parameters by layer (``sftkit.params.layer_of``; the group
``"none"`` holds parameters outside the numbered layers, i.e. the embeddings) or by module kind
(``sftkit.params.module_of``: embeddings, attn.q/k/v/o, ffn.in/out, bias, …).

JSON document (``to_json()`` of ``OverlapMatrix`` / ``MethodComparison``, printed by
``sftkit overlap --json``; the machine-checkable schema is ``JSON_SCHEMA``, mirrored in
``docs/overlap.md``)::

    schema      "sftkit.overlap/1"
    mode        "pair" (2 SFTs) | "matrix" (N ≥ 3 SFTs, Fig. 3) | "methods" (language vs task per method, Fig. 2)
    by          null | "layer" | "module" — the breakdown included in every pair's "groups"
    sfts        [{label, reference, kind, language, task, method, base_model, base_fingerprint, entries}]
    pairs       [{a, b, language, method, total, groups}] — a, b index into sfts; language and method are
                set in "methods" mode (else null); total = statistics object; groups = [{group, …statistics}]
    matrix      pair/matrix mode only: {statistic: N×N list of lists}, row = A, column = B, for every name in
                STATISTICS; the diagonal compares each SFT with itself
    languages, methods
                "methods" mode only: the x-axis and the bar series of Fig. 2, in first-seen order
    statistics object: entries_a, entries_b, shared, union, same_sign (integers), frac_of_a, frac_of_b,
                jaccard, overlap, sign_agreement, mean_abs_a, mean_abs_b, abs_ratio (number or null)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.params import MODULE_KINDS, layer_of, module_of
from sftkit.sft import SparseDelta, SparseFineTuning

SCHEMA_ID = "sftkit.overlap/1"
GROUPINGS = ("layer", "module")
NO_LAYER = "none"
# Statistics that a matrix, heatmap or bar chart can show; integers and fractions alike.
STATISTICS = (
    "overlap",
    "jaccard",
    "frac_of_a",
    "frac_of_b",
    "shared",
    "sign_agreement",
    "abs_ratio",
)


@dataclass(frozen=True)
class OverlapCounts:
    """Additive counts of a pair over some set of parameters; every statistic derives from them."""

    entries_a: int = 0
    entries_b: int = 0
    shared: int = 0
    same_sign: int = 0
    abs_sum_a: float = 0.0  # Σ|φ_A| over the shared entries
    abs_sum_b: float = 0.0

    def __add__(self, other: OverlapCounts) -> OverlapCounts:
        return OverlapCounts(
            self.entries_a + other.entries_a,
            self.entries_b + other.entries_b,
            self.shared + other.shared,
            self.same_sign + other.same_sign,
            self.abs_sum_a + other.abs_sum_a,
            self.abs_sum_b + other.abs_sum_b,
        )

    def swapped(self) -> OverlapCounts:
        """The same counts seen from B's side."""
        return OverlapCounts(
            self.entries_b, self.entries_a, self.shared, self.same_sign, self.abs_sum_b, self.abs_sum_a
        )

    @property
    def union(self) -> int:
        return self.entries_a + self.entries_b - self.shared

    @property
    def frac_of_a(self) -> float | None:
        return _ratio(self.shared, self.entries_a)

    @property
    def frac_of_b(self) -> float | None:
        return _ratio(self.shared, self.entries_b)

    @property
    def jaccard(self) -> float | None:
        return _ratio(self.shared, self.union)

    @property
    def overlap(self) -> float | None:
        """shared / min(|A|, |B|)."""
        return _ratio(self.shared, min(self.entries_a, self.entries_b))

    @property
    def sign_agreement(self) -> float | None:
        return _ratio(self.same_sign, self.shared)

    @property
    def mean_abs_a(self) -> float | None:
        return _ratio(self.abs_sum_a, self.shared)

    @property
    def mean_abs_b(self) -> float | None:
        return _ratio(self.abs_sum_b, self.shared)

    @property
    def abs_ratio(self) -> float | None:
        """mean |φ_A| / mean |φ_B| on the shared entries (a ratio of means: robust to tiny single values)."""
        return _ratio(self.abs_sum_a, self.abs_sum_b) if self.shared else None

    def statistic(self, name: str) -> float | int | None:
        if name not in STATISTICS:
            raise BadInputError(f"unknown statistic {name!r}; choose one of {', '.join(STATISTICS)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "entries_a": self.entries_a,
            "entries_b": self.entries_b,
            "shared": self.shared,
            "union": self.union,
            "same_sign": self.same_sign,
            "frac_of_a": self.frac_of_a,
            "frac_of_b": self.frac_of_b,
            "jaccard": self.jaccard,
            "overlap": self.overlap,
            "sign_agreement": self.sign_agreement,
            "mean_abs_a": self.mean_abs_a,
            "mean_abs_b": self.mean_abs_b,
            "abs_ratio": self.abs_ratio,
        }


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


@dataclass(frozen=True)
class PairOverlap:
    """Counts of one pair per parameter (names relative to the encoder), with totals and breakdowns."""

    parameters: Mapping[str, OverlapCounts]

    @cached_property
    def total(self) -> OverlapCounts:
        return sum(self.parameters.values(), OverlapCounts())

    def by(self, grouping: str) -> list[tuple[str, OverlapCounts]]:
        """Counts summed per layer or per module kind, in model order."""
        key = _group_key(grouping)
        groups: dict[str, OverlapCounts] = {}
        for name, counts in self.parameters.items():
            group = key(name)
            groups[group] = groups.get(group, OverlapCounts()) + counts
        order = group_sort_key(grouping)
        return sorted(groups.items(), key=lambda item: order(item[0]))

    def swapped(self) -> PairOverlap:
        return PairOverlap({name: counts.swapped() for name, counts in self.parameters.items()})

    def to_dict(self, by: str | None = None) -> dict[str, Any]:
        groups = [{"group": group, **counts.to_dict()} for group, counts in self.by(by)] if by else []
        return {"total": self.total.to_dict(), "groups": groups}


def check_grouping(by: str | None) -> str | None:
    if by is not None and by not in GROUPINGS:
        raise BadInputError(f"cannot break down by {by!r}; choose 'layer' or 'module'")
    return by


def _group_key(grouping: str):
    check_grouping(grouping)
    if grouping == "layer":
        return lambda name: str(layer) if (layer := layer_of(name)) is not None else NO_LAYER
    return module_of


def group_sort_key(grouping: str):
    """Sort key putting group names in model order (embeddings first, then layers 0, 1, …)."""
    if grouping == "layer":
        return lambda group: -1 if group == NO_LAYER else int(group)
    return MODULE_KINDS.index


# ---------------------------------------------------------------------------------------- core
def _shared_positions(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``a`` and in ``b`` of their common values (both ascending and unique).

    A stable argsort of the concatenation merges the two sorted runs in linear time; an equal
    neighbour pair is a shared value, the left one from ``a`` (stability), the right one from ``b``.
    """
    if a.size == 0 or b.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    merged = np.concatenate((a, b))
    order = np.argsort(merged, kind="stable")
    ordered = merged[order]
    equal = np.flatnonzero(ordered[1:] == ordered[:-1])
    return order[equal], order[equal + 1] - a.size


def _values(delta: SparseDelta) -> np.ndarray:
    """The deltas as a numpy array (zero-copy except bfloat16, which numpy lacks).

    Statistics run in numpy: per-parameter torch calls on small tensors cost more in thread-pool
    overhead than the work itself.
    """
    values = delta.values.detach().cpu()
    return (values.float() if values.dtype == torch.bfloat16 else values).numpy()


def _parameter_counts(a: SparseDelta | None, b: SparseDelta | None) -> OverlapCounts:
    if a is None or b is None:
        return OverlapCounts(a.nnz if a is not None else 0, b.nnz if b is not None else 0)
    pos_a, pos_b = _shared_positions(a.indices.detach().cpu().numpy(), b.indices.detach().cpu().numpy())
    if pos_a.size == 0:
        return OverlapCounts(a.nnz, b.nnz)
    values_a = _values(a)[pos_a].astype(np.float64)
    values_b = _values(b)[pos_b].astype(np.float64)
    return OverlapCounts(
        entries_a=a.nnz,
        entries_b=b.nnz,
        shared=int(pos_a.size),
        same_sign=int(np.count_nonzero(np.sign(values_a) == np.sign(values_b))),
        abs_sum_a=float(np.abs(values_a).sum()),
        abs_sum_b=float(np.abs(values_b).sum()),
    )


def _self_counts(sft: SparseFineTuning) -> PairOverlap:
    """An SFT compared with itself (the matrix diagonal), without the merge."""
    counts = {}
    for name, delta in sft.diffs.items():
        abs_sum = float(np.abs(_values(delta)).sum(dtype=np.float64))
        counts[name] = OverlapCounts(delta.nnz, delta.nnz, delta.nnz, delta.nnz, abs_sum, abs_sum)
    return PairOverlap(counts)


def pair_overlap(a: SparseFineTuning, b: SparseFineTuning) -> PairOverlap:
    """Overlap counts of two SFTs per parameter; parameters only one of them changes count with 0 shared.

    Raises ``BaseMismatchError`` when the SFTs were trained on different bases or disagree on a shape.
    """
    check_same_base([_labelled(a), _labelled(b)])
    counts: dict[str, OverlapCounts] = {}
    for name in list(a.diffs) + [name for name in b.diffs if name not in a.diffs]:
        delta_a, delta_b = a.diffs.get(name), b.diffs.get(name)
        if delta_a is not None and delta_b is not None and delta_a.shape != delta_b.shape:
            raise BaseMismatchError(f"{name} has shape {delta_a.shape} in one SFT and {delta_b.shape} in the other")
        counts[name] = _parameter_counts(delta_a, delta_b)
    return PairOverlap(counts)


# ---------------------------------------------------------------------------------------- subjects
@dataclass(frozen=True)
class Labelled:
    """An SFT with the label it is shown under and, optionally, its registry reference."""

    sft: SparseFineTuning
    label: str
    reference: str | None = None


def _labelled(item: SparseFineTuning | Labelled) -> Labelled:
    return item if isinstance(item, Labelled) else Labelled(item, item.metadata.name)


def _summary(item: Labelled) -> dict[str, Any]:
    meta = item.sft.metadata
    return {
        "label": item.label,
        "reference": item.reference,
        "kind": meta.kind,
        "language": meta.language,
        "task": meta.task,
        "method": meta.method,
        "base_model": meta.base_model,
        "base_fingerprint": meta.base_fingerprint,
        "entries": item.sft.num_entries,
    }


def check_same_base(items: Sequence[Labelled]) -> None:
    """Refuse SFTs of different bases: fingerprints when both have one, else base model names."""
    first = items[0]
    for other in items[1:]:
        meta_a, meta_b = first.sft.metadata, other.sft.metadata
        if meta_a.base_fingerprint and meta_b.base_fingerprint:
            if meta_a.base_fingerprint != meta_b.base_fingerprint:
                raise BaseMismatchError(
                    f"{first.label} and {other.label} were trained on different bases "
                    f"({meta_a.base_model or '?'} {meta_a.base_fingerprint[:19]}… vs "
                    f"{meta_b.base_model or '?'} {meta_b.base_fingerprint[:19]}…): their overlap is meaningless"
                )
        elif meta_a.base_model and meta_b.base_model and meta_a.base_model != meta_b.base_model:
            raise BaseMismatchError(
                f"{first.label} and {other.label} were trained on different bases "
                f"({meta_a.base_model} vs {meta_b.base_model}): their overlap is meaningless"
            )


# ---------------------------------------------------------------------------------------- N SFTs (Fig. 3)
@dataclass(frozen=True)
class OverlapMatrix:
    """All pairwise overlaps of N SFTs (paper Fig. 3); ``pairs`` holds i < j."""

    items: list[Labelled]
    pairs: dict[tuple[int, int], PairOverlap]
    diagonal: list[PairOverlap]

    @property
    def labels(self) -> list[str]:
        return [item.label for item in self.items]

    def pair(self, i: int, j: int) -> PairOverlap:
        """Row i = A, column j = B."""
        if i == j:
            return self.diagonal[i]
        return self.pairs[(i, j)] if i < j else self.pairs[(j, i)].swapped()

    def matrix(self, statistic: str = "overlap") -> list[list[float | int | None]]:
        size = len(self.items)
        return [[self.pair(i, j).total.statistic(statistic) for j in range(size)] for i in range(size)]

    def to_json(self, by: str | None = None) -> dict[str, Any]:
        check_grouping(by)
        return {
            "schema": SCHEMA_ID,
            "mode": "pair" if len(self.items) == 2 else "matrix",
            "by": by,
            "sfts": [_summary(item) for item in self.items],
            "pairs": [
                {"a": i, "b": j, "language": None, "method": None, **overlap.to_dict(by)}
                for (i, j), overlap in self.pairs.items()
            ],
            "matrix": {statistic: self.matrix(statistic) for statistic in STATISTICS},
        }


def overlap_matrix(sfts: Sequence[SparseFineTuning | Labelled]) -> OverlapMatrix:
    """Pairwise overlaps of two or more SFTs trained on the same base."""
    items = [_labelled(item) for item in sfts]
    if len(items) < 2:
        raise BadInputError(f"an overlap needs at least 2 SFTs, got {len(items)}")
    check_same_base(items)
    pairs = {
        (i, j): pair_overlap(items[i].sft, items[j].sft) for i in range(len(items)) for j in range(i + 1, len(items))
    }
    return OverlapMatrix(items, pairs, [_self_counts(item.sft) for item in items])


# ---------------------------------------------------------------------------------------- Fig. 2
@dataclass(frozen=True)
class MethodRow:
    language: str
    method: str
    a: int  # index of the language SFT in MethodComparison.items
    b: int  # index of the task SFT
    overlap: PairOverlap


@dataclass(frozen=True)
class MethodComparison:
    """Language-vs-task overlap per language and method (paper Fig. 2)."""

    items: list[Labelled]
    rows: list[MethodRow]
    languages: list[str] = field(init=False)
    methods: list[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "languages", list(dict.fromkeys(row.language for row in self.rows)))
        object.__setattr__(self, "methods", list(dict.fromkeys(row.method for row in self.rows)))

    def table(self, statistic: str = "overlap") -> dict[str, list[float | int | None]]:
        """{method: [statistic per language]} in ``languages`` order; None where a pair is missing."""
        cell = {(row.language, row.method): row.overlap.total.statistic(statistic) for row in self.rows}
        return {method: [cell.get((language, method)) for language in self.languages] for method in self.methods}

    def to_json(self, by: str | None = None) -> dict[str, Any]:
        check_grouping(by)
        return {
            "schema": SCHEMA_ID,
            "mode": "methods",
            "by": by,
            "sfts": [_summary(item) for item in self.items],
            "pairs": [
                {"a": row.a, "b": row.b, "language": row.language, "method": row.method, **row.overlap.to_dict(by)}
                for row in self.rows
            ],
            "languages": self.languages,
            "methods": self.methods,
        }


def overlap_by_method(
    triples: Iterable[tuple[SparseFineTuning | Labelled, SparseFineTuning | Labelled, str]],
) -> MethodComparison:
    """Overlap of each (language SFT, task SFT, method label) triple, for Fig. 2-style comparisons.

    The language shown is the language SFT's ``metadata.language`` (else its label); one pair per
    (language, method). An SFT used in several triples (typically the task SFT) is compared once per
    triple but listed once.
    """
    items: list[Labelled] = []
    position: dict[int, int] = {}

    def index_of(item: Labelled) -> int:
        if id(item.sft) not in position:
            position[id(item.sft)] = len(items)
            items.append(item)
        return position[id(item.sft)]

    pairs: list[tuple[str, str, int, int]] = []
    for language_item, task_item, method in triples:
        lang, task = _labelled(language_item), _labelled(task_item)
        language = lang.sft.metadata.language or lang.label
        if any(seen[:2] == (language, method) for seen in pairs):
            raise BadInputError(f"two language SFTs for {language!r} with method {method!r}; give one per method")
        pairs.append((language, method, index_of(lang), index_of(task)))
    if not pairs:
        raise BadInputError("no (language SFT, task SFT, method) triple to compare")
    check_same_base(items)
    rows = [
        MethodRow(language, method, a, b, pair_overlap(items[a].sft, items[b].sft)) for language, method, a, b in pairs
    ]
    return MethodComparison(items, rows)


# ---------------------------------------------------------------------------------------- schema
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_COUNT = {"type": "integer", "minimum": 0}
_STATS_PROPERTIES = {
    "entries_a": _COUNT,
    "entries_b": _COUNT,
    "shared": _COUNT,
    "union": _COUNT,
    "same_sign": _COUNT,
    "frac_of_a": _NUMBER_OR_NULL,
    "frac_of_b": _NUMBER_OR_NULL,
    "jaccard": _NUMBER_OR_NULL,
    "overlap": _NUMBER_OR_NULL,
    "sign_agreement": _NUMBER_OR_NULL,
    "mean_abs_a": _NUMBER_OR_NULL,
    "mean_abs_b": _NUMBER_OR_NULL,
    "abs_ratio": _NUMBER_OR_NULL,
}
_STRING_OR_NULL = {"type": ["string", "null"]}

JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "sftkit overlap --json",
    "type": "object",
    "required": ["schema", "mode", "by", "sfts", "pairs"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "mode": {"enum": ["pair", "matrix", "methods"]},
        "by": {"enum": [None, *GROUPINGS]},
        "sfts": {
            "type": "array",
            "minItems": 2,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "label",
                    "reference",
                    "kind",
                    "language",
                    "task",
                    "method",
                    "base_model",
                    "base_fingerprint",
                    "entries",
                ],
                "properties": {
                    "label": {"type": "string"},
                    "reference": _STRING_OR_NULL,
                    "kind": {"enum": ["language", "task"]},
                    "language": _STRING_OR_NULL,
                    "task": _STRING_OR_NULL,
                    "method": _STRING_OR_NULL,
                    "base_model": _STRING_OR_NULL,
                    "base_fingerprint": _STRING_OR_NULL,
                    "entries": _COUNT,
                },
            },
        },
        "pairs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["a", "b", "language", "method", "total", "groups"],
                "properties": {
                    "a": _COUNT,
                    "b": _COUNT,
                    "language": _STRING_OR_NULL,
                    "method": _STRING_OR_NULL,
                    "total": {"$ref": "#/$defs/statistics", "unevaluatedProperties": False},
                    "groups": {
                        "type": "array",
                        "items": {
                            "$ref": "#/$defs/statistics",
                            "required": ["group"],
                            "properties": {"group": {"type": "string"}},
                            "unevaluatedProperties": False,
                        },
                    },
                },
            },
        },
        "matrix": {
            "type": "object",
            "additionalProperties": False,
            "required": list(STATISTICS),
            "properties": {
                statistic: {"type": "array", "items": {"type": "array", "items": _NUMBER_OR_NULL}}
                for statistic in STATISTICS
            },
        },
        "languages": {"type": "array", "items": {"type": "string"}},
        "methods": {"type": "array", "items": {"type": "string"}},
    },
    "$defs": {
        "statistics": {
            "type": "object",
            "required": list(_STATS_PROPERTIES),
            "properties": _STATS_PROPERTIES,
        }
    },
    "allOf": [
        {
            "if": {"properties": {"mode": {"const": "methods"}}},
            "then": {"required": ["languages", "methods"], "not": {"required": ["matrix"]}},
            "else": {
                "required": ["matrix"],
                "not": {"anyOf": [{"required": ["languages"]}, {"required": ["methods"]}]},
            },
        }
    ],
}
