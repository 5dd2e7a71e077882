"""Token tasks (NER, POS) as task SFTs: train through the CLI, compose, load as a token classifier, evaluate.

The data follows a fixed lexicon of the toy source language, so a tiny model learns it in a few dozen steps:
its first 20 words are people (``PER``), the next 20 places (``LOC``), the rest ``O`` — a run of same-type
words is one entity (``B-`` then ``I-``); for POS every word's tag is its concept number modulo 3.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error
from safetensors.torch import load_file
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

from sftkit import toy
from sftkit.compose import compose
from sftkit.errors import BadInputError
from sftkit.sft import SparseFineTuning
from sftkit.training import make_config, train
from sftkit.training.evaluation import evaluate_tagger
from sftkit.training.token_data import TaggedSentence
from sftkit.training.trainer import TOKEN_SCORES

NER_LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
POS_TAGS = ("ADJ", "NOUN", "VERB")
QUICK = ["--recipe", "quick", "--batch-size", "32", "--max-steps", "30", "--eval-steps", "15"]  # toy-sized batches


def _sentences(scheme: str, n: int, seed: int) -> list[TaggedSentence]:
    language = toy.make_languages()[toy.SOURCE_LANGUAGE]
    concept = {}
    for index, word in enumerate(language.words):
        concept.setdefault(word, index)
    rng = random.Random(f"{scheme}-{seed}")
    sentences = []
    for _ in range(n):
        words = language.sentence(rng, rng.randint(4, 10))[0].split()
        concepts = [concept[word] for word in words]
        if scheme == "pos":
            sentences.append(TaggedSentence(words, [POS_TAGS[c % 3] for c in concepts]))
            continue
        tags, previous = [], None
        for c in concepts:
            kind = "PER" if c < 20 else "LOC" if c < 40 else None
            tags.append("O" if kind is None else f"{'I' if kind == previous else 'B'}-{kind}")
            previous = kind
        sentences.append(TaggedSentence(words, tags))
    return sentences


def _write_conll(path: Path, sentences: list[TaggedSentence]) -> Path:
    blocks = ["\n".join(f"{w}\t{t}" for w, t in zip(s.words, s.tags, strict=True)) for s in sentences]
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, sentences: list[TaggedSentence], tags_key: str) -> Path:
    lines = [json.dumps({"tokens": s.words, tags_key: s.tags}) for s in sentences]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _direct_tags(directory: Path, sentences: list[TaggedSentence]) -> list[list[str]]:
    """Each word's predicted tag, read at its first sub-token: plain transformers, no sftkit."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForTokenClassification.from_pretrained(directory).eval()
    predicted = []
    with torch.no_grad():
        for sentence in sentences:
            encoded = tokenizer(sentence.words, is_split_into_words=True, return_tensors="pt")
            ids = model(**encoded).logits[0].argmax(-1).tolist()
            firsts, seen = {}, set()
            for position, word in enumerate(encoded.word_ids(0)):
                if word is not None and word not in seen:
                    seen.add(word)
                    firsts[word] = model.config.id2label[ids[position]]
            predicted.append([firsts[i] for i in range(len(sentence.words))])
    return predicted


def test_ner_task_sft_trains_composes_runs_in_a_pipeline_and_evaluates(cli, tiny_base, tmp_path):
    train_file = _write_conll(tmp_path / "train.conll", _sentences("ner", 240, 1))
    test_sentences = _sentences("ner", 60, 2)
    test_file = _write_conll(tmp_path / "test.conll", test_sentences)
    result = cli("train", "--task", "ner", "--base", tiny_base, "--train", train_file, *QUICK, "-o", tmp_path / "sft")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "task:ner@1"
    assert "best validation entity_f1" in result.stderr

    sft = SparseFineTuning.load(tmp_path / "sft")
    meta = sft.metadata
    assert (meta.kind, meta.task, meta.head_type, meta.labels) == ("task", "ner", "token-classification", NER_LABELS)
    assert meta.trainer["task_type"] == "token" and meta.trainer["recipe"] == "quick"
    assert set(sft.full) == {"classifier.weight", "classifier.bias"}
    assert sft.full["classifier.weight"].shape[0] == len(NER_LABELS)
    for phase in ("full", "sparse"):
        assert {"entity_f1", "entity_precision", "entity_recall", "accuracy"} <= set(meta.metrics[phase]["history"][-1])
        assert meta.metrics[phase]["entity_f1"] > 0.3  # it learned the lexicon (0 before training)

    out = tmp_path / "model"
    result = cli("compose", "--task", "ner", "-o", out)
    assert result.exit_code == 0, result.output
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert type(model).__name__ == "XLMRobertaForTokenClassification"
    assert [model.config.id2label[i] for i in range(len(NER_LABELS))] == NER_LABELS
    assert 'pipeline_tag: "token-classification"' in (out / "README.md").read_text()
    line = one_line_error(cli("compose", "--task", "ner", "--head", "sequence-classification", "-o", tmp_path / "x"))
    assert "trained with a token-classification head" in line
    with pytest.raises(BadInputError, match="trained with a token-classification head"):
        compose(str(tiny_base), [sft], head="sequence-classification")
    # The streamed directory holds exactly the in-memory composition's weights.
    in_memory = compose(str(tiny_base), [sft])
    assert type(in_memory).__name__ == "XLMRobertaForTokenClassification"
    stored = load_file(str(out / "model.safetensors"))
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(stored[name], tensor), name

    # pipeline("token-classification") tags every word as the model's own argmax at its first sub-token.
    direct = _direct_tags(out, test_sentences)
    tagger = pipeline("token-classification", model=str(out), ignore_labels=[])
    for sentence, expected in zip(test_sentences[:5], direct[:5], strict=True):
        text = " ".join(sentence.words)
        assert _first_of_each_word(tagger(text), text) == expected
    assert any(tag != "O" for tags in direct for tag in tags)

    # sftkit eval (the directory, and the registered SFT composed on its base) = seqeval on the direct tags.
    gold = [s.tags for s in test_sentences]
    for target in (out, "ner"):
        result = cli("eval", target, "--data", test_file, "--json")
        assert result.exit_code == 0, result.output
        scores = json.loads(result.stdout)
        assert scores["entity_f1"] == pytest.approx(f1_score(gold, direct), abs=1e-12)
        assert scores["entity_precision"] == pytest.approx(precision_score(gold, direct), abs=1e-12)
        assert scores["entity_recall"] == pytest.approx(recall_score(gold, direct), abs=1e-12)
        assert scores["accuracy"] == pytest.approx(accuracy_score(gold, direct), abs=1e-12)
        assert set(scores["per_class"]) == {"LOC", "PER"} and scores["n"] == sum(len(g) for g in gold)
        assert scores["entities"] == sum(t.startswith("B-") for g in gold for t in g)
    table = cli("eval", out, "--data", test_file)
    assert table.exit_code == 0 and "entity F1" in table.stdout and "PER" in table.stdout


def _first_of_each_word(tokens: list[dict], text: str) -> list[str]:
    """The pipeline's label at the first sub-token of each whitespace-separated word (by character offsets)."""
    starts, position = [], 0
    for word in text.split(" "):
        starts.append(position)
        position += len(word) + 1
    by_start = {t["start"]: t["entity"] for t in tokens}
    return [by_start[start] for start in starts]


def test_pos_task_sft_from_jsonl_is_selected_by_accuracy(cli, tiny_base, tmp_path):
    train_file = _write_jsonl(tmp_path / "train.jsonl", _sentences("pos", 200, 3), "upos")
    test_sentences = _sentences("pos", 40, 4)
    test_file = _write_jsonl(tmp_path / "test.jsonl", test_sentences, "upos")
    args = ["--task", "pos", "--base", tiny_base, "--train", train_file, "--label-column", "upos"]
    result = cli("train", *args, *QUICK[:2], "--max-steps", "20", "--eval-steps", "20")
    assert result.exit_code == 0, result.output
    assert "best validation accuracy" in result.stderr
    result = cli("show", "pos", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["trainer"]["task_type"] == "token" and shown["config"]["head_type"] == "token-classification"
    assert shown["config"]["labels"] == list(POS_TAGS)
    result = cli("eval", "pos", "--data", test_file, "--label-column", "upos", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert "entity_f1" not in scores and set(scores["per_class"]) == set(POS_TAGS)
    assert 1 / 3 < scores["accuracy"] <= 1  # better than chance over three tags
    out = tmp_path / "model"
    assert cli("compose", "--task", "pos", "-o", out).exit_code == 0
    direct = _direct_tags(out, test_sentences)
    gold = [s.tags for s in test_sentences]
    assert scores["accuracy"] == pytest.approx(accuracy_score(gold, direct), abs=1e-12)


@pytest.mark.parametrize(
    ("content", "suffix", "extra", "expected"),
    [
        ("Ujung\tB-LOC\nBatee\n", ".conll", [], ["line 2", "no tag"]),
        ("Ujung\tB-LOC\n", ".conll", ["--task-type", "tokens"], ["task type must be one of sequence, token"]),
        ("id,text,label\n1,a b,O\n", ".csv", [], ["token tasks read CoNLL", "not CSV"]),
        ("Ujung\tO\nBatee\tO\n\nis\tO\n", ".conll", [], ["only one tag (O)"]),
    ],
)
def test_bad_token_input_is_one_line_and_exit_code_2(cli, tiny_base, tmp_path, content, suffix, extra, expected):
    data = tmp_path / f"data{suffix}"
    data.write_text(content, encoding="utf-8")
    result = cli("train", "--task", "ner", "--base", tiny_base, "--train", data, *extra, *QUICK)
    line = one_line_error(result)
    for part in expected:
        assert part in line, line


def test_task_type_is_resolved_from_the_name_then_the_data(tmp_path):
    conll = _write_conll(tmp_path / "chunks.conll", _sentences("ner", 3, 0))
    tagged_jsonl = _write_jsonl(tmp_path / "tagged.jsonl", _sentences("pos", 3, 0), "tags")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "a b", "label": "x"}\n', encoding="utf-8")
    resolved = {
        "ner": make_config(task="ner").resolved_task_type,
        "conll": make_config(task="chunk", train=str(conll)).resolved_task_type,
        "jsonl": make_config(task="chunk", train=str(tagged_jsonl)).resolved_task_type,
        "texts": make_config(task="chunk", train=str(texts)).resolved_task_type,
        "explicit": make_config(task="ner", task_type="sequence").resolved_task_type,
        "sa": make_config(task="sa").resolved_task_type,
        "language": make_config(language="ace").resolved_task_type,
    }
    assert resolved == {
        "ner": "token",
        "conll": "token",
        "jsonl": "token",
        "texts": "sequence",
        "explicit": "sequence",
        "sa": "sequence",
        "language": None,
    }
    # The paper-sa recipe selects by macro-F1; a token task by entity F1 (BIO tags) or accuracy (other tags).
    assert make_config(task="ner").best_metric == "entity_f1"
    assert make_config(task="chunk", train=str(conll)).best_metric == "entity_f1"
    assert make_config(task="chunk", train=str(tagged_jsonl)).best_metric == "accuracy"
    assert make_config(task="pos", metric="macro_f1").best_metric == "macro_f1"
    assert make_config(task="ner").to_dict()["task_type"] == "token"
    assert make_config(task="ner").collator_kind == "tagging"
    for bad, message in (
        ({"task": "ner", "task_type": "words"}, "task type must be one of"),
        ({"language": "ace", "task_type": "token"}, "task SFTs only"),
        ({"task": "sa", "metric": "entity_f1"}, "entity_f1 scores token tasks"),
        ({"task": "ner", "task_type": "sequence", "metric": "entity_f1"}, "entity_f1 scores token tasks"),
        ({"task": "ner", "metric": "loss"}, "a token task is selected by"),
    ):
        with pytest.raises(BadInputError, match=message):
            make_config(**bad)


def test_in_memory_tagged_sentences_need_a_token_task(tiny_base):
    sentences = [(s.words, s.tags) for s in _sentences("ner", 20, 5)]
    config = make_config(task="chunk", base_model=str(tiny_base), recipe="quick", max_steps=1)
    with pytest.raises(BadInputError, match="set task_type='token'"):
        train(config, train_data=sentences)


def test_in_memory_token_task_with_given_tags_and_validation(tiny_base):
    sentences = [(s.words, s.tags) for s in _sentences("ner", 40, 6)]
    held = [(s.words, s.tags) for s in _sentences("ner", 10, 7)]
    options = {"base_model": str(tiny_base), "recipe": "quick", "max_steps": 4, "eval_steps": 2, "task_type": "token"}
    with pytest.raises(BadInputError, match="set metric='entity_f1'"):  # the tags are only known from the data
        train(make_config(task="chunk", **options), train_data=sentences)
    config = make_config(task="chunk", labels=[*NER_LABELS, "B-ORG", "I-ORG"], **options)
    result = train(config, train_data=sentences, validation_data=held)
    meta = result.sft.metadata
    assert meta.head_type == "token-classification" and meta.labels == [*NER_LABELS, "B-ORG", "I-ORG"]
    assert meta.trainer["validation_examples"] == 10 and meta.data["validation"]["sentences"] == 10
    assert "entity_f1" in meta.metrics["sparse"] and type(result.model).__name__ == "XLMRobertaForTokenClassification"


def test_validation_during_training_equals_sftkit_eval_on_truncated_sentences(tiny_base):
    """At max_length 8 most held-out sentences lose words: the best step's validation scores (θ2 is that
    step's model) still equal ``evaluate_tagger`` on the same sentences, which scores every word."""
    sentences = [(s.words, s.tags) for s in _sentences("ner", 40, 6)]
    held = [(s.words, s.tags) for s in _sentences("ner", 10, 7)]
    config = make_config(
        task="ner",
        base_model=str(tiny_base),
        recipe="quick",
        max_steps=4,
        eval_steps=2,
        max_length=8,
        labels=NER_LABELS,
    )
    result = train(config, train_data=sentences, validation_data=held)
    sparse = result.sft.metadata.metrics["sparse"]
    (best,) = [entry for entry in sparse["history"] if entry["step"] == sparse["best_step"]]
    evaluated = evaluate_tagger(result.model, held, tokenizer=result.tokenizer, device="cpu", max_length=8)
    assert evaluated["unpredicted_words"] > 0
    assert {key: best[key] for key in TOKEN_SCORES} == pytest.approx({key: evaluated[key] for key in TOKEN_SCORES})
