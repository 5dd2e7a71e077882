"""The JSON header of a safetensors file, read without torch or numpy (the one header reader).

``safetensors.safe_open`` imports numpy or torch, which would slow down ``sftkit show`` and ``list``;
the format is simple and documented: an 8-byte little-endian header length, then a JSON object
mapping tensor names to ``dtype``, ``shape`` and ``data_offsets`` (plus an optional ``__metadata__``).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from sftkit.errors import BadInputError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 << 20


def read_raw_header(handle: BinaryIO) -> tuple[int, dict[str, Any]]:
    """Header length and parsed header from an open file, left at the start of the tensor data.

    Raises ``ValueError`` for anything that is not a safetensors header.
    """
    prefix = handle.read(8)
    if len(prefix) != 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if not 0 < length <= MAX_HEADER_BYTES:
        raise ValueError("invalid header length")
    header = json.loads(handle.read(length))  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return length, header


def check_layout(header: dict[str, Any], data_bytes: int) -> None:
    """Every tensor's bytes match dtype × shape, and the tensors tile the data exactly (``ValueError`` if not).

    ``safetensors.safe_open`` refuses such files too; a reader that trusted the offsets would read the
    wrong bytes.
    """
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            expected = math.prod(int(d) for d in info["shape"]) * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad header entry for {key!r}") from exc
        if end - begin != expected:
            raise ValueError(f"{key!r} has {end - begin} bytes for {expected}")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ValueError("tensor data overlaps or leaves gaps")
        position = end
    if position != data_bytes:
        raise ValueError(f"{data_bytes} data bytes, the header describes {position}")


def read_checked_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of a safetensors file, checked against the file's size (no tensor is read).

    Raises ``BadInputError`` for a truncated or malformed file.
    """
    weights = Path(path)
    try:
        with weights.open("rb") as handle:
            length, header = read_raw_header(handle)
        check_layout(header, weights.stat().st_size - 8 - length)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{weights} is corrupted or truncated: {exc}") from exc
    return header
