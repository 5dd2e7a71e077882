"""From texts to batches: tokenisation, the held-out split, the batch order and the collators.

Token tasks (NER, POS) tokenise pre-split words with a fast tokenizer and label only the first sub-token
of each word; continuation sub-tokens, special tokens and padding carry ``-100`` (ignored by the loss and
the metrics), so one prediction per word is read back at exactly those positions.

The batch order is a pure function of (seed, step), so a resumed run sees exactly the batches the
interrupted one would have, and every process of a distributed run takes its own slice of the same
global batch. Training batches are length-grouped by default (``group_by_length``): on CPU a padded
token costs as much as a real one, and random batches of long-tailed sentences are mostly padding.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification, DataCollatorWithPadding

from sftkit.errors import BadInputError
from sftkit.training.data import LabelledExample
from sftkit.training.token_data import TaggedSentence

Item = dict[str, Any]


def tokenize_corpus(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[Item]:
    """Concatenate the tokenised texts and cut them into blocks of ``max_length`` (as HF's run_mlm does).

    Blocks waste no padding on short lines; the last, shorter block is kept so small corpora lose nothing.
    """
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]:
        ids.extend(encoded)
    blocks = [ids[start : start + max_length] for start in range(0, len(ids), max_length)]
    return [{"input_ids": block, "attention_mask": [1] * len(block)} for block in blocks if len(block) > 2]


def tokenize_labelled(
    tokenizer: Any, examples: Sequence[LabelledExample], label2id: dict[str, int], max_length: int
) -> list[Item]:
    firsts = [example.text for example in examples]
    pairs = [example.text_pair for example in examples]
    encoded = tokenizer(
        firsts, pairs if pairs and pairs[0] is not None else None, truncation=True, max_length=max_length
    )
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label2id[example.label]}
        for ids, mask, example in zip(encoded["input_ids"], encoded["attention_mask"], examples, strict=True)
    ]


IGNORE = -100  # the label of positions that are not a word's first sub-token
# What a scored sentence's item also carries (``tokenize_tagged(scored=True)``); never a model input.
GOLD_TAGS = "gold_tags"  # the tag id of every word of the sentence
WORD_INDEX = "word_index"  # the word at each labelled position, in order
SCORING_KEYS = (GOLD_TAGS, WORD_INDEX)


def tokenize_tagged(
    tokenizer: Any,
    sentences: Sequence[TaggedSentence],
    label2id: dict[str, int],
    max_length: int,
    *,
    scored: bool = False,
) -> list[Item]:
    """One item per sentence: ``labels`` holds the tag id at each word's first sub-token, ``-100`` elsewhere.

    Sentences longer than ``max_length`` tokens are truncated: their last words get no label (no prediction).
    ``scored`` items also hold ``gold_tags`` and ``word_index``, so that metrics count every word of the
    sentence, including those truncation cut off (``token_metrics.sentence_tags``), not just the labelled ones.
    """
    encoded = _encode_words(tokenizer, sentences, max_length)
    items = []
    for index, sentence in enumerate(sentences):
        words = _first_subtokens(encoded.word_ids(index))
        item = {
            "input_ids": encoded["input_ids"][index],
            "attention_mask": encoded["attention_mask"][index],
            "labels": [IGNORE if word is None else _tag_id(label2id, sentence.tags[word], index) for word in words],
        }
        if scored:
            item[GOLD_TAGS] = [_tag_id(label2id, tag, index) for tag in sentence.tags]
            item[WORD_INDEX] = [word for word in words if word is not None]
        items.append(item)
    return items


def _tag_id(label2id: dict[str, int], tag: str, index: int) -> int:
    if tag not in label2id:
        raise BadInputError(f"sentence {index + 1}: tag {tag!r} is not one of the labels ({', '.join(label2id)})")
    return label2id[tag]


def _encode_words(tokenizer: Any, sentences: Sequence[TaggedSentence], max_length: int) -> Any:
    if not getattr(tokenizer, "is_fast", False):
        raise BadInputError(
            f"token tasks need a fast tokenizer (word alignment via word_ids()), got {type(tokenizer).__name__}"
        )
    return tokenizer(
        [sentence.words for sentence in sentences], is_split_into_words=True, truncation=True, max_length=max_length
    )


def _first_subtokens(word_ids: Sequence[int | None]) -> list[int | None]:
    """The word index at each word's first sub-token, ``None`` at special tokens and continuations."""
    firsts: list[int | None] = []
    previous = None
    for word in word_ids:
        firsts.append(word if word is not None and word != previous else None)
        previous = word
    return firsts


def holdout_split(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): a seeded random ``fraction`` of the items, at least one, never all."""
    if len(items) < 2:
        raise BadInputError(f"need at least 2 examples to hold some out for validation, got {len(items)}")
    held = min(max(1, round(fraction * len(items))), len(items) - 1)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held])
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]


# Mega-batches of at most this many batches, as transformers' ``get_length_grouped_indices``.
MEGA_BATCHES = 50


def group_by_length(
    order: torch.Tensor, lengths: torch.Tensor, batch_size: int, generator: torch.Generator
) -> torch.Tensor:
    """``order`` regrouped into batches of similar length, the batches then shuffled (``generator``).

    The seeded permutation still decides which examples meet: each mega-batch of ``min(size // 4 batches,
    50)`` batches is sorted by length (transformers' ``group_by_length``), so dynamic padding computes little
    beyond the real tokens. Unlike transformers, the batches are then put in a seeded random order: left
    sorted, every 50 steps would run from the longest sentences to the shortest, and where length goes with
    the label (SMSA: long reviews lean one way) that drift stalls a short run (issue 19: a task SFT's phase 1 on
    mE5-small at SMSA validation macro-F1 0.14 → 0.46 at steps 50 → 100 sorted, 0.55 at step 50 unsorted).
    """
    mega = batch_size * max(1, min(len(order) // (4 * batch_size), MEGA_BATCHES))
    chunks = [order[start : start + mega] for start in range(0, len(order), mega)]
    grouped = torch.cat([chunk[torch.sort(lengths[chunk], descending=True, stable=True).indices] for chunk in chunks])
    full = len(grouped) // batch_size  # a last, partial batch stays last: the wrap-round completes it
    batches = list(torch.split(grouped[: full * batch_size], batch_size))
    shuffled = [batches[i] for i in torch.randperm(full, generator=generator).tolist()]
    return torch.cat([*shuffled, grouped[full * batch_size :]])


class BatchOrder:
    """Global batch ``step`` = a slice of the epoch's seeded permutation, wrapped round to full batches.

    With ``lengths`` (one per example) the permutation is length-grouped (``group_by_length``); every
    example still comes exactly once per epoch before the wrap-round fills the last batch.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        lengths: Sequence[int] | None = None,
    ) -> None:
        if batch_size % world:
            raise BadInputError(f"batch size {batch_size} is not a multiple of the {world} processes")
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world = rank, world
        # Equal lengths (MLM's fixed-length blocks) have nothing to group: the plain order, unchanged.
        varied = lengths is not None and len(set(lengths)) > 1
        self.lengths = torch.tensor(lengths, dtype=torch.long) if varied else None
        self.steps_per_epoch = -(-size // batch_size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> list[int]:
        """This process's share of the global batch at ``step``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=generator)
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, self.batch_size, generator)
            repeats = -(-self.steps_per_epoch * self.batch_size // self.size)
            self._epoch, self._order = epoch, order.repeat(repeats)
        batch = self._order[position * self.batch_size : (position + 1) * self.batch_size]
        share = self.batch_size // self.world
        return batch[self.rank * share : (self.rank + 1) * share].tolist()


def make_collator(kind: str, tokenizer: Any, mlm_probability: float, seed: int | None = None) -> Any:
    """MLM masking (15 % by default) for language SFTs, dynamic padding for task SFTs.

    ``kind="tagging"`` (token tasks) also pads ``labels`` with ``-100``.

    ``seed=None`` draws masks from torch's global generator, which the trainer reseeds every step.
    """
    if kind == "language":
        return SeededMaskingCollator(tokenizer, mlm_probability=mlm_probability, seed=seed)
    if kind == "tagging":
        return TaggingCollator(tokenizer)
    return DataCollatorWithPadding(tokenizer)


class SeededMaskingCollator(DataCollatorForLanguageModeling):
    """transformers' MLM collator, whose ``seed`` also holds outside the main process.

    transformers refuses a seeded collator in a child process unless it is a DataLoader worker (there it
    offsets the seed by the worker id, so workers draw different masks), which made training fail in any
    worker process: a job runner's, ``sftkit demo``'s. Here one collator serves one process, so the seed
    applies as given, and a run draws the same masks wherever it runs.
    """

    def create_rng(self, return_tensors: str | None = None) -> None:
        self.generator = self.get_generator(self.seed, return_tensors)
        self._generator_pid = os.getpid()


class TaggingCollator:
    """Token-task batches: ``labels`` padded with -100 (transformers' collator), and so are a scored
    sentence's ``gold_tags`` and ``word_index``, which are per word, not per token."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = DataCollatorForTokenClassification(tokenizer, label_pad_token_id=IGNORE)

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        per_word = {key: [item[key] for item in items] for key in SCORING_KEYS if key in items[0]}
        batch = dict(self.pad([{k: v for k, v in item.items() if k not in per_word} for item in items]))
        for key, rows in per_word.items():
            width = max(len(row) for row in rows)
            batch[key] = torch.tensor([row + [IGNORE] * (width - len(row)) for row in rows], dtype=torch.long)
        return batch


def fixed_batches(items: Sequence[Item], collator: Any, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Validation batches collated once (with fixed MLM masks), so every evaluation scores the same task."""
    return [dict(collator(list(items[i : i + batch_size]))) for i in range(0, len(items), batch_size)]


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Input tokens of a batch, padding excluded: what a throughput figure should count."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
