"""A composition's plan: which SFTs go in with which weights, how they merge, which one brings the head, and the
record of it.

Validated before any weight is read and shared by both ways of composing (in memory, ``sftkit.compose``;
streamed, ``sftkit.streaming``), which is why it lives in neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftkit import __version__
from sftkit.base_model import CLASSIFIER_HEADS, HEADS
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.merging import Addition, Merge
from sftkit.sft import SparseDelta, SparseFineTuning

COMPOSE_RECORD = "sftkit_compose.json"


@dataclass(frozen=True)
class Part:
    """One SFT going into a composition, with the name the user knows it by."""

    sft: SparseFineTuning
    weight: float = 1.0
    reference: str | None = None

    def record(self) -> dict[str, Any]:
        meta = self.sft.metadata
        return {
            "reference": self.reference,
            "name": meta.name,
            "kind": meta.kind,
            "language": meta.language,
            "task": meta.task,
            "method": meta.method,
            "rank": meta.rank,
            "weight": self.weight,
            "base_fingerprint": meta.base_fingerprint,
            "num_entries": self.sft.num_entries,
        }


def _head_part(parts: Sequence[Part], head: str, head_from: int | None) -> Part | None:
    if head == "none":
        return None
    if head_from is not None:
        if not 0 <= head_from < len(parts):
            raise BadInputError(f"head_from={head_from} is not the position of one of the {len(parts)} SFTs")
        return parts[head_from]
    wanted_kind = "task" if head in CLASSIFIER_HEADS else "language"
    candidates = [p for p in parts if p.sft.metadata.kind == wanted_kind and p.sft.full]
    if len(candidates) > 1:
        names = ", ".join(p.reference or p.sft.metadata.name for p in candidates)
        raise BadInputError(f"more than one {wanted_kind} SFT brings a head ({names}); choose one with head_from")
    if not candidates:
        raise BadInputError(
            f"a {head} model needs a {wanted_kind} SFT with a trained head, and none of the SFTs has one"
        )
    return candidates[0]


@dataclass(frozen=True)
class Plan:
    """What goes into a composition, validated before any weight is read."""

    parts: tuple[Part, ...]
    head: str
    head_part: Part | None
    merge: Merge = field(default_factory=Merge)
    tuning: Mapping[str, Any] | None = None  # how ``--tune`` chose the weights, recorded as is

    @property
    def labels(self) -> list[str] | None:
        return self.head_part.sft.metadata.labels if self.head_part else None

    def check_fingerprint(self, fingerprint: str, base: str) -> None:
        for part in self.parts:
            theirs = part.sft.metadata.base_fingerprint
            if theirs is not None and theirs != fingerprint:
                raise BaseMismatchError(f"{_trained_on(part)}, not on {base!r} ({fingerprint[:19]}…)")

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]], base: str) -> None:
        """Refuse an SFT that changes a parameter ``base`` lacks or shapes differently (encoder-relative names).

        Needed for SFTs that record no fingerprint, and run before any weight is read, so a wrong base
        is named as such rather than surfacing as a shape error halfway through.
        """
        for part in self.parts:
            for name, delta in part.sft.diffs.items():
                shape = shapes.get(name)
                if shape != delta.shape:
                    found = f"its {name} is {delta.shape}, the base's {shape}" if shape else f"the base has no {name}"
                    raise BaseMismatchError(f"{_trained_on(part)}, not on {base!r} ({found})")

    def addition(self, name: str) -> Addition:
        """What both writers add to encoder parameter ``name`` (encoder-relative), with ``index_add_``."""
        deltas = [
            (position, part.weight, delta.indices, delta.values)
            for position, part in enumerate(self.parts)
            if (delta := part.sft.diffs.get(name)) is not None
        ]
        return self.merge.addition(name, deltas)

    def applied(self) -> list[tuple[SparseFineTuning, float, bool]]:
        """(SFT, scale, with its head) to ``apply`` in order for the in-memory model (``compose``, ``--tune``).

        ``sum`` applies each part as it is; another method applies the merged addends as SFTs at scale 1, the
        first carrying the head part's head.
        """
        if self.merge.method == "sum":
            return [(part.sft, part.weight, part is self.head_part) for part in self.parts]
        shapes = {name: delta.shape for part in self.parts for name, delta in part.sft.diffs.items()}
        layers: list[dict[str, SparseDelta]] = [{}]
        for name, shape in shapes.items():
            for depth, (scale, indices, values) in enumerate(self.addition(name).terms()):
                assert scale == 1.0  # merged addends carry their weights in their values
                if depth == len(layers):
                    layers.append({})
                layers[depth][name] = SparseDelta(shape, indices, values)
        head = self.head_part.sft.full if self.head_part else {}
        with_head = self.head_part is not None
        return [
            (SparseFineTuning(diffs, head if not depth else {}), 1.0, with_head and not depth)
            for depth, diffs in enumerate(layers)
        ]

    def check_head(self, head_names: Sequence[str]) -> None:
        if self.head_part is None:
            return
        missing = [name for name in head_names if name not in self.head_part.sft.full]
        if missing:
            raise BadInputError(
                f"SFT {self.head_part.reference or self.head_part.sft.metadata.name!r} has no trained head for "
                f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
            )


def _label(part: Part) -> str:
    return part.reference or part.sft.metadata.name


def _trained_on(part: Part) -> str:
    meta = part.sft.metadata
    fingerprint = f" ({meta.base_fingerprint[:19]}…)" if meta.base_fingerprint else ""
    return f"SFT {_label(part)!r} was trained on base {meta.base_model or 'unknown'!r}{fingerprint}"


def check_same_base(parts: Sequence[Part]) -> None:
    """Refuse SFTs whose base fingerprints differ: no single base fits them all, whichever is chosen."""
    known = [part for part in parts if part.sft.metadata.base_fingerprint]
    for part in known[1:]:
        if part.sft.metadata.base_fingerprint != known[0].sft.metadata.base_fingerprint:
            first, other = known[0].sft.metadata, part.sft.metadata
            raise BaseMismatchError(
                f"cannot compose SFTs trained on different base models: {_label(known[0])!r} on "
                f"{first.base_model or 'unknown'!r} ({first.base_fingerprint[:19]}…), {_label(part)!r} on "
                f"{other.base_model or 'unknown'!r} ({other.base_fingerprint[:19]}…)"
            )


def parts_of(
    sfts: Sequence[SparseFineTuning],
    weights: Sequence[float] | None = None,
    references: Sequence[str | None] | None = None,
) -> tuple[Part, ...]:
    """Pair each SFT with its weight (default 1) and the reference the user knows it by."""
    weights = list(weights) if weights is not None else [1.0] * len(sfts)
    if len(weights) != len(sfts):
        raise BadInputError(f"{len(weights)} weights for {len(sfts)} SFTs")
    refs = list(references) if references is not None else [None] * len(sfts)
    return tuple(Part(sft, float(w), ref) for sft, w, ref in zip(sfts, weights, refs, strict=True))


def default_head(parts: Sequence[Part], head_from: int | None = None) -> str:
    """The head a task SFT was trained with (its ``head_type``): token classification for a NER or POS
    SFT, sequence classification otherwise (also for SFTs that record no head type, e.g. imported ones)."""
    if head_from is not None and 0 <= head_from < len(parts):
        chosen = [parts[head_from]]
    else:
        chosen = [p for p in parts if p.sft.metadata.kind == "task" and p.sft.full]
    trained = {p.sft.metadata.head_type for p in chosen}
    return "token-classification" if trained == {"token-classification"} else "sequence-classification"


def plan(
    sfts: Sequence[SparseFineTuning],
    weights: Sequence[float] | None = None,
    head: str | None = None,
    head_from: int | None = None,
    references: Sequence[str | None] | None = None,
    merge: Merge | None = None,
    tuning: Mapping[str, Any] | None = None,
) -> Plan:
    """Validate the arguments of a composition: weights, merge method, which SFT brings the head, its labels.

    ``head``: one of ``HEADS``; ``None`` = the task SFT's own (``default_head``). ``merge``: ``Merge.of(…)``,
    default ``sum``.
    """
    if head is not None and head not in HEADS:
        raise BadInputError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if not sfts:
        raise BadInputError("nothing to compose: give at least one SFT")
    parts = parts_of(sfts, weights, references)
    merge = merge or Merge()
    merge.check_count(len(parts))
    check_same_base(parts)
    head = head or default_head(parts, head_from)
    result = Plan(parts, head, _head_part(parts, head, head_from), merge, tuning)
    if head in CLASSIFIER_HEADS and not result.labels:
        raise BadInputError("the task SFT records no labels, so the classifier's size is unknown")
    trained = result.head_part.sft.metadata.head_type if result.head_part else None
    if head in CLASSIFIER_HEADS and trained in CLASSIFIER_HEADS and trained != head:
        assert result.head_part is not None
        name = result.head_part.reference or result.head_part.sft.metadata.name
        raise BadInputError(f"SFT {name!r} was trained with a {trained} head, not {head}: leave the head unset")
    return result


def compose_record(
    base_model: str,
    fingerprint: str | None,
    architecture: str,
    parts: Sequence[Part],
    merge: Merge | None = None,
    tuning: Mapping[str, Any] | None = None,
) -> dict:
    """Contents of ``sftkit_compose.json``: enough to know exactly what a model directory is made of."""
    record = {
        "sftkit_version": __version__,
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "architecture": architecture,
        "merge": (merge or Merge()).record(),
        "sfts": [part.record() for part in parts],
    }
    return record | ({"tuning": dict(tuning)} if tuning is not None else {})
