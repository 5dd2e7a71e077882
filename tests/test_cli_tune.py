"""``sftkit compose --tune DEV``: the search, its table and progress, the record, the written model, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import one_line_error
from merge_helpers import random_sfts
from safetensors.torch import load_file

from sftkit import toy
from sftkit.compose import compose
from sftkit.registry import Registry
from sftkit.training import evaluate

LANGUAGES = ("sa", "min", "ind")  # the task, then two related languages' SFTs (a target with none of its own)


@pytest.fixture
def registry(sftkit_home, tiny_base):
    registry = Registry.open()
    for sft, name in zip(random_sfts(tiny_base), LANGUAGES, strict=True):
        sft.metadata.base_model = str(tiny_base)
        if sft.metadata.kind == "language":
            sft.metadata.language = name
        registry.add(sft)
    return registry


@pytest.fixture(scope="module")
def dev(tmp_path_factory, toy_languages):
    return toy.write_labelled_csv(tmp_path_factory.mktemp("dev") / "dev.csv", toy.labelled(toy_languages["ace"], 60))


def _written(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_tune_a_mix_of_two_languages_writes_the_best_of_the_grid(cli, registry, tiny_base, dev, tmp_path):
    out = tmp_path / "mix"
    result = cli("compose", "-t", "sa", "-l", "min", "-l", "ind", "--tune", dev, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    tuning = record["tuning"]
    assert (tuning["dev"], tuning["metric"], tuning["search"]) == (str(dev), "macro_f1", "grid")
    assert tuning["tuned"] == ["lang:min@1", "lang:ind@1"]
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    given = [1.0, 1.0, 1.0]  # tried first: among equal scores the search keeps it
    assert [t["weights"] for t in tuning["trials"]] == [given] + [
        [1.0, a, b] for a in grid for b in grid if [1.0, a, b] != given
    ]
    best = max(tuning["trials"], key=lambda t: t["score"])
    assert tuning["chosen"] == {"weights": best["weights"], "density": None} and tuning["score"] == best["score"]
    assert [p["weight"] for p in record["sfts"]] == best["weights"]
    assert len({t["score"] for t in tuning["trials"]}) > 1  # the weights really change the predictions

    sfts = [registry.load(f"{kind}:{name}") for kind, name in zip(("task", "lang", "lang"), LANGUAGES, strict=True)]
    written = _written(out)
    for name, tensor in compose(str(tiny_base), sfts, best["weights"]).state_dict().items():
        assert torch.equal(written[name], tensor), name
    # A trial's score is what `sftkit eval` gives the model composed with its weights.
    for trial in (tuning["trials"][0], tuning["trials"][17]):
        model = compose(str(tiny_base), sfts, trial["weights"])
        assert evaluate(model, dev, tokenizer=str(tiny_base))["macro_f1"] == trial["score"]
    assert "Weights chosen by `--tune`" in (out / "README.md").read_text()


def test_tune_a_ties_merge_prints_the_table_and_searches_d(cli, registry, dev, tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKIT_LOG_INTERVAL", "0")
    out = tmp_path / "ties"
    arguments = ["-t", "sa", "-l", "min", "--merge", "ties", "--tune", dev, "--tune-weights", "0.5,1"]
    result = cli("compose", *arguments, "--tune-densities", "0.5,1", "-o", out)
    assert result.exit_code == 0, result.output
    assert "4 trials (grid search)" in result.stdout
    assert "w lang:min@1" in result.stdout and "macro_f1" in result.stdout
    assert "tuning: trial 1/4" in result.stderr and "tuning: trial 4/4" in result.stderr
    tuning = json.loads((out / "sftkit_compose.json").read_text())["tuning"]
    trials = [(t["weights"][1], t["density"]) for t in tuning["trials"]]
    assert trials == [(1.0, 1.0), (0.5, 0.5), (0.5, 1.0), (1.0, 0.5)]  # as given first, then the rest of the grid
    merge = json.loads((out / "sftkit_compose.json").read_text())["merge"]
    assert merge == {"method": "ties", "density": tuning["chosen"]["density"], "seed": None, "normalize": True}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-t", "sa", "--tune", "DEV"], "give at least one language SFT"),
        (["-l", "min", "--head", "none", "--tune", "DEV"], "--tune scores a classifier on labelled data"),
        (["-t", "sa", "-l", "min", "--tune", "missing.csv"], "--tune: no dev set at missing.csv"),
        (["-t", "sa", "-l", "min", "--tune", "DEV", "--tune-weights", "1,x"], "--tune-weights must be comma-separated"),
        (["-t", "sa", "-l", "min", "--merge", "ties", "--tune", "DEV", "--tune-densities", "0,1"], "in (0, 1]"),
        (["-t", "sa", "-l", "min", "--tune", "DEV", "--tune-metric", "f2"], "--tune-metric must be one of macro_f1"),
        (["-t", "sa", "-l", "min", "--tune", "DEV", "--tune-rounds", "0"], "at least one round"),
    ],
)
def test_bad_tune_input_is_one_line(cli, registry, dev, tmp_path, arguments, message):
    result = cli("compose", *[str(dev) if a == "DEV" else a for a in arguments], "-o", tmp_path / "m")
    assert message in one_line_error(result)
    assert not (tmp_path / "m").exists()


def test_tune_a_ner_task_sft_maximises_entity_f1(cli, registry, tiny_base, toy_languages, tmp_path):
    """A token task SFT: the dev set is CoNLL, the metric entity F1, and the trials score what `eval` scores."""
    from transformers import AutoModelForTokenClassification

    from sftkit.params import head_parameters
    from sftkit.sft import SFTMetadata, SparseFineTuning
    from sftkit.training import evaluate_tagger

    tags = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    tagger = AutoModelForTokenClassification.from_pretrained(tiny_base, num_labels=len(tags))
    task = registry.load("task:sa")
    head = {
        name: torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) for name, p in head_parameters(tagger)
    }
    metadata = SFTMetadata(
        kind="task", task="ner", labels=tags, head_type="token-classification", base_model=str(tiny_base)
    )
    registry.add(SparseFineTuning(task.diffs, head, metadata))
    dev = tmp_path / "dev.conll"
    sentences = [text.split() for text, _ in toy.labelled(toy_languages["ace"], 40)]
    dev.write_text(
        "\n\n".join("\n".join(f"{w}\t{tags[(i + j) % 5]}" for j, w in enumerate(s)) for i, s in enumerate(sentences))
    )
    out = tmp_path / "ner"
    result = cli("compose", "-t", "ner", "-l", "min", "--tune", dev, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    tuning = json.loads(result.stdout)["tuning"]
    assert tuning["metric"] == "entity_f1" and len(tuning["trials"]) == 5
    assert len({t["score"] for t in tuning["trials"]}) > 1 and tuning["score"] == max(
        t["score"] for t in tuning["trials"]
    )
    sfts = [registry.load("task:ner"), registry.load("lang:min")]
    for trial in tuning["trials"][::2]:
        model = compose(str(tiny_base), sfts, trial["weights"])
        assert evaluate_tagger(model, dev, tokenizer=str(tiny_base))["entity_f1"] == trial["score"]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["XLMRobertaForTokenClassification"]
