"""The chunked safetensors reader/writer (``sftkit.safetensors_io``) against the reference ``safetensors`` library."""

from __future__ import annotations

import json
import os
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sftkit.safetensors_io import (
    DTYPES,
    NAMES,
    itemsize,
    open_tensors,
    packed_order,
    read_header,
    read_into,
    write_sequential,
)

# What ``sftkit.streaming`` catches to fall back to the in-memory path: a corrupt header must raise one of these.
FALLBACK_ERRORS = (KeyError, ValueError, OSError)


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=torch.int64).to(dtype)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """One tensor per supported dtype, odd sizes so misaligned offsets would show, plus a 0-d and an empty one."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (7,), (2, 3, 3), (11,), (1, 9), (4, 1), (13,), (5, 2), (3,), (6, 7)]
    tensors = {
        f"t{i}.{name.lower()}": _random_tensor(dtype, shapes[i], generator)
        for i, (name, dtype) in enumerate(DTYPES.items())
    }
    tensors["scalar.f32"] = torch.tensor(3.25)
    tensors["empty.i64"] = torch.zeros((0, 4), dtype=torch.int64)
    return tensors


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def _chunks(data: bytes, rng: random.Random):
    """The data cut at random points, sometimes inside an element, some chunks empty, as memoryviews and bytes."""
    position = 0
    while position < len(data):
        size = rng.choice([0, 1, 3, 8, 17, 64])
        chunk = data[position : position + size]
        yield memoryview(chunk) if rng.random() < 0.5 else chunk
        position += size


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata=None, seed: int = 0) -> int:
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    data = b"".join(_raw(tensors[name]) for name, _, _ in packed_order(layout))
    return write_sequential(path, layout, _chunks(data, random.Random(seed)), metadata)


def _read_all(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor through open_tensors + read_into only."""
    result = {}
    with open_tensors(paths) as tensors:
        for name, (descriptor, info) in tensors.items():
            buffer = bytearray(info.end - info.start)
            read_into(descriptor, info.start, memoryview(buffer))
            flat = torch.frombuffer(buffer, dtype=info.dtype) if buffer else torch.empty(0, dtype=info.dtype)
            result[name] = flat.reshape(info.shape).clone()
    return result


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


def test_dtype_tables_match_torch_and_safetensors():
    assert {name: itemsize(dtype) for name, dtype in DTYPES.items()} == {
        "F64": 8,
        "F32": 4,
        "F16": 2,
        "BF16": 2,
        "I64": 8,
        "I32": 4,
        "I16": 2,
        "I8": 1,
        "U8": 1,
        "BOOL": 1,
    }
    assert all(NAMES[dtype] == name for name, dtype in DTYPES.items())


def test_written_file_loads_identically_with_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "ours.safetensors"
    nbytes = _write(path, tensors, metadata={"format": "pt", "note": "hello"})
    assert nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    _assert_same(load_file(str(path)), tensors)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "hello"}
    # The header is 8-byte padded and the data fills the rest of the file exactly.
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert length % 8 == 0
    assert path.stat().st_size == 8 + length + nbytes


def test_default_metadata_is_format_pt(tmp_path):
    path = tmp_path / "x.safetensors"
    _write(path, {"a": torch.arange(4, dtype=torch.int32)})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_reader_reads_safetensors_files_exactly(tmp_path):
    tensors = _tensors(seed=1)
    path = tmp_path / "reference.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    _assert_same(_read_all([path]), tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64, torch.float32, torch.bool])
def test_round_trip_through_both_paths_per_dtype(tmp_path, dtype):
    """ours → ours, ours → safetensors, safetensors → ours: all bit-identical."""
    generator = torch.Generator().manual_seed(7)
    tensors = {"a": _random_tensor(dtype, (17, 3), generator), "b": _random_tensor(dtype, (5,), generator)}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    _write(ours, tensors, seed=3)
    save_file(tensors, str(theirs))
    _assert_same(_read_all([ours]), tensors)
    _assert_same(load_file(str(ours)), tensors)
    _assert_same(_read_all([theirs]), tensors)


def test_header_offsets_are_absolute_and_match_the_reference_library(tmp_path):
    tensors = _tensors(seed=2)
    path = tmp_path / "reference.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    header = read_header(path)
    assert header.keys() == tensors.keys()  # __metadata__ is not a tensor
    for name, info in header.items():
        assert info.dtype == tensors[name].dtype
        assert info.shape == tuple(tensors[name].shape)
        assert raw[info.start : info.end] == _raw(tensors[name]), name


def test_packed_order_sorts_by_decreasing_element_size():
    layout = [
        ("a", torch.int8, (3,)),
        ("b", torch.float32, (2,)),
        ("c", torch.bfloat16, (1,)),
        ("d", torch.float64, (5,)),
        ("e", torch.float16, (4,)),
        ("f", torch.int32, (1,)),
        ("g", torch.bool, (2,)),
        ("h", torch.int64, ()),
    ]
    order = packed_order(layout)
    assert sorted(order) == sorted(layout)  # a permutation, entries unchanged
    assert [itemsize(dtype) for _, dtype, _ in order] == [8, 8, 4, 4, 2, 2, 1, 1]


def test_data_is_stored_in_packed_order_with_every_slot_aligned(tmp_path):
    tensors = _tensors(seed=3)
    path = tmp_path / "packed.safetensors"
    _write(path, tensors)
    header = read_header(path)
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    order = [name for name, _, _ in packed_order(layout)]
    assert sorted(header, key=lambda name: (header[name].start, order.index(name))) == order
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    position = 8 + length
    for name in order:  # contiguous, no gaps, no overlap
        info = header[name]
        assert info.start == position, name
        assert (info.start - 8 - length) % itemsize(info.dtype) == 0, name
        position = info.end
    assert position == path.stat().st_size


def test_sharded_files_are_read_together_each_through_its_own_descriptor(tmp_path):
    tensors = _tensors(seed=4)
    names = list(tensors)
    shards = [names[0::3], names[1::3], names[2::3]]
    paths = []
    for i, shard in enumerate(shards):
        path = tmp_path / f"model-{i + 1:05d}-of-00003.safetensors"
        if i == 1:  # mixed writers: one shard by the reference library
            save_file({n: tensors[n] for n in shard}, str(path))
        else:
            _write(path, {n: tensors[n] for n in shard}, seed=i)
        paths.append(path)
    with open_tensors(paths) as opened:
        descriptors = {name: descriptor for name, (descriptor, _) in opened.items()}
        assert len(set(descriptors.values())) == 3
        for shard in shards:
            assert len({descriptors[n] for n in shard}) == 1
    for descriptor in descriptors.values():  # closed after the block
        with pytest.raises(OSError):
            os.fstat(descriptor)
    _assert_same(_read_all(paths), tensors)


def test_concurrent_positional_reads_on_one_descriptor(tmp_path):
    generator = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn(257, generator=generator) for i in range(16)}
    path = tmp_path / "many.safetensors"
    _write(path, tensors)
    with open_tensors([path]) as opened:

        def read(name: str) -> torch.Tensor:
            descriptor, info = opened[name]
            buffer = bytearray(info.end - info.start)
            read_into(descriptor, info.start, memoryview(buffer))
            return torch.frombuffer(buffer, dtype=info.dtype).clone()

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = dict(zip(tensors, pool.map(read, list(tensors) * 4), strict=False))
    _assert_same(results, tensors)


def test_partial_reads_at_an_offset(tmp_path):
    values = torch.arange(100, dtype=torch.float64)
    path = tmp_path / "x.safetensors"
    _write(path, {"v": values})
    with open_tensors([path]) as opened:
        descriptor, info = opened["v"]
        buffer = bytearray(10 * 8)
        read_into(descriptor, info.start + 37 * 8, memoryview(buffer))
    assert torch.equal(torch.frombuffer(buffer, dtype=torch.float64), values[37:47])


def test_a_truncated_file_is_refused_and_reading_past_the_end_is_an_error(tmp_path):
    path = tmp_path / "x.safetensors"
    _write(path, {"a": torch.ones(64), "b": torch.ones(64, dtype=torch.float16)})
    header = read_header(path)
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size - 5)
    with pytest.raises(ValueError, match="data bytes"):  # the header no longer matches the file
        read_header(path)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        info = header["b"]
        with pytest.raises(ValueError, match="truncated"):
            read_into(descriptor, info.start, memoryview(bytearray(info.end - info.start)))
        info = header["a"]  # before the cut: still readable
        buffer = bytearray(info.end - info.start)
        read_into(descriptor, info.start, memoryview(buffer))
    finally:
        os.close(descriptor)
    assert torch.equal(torch.frombuffer(buffer, dtype=torch.float32), torch.ones(64))
    assert header["a"].end <= path.stat().st_size < header["b"].end


@pytest.mark.parametrize("delta", [-1, 1, -4])
def test_writer_refuses_a_stream_of_the_wrong_length(tmp_path, delta):
    layout = [("a", torch.float32, (4,)), ("b", torch.int8, (3,))]
    data = bytes(19 + delta)
    with pytest.raises(ValueError, match=f"wrote {19 + delta} data bytes, expected 19"):
        write_sequential(tmp_path / "x.safetensors", layout, [data])


def test_writer_refuses_a_dtype_it_cannot_name(tmp_path):
    with pytest.raises(KeyError):
        write_sequential(tmp_path / "x.safetensors", [("a", torch.complex64, (2,))], [bytes(16)])


def test_empty_file_round_trips(tmp_path):
    path = tmp_path / "empty.safetensors"
    assert write_sequential(path, [], []) == 0
    assert load_file(str(path)) == {}
    assert read_header(path) == {}


# ---------------------------------------------------------------------------------------------- corrupt headers


def _file(tmp_path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _json(header: dict) -> bytes:
    encoded = json.dumps(header).encode()
    return encoded + b" " * (-len(encoded) % 8)


def test_unknown_dtype_raises_value_error(tmp_path):
    """Documented: unknown dtypes raise ``ValueError`` so callers fall back (here a real float8 file)."""
    path = tmp_path / "f8.safetensors"
    save_file({"a": torch.zeros(4, dtype=torch.float8_e4m3fn), "b": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="bad header entry"):
        read_header(path)
    with pytest.raises(ValueError), open_tensors([path]):
        pass


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(struct.pack("<Q", 16) + b"{not json}      ", id="invalid-json"),
        pytest.param(struct.pack("<Q", 8) + b"\xff\xfe{}    ", id="invalid-utf8"),
        pytest.param(b"", id="empty-file"),
        pytest.param(b"\x10\x00\x00", id="shorter-than-the-length-field"),
        pytest.param(struct.pack("<Q", 8) + b"[1, 2] ", id="header-not-an-object"),
        pytest.param(struct.pack("<Q", 0), id="zero-header-length"),
        pytest.param(struct.pack("<Q", 2**62) + b"{}      ", id="absurd-header-length"),
    ],
)
def test_a_bad_header_raises_value_error(tmp_path, content):
    """Documented: a bad header raises ``ValueError`` (which ``sftkit.streaming`` falls back on)."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        read_header(path)
    with pytest.raises(ValueError), open_tensors([path]):
        pass


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(_json({"a": {"dtype": "F32", "shape": [1]}}), id="missing-offsets"),
        pytest.param(_json({"a": {"dtype": "U16", "shape": [1], "data_offsets": [0, 2]}}), id="unsupported-dtype"),
    ],
)
def test_a_bad_tensor_entry_raises_an_error_the_callers_fall_back_on(tmp_path, header):
    path = _file(tmp_path, header, bytes(8))
    with pytest.raises(FALLBACK_ERRORS):
        read_header(path)


def test_a_tensor_entry_that_is_not_an_object_raises_an_error_the_callers_fall_back_on(tmp_path):
    path = _file(tmp_path, b'{"a":3} ', bytes(8))
    with pytest.raises(FALLBACK_ERRORS):
        read_header(path)


def test_open_tensors_closes_what_it_opened_when_a_later_header_is_corrupt(tmp_path):
    good = tmp_path / "good.safetensors"
    _write(good, {"a": torch.ones(2)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 8) + b"{broken ")
    before = set(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    with pytest.raises(ValueError), open_tensors([good, bad]):
        pass
    if before is not None:
        assert set(os.listdir("/proc/self/fd")) <= before


@pytest.mark.parametrize(
    ("entry", "length"),
    [
        pytest.param({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, None, id="offsets-shorter-than-the-shape"),
        pytest.param({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, None, id="end-before-start"),
        pytest.param({"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}, None, id="data-beyond-the-file"),
        pytest.param({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, 4096, id="header-beyond-the-file"),
    ],
)
def test_inconsistent_offsets_are_rejected(tmp_path, entry, length):
    # A declared header length beyond the file: the JSON is read short, so no data follows it.
    path = _file(tmp_path, _json({"a": entry}), bytes(8) if length is None else b"", length=length)
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError):  # the reference library refuses the same file
        load_file(str(path))
    with pytest.raises(FALLBACK_ERRORS):
        read_header(path)
