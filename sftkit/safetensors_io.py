"""Safetensors files read and written in chunks through one reused buffer.

Why not ``safetensors.torch.save_file``: it needs every tensor of a file materialised first, so
composing a 1 GB checkpoint would allocate (and page-fault) a second gigabyte. Here each tensor is
streamed through one small reused buffer: read from the base file, patched, written — the cost of a
file copy.
The layout is the documented safetensors format: an 8-byte little-endian header length, a JSON header (padded with
spaces to a multiple of 8) with ``dtype``, ``shape`` and ``data_offsets``, then the packed data; files
written here are read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor layout of a safetensors file; unknown dtypes raise ``KeyError`` (callers fall back)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    return {
        name: TensorInfo(
            DTYPES[info["dtype"]], tuple(info["shape"]), base + info["data_offsets"][0], base + info["data_offsets"][1]
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


@contextmanager
def open_tensors(paths: Sequence[Path]) -> Iterator[dict[str, tuple[BinaryIO, TensorInfo]]]:
    """Every tensor of ``paths`` as (open file, layout), valid inside the block.

    Plain ``readinto`` at known offsets copies straight from the page cache into the caller's buffer:
    cheaper than memory-mapping, which pays a page fault for every 4 KiB it touches.
    """
    handles: list[BinaryIO] = []
    try:
        tensors: dict[str, tuple[BinaryIO, TensorInfo]] = {}
        for path in paths:
            handle = path.open("rb", buffering=0)
            handles.append(handle)
            for name, info in read_header(path).items():
                tensors[name] = (handle, info)
        yield tensors
    finally:
        for handle in handles:
            handle.close()


def read_into(handle: BinaryIO, offset: int, target: memoryview) -> None:
    """Fill ``target`` with the bytes of ``handle`` at ``offset`` (a short file is an error)."""
    done = 0
    while done < len(target):
        handle.seek(offset + done)
        count = handle.readinto(target[done:])
        if not count:
            raise ValueError(f"{getattr(handle, 'name', 'checkpoint')} is truncated")
        done += count


def write_sequential(
    path: Path,
    layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    chunks: Callable[[str, torch.dtype, tuple[int, ...]], Iterable[memoryview | bytes]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file whose tensors arrive as byte chunks from ``chunks(name, dtype, shape)``.

    Tensors are packed by decreasing element size so that every slot is aligned for its dtype. Each
    tensor must yield exactly its size in bytes. Returns the number of data bytes.
    """
    ordered = sorted(layout, key=lambda item: -itemsize(item[1]))
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in ordered:
        nbytes = torch.Size(shape).numel() * itemsize(dtype)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, dtype, shape in ordered:
            written = sum(handle.write(chunk) for chunk in chunks(name, dtype, shape))
            expected = torch.Size(shape).numel() * itemsize(dtype)
            if written != expected:
                raise ValueError(f"{name}: wrote {written} bytes, expected {expected}")
    return offset


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
