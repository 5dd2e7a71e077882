"""``sftkit compose`` through the registry: the user's example command, its JSON and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import one_line_error
from registry_helpers import base_sft
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification
from typer.testing import CliRunner

from sftkit.cli.main import app
from sftkit.registry import Registry

runner = CliRunner()


@pytest.fixture
def populated(tiny_base, other_base, sftkit_home):
    registry = Registry.open()
    mlm = AutoModelForMaskedLM.from_pretrained(tiny_base)
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3)
    registry.add(base_sft(mlm, "language", "ban", str(tiny_base), 1))
    registry.add(base_sft(classifier, "task", "sa", str(tiny_base), 2))
    other = AutoModelForMaskedLM.from_pretrained(other_base)
    registry.add(base_sft(other, "language", "ace", str(other_base), 3))
    return registry


def test_user_example_compose_task_and_language(populated, tiny_base, tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(app, ["compose", "--task", "sa", "--lang", "ban", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "composed" in result.output

    composed = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_base / "model.safetensors"))
    language, task = populated.load("lang:ban"), populated.load("task:sa")
    name = "encoder.layer.1.intermediate.dense.weight"
    expected = base[f"roberta.{name}"] + task.dense_delta(name) + language.dense_delta(name)
    assert torch.allclose(composed[f"roberta.{name}"], expected, atol=1e-6)
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label[2] == "positive"


def test_compose_json_output_and_weights(populated, tmp_path):
    result = runner.invoke(
        app, ["compose", "-t", "sa", "-l", "lang:ban@1", "--weights", "1,0.5", "-o", str(tmp_path / "m"), "--json"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["path"] == str(tmp_path / "m")
    assert [(p["reference"], p["weight"]) for p in record["sfts"]] == [("task:sa@1", 1.0), ("lang:ban@1", 0.5)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--lang", "ban"], "needs a task SFT"),
        (["--task", "sa", "--lang", "xx"], "xx"),
        (["--task", "sa", "--weights", "1,x"], "--weights must be"),
        (["--task", "sa", "--weights", "1,1"], "2 numbers for 1 SFTs"),
        ([], "nothing to compose"),
        (["-t", "sa", "-l", "ban", "--merge", "ties", "--density", "0"], "--density must be in (0, 1], not 0"),
        (["-t", "sa", "-l", "ban", "--merge", "dare-ties", "--density", "1.2"], "--density must be in (0, 1]"),
        (["-t", "sa", "--merge", "ties"], "--merge ties elects signs between SFTs: it needs at least two, not 1"),
        (["-t", "sa", "-l", "ban", "--merge", "ties", "--merge-seed", "3"], "--merge-seed only applies to DARE"),
        (["-t", "sa", "-l", "ban", "--merge-seed", "3"], "--merge-seed only applies to DARE"),
        (["-t", "sa", "-l", "ban", "--density", "0.5"], "--density needs a merge method that sparsifies"),
        (["-t", "sa", "-l", "ban", "--merge", "slerp"], "must be one of sum, ties, dare-linear, dare-ties"),
    ],
)
def test_bad_input_exits_2_with_one_line(populated, tmp_path, arguments, message):
    result = runner.invoke(app, ["compose", *arguments, "-o", str(tmp_path / "m")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_compose_with_a_ties_merge_writes_what_the_api_composes(populated, tiny_base, tmp_path):
    from sftkit.compose import compose

    out = tmp_path / "m"
    arguments = ["-t", "sa", "-l", "ban", "--weights", "1,0.8", "--merge", "ties", "--density", "0.5", "--no-normalize"]
    result = runner.invoke(app, ["compose", *arguments, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "merge    ties (density 0.5, normalize False)" in result.output
    sfts = [populated.load("task:sa"), populated.load("lang:ban")]
    model = compose(str(tiny_base), sfts, [1.0, 0.8], merge="ties", density=0.5, normalize=False)
    written = load_file(str(out / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(written[name], tensor), name
    again = runner.invoke(
        app, ["compose", *arguments[:4], "--merge", "dare-linear", "-o", str(tmp_path / "d"), "--json"]
    )
    assert json.loads(again.stdout)["merge"] == {"method": "dare-linear", "density": 1.0, "seed": 0, "normalize": None}


def test_mismatched_base_is_refused(populated, tiny_base, tmp_path):
    result = runner.invoke(
        app, ["compose", "--task", "sa", "--lang", "ace", "--base", str(tiny_base), "-o", str(tmp_path / "m")]
    )
    assert "cannot compose SFTs trained on different base models" in one_line_error(result)
    assert not (tmp_path / "m").exists()


def test_existing_output_needs_force(populated, tmp_path):
    out = tmp_path / "m"
    assert runner.invoke(app, ["compose", "--task", "sa", "-o", str(out)]).exit_code == 0
    again = runner.invoke(app, ["compose", "--task", "sa", "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, ["compose", "--task", "sa", "-o", str(out), "--force"]).exit_code == 0


@pytest.fixture(scope="module")
def narrow_base(tmp_path_factory, toy_languages):
    """Another base with other shapes (hidden 32): its SFTs fit no tiny_base parameter."""
    from sftkit import toy

    texts = [text for language in toy_languages.values() for text in toy.corpus(language, 300)]
    return toy.build_tiny_base(tmp_path_factory.mktemp("narrow-base"), texts, hidden_size=32)


@pytest.fixture
def mixed(populated, narrow_base):
    populated.add(base_sft(AutoModelForMaskedLM.from_pretrained(narrow_base), "language", "jav", str(narrow_base), 4))
    return populated


@pytest.mark.parametrize("choose_base", [False, True])
def test_sfts_of_different_bases_are_refused_naming_both(mixed, tiny_base, narrow_base, tmp_path, choose_base):
    """With or without --base: the fingerprint refusal, not advice to pick a base, and no shape error."""
    base = ["--base", str(tiny_base)] if choose_base else []
    result = runner.invoke(app, ["compose", "--task", "sa", "--lang", "jav", *base, "-o", str(tmp_path / "m")])
    line = one_line_error(result)
    assert line.startswith("error: cannot compose SFTs trained on different base models")
    for name in ("task:sa@1", "lang:jav@1", str(tiny_base), str(narrow_base), "sha256:"):
        assert name in line
    assert "--base" not in line and "shape" not in line
    assert not (tmp_path / "m").exists()


def test_a_base_of_other_shapes_is_refused_as_another_base(populated, tiny_base, narrow_base, tmp_path):
    result = runner.invoke(app, ["compose", "--task", "sa", "--base", str(narrow_base), "-o", str(tmp_path / "m")])
    line = one_line_error(result)
    assert f"SFT 'task:sa@1' was trained on base {str(tiny_base)!r} (sha256:" in line
    assert f"not on {str(narrow_base)!r}" in line
    assert not (tmp_path / "m").exists()


def test_sftkit_base_stands_in_for_a_hub_base_offline(sftkit_home, tiny_base, tmp_path, monkeypatch):
    """SFTs that name a Hub base compose offline on a local copy given by SFTKIT_BASE; without it, one line."""
    registry = Registry.open()
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_base, num_labels=3)
    registry.add(base_sft(classifier, "task", "sa", "FacebookAI/xlm-roberta-base", 2))
    line = one_line_error(runner.invoke(app, ["compose", "--task", "sa", "-o", str(tmp_path / "m")]))
    assert "'FacebookAI/xlm-roberta-base'" in line and "SFTKIT_BASE" in line and "HF_HUB_OFFLINE" in line
    monkeypatch.setenv("SFTKIT_BASE", str(tiny_base))
    result = runner.invoke(app, ["compose", "--task", "sa", "-o", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
