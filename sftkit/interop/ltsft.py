"""composable-sft's LT-SFT format (``pytorch_diff.bin``): read it safely, write it faithfully.

Facts of the format (from its public source, see issue 8):

- ``pytorch_diff.bin`` is a ``torch.save``d dict ``{'diffs': {name: {'size': torch.Size, 'index_steps':
  [first flat index, step, step, ...], 'values': tensor}}, 'abs': {name: dense tensor}}``; a parameter
  with no tuned entry has empty ``index_steps``.
- Flat indices are COLUMN-major (multipliers ``cumprod([1] + size[:-1])``: the first dimension varies
  fastest) and ascending in that order; ours are row-major. Converting reorders the values too.
- Names are full-model names (``roberta.encoder…``); our sparse deltas are relative to the encoder.
- The reference pickles ``index_steps[0]`` as a numpy int64 scalar, so the file is loaded with
  ``weights_only=True`` plus exactly the numpy globals that scalar needs. Anything else is refused
  unexecuted.

The tied MLM decoder: with tied embeddings, transformers 5 lists the shared tensor under the head's name,
so the reference stores a language SFT's *trained word embeddings* densely in ``abs`` as
``lm_head.decoder.weight`` (``cls.predictions.decoder.weight`` for BERT). The reference composes a
language SFT with ``apply(model, with_abs=False)``: its ``abs`` never touches the composed model, whatever
it holds. An import therefore composes exactly like the reference by default: the tied decoder stays a
dense MLM-head tensor under its own name (applied only with the MLM head, as ``with_abs=True`` would), or
is dropped when the sparse diffs already cover the word embeddings (a redundant copy). Only on request
(``decoder_as_embeddings=True``, ``--decoder-as-embeddings``) and with the base at hand does it become
the sparse delta ``trained − base`` of ``embeddings.word_embeddings.weight``, which keeps the language's
embedding adaptation in every composition but departs from the reference (a note says so).
Independently, BERT pooler diffs become dense head tensors (``base + delta``) when the base is at hand,
as our convention stores poolers with the head.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sftkit.artifact import CARD_NAME, LTSFT_FILE, SIDECAR_NAME
from sftkit.atomic import atomic_directory
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.params import maskable_parameters
from sftkit.sft import SFTMetadata, SparseDelta, SparseFineTuning

# SIDECAR_NAME is written next to pytorch_diff.bin by our export (composable-sft ignores it) so that a
# round trip through the LT-SFT format keeps the metadata and the encoder prefix.
TIED_DECODERS = ("lm_head.decoder.weight", "cls.predictions.decoder.weight")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
POOLER = "pooler."
_MLM_HEADS = ("lm_head.", "cls.predictions.")
_ENCODER_PARTS = ("embeddings", "encoder")


@dataclass
class ReadResult:
    """An imported SFT and what the user should know about the conversion."""

    sft: SparseFineTuning
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- index maths
def _multipliers(shape: tuple[int, ...], column_major: bool) -> torch.Tensor:
    """Flat-index weight of each dimension: ``cumprod([1] + size[:-1])`` column-major, mirrored row-major."""
    dims = list(shape) if column_major else list(reversed(shape))
    strides = torch.cumprod(torch.tensor([1, *dims[:-1]], dtype=torch.int64), dim=0)
    return strides if column_major else strides.flip(0)


def convert_flat_indices(indices: torch.Tensor, shape: tuple[int, ...], to_row_major: bool) -> torch.Tensor:
    """Map flat indices between column-major (LT-SFT) and row-major (ours) order; the result is unsorted."""
    if len(shape) < 2 or indices.numel() == 0:
        return indices.clone()
    source = _multipliers(shape, column_major=to_row_major)
    target = _multipliers(shape, column_major=not to_row_major)
    sizes = torch.tensor(shape, dtype=torch.int64)
    coordinates = torch.div(indices.unsqueeze(1), source, rounding_mode="floor") % sizes
    return (coordinates * target).sum(dim=1)


def _reordered(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], to_row_major: bool):
    converted = convert_flat_indices(indices, shape, to_row_major)
    converted, order = torch.sort(converted)
    return converted, values[order]


# ---------------------------------------------------------------------------------------------- safe loading
def _allowed_numpy_globals() -> list[Any]:
    """Exactly what a numpy int64 scalar needs: ``scalar`` (numpy 2 and numpy 1 module names), ``dtype``
    and the int64 dtype class that ``dtype.__setstate__`` builds."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    scalar = core.multiarray.scalar
    return [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
        type(np.dtype(np.int64)),
    ]


def _unpickling_reason(exc: Exception) -> str:
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_pytorch_diff(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a ``pytorch_diff.bin`` with ``weights_only=True`` and the numpy scalar allowlist only."""
    file = Path(path)
    if not file.is_file():
        raise BadInputError(f"{file} does not exist")
    try:
        with torch.serialization.safe_globals(_allowed_numpy_globals()):
            data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BadInputError(
            f"{file}: unsafe or unsupported pickle, refused without running it ({_unpickling_reason(exc)})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"{file} is not a readable torch file: {detail}") from exc
    if not isinstance(data, dict) or not ({"diffs", "abs"} & set(data)):
        raise BadInputError(f"{file} is not an LT-SFT file (expected a dict with 'diffs' and 'abs')")
    for key in ("diffs", "abs"):
        if not isinstance(data.get(key, {}), dict):
            raise BadInputError(f"{file}: {key!r} must be a dict of parameter name → entry")
    return data


# ---------------------------------------------------------------------------------------------- decoding
def _first_index(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise BadInputError(f"{name}: index_steps must hold integers, not {type(value).__name__}")
    return int(value)


def decode_entry(name: str, entry: Any) -> SparseDelta:
    """One ``diffs`` entry → a row-major ``SparseDelta`` (validated: ascending, in range, lengths agree)."""
    if not isinstance(entry, dict) or not {"size", "index_steps", "values"} <= set(entry):
        raise BadInputError(f"{name}: a diff entry needs 'size', 'index_steps' and 'values'")
    try:
        shape = tuple(int(s) for s in entry["size"])
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"{name}: 'size' is not a shape") from exc
    steps, values = entry["index_steps"], entry["values"]
    if not isinstance(steps, list | tuple):
        raise BadInputError(f"{name}: index_steps must be a list, not {type(steps).__name__}")
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise BadInputError(f"{name}: values must be a floating-point tensor")
    values = values.reshape(-1)
    if len(steps) != values.numel():
        raise BadInputError(f"{name}: {len(steps)} index steps but {values.numel()} values")
    if not steps:
        return SparseDelta(shape, torch.zeros(0, dtype=torch.int64), values.clone())
    first = torch.tensor([_first_index(steps[0], name)], dtype=torch.int64)
    rest = torch.tensor(steps[1:]) if len(steps) > 1 else torch.zeros(0, dtype=torch.int64)
    if rest.dtype != torch.int64:
        raise BadInputError(f"{name}: index_steps must hold integers (found {rest.dtype})")
    if rest.numel() and int(rest.min()) <= 0:
        raise BadInputError(f"{name}: index_steps after the first must be positive (indices must ascend)")
    indices = torch.cat([first, rest]).cumsum(0)
    numel = torch.Size(shape).numel()
    if int(indices[0]) < 0 or int(indices[-1]) >= numel:
        raise BadInputError(f"{name}: flat indices out of range for size {list(shape)}")
    rows, ordered = _reordered(indices, values, shape, to_row_major=True)
    return SparseDelta(shape, rows, ordered)


def encode_delta(delta: SparseDelta) -> dict[str, Any]:
    """A ``SparseDelta`` → an LT-SFT ``diffs`` entry (plain ints, so any torch loads it safely)."""
    columns, values = _reordered(delta.indices, delta.values, delta.shape, to_row_major=False)
    steps = torch.diff(columns, prepend=torch.zeros(1, dtype=torch.int64)) if columns.numel() else columns
    return {"size": torch.Size(delta.shape), "index_steps": steps.tolist(), "values": values.contiguous()}


# ---------------------------------------------------------------------------------------------- names
def detect_prefix(names: list[str]) -> str:
    """The encoder's attribute name shared by all full-model diff names (``roberta``, ``bert``), or ``""``
    when the names are already relative to the encoder."""
    if not names or all(name.split(".", 1)[0] in _ENCODER_PARTS for name in names):
        return ""
    candidates = {
        parts[0] for parts in (name.split(".") for name in names) if len(parts) > 2 and parts[1] in _ENCODER_PARTS
    }
    if len(candidates) != 1:
        raise BadInputError(
            "cannot tell which part of the parameter names is the encoder "
            f"(candidates: {sorted(candidates) or 'none'}); pass the base model (--base) or --prefix"
        )
    return candidates.pop()


def _strip(name: str, prefix: str) -> str:
    if not prefix:
        return name
    if not name.startswith(prefix + "."):
        raise BadInputError(
            f"sparse diff {name!r} lies outside the encoder {prefix!r}: sparse heads cannot be imported "
            "(they are only meaningful relative to a randomly initialised head)"
        )
    return name[len(prefix) + 1 :]


def _is_language_head(names: list[str]) -> bool:
    return all(name.startswith(_MLM_HEADS) for name in names)


def _generic_labels(full: Mapping[str, torch.Tensor]) -> list[str] | None:
    """Number of classes from a classifier's output layer (``LABEL_i`` as transformers names them)."""
    outputs = [
        tensor
        for name, tensor in full.items()
        if tensor.dim() == 2 and (name.endswith("out_proj.weight") or name == "classifier.weight")
    ]
    return [f"LABEL_{i}" for i in range(outputs[0].shape[0])] if len(outputs) == 1 else None


# ---------------------------------------------------------------------------------------------- read
def _sidecar(directory: Path) -> dict[str, Any] | None:
    path = directory / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
        raise BadInputError(f"{path} lacks the 'metadata' written by sftkit")
    return data


def _metadata(base: dict[str, Any], overrides: Mapping[str, Any]) -> SFTMetadata:
    known = {f.name for f in fields(SFTMetadata)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BadInputError(f"unknown metadata field(s): {', '.join(unknown)}")
    merged = dict(base)
    merged.update({key: value for key, value in overrides.items() if value is not None})
    return SFTMetadata.from_dict(merged)


def _file_of(path: Path) -> Path:
    return path / LTSFT_FILE if path.is_dir() else path


def read_ltsft(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | None = None,
    base: nn.Module | None = None,
    prefix: str | None = None,
    decoder_as_embeddings: bool = False,
) -> ReadResult:
    """Convert an LT-SFT directory (or its ``pytorch_diff.bin``) to a ``SparseFineTuning``.

    ``overrides`` are metadata fields the user gave (kind, language, task, labels, base_model, …); with
    ``base`` (a loaded model) the encoder prefix is its ``base_model_prefix`` and pooler diffs move to
    the head. A tied decoder in ``abs`` stays a head tensor, so compositions equal the reference's
    ``apply``, unless ``decoder_as_embeddings`` (with ``base``) asks for a word-embedding delta (see the
    module docstring).
    """
    file = _file_of(Path(path))
    data = load_pytorch_diff(file)
    sidecar = _sidecar(file.parent)
    raw_diffs: dict[str, Any] = data.get("diffs", {})
    raw_abs: dict[str, Any] = data.get("abs", {})
    for name, tensor in raw_abs.items():
        if not isinstance(tensor, torch.Tensor):
            raise BadInputError(f"abs tensor {name!r} is a {type(tensor).__name__}, not a tensor")
    if prefix is None:
        prefix = base.base_model_prefix if base is not None else (sidecar or {}).get("prefix")
    if prefix is None:
        prefix = detect_prefix(list(raw_diffs))
    diffs = {_strip(name, prefix): decode_entry(name, entry) for name, entry in raw_diffs.items()}
    full = {name: tensor.detach().clone() for name, tensor in raw_abs.items()}
    base_params = dict(base.base_model.named_parameters()) if base is not None else {}
    bookkeeping: dict[str, Any] = {"prefix": prefix}
    notes: list[str] = []
    for name in [n for n in full if n in TIED_DECODERS]:
        notes.extend(_tied_decoder(name, diffs, full, base_params, bookkeeping, decoder_as_embeddings))
    notes.extend(_poolers_to_head(diffs, full, base_params, prefix))

    overrides = dict(overrides or {})
    if sidecar is not None:
        metadata = _metadata(sidecar["metadata"], overrides)
    else:
        metadata = _metadata(_inferred_metadata(raw_abs, full, overrides, bookkeeping, notes), overrides)
    sft = SparseFineTuning(diffs, full, metadata)
    if base is not None:
        _check_shapes(sft, base_params)
        if sidecar is None:
            metadata.maskable_entries = sum(int(p.numel()) for _, p in maskable_parameters(base))
            metadata.k = sft.num_entries
            metadata.density = sft.num_entries / metadata.maskable_entries if metadata.maskable_entries else None
    return ReadResult(sft, notes)


def _inferred_metadata(
    raw_abs: Mapping[str, Any],
    full: Mapping[str, torch.Tensor],
    overrides: Mapping[str, Any],
    bookkeeping: dict[str, Any],
    notes: list[str],
) -> dict[str, Any]:
    """What a bare LT-SFT file tells about itself: an MLM head (or none) means a language SFT."""
    inferred: dict[str, Any] = {"method": "lt-sft", "extra": {"lt_sft": bookkeeping}}
    inferred["kind"] = "language" if _is_language_head(list(raw_abs)) else "task"
    if overrides.get("kind", inferred["kind"]) == "task" and not overrides.get("labels"):
        labels = _generic_labels(full)
        if labels:
            inferred["labels"] = labels
            notes.append(f"labels unknown: named {labels[0]}…{labels[-1]} (give --labels to name them)")
    return inferred


def _poolers_to_head(
    diffs: dict[str, SparseDelta], full: dict[str, torch.Tensor], base_params: Mapping[str, torch.Tensor], prefix: str
) -> list[str]:
    """BERT pooler diffs → dense head tensors ``base + delta``, as sftkit stores poolers with the head."""
    poolers = [name for name in diffs if name.startswith(POOLER)]
    if not poolers:
        return []
    if not all(name in base_params for name in poolers):
        return ["pooler diffs kept sparse; re-import with --base to store them with the head as sftkit does"]
    for name in poolers:
        param = base_params[name].detach()
        full[f"{prefix}.{name}" if prefix else name] = (param.float() + diffs.pop(name).to_dense(torch.float32)).to(
            param.dtype
        )
    return [f"pooler diffs stored as dense head tensors (base + delta): {', '.join(poolers)}"]


def _tied_decoder(
    name: str,
    diffs: dict[str, SparseDelta],
    full: dict[str, torch.Tensor],
    base_params: Mapping[str, torch.Tensor],
    bookkeeping: dict[str, Any],
    as_embeddings: bool,
) -> Iterator[str]:
    """Keep (or drop, when redundant) the tied decoder as the reference's ``apply`` treats it; convert it
    to a word-embedding delta only when asked, since that changes what a composition contains."""
    tensor = full[name]
    if WORD_EMBEDDINGS in diffs:
        if diffs[WORD_EMBEDDINGS].shape == tuple(tensor.shape):
            del full[name]
            bookkeeping.setdefault("dropped", []).append(name)
            yield f"dropped {name}: a dense copy of the word embeddings, whose sparse diff is already imported"
        return
    if not as_embeddings:
        yield (
            f"{name} (the tied decoder, i.e. trained word embeddings) kept as a dense MLM-head tensor: "
            "compositions without the MLM head ignore it, as composable-sft's apply(with_abs=False) does "
            "(--decoder-as-embeddings with --base would add it to the word embeddings instead)"
        )
        return
    embeddings = base_params.get(WORD_EMBEDDINGS)
    if embeddings is None or tuple(embeddings.shape) != tuple(tensor.shape):
        reason = "needs the base model (--base)" if embeddings is None else "needs a base of the same vocabulary"
        yield f"{name} kept as a dense MLM-head tensor: converting it to a word-embedding delta {reason}"
        return
    diffs[WORD_EMBEDDINGS] = SparseDelta.from_dense(tensor.float() - embeddings.detach().float())
    del full[name]
    bookkeeping.setdefault("converted", []).append(name)
    yield (
        f"{name} converted to a sparse delta of {WORD_EMBEDDINGS} against the base, as asked "
        "(--decoder-as-embeddings): compositions of this SFT change the word embeddings, so they differ "
        "from composable-sft's apply(with_abs=False), which ignores a language SFT's abs"
    )


def _check_shapes(sft: SparseFineTuning, base_params: Mapping[str, torch.Tensor]) -> None:
    for name, delta in sft.diffs.items():
        param = base_params.get(name)
        if param is None:
            raise BaseMismatchError(f"the base model has no parameter {name!r} that this LT-SFT changes")
        if tuple(param.shape) != delta.shape:
            raise BaseMismatchError(
                f"{name}: LT-SFT size {list(delta.shape)} differs from the base's {list(param.shape)}"
            )


# ---------------------------------------------------------------------------------------------- write
def _card(metadata: SFTMetadata, prefix: str) -> str:
    with_abs = "False" if metadata.kind == "language" else "True"
    return "\n".join(
        [
            "---",
            *([f"base_model: {json.dumps(metadata.base_model)}"] if metadata.base_model else []),
            *(["language:", f"- {json.dumps(metadata.language)}"] if metadata.language else []),
            "tags:",
            '- "sftkit"',
            '- "lt-sft"',
            '- "sparse-fine-tuning"',
            f'- "{metadata.kind}-sft"',
            "---",
            f"# {metadata.name} — {metadata.kind} SFT in the LT-SFT format",
            "",
            f"Exported by sftkit ({metadata.method}) for [composable-sft](https://github.com/cambridgeltl/composable-sft);"
            f" parameter names are full-model names under `{prefix}`.",
            "",
            "```python",
            "from sft import SFT",
            "sft = SFT('path/to/this/directory')",
            f"sft.apply(model, with_abs={with_abs})",
            "```",
            "",
            f"`{SIDECAR_NAME}` keeps the sftkit metadata: `sftkit import` restores the SFT exactly.",
            "",
        ]
    )


def write_ltsft(sft: SparseFineTuning, out_dir: str | os.PathLike[str], prefix: str, overwrite: bool = False) -> Path:
    """Write ``sft`` as an LT-SFT directory (``pytorch_diff.bin`` + sidecar metadata + card), atomically."""
    diffs = {f"{prefix}.{name}" if prefix else name: encode_delta(delta) for name, delta in sft.diffs.items()}
    clash = set(diffs) & set(sft.full)
    if clash:
        raise BadInputError(f"names stored both sparsely and densely after adding the prefix: {sorted(clash)[:3]}")
    payload = {"diffs": diffs, "abs": {name: tensor.detach().contiguous() for name, tensor in sft.full.items()}}
    sidecar = {"format": "lt-sft", "prefix": prefix, "metadata": sft.metadata.to_dict()}
    target = Path(out_dir)
    with atomic_directory(target, overwrite) as staging:
        torch.save(payload, staging / LTSFT_FILE)
        (staging / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        (staging / CARD_NAME).write_text(_card(sft.metadata, prefix))
    return target
