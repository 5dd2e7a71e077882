"""A composition's plan: which SFTs go in with which weights, which one brings the head, and the record of it.

Validated before any weight is read and shared by both ways of composing (in memory, ``sftkit.compose``;
streamed, ``sftkit.streaming``), which is why it lives in neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sftkit import __version__
from sftkit.base_model import HEADS
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.sft import SparseFineTuning

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
    wanted_kind = "task" if head == "sequence-classification" else "language"
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

    @property
    def labels(self) -> list[str] | None:
        return self.head_part.sft.metadata.labels if self.head_part else None

    def check_fingerprint(self, fingerprint: str) -> None:
        for part in self.parts:
            theirs = part.sft.metadata.base_fingerprint
            if theirs is not None and theirs != fingerprint:
                raise BaseMismatchError(
                    f"SFT {part.reference or part.sft.metadata.name!r} was trained on base "
                    f"{part.sft.metadata.base_model!r} ({theirs[:19]}…), not on this base ({fingerprint[:19]}…)"
                )

    def check_head(self, head_names: Sequence[str]) -> None:
        if self.head_part is None:
            return
        missing = [name for name in head_names if name not in self.head_part.sft.full]
        if missing:
            raise BadInputError(
                f"SFT {self.head_part.reference or self.head_part.sft.metadata.name!r} has no trained head for "
                f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
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


def plan(
    sfts: Sequence[SparseFineTuning],
    weights: Sequence[float] | None = None,
    head: str = "sequence-classification",
    head_from: int | None = None,
    references: Sequence[str | None] | None = None,
) -> Plan:
    """Validate the arguments of a composition: weights, which SFT brings the head, its labels."""
    if head not in HEADS:
        raise BadInputError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if not sfts:
        raise BadInputError("nothing to compose: give at least one SFT")
    parts = parts_of(sfts, weights, references)
    result = Plan(parts, head, _head_part(parts, head, head_from))
    if head == "sequence-classification" and not result.labels:
        raise BadInputError("the task SFT records no labels, so the classifier's size is unknown")
    return result


def compose_record(base_model: str, fingerprint: str | None, architecture: str, parts: Sequence[Part]) -> dict:
    """Contents of ``sftkit_compose.json``: enough to know exactly what a model directory is made of."""
    return {
        "sftkit_version": __version__,
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "architecture": architecture,
        "sfts": [part.record() for part in parts],
    }
