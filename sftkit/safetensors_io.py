"""Safetensors files read and written in chunks through a few reused buffers.

Why not ``safetensors.torch.save_file``: it needs every tensor of a file materialised first, so
composing a 1 GB checkpoint would allocate (and page-fault) a second gigabyte. Here tensors stream
through a few small reused buffers: read from the base file, patched, written — about the cost of a
file copy.
The layout is the documented safetensors format: an 8-byte little-endian header length, a JSON header (padded with
spaces to a multiple of 8) with ``dtype``, ``shape`` and ``data_offsets``, then the packed data; files
written here are read back by ``safetensors.safe_open`` in the tests.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sftkit.safetensors_header import check_layout, read_raw_header

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
    """Tensor layout of a safetensors file, checked; a bad header or an unknown dtype raises ``ValueError``."""
    with path.open("rb") as handle:
        length, header = read_raw_header(handle)
    check_layout(header, path.stat().st_size - 8 - length)
    base = 8 + length
    return {
        name: TensorInfo(
            DTYPES[info["dtype"]], tuple(info["shape"]), base + info["data_offsets"][0], base + info["data_offsets"][1]
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


@contextmanager
def open_tensors(paths: Sequence[Path]) -> Iterator[dict[str, tuple[int, TensorInfo]]]:
    """Every tensor of ``paths`` as (file descriptor, layout), valid inside the block.

    Positional reads (``read_into``) copy straight from the page cache into the caller's buffer — cheaper
    than memory-mapping, which pays a page fault for every 4 KiB — and several threads may read at once.
    """
    descriptors: list[int] = []
    try:
        tensors: dict[str, tuple[int, TensorInfo]] = {}
        for path in paths:
            descriptors.append(os.open(path, os.O_RDONLY))
            for name, info in read_header(path).items():
                tensors[name] = (descriptors[-1], info)
        yield tensors
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def read_into(descriptor: int, offset: int, target: memoryview) -> None:
    """Fill ``target`` with the file's bytes at ``offset`` (thread-safe; a short file is an error)."""
    done = 0
    while done < len(target):
        count = os.preadv(descriptor, [target[done:]], offset + done)
        if not count:
            raise ValueError("the checkpoint file is truncated")
        done += count


def packed_order(
    layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """The order tensors are stored in: by decreasing element size, so every slot is aligned for its dtype."""
    return sorted(layout, key=lambda item: -itemsize(item[1]))


def write_sequential(
    path: Path,
    layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    stream: Iterable[memoryview | bytes],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file whose data arrives as byte chunks, tensor after tensor in ``packed_order``.

    The chunks must add up to exactly the tensors' sizes. Returns the number of data bytes.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in packed_order(layout):
        nbytes = torch.Size(shape).numel() * itemsize(dtype)
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        written = sum(handle.write(chunk) for chunk in stream)
    if written != offset:
        raise ValueError(f"{path.name}: wrote {written} data bytes, expected {offset}")
    return offset


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
