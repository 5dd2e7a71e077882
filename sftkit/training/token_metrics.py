"""Token-task scores: entity-level precision / recall / F1 for BIO-tagged NER (seqeval), word accuracy for POS.

The scores come from a count table, which sums across processes in a distributed run (like the
classification confusion matrix of :mod:`sftkit.training.evaluation`):

- one row per class — the entity types for BIO / IOBES labels (NER), the tags otherwise (POS) —
  holding ``[true positives, predicted, gold]``;
- a last row ``[words tagged correctly, words, words]``.

Entities are the spans that ``seqeval`` extracts in its default (conlleval-compatible) mode, so an ``I-``
tag after ``O`` starts an entity, and an entity counts as correct only with the same type and the same
first and last word; the micro scores equal ``seqeval.metrics.classification_report``'s ``micro avg``.
A word without a prediction (cut off by truncation) counts as ``O`` for NER and as wrong for POS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sftkit.errors import BadInputError
from sftkit.training.features import GOLD_TAGS, IGNORE, WORD_INDEX
from sftkit.training.token_data import OUTSIDE, entity_types

# The validation metric that picks the best checkpoint.
ENTITY_METRIC = "entity_f1"
TAG_METRIC = "accuracy"


def best_metric(labels: Sequence[str]) -> str:
    """``entity_f1`` for BIO / IOBES entity labels (NER), ``accuracy`` for any other tag set (POS)."""
    return ENTITY_METRIC if entity_types(labels) is not None else TAG_METRIC


def count_classes(labels: Sequence[str]) -> list[str]:
    """The row names of the count table: the entity types (NER) or the tags themselves (POS)."""
    return entity_types(labels) or list(labels)


def word_tags(
    predictions: torch.Tensor, gold_ids: torch.Tensor, labels: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """(gold, predicted) word-level tag sequences, one per row, read at the positions whose gold id is not -100.

    ``predictions``: logits ``[batch, tokens, labels]`` or predicted ids ``[batch, tokens]``; ``gold_ids``:
    the ``labels`` of a :func:`~sftkit.training.features.tokenize_tagged` batch (first sub-tokens only).
    """
    predictions, gold_ids = torch.as_tensor(predictions), torch.as_tensor(gold_ids)
    if predictions.dim() == gold_ids.dim() + 1:
        predictions = predictions.argmax(dim=-1)
    if predictions.shape != gold_ids.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} do not match labels {tuple(gold_ids.shape)}")
    gold_tags, predicted_tags = [], []
    for predicted_row, gold_row in zip(predictions.tolist(), gold_ids.tolist(), strict=True):
        positions = [i for i, gold in enumerate(gold_row) if gold != IGNORE]
        gold_tags.append([labels[gold_row[i]] for i in positions])
        predicted_tags.append([labels[predicted_row[i]] for i in positions])
    return gold_tags, predicted_tags


def sentence_tags(
    predictions: torch.Tensor, batch: Mapping[str, torch.Tensor], labels: Sequence[str]
) -> tuple[list[list[str]], list[list[str | None]]]:
    """(gold, predicted) tags of every word of each sentence of a scored batch (``tokenize_tagged(scored=True)``).

    A word without a prediction (cut off by truncation, or tokenised to nothing) is ``None``, which
    :func:`tag_counts` scores as ``O`` (NER) or wrong (POS): the scores are those of the whole sentences.
    """
    _, seen = word_tags(predictions, batch["labels"], labels)
    gold, predicted = [], []
    for tag_ids, words, tags in zip(batch[GOLD_TAGS].tolist(), batch[WORD_INDEX].tolist(), seen, strict=True):
        gold.append([labels[tag] for tag in tag_ids if tag != IGNORE])
        row: list[str | None] = [None] * len(gold[-1])
        for word, tag in zip((word for word in words if word != IGNORE), tags, strict=True):
            row[word] = tag
        predicted.append(row)
    return gold, predicted


def tag_counts(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str | None]], labels: Sequence[str]
) -> torch.Tensor:
    """The int64 count table ``[len(count_classes(labels)) + 1, 3]`` (see the module docstring).

    A predicted sequence may be shorter than its gold one (truncation) or hold ``None`` (no prediction).
    """
    from seqeval.metrics.sequence_labeling import get_entities  # here: seqeval pulls in scikit-learn (+1.6 s)

    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sequences but {len(predicted)} predicted ones")
    known = set(labels)
    types = entity_types(labels)
    classes = types or list(labels)
    row = {name: i for i, name in enumerate(classes)}
    counts = torch.zeros(len(classes) + 1, 3, dtype=torch.long)
    for number, (gold_tags, predicted_tags) in enumerate(zip(gold, predicted, strict=True), start=1):
        if len(predicted_tags) > len(gold_tags):
            raise ValueError(f"sentence {number}: {len(predicted_tags)} predictions for {len(gold_tags)} words")
        predicted_tags = list(predicted_tags) + [None] * (len(gold_tags) - len(predicted_tags))
        if types is not None:
            predicted_tags = [OUTSIDE if tag is None else tag for tag in predicted_tags]
        for tag in (*gold_tags, *predicted_tags):
            if tag is not None and tag not in known:
                raise BadInputError(f"sentence {number}: unknown tag {tag!r} (expected one of {', '.join(labels)})")
        counts[-1, 0] += sum(g == p for g, p in zip(gold_tags, predicted_tags, strict=True))
        counts[-1, 1:] += len(gold_tags)
        if types is not None:
            gold_spans = get_entities(list(gold_tags))
            predicted_spans = get_entities(predicted_tags)
            matched = set(gold_spans) & set(predicted_spans)
            for column, spans in ((0, matched), (1, predicted_spans), (2, gold_spans)):
                for kind, _, _ in spans:
                    counts[row[kind], column] += 1
        else:
            for gold_tag, predicted_tag in zip(gold_tags, predicted_tags, strict=True):
                counts[row[gold_tag], 2] += 1
                if predicted_tag is not None:
                    counts[row[predicted_tag], 1] += 1
                    counts[row[gold_tag], 0] += gold_tag == predicted_tag
    return counts


def tag_scores(counts: torch.Tensor, labels: Sequence[str]) -> dict[str, Any]:
    """Scores of a count table from :func:`tag_counts` (summed over batches and processes).

    NER: ``{"entity_f1", "entity_precision", "entity_recall"`` (micro over entities), ``"macro_f1"`` (over
    the entity types that occur in the gold or the predictions), ``"accuracy"`` (words), ``"per_class"``
    ``{type: precision, recall, f1, support}``, ``"entities"`` (gold), ``"n"`` (words) ``}``.
    POS: ``{"accuracy", "macro_f1", "per_class"`` (per tag), ``"n"}``.
    """
    classes = count_classes(labels)
    if counts.shape != (len(classes) + 1, 3):
        raise ValueError(f"a count table for {len(classes)} classes has shape {(len(classes) + 1, 3)}")
    table = counts[:-1].double()
    correct, words = float(counts[-1, 0]), int(counts[-1, 1])
    true_positive, predicted, gold = table[:, 0], table[:, 1], table[:, 2]
    precision, recall, f1 = _prf(true_positive, predicted, gold)
    present = (gold > 0) | (predicted > 0)
    result: dict[str, Any] = {}
    if entity_types(labels) is not None:
        micro = _prf(true_positive.sum(), predicted.sum(), gold.sum())
        result |= {
            ENTITY_METRIC: float(micro[2]),
            "entity_precision": float(micro[0]),
            "entity_recall": float(micro[1]),
        }
    result |= {
        "accuracy": correct / words if words else 0.0,
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(gold[i]),
            }
            for i, name in enumerate(classes)
        },
    }
    if entity_types(labels) is not None:
        result["entities"] = int(gold.sum())
    result["n"] = words
    return result


def _prf(
    true_positive: torch.Tensor, predicted: torch.Tensor, gold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision, recall, F1, each 0 where undefined (seqeval's ``zero_division=0``)."""
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(gold > 0, true_positive / gold.clamp(min=1), torch.zeros_like(gold))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-300), torch.zeros_like(gold))
    return precision, recall, f1
