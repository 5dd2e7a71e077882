"""sftkit.density (densities per layer and module) and the torch-free header readers it stands on."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from sftkit.artifact import WEIGHTS_NAME, read_weights_summary
from sftkit.density import density_by_layer, density_by_module
from sftkit.errors import BadInputError
from sftkit.params import layer_of, module_of
from sftkit.safetensors_header import read_checked_header
from sftkit.sft import SFTMetadata, SparseFineTuning

SHAPES = {
    "embeddings.word_embeddings.weight": (30, 8),
    "embeddings.position_embeddings.weight": (10, 8),
    "encoder.layer.0.attention.self.query.weight": (8, 8),
    "encoder.layer.0.attention.self.key.weight": (8, 8),
    "encoder.layer.0.attention.self.value.bias": (8,),
    "encoder.layer.0.attention.output.dense.weight": (8, 8),
    "encoder.layer.1.intermediate.dense.weight": (16, 8),
    "encoder.layer.1.output.dense.weight": (8, 16),
    "encoder.layer.11.output.dense.bias": (8,),
    "pooler.dense.weight": (8, 8),
}


@pytest.fixture(params=[0, 1, 2])
def random_sft(request):
    generator = torch.Generator().manual_seed(request.param)
    deltas = {
        name: torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.2)
        for name, shape in SHAPES.items()
    }
    sft = SparseFineTuning.from_dense_deltas(
        deltas, full={"classifier.weight": torch.ones(3, 8)}, metadata=SFTMetadata()
    )
    return sft, deltas


def plain_density(deltas, key) -> dict[str, tuple[int, int]]:
    """The obvious computation on dense tensors."""
    groups: dict[str, list[int]] = {}
    for name, tensor in deltas.items():
        entry = groups.setdefault(key(name), [0, 0])
        entry[0] += int((tensor != 0).sum())
        entry[1] += tensor.numel()
    return {group: (entries, size) for group, (entries, size) in groups.items()}


def test_densities_match_the_obvious_computation_from_object_and_directory(random_sft, tmp_path):
    sft, deltas = random_sft
    directory = sft.save(tmp_path / "sft")

    def layer(name: str) -> str:
        index = layer_of(name)
        return f"layer {index}" if index is not None else ("embeddings" if module_of(name) == "embeddings" else "other")

    for source in (sft, directory, directory / WEIGHTS_NAME):
        by_layer = density_by_layer(source)
        by_module = density_by_module(source)
        assert {r.group: (r.entries, r.size) for r in by_layer} == plain_density(deltas, layer)
        assert {r.group: (r.entries, r.size) for r in by_module} == plain_density(deltas, module_of)
        assert [r.group for r in by_layer] == ["embeddings", "layer 0", "layer 1", "layer 11", "other"]
        assert [r.group for r in by_module] == [
            "embeddings",
            "attn.q",
            "attn.k",
            "attn.o",
            "ffn.in",
            "ffn.out",
            "bias",
            "other",
        ]
        for row in by_layer + by_module:
            assert row.density == pytest.approx(row.entries / row.size)
    summary = read_weights_summary(directory)
    assert summary.num_entries == sft.num_entries and summary.full_tensors == {"classifier.weight": (3, 8)}


def test_header_reader_agrees_with_safetensors(random_sft, tmp_path):
    sft, _ = random_sft
    weights = sft.save(tmp_path / "sft") / WEIGHTS_NAME
    header = read_checked_header(weights)
    with safe_open(str(weights), framework="pt") as handle:
        assert header.pop("__metadata__") == handle.metadata()
        assert {key: tuple(info["shape"]) for key, info in header.items()} == {
            key: tuple(handle.get_slice(key).get_shape())
            for key in handle.keys()  # noqa: SIM118
        }


def _rewrite(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_header_reader_refuses_broken_files(tmp_path):
    sft = SparseFineTuning.from_dense_deltas({"w": torch.tensor([[0.0, 2.0], [3.0, 0.0]])}, metadata=SFTMetadata())
    weights = sft.save(tmp_path / "sft") / WEIGHTS_NAME
    good = weights.read_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    header, data = json.loads(good[8 : 8 + length]), good[8 + length :]

    truncated, trailing, empty = good[:-3], good + b"\0" * 8, b""
    huge_header, not_json = struct.pack("<Q", 1 << 40) + good[8:], struct.pack("<Q", 4) + b"{no}" + data
    for content in (truncated, trailing, empty, huge_header, not_json):
        weights.write_bytes(content)
        with pytest.raises(BadInputError, match="corrupted"):
            read_checked_header(weights)

    wrong_size = json.loads(json.dumps(header))
    wrong_size["w.values"]["shape"] = [3]
    _rewrite(weights, wrong_size, data)
    with pytest.raises(BadInputError, match="bytes for"):
        read_checked_header(weights)
    overlapping = json.loads(json.dumps(header))
    overlapping["w.indices"]["data_offsets"] = overlapping["w.values"]["data_offsets"]
    _rewrite(weights, overlapping, data)
    with pytest.raises(BadInputError, match="overlaps or leaves gaps"):
        read_checked_header(weights)
    foreign = {"model.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _rewrite(weights, foreign, b"\0" * 8)
    with pytest.raises(BadInputError, match="not an SFT weights file"):
        read_weights_summary(weights)
