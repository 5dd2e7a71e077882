"""Composition: θ = θ0 + Σ wᵢ φᵢ (or a TIES / DARE merge of the wᵢ φᵢ, ``sftkit.merging``) with the task
SFT's head on top, exported as a plain HF directory.

The exported directory is an ordinary Hugging Face model (config with ``id2label``, safetensors
weights, the base tokenizer) plus ``sftkit_compose.json`` recording which SFTs went in with which
weights, so ``AutoModelForSequenceClassification.from_pretrained(dir)`` and
``pipeline("text-classification", model=dir)`` work with no sftkit installed — or, for a token task
SFT (NER, POS; ``head_type`` ``token-classification``), ``AutoModelForTokenClassification`` and
``pipeline("token-classification")``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sftkit.artifact import CARD_NAME
from sftkit.atomic import atomic_directory, check_target
from sftkit.base_model import head_of_architecture, load_base, load_tokenizer, quiet_transformers, untie_decoder
from sftkit.card import composed_model_card
from sftkit.composition_plan import COMPOSE_RECORD, Part, Plan, compose_record, parts_of, plan
from sftkit.fingerprint import base_fingerprint
from sftkit.merging import Merge
from sftkit.params import encoder_of, head_parameters
from sftkit.sft import SparseFineTuning
from sftkit.streaming import stream_composition


def compose(
    base: str | Any,
    sfts: Sequence[SparseFineTuning],
    weights: Sequence[float] | None = None,
    head: str | None = None,
    head_from: int | None = None,
    references: Sequence[str | None] | None = None,
    revision: str | None = None,
    merge: str = "sum",
    density: float | None = None,
    merge_seed: int | None = None,
    normalize: bool | None = None,
):
    """Return θ0 + Σ wᵢ φᵢ in memory, with the head of the task SFT (or ``head_from``) on top.

    ``base`` is a Hub id, a local directory or an already loaded model (changed in place). SFTs
    whose base fingerprint differs from the base are refused, as are two heads and a missing head.
    ``head`` (``sftkit.base_model.HEADS``) defaults to the one the task SFT was trained with
    (``sequence-classification``, or ``token-classification`` for NER / POS). ``merge`` is one of
    ``sftkit.merging.METHODS`` (``sum``, ``ties``, ``dare-linear``, ``dare-ties``) with its ``density``,
    ``merge_seed`` (DARE) and ``normalize`` (TIES's division by the kept weights; default on).
    """
    settings = Merge.of(merge, density, merge_seed, normalize)
    return _compose(base, plan(sfts, weights, head, head_from, references, settings), revision)[0]


def _compose(base: str | Any, composition: Plan, revision: str | None) -> tuple[Any, str]:
    """The composed model and θ0's fingerprint (read before any SFT moved a weight)."""
    model, fingerprint = prepare(base, composition, revision)
    for sft, scale, with_head in composition.applied():
        sft.apply(model, scale=scale, with_head=with_head)
    return model, fingerprint


def prepare(base: str | Any, composition: Plan, revision: str | None = None) -> tuple[Any, str]:
    """θ0 with the plan's head, checked against the plan's SFTs, nothing applied yet; and θ0's fingerprint.

    ``sftkit.tuning`` applies and reverts ``composition.applied()`` on it trial after trial.
    """
    loads = isinstance(base, str | os.PathLike)
    model = load_base(base, composition.head, composition.labels, revision) if loads else base
    fingerprint = base_fingerprint(model)
    name = str(base) if loads else model.config.name_or_path
    composition.check_fingerprint(fingerprint, name)
    composition.check_shapes({n: tuple(p.shape) for n, p in encoder_of(model).named_parameters()}, name)
    composition.check_head([name for name, _ in head_parameters(model)])
    head_sft = composition.head_part.sft if composition.head_part else None
    if composition.head == "masked-lm" and head_sft and head_sft.metadata.trained_with_frozen_decoder:
        untie_decoder(model, freeze=False)  # the decoder stays θ0's, as in training, while φ moves the embeddings
    return model, fingerprint


def compose_to_directory(
    base: str,
    sfts: Sequence[SparseFineTuning],
    out_dir: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    head: str | None = None,
    head_from: int | None = None,
    references: Sequence[str | None] | None = None,
    revision: str | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    merge: str = "sum",
    density: float | None = None,
    merge_seed: int | None = None,
    normalize: bool | None = None,
    tuning: Mapping[str, object] | None = None,
) -> Path:
    """Compose and export in one go, tensor by tensor when the checkpoint allows it.

    The streaming path (``sftkit.streaming``) never holds the whole model in memory; checkpoints it
    cannot map (no safetensors, unusual key names, tied heads) go through ``compose`` + ``export``.
    Both write identical weights. The merge settings are ``compose``'s; ``tuning`` (what
    ``sftkit.tuning.tune`` tried) is recorded in ``sftkit_compose.json`` as is.
    """
    settings = Merge.of(merge, density, merge_seed, normalize)
    composition = plan(sfts, weights, head, head_from, references, settings, tuning)
    check_target(Path(out_dir), overwrite)  # before any weight is read
    written = stream_composition(base, composition, Path(out_dir), revision, max_shard_size, overwrite)
    if written is not None:
        return written
    model, fingerprint = _compose(base, composition, revision)
    target = Path(out_dir)
    parts, merged, tried = composition.parts, composition.merge, composition.tuning
    return _export(model, target, parts, merged, tried, fingerprint, None, max_shard_size, overwrite)


def export(
    model: Any,
    out_dir: str | os.PathLike[str],
    sfts: Sequence[SparseFineTuning] = (),
    weights: Sequence[float] | None = None,
    references: Sequence[str | None] | None = None,
    tokenizer: str | Any | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    merge: str = "sum",
    density: float | None = None,
    merge_seed: int | None = None,
    normalize: bool | None = None,
) -> Path:
    """Write ``model`` (from ``compose``) as a Hugging Face directory, atomically.

    ``sfts`` (with the ``weights``, ``references`` and merge settings given to ``compose``) are recorded in
    ``sftkit_compose.json`` and the model card; the base fingerprint recorded is theirs.
    ``tokenizer`` is a tokenizer object or a name/path to load one from; by default the base
    model's ``name_or_path``.
    """
    parts = parts_of(sfts, weights, references)
    settings = Merge.of(merge, density, merge_seed, normalize)
    fingerprint = next((p.sft.metadata.base_fingerprint for p in parts if p.sft.metadata.base_fingerprint), None)
    return _export(model, Path(out_dir), parts, settings, None, fingerprint, tokenizer, max_shard_size, overwrite)


def _export(
    model: Any,
    target: Path,
    parts: Sequence[Part],
    merge: Merge,
    tuning: Mapping[str, object] | None,
    fingerprint: str | None,
    tokenizer: str | Any | None,
    max_shard_size: str | int,
    overwrite: bool,
) -> Path:
    check_target(target, overwrite)
    source = tokenizer if tokenizer is not None else model.config.name_or_path
    if isinstance(source, str | os.PathLike):
        source = load_tokenizer(str(source))
    base = model.config.name_or_path
    labels = list(model.config.id2label.values()) if getattr(model.config, "id2label", None) else None
    with atomic_directory(target, overwrite) as staging:
        with quiet_transformers():
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        source.save_pretrained(staging)
        record = compose_record(base, fingerprint, type(model).__name__, parts, merge, tuning)
        (staging / COMPOSE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        head = head_of_architecture(type(model).__name__)
        card = composed_model_card(base, record["sfts"], labels, head, record["merge"], record.get("tuning"))
        (staging / CARD_NAME).write_text(card)
    return target
