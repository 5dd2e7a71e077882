"""The SFT artifact on disk, described without torch: its file names, its name rule, its weights header.

One SFT is one directory (the unit stored in the registry and pushed to the Hub)::

    sft_config.json          metadata (``sftkit.metadata.SFTMetadata``)
    sft_model.safetensors    <param>.indices  flat row-major indices, ascending, int32 (int64 if numel >= 2**31)
                             <param>.values   the deltas (float32, or float16/bfloat16 on request)
                             <param>.full     dense tensors of fully trained parameters (heads)
                             header metadata ``shapes``: every sparsely stored parameter's shape
    README.md                model card with YAML front matter

An SFT exported for the LT-SFT reference is ``pytorch_diff.bin`` plus ``sftkit_metadata.json``.
This module is the one place these names are spelled; the CLI reads headers through it without
importing torch (``sftkit show`` starts in well under a second).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from sftkit.errors import BadInputError
from sftkit.safetensors_header import read_checked_header

FORMAT_VERSION = 1
CONFIG_NAME = "sft_config.json"
WEIGHTS_NAME = "sft_model.safetensors"
CARD_NAME = "README.md"
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
LTSFT_FILE = "pytorch_diff.bin"  # the LT-SFT reference's file name
SIDECAR_NAME = "sftkit_metadata.json"  # our metadata next to an LT-SFT file
KINDS = ("language", "task")


def sft_name(kind: str, language: str | None, task: str | None) -> str | None:
    """An SFT's name: its language for a language SFT, its task for a task SFT (None when unset)."""
    return language if kind == "language" else task


@dataclass(frozen=True)
class ParameterCount:
    """Tuned entries (``entries``) out of all entries (``size``) of one sparsely stored parameter."""

    name: str
    entries: int
    size: int


@dataclass(frozen=True)
class WeightsSummary:
    """What the safetensors header of an SFT says, read without loading any tensor."""

    parameters: list[ParameterCount]
    full_tensors: dict[str, tuple[int, ...]]

    @property
    def num_entries(self) -> int:
        return sum(p.entries for p in self.parameters)


def read_weights_summary(path: str | os.PathLike[str]) -> WeightsSummary:
    """Parse and check the header of ``sft_model.safetensors`` (a directory or the file itself).

    Raises ``BadInputError`` for a file that is missing, truncated or not laid out like an SFT.
    """
    weights = Path(path)
    if weights.is_dir():
        weights = weights / WEIGHTS_NAME
    if not weights.is_file():
        raise BadInputError(f"{weights} does not exist (an SFT directory holds {WEIGHTS_NAME})")
    header = read_checked_header(weights)
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
