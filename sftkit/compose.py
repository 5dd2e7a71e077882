"""Composition: θ = θ0 + Σ wᵢ φᵢ with the task SFT's head on top, exported as a plain HF directory.

The exported directory is an ordinary Hugging Face model (config with ``id2label``, safetensors
weights, the base tokenizer) plus ``sftkit_compose.json`` recording which SFTs went in with which
weights, so ``AutoModelForSequenceClassification.from_pretrained(dir)`` and
``pipeline("text-classification", model=dir)`` work with no sftkit installed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit import __version__
from sftkit.atomic import atomic_directory, check_target
from sftkit.card import composed_model_card
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.fingerprint import base_fingerprint
from sftkit.params import head_parameters
from sftkit.sft import SparseFineTuning

COMPOSE_RECORD = "sftkit_compose.json"
HEADS = ("sequence-classification", "masked-lm", "none")


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


@contextmanager
def quiet_transformers():
    """Silence load reports and weight-loading bars: the fresh classifier they warn about is overwritten."""
    from transformers.utils import logging

    previous, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(previous)
        if bars:
            logging.enable_progress_bar()


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


def head_class(head: str, labels: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """The transformers Auto class of a head and the config overrides it needs (a classifier's labels)."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    if head == "sequence-classification":
        labels = list(labels or [])
        overrides = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
        }
        return AutoModelForSequenceClassification, overrides
    return (AutoModelForMaskedLM if head == "masked-lm" else AutoModel), {}


def load_base(base: str, head: str, labels: Sequence[str] | None = None, revision: str | None = None):
    """Load θ0 with the requested head from a Hub id or a local directory."""
    return load_base_reporting(base, head, labels, revision)[0]


def load_base_reporting(
    base: str, head: str, labels: Sequence[str] | None = None, revision: str | None = None
) -> tuple[Any, list[str]]:
    """``load_base`` plus the sorted names of the weights the checkpoint lacked (a freshly initialised head)."""
    auto, overrides = head_class(head, labels)
    if revision:
        overrides["revision"] = revision
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(base, output_loading_info=True, **overrides)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"cannot load base model {base!r}: {str(exc).splitlines()[0]}") from exc
    return model, sorted(info.get("missing_keys", ()))


def untie_decoder(model: Any, freeze: bool) -> Any:
    """Give the MLM decoder its own copy of the word embeddings (frozen when ``freeze``); returns it.

    Language SFTs train with this decoder (the LT-SFT reference's ``--freeze_decoder``), so a masked-LM
    composition of one rebuilds it: θ0's embeddings in the decoder, θ0 + φ_L in the encoder. Returns None
    when the model has no output embedding; an already untied decoder keeps its values.
    """
    import torch

    output = model.get_output_embeddings()
    if output is None:
        return None
    words = model.get_input_embeddings().weight
    if output.weight is words:
        output.weight = torch.nn.Parameter(words.detach().clone(), requires_grad=not freeze)
    elif freeze:
        output.weight.requires_grad_(False)
    model.config.tie_word_embeddings = False  # keeps a later tie_weights() (or a reload) from re-tying it
    return output.weight


def trained_with_frozen_decoder(sft: SparseFineTuning) -> bool:
    """A language SFT trained with the untied, frozen decoder (every one since the option exists)."""
    return sft.metadata.kind == "language" and bool((sft.metadata.trainer or {}).get("freeze_decoder"))


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

    def records(self) -> list[dict[str, Any]]:
        return [part.record() for part in self.parts]


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
    weights = list(weights) if weights is not None else [1.0] * len(sfts)
    if len(weights) != len(sfts):
        raise BadInputError(f"{len(weights)} weights for {len(sfts)} SFTs")
    refs = list(references) if references is not None else [None] * len(sfts)
    parts = tuple(Part(sft, float(w), ref) for sft, w, ref in zip(sfts, weights, refs, strict=True))
    result = Plan(parts, head, _head_part(parts, head, head_from))
    if head == "sequence-classification" and not result.labels:
        raise BadInputError("the task SFT records no labels, so the classifier's size is unknown")
    return result


def compose(
    base: str | Any,
    sfts: Sequence[SparseFineTuning],
    weights: Sequence[float] | None = None,
    head: str = "sequence-classification",
    head_from: int | None = None,
    references: Sequence[str | None] | None = None,
    revision: str | None = None,
):
    """Return θ0 + Σ wᵢ φᵢ in memory, with the head of the task SFT (or ``head_from``) on top.

    ``base`` is a Hub id, a local directory or an already loaded model (changed in place). SFTs
    whose base fingerprint differs from the base are refused, as are two heads and a missing head.
    """
    composition = plan(sfts, weights, head, head_from, references)
    model = load_base(base, head, composition.labels, revision) if isinstance(base, str | os.PathLike) else base
    fingerprint = base_fingerprint(model)
    composition.check_fingerprint(fingerprint)
    composition.check_head([name for name, _ in head_parameters(model)])
    if head == "masked-lm" and composition.head_part and trained_with_frozen_decoder(composition.head_part.sft):
        untie_decoder(model, freeze=False)  # the decoder stays θ0's, as in training, while φ moves the embeddings
    for part in composition.parts:
        part.sft.apply(model, scale=part.weight, with_head=part is composition.head_part)
    model.sftkit_parts = composition.records()  # read by export()
    model.sftkit_fingerprint = fingerprint
    return model


def compose_to_directory(
    base: str,
    sfts: Sequence[SparseFineTuning],
    out_dir: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    head: str = "sequence-classification",
    head_from: int | None = None,
    references: Sequence[str | None] | None = None,
    revision: str | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> Path:
    """Compose and export in one go, tensor by tensor when the checkpoint allows it.

    The streaming path (``sftkit.streaming``) never holds the whole model in memory; checkpoints it
    cannot map (no safetensors, unusual key names, tied heads) go through ``compose`` + ``export``.
    Both write identical weights.
    """
    from sftkit.streaming import stream_composition

    composition = plan(sfts, weights, head, head_from, references)
    check_target(Path(out_dir), overwrite)  # before any weight is read
    written = stream_composition(base, composition, Path(out_dir), revision, max_shard_size, overwrite)
    if written is not None:
        return written
    model = compose(base, sfts, weights, head, head_from, references, revision)
    return export(model, out_dir, max_shard_size=max_shard_size, overwrite=overwrite)


def compose_record(base_model: str, fingerprint: str | None, architecture: str, parts: list[dict]) -> dict:
    """Contents of ``sftkit_compose.json``: enough to know exactly what a model directory is made of."""
    return {
        "sftkit_version": __version__,
        "base_model": base_model,
        "base_fingerprint": fingerprint,
        "architecture": architecture,
        "sfts": parts,
    }


def export(
    model: Any,
    out_dir: str | os.PathLike[str],
    tokenizer: str | Any | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (from ``compose``) as a Hugging Face directory, atomically.

    ``tokenizer`` is a tokenizer object or a name/path to load one from; by default the base
    model's ``name_or_path``.
    """
    from transformers import AutoTokenizer

    target = Path(out_dir)
    check_target(target, overwrite)
    source = tokenizer if tokenizer is not None else model.config.name_or_path
    if isinstance(source, str | os.PathLike):
        try:
            source = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise BadInputError(f"cannot load the tokenizer of {source!r}: {str(exc).splitlines()[0]}") from exc
    with atomic_directory(target, overwrite) as staging:
        with quiet_transformers():
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        source.save_pretrained(staging)
        parts = getattr(model, "sftkit_parts", [])
        labels = list(model.config.id2label.values()) if getattr(model.config, "id2label", None) else None
        record = compose_record(
            model.config.name_or_path, getattr(model, "sftkit_fingerprint", None), type(model).__name__, parts
        )
        (staging / COMPOSE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (staging / "README.md").write_text(composed_model_card(model.config.name_or_path, parts, labels))
    return target
