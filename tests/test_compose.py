"""Composition θ0 + Σ wᵢ φᵢ and export to a plain Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

from sftkit.compose import COMPOSE_RECORD, compose, export
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.fingerprint import base_fingerprint
from sftkit.params import head_parameters, maskable_parameters
from sftkit.sft import SFTMetadata, SparseFineTuning
from sftkit.toy import LABELS


def _random_sparse(model, seed: int, density: float) -> tuple[dict, dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    start = {name: p.detach().clone() for name, p in maskable_parameters(model)}
    end = {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in start.items()}
    masks = {name: torch.rand(t.shape, generator=generator) < density for name, t in start.items()}
    return start, end, masks


@pytest.fixture(scope="module")
def sft_dirs(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """A language SFT (with MLM head) and a task SFT (with classifier head) saved to disk."""
    root = tmp_path_factory.mktemp("sfts")
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_base)
    fingerprint = base_fingerprint(mlm)
    start, end, masks = _random_sparse(mlm, seed=1, density=0.05)
    language = SparseFineTuning.from_state_dicts(
        start,
        end,
        masks,
        {name: p.detach() for name, p in head_parameters(mlm)},
        SFTMetadata(kind="language", language="ace", base_model=str(tiny_base), base_fingerprint=fingerprint),
    )
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=len(LABELS))
    start, end, masks = _random_sparse(classifier, seed=2, density=0.1)
    head = {name: torch.randn_like(p) for name, p in head_parameters(classifier)}
    task = SparseFineTuning.from_state_dicts(
        start,
        end,
        masks,
        head,
        SFTMetadata(
            kind="task", task="sa", labels=list(LABELS), base_model=str(tiny_base), base_fingerprint=fingerprint
        ),
    )
    return {"language": language.save(root / "ace"), "task": task.save(root / "sa")}


def _dense_deltas_from_file(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read an SFT file with plain safetensors, independently of SparseFineTuning.load."""
    tensors = load_file(str(directory / "sft_model.safetensors"))
    from safetensors import safe_open

    with safe_open(str(directory / "sft_model.safetensors"), framework="pt") as handle:
        shapes = json.loads(handle.metadata()["shapes"])
    deltas = {}
    for name, shape in shapes.items():
        dense = torch.zeros(torch.Size(shape).numel())
        dense[tensors[f"{name}.indices"].long()] = tensors[f"{name}.values"].float()
        deltas[name] = dense.view(shape)
    heads = {key[: -len(".full")]: t for key, t in tensors.items() if key.endswith(".full")}
    return deltas, heads


def test_exported_weights_equal_base_plus_deltas(tiny_base, sft_dirs, tmp_path):
    task, language = (SparseFineTuning.load(sft_dirs[k]) for k in ("task", "language"))
    out = export(compose(str(tiny_base), [task, language], weights=[1.0, 0.5]), tmp_path / "model")

    base = load_file(str(tiny_base / "model.safetensors"))
    composed = load_file(str(out / "model.safetensors"))
    task_deltas, task_heads = _dense_deltas_from_file(sft_dirs["task"])
    language_deltas, _ = _dense_deltas_from_file(sft_dirs["language"])
    prefix = "roberta."
    for name, delta in task_deltas.items():
        expected = base[prefix + name] + delta + 0.5 * language_deltas[name]
        assert torch.allclose(composed[prefix + name], expected, atol=1e-6), name
    for name, tensor in task_heads.items():
        assert torch.equal(composed[name], tensor), name
    assert not any(key.startswith("lm_head") for key in composed)

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    record = json.loads((out / COMPOSE_RECORD).read_text())
    assert [(p["kind"], p["weight"]) for p in record["sfts"]] == [("task", 1.0), ("language", 0.5)]
    assert record["base_fingerprint"].startswith("sha256:")
    assert "base_model:" in (out / "README.md").read_text()


def test_exported_directory_runs_in_a_pipeline(tiny_base, sft_dirs, tmp_path):
    sfts = [SparseFineTuning.load(sft_dirs[k]) for k in ("language", "task")]
    out = export(compose(str(tiny_base), sfts), tmp_path / "model")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 3
    predictions = pipeline("text-classification", model=str(out))(["baka lo mi", "zuto fe"])
    assert [p["label"] in LABELS for p in predictions] == [True, True]


def test_sharded_export_loads(tiny_base, sft_dirs, tmp_path):
    sfts = [SparseFineTuning.load(sft_dirs[k]) for k in ("language", "task")]
    out = export(compose(str(tiny_base), sfts), tmp_path / "model", max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").exists()
    AutoModelForSequenceClassification.from_pretrained(out)


def test_mismatched_base_is_refused(other_base, sft_dirs):
    with pytest.raises(BaseMismatchError, match="was trained on base"):
        compose(str(other_base), [SparseFineTuning.load(sft_dirs["task"])])


def test_two_heads_or_no_head_are_refused(tiny_base, sft_dirs):
    task = SparseFineTuning.load(sft_dirs["task"])
    language = SparseFineTuning.load(sft_dirs["language"])
    with pytest.raises(BadInputError, match="more than one task SFT"):
        compose(str(tiny_base), [task, task])
    with pytest.raises(BadInputError, match="needs a task SFT"):
        compose(str(tiny_base), [language])
    headless = SparseFineTuning(task.diffs, {"classifier.dense.weight": task.full["classifier.dense.weight"]})
    headless.metadata = task.metadata
    with pytest.raises(BadInputError, match="no trained head"):
        compose(str(tiny_base), [headless])


def test_language_only_composition_into_a_bare_encoder(tiny_base, sft_dirs, tmp_path):
    language = SparseFineTuning.load(sft_dirs["language"])
    model = compose(str(tiny_base), [language], head="none")
    assert type(model).__name__ == "XLMRobertaModel"
    out = export(model, tmp_path / "encoder")
    assert (out / "model.safetensors").exists()


def test_export_refuses_to_overwrite_and_leaves_no_partial_directory(tiny_base, sft_dirs, tmp_path):
    model = compose(str(tiny_base), [SparseFineTuning.load(sft_dirs["task"])])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="already exists"):
        export(model, tmp_path / "model")
    assert (tmp_path / "model" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_arguments(tiny_base, sft_dirs):
    task = SparseFineTuning.load(sft_dirs["task"])
    with pytest.raises(BadInputError, match="weights for"):
        compose(str(tiny_base), [task], weights=[1.0, 2.0])
    with pytest.raises(BadInputError, match="nothing to compose"):
        compose(str(tiny_base), [])
    with pytest.raises(BadInputError, match="cannot load base model"):
        compose("/nonexistent/base", [task])


@pytest.mark.parametrize(
    ("shard", "threads", "chunk_bytes"), [("2GB", 1, 2**25), ("100KB", 2, 2**25), ("2GB", 2, 4096)]
)
def test_streaming_export_equals_in_memory_export(
    tiny_base, sft_dirs, tmp_path, monkeypatch, shard, threads, chunk_bytes
):
    """Sharded or not, one worker or a pool, whole tensors or many small chunks: the same weights."""
    from sftkit import streaming
    from sftkit.compose import compose_to_directory

    monkeypatch.setattr(streaming, "CHUNK_BYTES", chunk_bytes)
    sfts = [SparseFineTuning.load(sft_dirs[k]) for k in ("task", "language")]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        streamed = compose_to_directory(
            str(tiny_base), sfts, tmp_path / "streamed", weights=[1.0, 0.7], max_shard_size=shard
        )
    finally:
        torch.set_num_threads(previous)
    in_memory = export(compose(str(tiny_base), sfts, weights=[1.0, 0.7]), tmp_path / "in-memory")

    def weights(directory: Path) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(directory.glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        return tensors

    a, b = weights(streamed), weights(in_memory)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (shard == "100KB") == (streamed / "model.safetensors.index.json").exists()
    record = json.loads((streamed / COMPOSE_RECORD).read_text())
    assert record["base_fingerprint"] == json.loads((in_memory / COMPOSE_RECORD).read_text())["base_fingerprint"]
    predictions = pipeline("text-classification", model=str(streamed))(["baka lo mi"])
    assert predictions[0]["label"] in LABELS


def test_streaming_export_refuses_a_mismatched_base_and_writes_nothing(other_base, sft_dirs, tmp_path):
    from sftkit.compose import compose_to_directory

    with pytest.raises(BaseMismatchError):
        compose_to_directory(str(other_base), [SparseFineTuning.load(sft_dirs["task"])], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
