"""A run's examples: read, split into training and validation, tokenised — one stream or one per source.

Language SFTs read raw text (MLM); task SFTs read labelled texts or, for token tasks (NER, POS), tagged
sentences. Validation data is given or held out of the training data (``holdout``, seeded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sftkit.errors import BadInputError
from sftkit.training.config import TrainConfig
from sftkit.training.data import HUB_PREFIX, Corpus, LabelledData, load_corpus, load_labelled
from sftkit.training.features import holdout_split, tokenize_corpus, tokenize_labelled, tokenize_tagged
from sftkit.training.token_data import label_order, load_tagged, looks_tagged
from sftkit.training.token_metrics import best_metric


@dataclass(frozen=True)
class RunData:
    """One stream's examples, tokenised, with the label names and a record of where they came from."""

    train_items: list[dict[str, Any]]
    validation_items: list[dict[str, Any]]
    labels: list[str] | None
    record: dict[str, Any]


def load_run_data(config: TrainConfig, tokenizer: Any, train_data: Any, validation_data: Any) -> RunData:
    """Read and tokenise the training data and the validation data (given, or held out of training)."""
    cfg = config
    train_source = train_data if train_data is not None else cfg.train
    if train_source is None:
        raise BadInputError(f"no training data: pass {'--corpus' if cfg.kind == 'language' else '--train'} FILE")
    validation_source = validation_data if validation_data is not None else cfg.validation
    length = cfg.max_length
    labels: list[str] | None = None
    if cfg.kind == "language":
        corpus = load_corpus(train_source, cfg.text_column)
        held: Corpus | None = None
        if validation_source is not None:
            held = load_corpus(validation_source, cfg.text_column)
            train_texts, held_texts = corpus.texts, held.texts
        else:
            train_texts, held_texts = holdout_split(corpus.texts, cfg.holdout, cfg.seed)
        train_items = tokenize_corpus(tokenizer, train_texts, length)
        validation_items = tokenize_corpus(tokenizer, held_texts, length)
        record = {"train": corpus.describe(), "validation": held.describe() if held else None}
    elif cfg.token_task:
        train_items, validation_items, labels, record = _load_tagged_data(
            cfg, tokenizer, train_source, validation_source
        )
    else:
        if cfg.task_type is None and looks_tagged(train_source):
            raise BadInputError(
                f"the training data of task {cfg.task!r} is tagged sentences, but the run was set up for a sequence "
                "task (its training file was not known): set task_type='token' (--task-type token)"
            )
        options = {
            "text_column": cfg.text_column,
            "text_pair_column": cfg.text_pair_column,
            "label_column": cfg.label_column,
        }
        labelled: LabelledData = load_labelled(train_source, pair=cfg.is_pair, labels=cfg.labels, **options)
        labels = list(cfg.labels) if cfg.labels else labelled.labels
        if len(labels) < 2:
            raise BadInputError(f"{labelled.source}: only one label ({labels[0]}); a classifier needs two")
        label2id = {label: i for i, label in enumerate(labels)}
        held_data = None
        if validation_source is not None:
            held_data = load_labelled(validation_source, pair=labelled.pair, labels=labels, **options)
            train_examples, held_examples = labelled.examples, held_data.examples
        else:
            train_examples, held_examples = holdout_split(labelled.examples, cfg.holdout, cfg.seed)
        train_items = tokenize_labelled(tokenizer, train_examples, label2id, length)
        validation_items = tokenize_labelled(tokenizer, held_examples, label2id, length)
        record = {"train": labelled.describe(), "validation": held_data.describe() if held_data else None}
    if record["validation"] is None:
        record["validation"] = {"held_out_of_train": cfg.holdout}
    if not train_items or not validation_items:
        raise BadInputError("the data is too small to form training and validation batches")
    return RunData(train_items, validation_items, labels, record)


def _load_tagged_data(
    cfg: TrainConfig, tokenizer: Any, train_source: Any, validation_source: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str], dict[str, Any]]:
    """Token tasks (NER, POS): CoNLL / JSONL sentences, labelled at each word's first sub-token.

    Tags come from ``cfg.labels`` (which also names integer JSONL tags) or from the data (``label_order``);
    the validation data (or the held-out sentences) must use the same tags.
    """
    for source in (train_source, validation_source):
        if isinstance(source, str) and source.startswith(HUB_PREFIX):
            raise BadInputError(f"{source}: token tasks read CoNLL or JSONL files (or in-memory sentences)")
        if isinstance(source, str | Path) and Path(source).suffix.lower() == ".csv":
            raise BadInputError(f"{source}: token tasks read CoNLL (word<TAB>tag) or JSONL (tokens, tags), not CSV")
    tokens_key, tags_key = cfg.token_keys
    tagged = load_tagged(train_source, cfg.labels, tokens_key=tokens_key, tags_key=tags_key)
    labels = tagged.labels
    if len(labels) < 2:
        raise BadInputError(f"{tagged.source}: only one tag ({labels[0]}); a tagger needs two")
    wanted = best_metric(labels)
    if cfg.metric is None and cfg.best_metric != wanted:
        raise BadInputError(
            f"{tagged.source}: these tags are scored by {wanted}, but the run was set up to select by "
            f"{cfg.best_metric} (its tags were not known): set metric={wanted!r} or labels=[…]"
        )
    held = None
    if validation_source is not None:
        held = load_tagged(validation_source, labels, tokens_key=tokens_key, tags_key=tags_key)
        train_sentences, held_sentences = tagged.sentences, held.sentences
    else:
        train_sentences, held_sentences = holdout_split(tagged.sentences, cfg.holdout, cfg.seed)
    label2id = {label: i for i, label in enumerate(labels)}
    train_items = tokenize_tagged(tokenizer, train_sentences, label2id, cfg.max_length)
    validation_items = tokenize_tagged(tokenizer, held_sentences, label2id, cfg.max_length, scored=True)
    record = {"train": tagged.describe(), "validation": held.describe() if held else None}
    return train_items, validation_items, labels, record


def load_source_data(
    config: TrainConfig, tokenizer: Any, data: tuple[Any, Any], languages: Sequence[str]
) -> list[RunData]:
    """Each source language's data (in ``languages`` order), all with one label set.

    A source's data comes from ``data`` when it is given as mappings by language, else from
    ``config.sources``. Labels: ``config.labels``, else the union of the sources' labels (the LT-SFT
    reference's multi-source recipes give one label file for all sources).
    """

    def read(language: str, labels: Sequence[str] | None) -> RunData:
        given = (config.sources or {}).get(language, {})
        train, validation = (part.get(language) if isinstance(part, Mapping) else None for part in data)
        train = train if train is not None else given.get("train")
        if train is None:
            raise BadInputError(f"source language {language!r} has no training data: give it as {language}=FILE")
        # One file per part: the run's task type and metric were decided once, from all of the sources.
        part = replace(
            config,
            sources=None,
            labels=tuple(labels) if labels else None,
            task_type=config.resolved_task_type,
            metric=config.best_metric,
        )
        return load_run_data(part, tokenizer, train, validation if validation is not None else given.get("validation"))

    loaded = [read(language, config.labels) for language in languages]
    label_sets = {tuple(part.labels or ()) for part in loaded}
    if config.labels is None and len(label_sets) > 1:
        union = {label for labels in label_sets for label in labels}
        labels = label_order(union) if config.token_task else sorted(union)
        loaded = [read(language, labels) for language in languages]
    return loaded
