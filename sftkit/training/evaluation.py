"""Classification scores (macro-F1, accuracy, per class) of a model on labelled data; token-task scores.

Scores come from a confusion matrix, which sums across processes in a distributed run and is all a
checkpoint choice needs. Macro-F1 averages over the labels that occur in the gold labels or the
predictions (scikit-learn's convention), with F1 = 0 for a label never predicted correctly.

Token tasks (NER, POS) do the same with the count table of :mod:`sftkit.training.token_metrics`:
:func:`tag_counts_of` (summable) then ``token_metrics.tag_scores``; :func:`evaluate_tagger` scores a
token-classification model on a CoNLL / JSONL file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    DataCollatorWithPadding,
)

from sftkit.base_model import load_tokenizer
from sftkit.errors import BadInputError
from sftkit.training.data import load_labelled
from sftkit.training.features import (
    GOLD_TAGS,
    SCORING_KEYS,
    WORD_INDEX,
    fixed_batches,
    make_collator,
    tokenize_labelled,
    tokenize_tagged,
)
from sftkit.training.token_data import load_tagged
from sftkit.training.token_metrics import count_classes, sentence_tags, tag_counts, tag_scores


def confusion_matrix(gold: torch.Tensor, predicted: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``[gold, predicted]`` counts (int64)."""
    flat = gold.reshape(-1).long() * num_labels + predicted.reshape(-1).long()
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def scores(confusion: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
    """``{"macro_f1", "accuracy", "per_class": {label: precision, recall, f1, support}, "n"}``."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    gold = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    total = float(confusion.sum())
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(gold > 0, true_positive / gold.clamp(min=1), torch.zeros_like(gold))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-300), torch.zeros_like(gold))
    present = (gold > 0) | (predicted > 0)
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(gold[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "per_class": per_class,
        "n": int(total),
    }


@torch.no_grad()
def confusion_of(model: Any, batches: Iterable[dict[str, torch.Tensor]], num_labels: int) -> torch.Tensor:
    """Confusion matrix of ``model``'s argmax predictions on collated batches that carry ``labels``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for batch in batches:
        inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
        predicted = model(**inputs).logits.argmax(dim=-1).cpu()
        confusion += confusion_matrix(batch["labels"], predicted, num_labels)
    model.train(was_training)
    return confusion


def _classifier(model_or_dir: Any, tokenizer: Any, auto_class: Any) -> tuple[Any, Any, list[str]]:
    """The model (loaded with ``auto_class`` from a directory, or as given), its tokenizer and its labels."""
    if isinstance(model_or_dir, str | os.PathLike):
        directory = Path(model_or_dir)
        if not (directory / "config.json").is_file():
            raise BadInputError(f"{directory} is not a model directory (no config.json)")
        model = auto_class.from_pretrained(directory)
        tokenizer = tokenizer or directory
    else:
        model = model_or_dir
        tokenizer = tokenizer or model.config.name_or_path
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(str(tokenizer))
    id2label = {int(i): str(label) for i, label in model.config.id2label.items()}
    return model, tokenizer, [id2label[i] for i in range(len(id2label))]


def evaluate(
    model_or_dir: Any,
    data: str | os.PathLike[str] | Sequence[Any],
    *,
    tokenizer: Any = None,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "auto",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str = "label",
    pair: bool | None = None,
) -> dict[str, Any]:
    """Score a sequence classifier (a model directory such as ``sftkit compose`` writes, or a model).

    ``data``: a labelled file (CSV/TSV/JSONL, NusaX/SMSA/AmericasNLI formats) or in-memory examples.
    Labels come from the model's ``id2label``; a data label outside it is an error naming the line.
    """
    model, tokenizer, labels = _classifier(model_or_dir, tokenizer, AutoModelForSequenceClassification)
    columns = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    return scorer(
        data, tokenizer, labels, "sequence-classification", batch_size, max_length, device, pair=pair, **columns
    )(model)


def _device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def _length(tokenizer: Any, max_length: int | None) -> int:
    return max_length or min(512, getattr(tokenizer, "model_max_length", 512) or 512)


def scorer(
    data: str | os.PathLike[str] | Sequence[Any],
    tokenizer: Any,
    labels: Sequence[str],
    head: str = "sequence-classification",
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "auto",
    **reading: Any,
) -> Callable[[Any], dict[str, Any]]:
    """``model → evaluate``'s scores on ``data`` (``evaluate_tagger``'s for a ``token-classification`` head),
    the data read, tokenised and batched once.

    Why: ``sftkit compose --tune`` scores one model after another on the same small dev set. ``reading`` says how
    ``load_labelled`` (``text_column``, ``text_pair_column``, ``label_column``, ``pair``) or ``load_tagged``
    (``tokens_key``, ``tags_key``) reads ``data``.
    """
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(str(tokenizer))
    index, length = {label: i for i, label in enumerate(labels)}, _length(tokenizer, max_length)
    if head == "token-classification":
        sentences = load_tagged(data, list(labels), **reading).sentences
        items = tokenize_tagged(tokenizer, sentences, index, length, scored=True)
        collator = make_collator("tagging", tokenizer, 0.0)
        unpredicted = sum(len(item[GOLD_TAGS]) - len(item[WORD_INDEX]) for item in items)

        def measure(model: Any) -> dict[str, Any]:
            return tag_scores(tag_counts_of(model, batches, labels), labels) | {"unpredicted_words": unpredicted}
    else:
        examples = load_labelled(data, labels=list(labels), **reading).examples
        items, collator = tokenize_labelled(tokenizer, examples, index, length), DataCollatorWithPadding(tokenizer)

        def measure(model: Any) -> dict[str, Any]:
            return scores(confusion_of(model, batches, len(labels)), labels)

    items.sort(key=lambda item: len(item["input_ids"]))  # less padding; the scores ignore order
    batches = fixed_batches(items, collator, batch_size)
    target = _device(device)

    def score(model: Any) -> dict[str, Any]:
        model.to(target)
        return measure(model)

    return score


@torch.no_grad()
def tag_counts_of(model: Any, batches: Iterable[dict[str, torch.Tensor]], labels: Sequence[str]) -> torch.Tensor:
    """Token-task count table (``token_metrics.tag_counts``) of ``model``'s argmax predictions on collated
    ``tokenize_tagged(scored=True)`` batches, read at the first sub-token of each word; sums across processes.

    Every word of each sentence counts, also those cut off at ``max_length`` (``token_metrics.sentence_tags``),
    so validation during training and :func:`evaluate_tagger` score the same data alike.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = torch.zeros(len(count_classes(labels)) + 1, 3, dtype=torch.long)
    for batch in batches:
        inputs = {key: value.to(device) for key, value in batch.items() if key not in ("labels", *SCORING_KEYS)}
        predicted = model(**inputs).logits.argmax(dim=-1).cpu()
        counts += tag_counts(*sentence_tags(predicted, batch, labels), labels)
    model.train(was_training)
    return counts


def evaluate_tagger(
    model_or_dir: Any,
    data: str | os.PathLike[str] | Sequence[Any],
    *,
    tokenizer: Any = None,
    batch_size: int = 64,
    max_length: int | None = None,
    device: str = "auto",
    tokens_key: str = "tokens",
    tags_key: str = "tags",
) -> dict[str, Any]:
    """Score a token classifier (NER: entity F1 …; POS: accuracy …) on a CoNLL-style or JSONL file.

    Tags come from the model's ``id2label``; a data tag outside it is an error naming the line. Every word
    of the data is scored: a word that got no prediction (cut off at ``max_length``) counts as ``O`` (NER)
    or wrong (POS), and ``"unpredicted_words"`` says how many there were.
    """
    model, tokenizer, labels = _classifier(model_or_dir, tokenizer, AutoModelForTokenClassification)
    keys = {"tokens_key": tokens_key, "tags_key": tags_key}
    return scorer(data, tokenizer, labels, "token-classification", batch_size, max_length, device, **keys)(model)
