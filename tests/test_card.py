"""Model cards (``sftkit.card``): Hub-style front matter and the actual numbers of the SFT they describe."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from sftkit.card import composed_model_card, sft_model_card
from sftkit.sft import CARD_NAME, SFTMetadata, SparseFineTuning


def _split(card: str) -> tuple[dict, str]:
    """(front matter parsed as YAML, body)."""
    assert card.startswith("---\n")
    front, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def _task_metadata(**overrides) -> SFTMetadata:
    fields = {
        "kind": "task",
        "task": "sentiment",
        "labels": ["negative", "neutral", "positive"],
        "base_model": "FacebookAI/xlm-roberta-base",
        "base_fingerprint": "sha256:0123456789abcdef",
        "method": "deftx",
        "rank": "90var",
        "keep": 0.25,
        "k": 7_600_000,
        "density": 0.027_812_5,
        "metrics": {"macro_f1": 0.8125, "accuracy": 0.875},
        "source_sft": {"reference": "sftkit/ace-lang@3", "sha256": "abc", "language": "ace"},
    }
    return SFTMetadata(**{**fields, **overrides})


def test_task_card_front_matter():
    front, _ = _split(sft_model_card(_task_metadata(), 7_600_000))
    assert front == {
        "base_model": "FacebookAI/xlm-roberta-base",
        "library_name": "sftkit",
        "tags": ["sftkit", "deft-x", "sparse-fine-tuning", "task-sft"],
    }  # a task SFT without a language has no language key at all


def test_task_card_body_states_the_sfts_numbers_and_labels():
    _, body = _split(sft_model_card(_task_metadata(), 7_612_345))
    assert "# sentiment — task SFT for `sentiment` (labels: negative, neutral, positive)" in body
    assert "sparse fine-tuning of `FacebookAI/xlm-roberta-base`" in body
    assert "using **deftx** (rank `90var`, keep 0.25, k = 7600000)" in body
    assert "- tuned entries: 7,612,345 (density 2.7812% of the maskable encoder parameters)" in body
    assert "- base fingerprint: `sha256:0123456789abcdef`" in body
    assert "- trained on top of the source-language SFT `sftkit/ace-lang@3`" in body
    metrics_line = next(line for line in body.splitlines() if line.startswith("- metrics: "))
    assert json.loads(metrics_line.removeprefix("- metrics: ").strip("`")) == {"macro_f1": 0.8125, "accuracy": 0.875}


def test_language_card():
    metadata = SFTMetadata(
        kind="language",
        language="ace",
        base_model="intfloat/multilingual-e5-small",
        method="lt-sft",
        density=None,
        keep=None,
        k=123,
    )
    front, body = _split(sft_model_card(metadata, 123))
    assert front["language"] == ["ace"]
    assert front["tags"] == ["sftkit", "lt-sft", "sparse-fine-tuning", "language-sft"]
    assert front["base_model"] == "intfloat/multilingual-e5-small"
    assert "# ace — language SFT for `ace`" in body
    assert "using **lt-sft** (rank `none`, keep " in body
    assert ", k = 123)." in body
    assert "- tuned entries: 123 (density unknown of" in body
    assert "labels:" not in body
    assert "- metrics:" not in body
    assert "source-language SFT" not in body


def test_front_matter_survives_awkward_strings():
    """Values are JSON-quoted, so colons, quotes and non-ASCII stay one YAML scalar."""
    metadata = _task_metadata(base_model='org/model: "v2" # not a comment', task="sa", labels=["négatif", "a, b"])
    front, body = _split(sft_model_card(metadata, 1))
    assert front["base_model"] == 'org/model: "v2" # not a comment'
    assert "(labels: négatif, a, b)" in body


def test_saved_sft_directory_carries_a_card_with_its_real_entry_count(tmp_path):
    generator = torch.Generator().manual_seed(0)
    deltas = {
        "layer.0.weight": torch.randn(6, 5, generator=generator) * (torch.rand(6, 5, generator=generator) < 0.3),
        "layer.0.bias": torch.tensor([0.0, 1.5, 0.0, -2.0]),
    }
    metadata = _task_metadata(density=0.1, k=None)
    sft = SparseFineTuning.from_dense_deltas(deltas, {"classifier.weight": torch.ones(3, 5)}, metadata)
    expected_entries = int(sum((d != 0).sum() for d in deltas.values()))
    assert sft.num_entries == expected_entries > 2
    directory = sft.save(tmp_path / "sft")
    card = (directory / CARD_NAME).read_text()
    assert f"- tuned entries: {expected_entries} (density 10.0000% of" in card
    assert card == sft_model_card(SparseFineTuning.load(directory).metadata, expected_entries)


def _parts():
    return [
        {"kind": "task", "reference": "sftkit/sa@2", "name": "sa", "weight": 1.0, "method": "deftx", "language": None},
        {"kind": "language", "reference": None, "name": "ace", "weight": 0.5, "method": "lt-sft", "language": "ace"},
        {"kind": "language", "reference": "bug-lang", "name": "bug", "weight": -0.25, "method": "deftx"},
        {
            "kind": "language",
            "reference": "ace-2",
            "name": "ace",
            "weight": 0.125,
            "method": "deftx",
            "language": "ace",
        },
    ]


def test_composed_card_lists_every_part_with_its_weight_and_the_labels():
    card = composed_model_card("FacebookAI/xlm-roberta-base", _parts(), ["negative", "neutral", "positive"])
    front, body = _split(card)
    assert front == {
        "base_model": "FacebookAI/xlm-roberta-base",
        "language": ["ace"],  # deduplicated; parts without a language add none
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["sftkit", "deft-x", "sparse-fine-tuning", "composed"],
    }
    lines = [line for line in body.splitlines() if line.startswith("- ")]
    assert lines == [
        "- task SFT `sftkit/sa@2` × 1.0 (deftx)",
        "- language SFT `ace` × 0.5 (lt-sft)",  # no reference: its name
        "- language SFT `bug-lang` × -0.25 (deftx)",
        "- language SFT `ace-2` × 0.125 (deftx)",
    ]
    assert "# Composed model on `FacebookAI/xlm-roberta-base`" in body
    assert "Labels: negative, neutral, positive." in body


@pytest.mark.parametrize("labels", [None, []])
def test_composed_card_without_labels(labels):
    front, body = _split(composed_model_card("base", _parts()[1:2], labels))
    assert front["language"] == ["ace"]
    assert "Labels:" not in body


def test_composed_card_languages_are_sorted_and_the_key_dropped_when_none():
    parts = [
        {"kind": "language", "name": "zu", "weight": 1, "method": "deftx", "language": "zu"},
        {"kind": "language", "name": "ace", "weight": 1, "method": "deftx", "language": "ace"},
    ]
    assert _split(composed_model_card("b", parts, None))[0]["language"] == ["ace", "zu"]
    assert "language" not in _split(composed_model_card("b", [{**parts[0], "language": None}], None))[0]
