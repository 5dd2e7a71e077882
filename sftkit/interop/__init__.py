"""Foreign SFT formats: detect, import into our artifact, export from it.

``import_sft`` accepts either format (our SFT directory or composable-sft's LT-SFT directory), applies
the metadata the user gave and, when the base model can be loaded, records its fingerprint.
``export_sft`` writes either format; the LT-SFT one needs the encoder prefix of the base model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftkit.artifact import CONFIG_NAME, LTSFT_FILE, WEIGHTS_NAME
from sftkit.base_model import load_base, local_files_only
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.fingerprint import base_fingerprint
from sftkit.interop.ltsft import ReadResult, read_ltsft, write_ltsft
from sftkit.sft import SFTMetadata, SparseFineTuning

FORMATS = ("sftkit", "lt-sft")

__all__ = ["FORMATS", "ReadResult", "detect_format", "encoder_prefix", "export_sft", "import_sft"]


def detect_format(path: str | os.PathLike[str]) -> str:
    """``"sftkit"`` for our SFT directory, ``"lt-sft"`` for a ``pytorch_diff.bin`` (or its directory)."""
    target = Path(path)
    if target.is_file():
        if target.name == LTSFT_FILE or target.suffix == ".bin":
            return "lt-sft"
        raise BadInputError(f"{target} is neither an SFT directory nor an LT-SFT {LTSFT_FILE}")
    if not target.is_dir():
        raise BadInputError(f"{target} does not exist")
    if (target / CONFIG_NAME).is_file() and (target / WEIGHTS_NAME).is_file():
        return "sftkit"
    if (target / LTSFT_FILE).is_file():
        return "lt-sft"
    raise BadInputError(
        f"{target} holds no SFT: expected {CONFIG_NAME} + {WEIGHTS_NAME} (sftkit) or {LTSFT_FILE} (LT-SFT)"
    )


def _load_base(base: str, revision: str | None, notes: list[str]):
    """The base encoder, or None (with a note) when it cannot be loaded, e.g. a Hub id while offline."""
    try:
        return load_base(base, "none", revision=revision)
    except BadInputError as exc:
        notes.append(f"{exc}; its name is recorded but its fingerprint is unknown")
        return None


def import_sft(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | None = None,
    base: str | None = None,
    revision: str | None = None,
    prefix: str | None = None,
    decoder_as_embeddings: bool = False,
) -> ReadResult:
    """Read an SFT in either format, with the user's metadata ``overrides`` applied.

    With ``base`` (a Hub id or local directory of the base model) the base is loaded: its fingerprint
    is recorded (or checked against the SFT's, raising ``BaseMismatchError``) and LT-SFT names are
    mapped with its encoder prefix. Without it, or when it cannot be loaded (offline), its name is
    still recorded, the fingerprint stays unknown and a note says so.

    By default an imported LT-SFT composes as composable-sft's ``apply`` does: a language SFT's ``abs``
    never reaches a classifier or a bare encoder. ``decoder_as_embeddings`` (LT-SFT with ``base`` only)
    departs from that on request: a tied MLM decoder in ``abs`` becomes a word-embedding delta, with a
    note saying so (see ``sftkit.interop.ltsft``).
    """
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    if base is not None:
        overrides.setdefault("base_model", base)
        if revision is not None:
            overrides.setdefault("base_revision", revision)
    notes: list[str] = []
    model = _load_base(base, revision, notes) if base is not None else None
    if detect_format(path) == "lt-sft":
        result = read_ltsft(path, overrides, base=model, prefix=prefix, decoder_as_embeddings=decoder_as_embeddings)
    else:
        sft = SparseFineTuning.load(path)
        merged = {**sft.metadata.to_dict(), **overrides}
        sft.metadata = SFTMetadata.from_dict(merged)
        result = ReadResult(sft)
    result.notes[:0] = notes
    metadata = result.sft.metadata
    if model is None:
        if metadata.base_fingerprint is None and not notes:
            result.notes.append("base fingerprint unknown (give --base to record it); compose cannot check the base")
        return result
    fingerprint = base_fingerprint(model)
    if metadata.base_fingerprint not in (None, fingerprint):
        raise BaseMismatchError(
            f"the SFT was trained on a base with fingerprint {metadata.base_fingerprint[:19]}…, "
            f"not on {base!r} ({fingerprint[:19]}…)"
        )
    metadata.base_fingerprint = fingerprint
    return result


def encoder_prefix(base_model: str | None, revision: str | None = None) -> str:
    """The attribute under which the base model's class keeps its encoder (``roberta``, ``bert``)."""
    if not base_model:
        raise BadInputError("the SFT records no base model, so its parameter prefix is unknown: pass --prefix")
    # transformers only here: importing and exporting our own format never loads a model.
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        config = AutoConfig.from_pretrained(
            base_model, revision=revision, local_files_only=local_files_only(base_model, revision)
        )
        return MODEL_MAPPING[type(config)].base_model_prefix
    except (OSError, ValueError, KeyError) as exc:
        raise BadInputError(
            f"cannot read the config of base model {base_model!r} to learn its parameter prefix "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): pass --prefix"
        ) from exc


def export_sft(
    sft: SparseFineTuning,
    out_dir: str | os.PathLike[str],
    format: str = "lt-sft",
    prefix: str | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> Path:
    """Write ``sft`` to ``out_dir`` atomically in ``format`` (``lt-sft`` or ``sftkit``)."""
    if format not in FORMATS:
        raise BadInputError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "sftkit":
        return sft.save(out_dir, dtype=dtype, overwrite=overwrite)
    if prefix is None:
        recorded = sft.metadata.extra.get("lt_sft", {})
        prefix = recorded.get("prefix") if isinstance(recorded, dict) else None
    if prefix is None:
        prefix = encoder_prefix(sft.metadata.base_model, sft.metadata.base_revision)
    return write_ltsft(sft, out_dir, prefix, overwrite=overwrite)
