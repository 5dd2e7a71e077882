"""Composition θ0 + Σ wᵢ φᵢ and export to a plain Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline

from sftkit.compose import compose, export
from sftkit.composition_plan import COMPOSE_RECORD
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


def _expected_encoder(base_dir: Path, parts: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """θ0 + Σ wᵢ φᵢ for every encoder tensor, from the files alone (names relative to the encoder)."""
    prefix = "roberta."
    expected = {
        key[len(prefix) :]: t.clone()
        for key, t in load_file(str(base_dir / "model.safetensors")).items()
        if key.startswith(prefix)
    }
    for directory, weight in parts:
        deltas, _ = _dense_deltas_from_file(directory)
        assert deltas, directory
        for name, delta in deltas.items():
            expected[name] += weight * delta
    return expected


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        assert not tensors.keys() & load_file(str(file)).keys()
        tensors.update(load_file(str(file)))
    return tensors


TEXTS = ["baka lo mi", "zuto fe", "mi mi baka zuto", "lo"]


def _in_memory_predictions(model, tokenizer_dir: Path) -> list[tuple[str, float]]:
    """(label, probability) of the composed model object itself, without any export."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model.eval()
    results = []
    with torch.no_grad():
        for text in TEXTS:
            probabilities = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
            index = int(probabilities.argmax())
            results.append((model.config.id2label[index], float(probabilities[index])))
    return results


def _assert_same_predictions(directory: Path, expected: list[tuple[str, float]]) -> None:
    predictions = pipeline("text-classification", model=str(directory))(TEXTS)
    assert [p["label"] for p in predictions] == [label for label, _ in expected]
    assert [p["score"] for p in predictions] == pytest.approx([score for _, score in expected], abs=1e-6)


def test_exported_weights_equal_base_plus_deltas(tiny_base, sft_dirs, tmp_path):
    task, language = (SparseFineTuning.load(sft_dirs[k]) for k in ("task", "language"))
    sfts, weights = [task, language], [1.0, 0.5]
    out = export(compose(str(tiny_base), sfts, weights=weights), tmp_path / "model", sfts, weights)

    base = load_file(str(tiny_base / "model.safetensors"))
    composed = load_file(str(out / "model.safetensors"))
    _, task_heads = _dense_deltas_from_file(sft_dirs["task"])
    expected = _expected_encoder(tiny_base, [(sft_dirs["task"], 1.0), (sft_dirs["language"], 0.5)])
    prefix = "roberta."
    # Every tensor is accounted for: the encoder is θ0 + Σ wᵢ φᵢ (norms untouched), the head is the task SFT's.
    assert composed.keys() == {prefix + name for name in expected} | task_heads.keys()
    for name, tensor in expected.items():
        assert torch.allclose(composed[prefix + name], tensor, atol=1e-6), name
        if "LayerNorm" in name:
            assert torch.equal(composed[prefix + name], base[prefix + name]), name
    changed = [name for name in expected if not torch.equal(composed[prefix + name], base[prefix + name])]
    assert len(changed) > 10  # the deltas really moved most tensors
    for name, tensor in task_heads.items():
        assert torch.equal(composed[name], tensor), name

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    record = json.loads((out / COMPOSE_RECORD).read_text())
    fingerprint = base_fingerprint(AutoModelForMaskedLM.from_pretrained(tiny_base))
    assert record["base_model"] == str(tiny_base)
    assert record["base_fingerprint"] == fingerprint
    assert record["architecture"] == "XLMRobertaForSequenceClassification"
    assert [
        (p["kind"], p["name"], p["weight"], p["method"], p["num_entries"], p["base_fingerprint"])
        for p in record["sfts"]
    ] == [
        ("task", "sa", 1.0, "deftx", task.num_entries, fingerprint),
        ("language", "ace", 0.5, "deftx", language.num_entries, fingerprint),
    ]
    for part in record["sfts"]:  # the counts agree with the files themselves
        tensors = load_file(str(sft_dirs[part["kind"]] / "sft_model.safetensors"))
        assert part["num_entries"] == sum(t.numel() for key, t in tensors.items() if key.endswith(".indices")) > 0
    card = (out / "README.md").read_text()
    assert f"base_model: {json.dumps(str(tiny_base))}" in card
    assert "- task SFT `sa` × 1.0 (deftx)" in card
    assert "- language SFT `ace` × 0.5 (deftx)" in card
    assert "Labels: negative, neutral, positive." in card


def test_exported_directory_runs_in_a_pipeline(tiny_base, sft_dirs, tmp_path):
    sfts = [SparseFineTuning.load(sft_dirs[k]) for k in ("language", "task")]
    model = compose(str(tiny_base), sfts)
    out = export(model, tmp_path / "model", sfts)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert reloaded.config.num_labels == 3
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    expected = _in_memory_predictions(model, tiny_base)
    # The head really discriminates (a constant answer would make the comparison below weak).
    assert len({score for _, score in expected}) > 1
    _assert_same_predictions(out, expected)


def test_sharded_export_loads(tiny_base, sft_dirs, tmp_path):
    sfts = [SparseFineTuning.load(sft_dirs[k]) for k in ("language", "task")]
    model = compose(str(tiny_base), sfts)
    out = export(model, tmp_path / "model", sfts, max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1
    assert sorted(set(index["weight_map"].values())) == shards
    stored = _weights(out)
    assert index["weight_map"].keys() == stored.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(stored[name], tensor), name
        assert name in load_file(str(out / index["weight_map"][name]))
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


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
    model = compose(str(tiny_base), [language], head="none", weights=[0.75])
    assert type(model).__name__ == "XLMRobertaModel"
    out = export(model, tmp_path / "encoder", [language], [0.75])
    stored = load_file(str(out / "model.safetensors"))
    expected = _expected_encoder(tiny_base, [(sft_dirs["language"], 0.75)])
    # θ0 + 0.75 φ_L in every encoder tensor; no MLM or classifier head. (The pooler, absent from the MLM
    # checkpoint, is whatever AutoModel initialised: it is only checked to be the in-memory model's.)
    assert stored.keys() - expected.keys() == {"pooler.dense.weight", "pooler.dense.bias"}
    assert expected.keys() <= stored.keys()
    for name, tensor in expected.items():
        assert torch.allclose(stored[name], tensor, atol=1e-6), name
    for name, tensor in model.state_dict().items():
        assert torch.equal(stored[name], tensor), name
    record = json.loads((out / COMPOSE_RECORD).read_text())
    assert record["architecture"] == "XLMRobertaModel"
    assert [(p["kind"], p["name"], p["weight"]) for p in record["sfts"]] == [("language", "ace", 0.75)]


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


MERGES = {
    "sum": {},
    "ties": {"merge": "ties", "density": 0.5},
    "dare-ties": {"merge": "dare-ties", "density": 0.7, "merge_seed": 3},
    "dare-linear": {"merge": "dare-linear", "density": 0.4},
}


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize(
    ("shard", "threads", "chunk_bytes"), [("2GB", 1, 2**25), ("100KB", 2, 2**25), ("2GB", 2, 4096)]
)
def test_streaming_export_equals_in_memory_export(
    tiny_base, sft_dirs, tmp_path, monkeypatch, shard, threads, chunk_bytes, merge
):
    """Sharded or not, one worker or a pool, whole tensors or many small chunks, any merge method: the same weights."""
    from sftkit import streaming
    from sftkit.compose import compose_to_directory

    monkeypatch.setattr(streaming, "CHUNK_BYTES", chunk_bytes)
    sfts = [SparseFineTuning.load(sft_dirs[k]) for k in ("task", "language")]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        streamed = compose_to_directory(
            str(tiny_base), sfts, tmp_path / "streamed", weights=[1.0, 0.7], max_shard_size=shard, **MERGES[merge]
        )
    finally:
        torch.set_num_threads(previous)
    model = compose(str(tiny_base), sfts, weights=[1.0, 0.7], **MERGES[merge])
    in_memory = export(model, tmp_path / "in-memory", sfts, [1.0, 0.7], **MERGES[merge])

    a, b = _weights(streamed), _weights(in_memory)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if merge != "sum":  # the merge really changed the weights
        summed = compose(str(tiny_base), sfts, weights=[1.0, 0.7]).state_dict()
        assert any(not torch.equal(a[name], summed[name]) for name in a)
    assert (shard == "100KB") == (streamed / "model.safetensors.index.json").exists()
    record = json.loads((streamed / COMPOSE_RECORD).read_text())
    assert record == json.loads((in_memory / COMPOSE_RECORD).read_text())
    assert record["merge"]["method"] == merge
    assert [(p["kind"], p["weight"]) for p in record["sfts"]] == [("task", 1.0), ("language", 0.7)]
    _assert_same_predictions(streamed, _in_memory_predictions(model, tiny_base))


def test_streaming_export_refuses_a_mismatched_base_and_writes_nothing(other_base, sft_dirs, tmp_path):
    from sftkit.compose import compose_to_directory

    with pytest.raises(BaseMismatchError):
        compose_to_directory(str(other_base), [SparseFineTuning.load(sft_dirs["task"])], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
