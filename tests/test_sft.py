"""The SFT artifact: save/load round trips, apply/revert, file layout, bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForMaskedLM

from sftkit.artifact import CONFIG_NAME, WEIGHTS_NAME
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.params import head_parameters, maskable_parameters
from sftkit.sft import SFTMetadata, SparseDelta, SparseFineTuning


def random_sft(model, density: float = 0.05, seed: int = 0, kind: str = "language") -> SparseFineTuning:
    generator = torch.Generator().manual_seed(seed)
    start = {name: param.detach().clone() for name, param in maskable_parameters(model)}
    end = {name: t + torch.randn(t.shape, generator=generator) for name, t in start.items()}
    masks = {name: torch.rand(t.shape, generator=generator) < density for name, t in start.items()}
    head = {name: param.detach() + 0.5 for name, param in head_parameters(model)}
    metadata = SFTMetadata(
        kind=kind,
        language="ace" if kind == "language" else None,
        task="sa" if kind == "task" else None,
        labels=["negative", "neutral", "positive"] if kind == "task" else None,
        base_model="tiny",
        method="deftx",
        rank="90var",
        keep=0.05,
        k=sum(int(m.sum()) for m in masks.values()),
        metrics={"val_loss": 1.25},
        rank_report=[{"name": "x", "rank": 3}],
    )
    return SparseFineTuning.from_state_dicts(start, end, masks, head, metadata)


@pytest.fixture
def mlm(tiny_base):
    return AutoModelForMaskedLM.from_pretrained(tiny_base)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_save_load_round_trip(tmp_path, mlm, dtype):
    sft = random_sft(mlm)
    sft.save(tmp_path / "sft", dtype=dtype)
    loaded = SparseFineTuning.load(tmp_path / "sft")

    assert loaded.metadata == sft.metadata
    assert set(loaded.diffs) == set(sft.diffs)
    wanted = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    for name, delta in sft.diffs.items():
        got = loaded.diffs[name]
        assert got.shape == delta.shape
        assert torch.equal(got.indices, delta.indices)
        assert got.values.dtype == wanted
        assert torch.equal(got.values, delta.values.to(wanted))
    for name, tensor in sft.full.items():
        assert torch.equal(loaded.full[name], tensor.to(wanted))


def test_file_layout_follows_the_format(tmp_path, mlm):
    sft = random_sft(mlm)
    directory = sft.save(tmp_path / "sft")
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((directory / CONFIG_NAME).read_text())
    assert config["kind"] == "language" and config["num_entries"] == sft.num_entries
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as handle:
        keys = set(handle.keys())
        name = "encoder.layer.0.attention.self.query.weight"
        assert handle.get_tensor(f"{name}.indices").dtype == torch.int32
        assert handle.get_tensor(f"{name}.values").dtype == torch.float32
    assert "lm_head.dense.weight.full" in keys
    # The tied MLM decoder is the word embedding matrix: stored once, sparsely, not as a head tensor.
    assert "lm_head.decoder.weight.full" not in keys
    card = (directory / "README.md").read_text()
    assert card.startswith("---\n") and 'library_name: "sftkit"' in card and "deft-x" in card


def test_artifact_bytes_per_entry_is_indices_plus_values(tmp_path, mlm):
    sft = random_sft(mlm)
    sft.full = {}
    directory = sft.save(tmp_path / "sft")
    size = (directory / WEIGHTS_NAME).stat().st_size
    header_allowance = 200 * len(sft.diffs) + 2048
    assert 8 * sft.num_entries <= size <= 8 * sft.num_entries + header_allowance


def test_apply_adds_deltas_and_revert_restores_exactly(mlm):
    sft = random_sft(mlm)
    before = {name: p.detach().clone() for name, p in mlm.named_parameters()}
    encoder_before = {name: p.detach().clone() for name, p in mlm.base_model.named_parameters()}
    sft.apply(mlm, scale=0.5)
    encoder_params = dict(mlm.base_model.named_parameters())
    for name, delta in sft.diffs.items():
        expected = encoder_before[name] + 0.5 * delta.to_dense()
        assert torch.allclose(encoder_params[name].detach(), expected, atol=1e-6)
    assert torch.equal(mlm.lm_head.dense.weight.detach(), sft.full["lm_head.dense.weight"])
    sft.revert(mlm)
    for name, param in mlm.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_revert_without_apply_is_an_error(mlm):
    with pytest.raises(BadInputError, match="not been applied"):
        random_sft(mlm).revert(mlm)


def test_apply_refuses_wrong_shapes(mlm):
    sft = random_sft(mlm)
    name = next(iter(sft.diffs))
    delta = sft.diffs[name]
    sft.diffs[name] = SparseDelta((delta.shape[0] + 1, *delta.shape[1:]), delta.indices, delta.values)
    with pytest.raises(BaseMismatchError, match="does not match"):
        sft.apply(mlm)


def _bad_last(sft: SparseFineTuning, mlm, fault: str) -> SparseFineTuning:
    """``sft`` with one fault after every valid delta: a missing parameter, a wrong shape, or a wrong head."""
    if fault == "missing":
        sft.diffs["encoder.layer.9.output.dense.weight"] = SparseDelta((2, 2), torch.tensor([0]), torch.ones(1))
    elif fault == "shape":
        name, delta = sft.diffs.popitem()
        sft.diffs[name] = SparseDelta((delta.shape[0] + 1, *delta.shape[1:]), delta.indices, delta.values)
    else:
        name = "lm_head.dense.weight"
        sft.full[name] = torch.ones(mlm.lm_head.dense.weight.shape[0] + 1, mlm.lm_head.dense.weight.shape[1])
    return sft


@pytest.mark.parametrize("fault", ["missing", "shape", "head"])
def test_a_refused_apply_leaves_the_model_bit_identical(mlm, fault):
    from sftkit.training.streams import applied

    sft = _bad_last(random_sft(mlm), mlm, fault)
    before = {name: p.detach().clone() for name, p in mlm.named_parameters()}
    with pytest.raises(BaseMismatchError):
        sft.apply(mlm)
    if fault != "head":  # applied() (a multi-source batch's SFT) leaves heads alone; it has nothing to undo
        with pytest.raises(BaseMismatchError), applied(sft, mlm):
            pass
    for name, param in mlm.named_parameters():
        assert torch.equal(param.detach(), before[name]), name
    with pytest.raises(BadInputError, match="not been applied"):
        sft.revert(mlm)


def test_bad_directories_give_clear_errors(tmp_path, mlm):
    with pytest.raises(BadInputError, match="not an SFT directory"):
        SparseFineTuning.load(tmp_path)
    directory = random_sft(mlm).save(tmp_path / "sft")
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BadInputError, match="corrupted or truncated"):
        SparseFineTuning.load(directory)


def test_save_never_replaces_silently_and_leaves_no_partial_files(tmp_path, mlm):
    sft = random_sft(mlm)
    sft.save(tmp_path / "sft")
    with pytest.raises(BadInputError, match="already exists"):
        sft.save(tmp_path / "sft")
    sft.save(tmp_path / "sft", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]
    with pytest.raises(BadInputError, match="value dtype"):
        sft.save(tmp_path / "other", dtype="int8")
    assert not (tmp_path / "other").exists()


def test_invalid_indices_are_refused():
    with pytest.raises(BadInputError, match="ascending"):
        SparseFineTuning({"w": SparseDelta((4,), torch.tensor([2, 1]), torch.ones(2))})
    with pytest.raises(BadInputError, match="out of range"):
        SparseFineTuning({"w": SparseDelta((4,), torch.tensor([1, 4]), torch.ones(2))})


def test_unknown_metadata_keys_survive_a_round_trip(tmp_path, mlm):
    sft = random_sft(mlm)
    directory = sft.save(tmp_path / "sft")
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["future_field"] = {"x": 1}
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    assert SparseFineTuning.load(directory).metadata.extra["future_field"] == {"x": 1}
