"""Training batch order (``sftkit.training.features.BatchOrder``): plain and length-grouped."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from sftkit.training.features import BatchOrder

BATCH = 16


def _long_tailed(size: int, seed: int = 0) -> list[int]:
    """Sentence lengths in tokens shaped like SMSA's (median ~40, a long tail), capped at 128."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(size, generator=generator) * 0.55 + 3.7)
    return lengths.round().clamp(4, 128).long().tolist()


def _epoch(order: BatchOrder, epoch: int = 0) -> list[list[int]]:
    first = epoch * order.steps_per_epoch
    return [order.indices(step) for step in range(first, first + order.steps_per_epoch)]


def _padding_overhead(batches: list[list[int]], lengths: list[int]) -> float:
    """Tokens a dynamically padded batch computes per real token."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    return padded / sum(lengths[i] for batch in batches for i in batch)


@pytest.mark.parametrize("size", [960, 1003])
@pytest.mark.parametrize("epoch", [0, 3])
def test_grouping_keeps_every_example_once_per_epoch(size, epoch):
    order = BatchOrder(size, BATCH, seed=5, lengths=_long_tailed(size))
    drawn = [i for batch in _epoch(order, epoch) for i in batch]
    counts = Counter(drawn)
    assert sorted(counts) == list(range(size))  # nothing dropped
    assert len(drawn) == order.steps_per_epoch * BATCH  # full batches: the last one wraps round
    assert sum(count - 1 for count in counts.values()) == order.steps_per_epoch * BATCH - size


def test_grouping_is_deterministic_per_seed_and_differs_between_seeds_and_epochs():
    lengths = _long_tailed(1000)
    first = _epoch(BatchOrder(1000, BATCH, seed=7, lengths=lengths))
    assert first == _epoch(BatchOrder(1000, BATCH, seed=7, lengths=lengths))
    assert first != _epoch(BatchOrder(1000, BATCH, seed=8, lengths=lengths))
    assert first != _epoch(BatchOrder(1000, BATCH, seed=7, lengths=lengths), epoch=1)


def test_a_step_drawn_alone_is_the_step_of_a_whole_run():
    """What a resumed run relies on: batch ``step`` is a function of (seed, step), not of earlier draws."""
    lengths = _long_tailed(500)
    whole = BatchOrder(500, BATCH, seed=3, lengths=lengths)
    run = [whole.indices(step) for step in range(100)]
    for step in (0, 31, 32, 77, 99):
        assert BatchOrder(500, BATCH, seed=3, lengths=lengths).indices(step) == run[step]


def test_grouped_batches_pad_far_less_than_random_ones():
    lengths = _long_tailed(4000)
    grouped = _padding_overhead(_epoch(BatchOrder(4000, BATCH, seed=1, lengths=lengths)), lengths)
    plain = _padding_overhead(_epoch(BatchOrder(4000, BATCH, seed=1)), lengths)
    assert plain > 1.5  # random batches of long-tailed sentences are mostly padding …
    assert grouped < 1.05  # … grouped ones almost none


def test_grouping_equal_lengths_is_the_plain_order():
    """MLM's fixed-length blocks: grouping changes nothing."""
    assert _epoch(BatchOrder(333, 8, seed=2, lengths=[128] * 333)) == _epoch(BatchOrder(333, 8, seed=2))


def test_grouped_batches_come_in_random_order_not_longest_first():
    """Sorted mega-batches run from the longest sentences to the shortest every 50 steps; where length goes
    with the label, that drift stalls a short run (issue 19). The batches' order must not follow length."""
    lengths = _long_tailed(4000)
    batches = _epoch(BatchOrder(4000, BATCH, seed=6, lengths=lengths))
    longest = torch.tensor([float(max(lengths[i] for i in batch)) for batch in batches])
    ranks = torch.argsort(torch.argsort(longest)).float()
    position = torch.arange(len(batches), dtype=torch.float)
    within_mega_batch = position % 50  # transformers' sort runs longest → shortest inside each block of 50
    spearman = torch.corrcoef(torch.stack([ranks, within_mega_batch]))[0, 1]
    assert abs(float(spearman)) < 0.2
    steps_down = sum(later <= earlier for earlier, later in itertools.pairwise(longest))
    assert steps_down < 0.75 * (len(batches) - 1)  # sorted: nearly every step; shuffled: about half


def test_grouped_batches_are_still_random_mixtures_of_the_data():
    """Which examples meet is decided by the seed, not by length alone: a batch is not a slice of the sorted data."""
    lengths = _long_tailed(2000)
    by_length = sorted(range(2000), key=lambda i: (-lengths[i], i))
    batches = _epoch(BatchOrder(2000, BATCH, seed=4, lengths=lengths))
    sorted_batches = [by_length[i : i + BATCH] for i in range(0, 2000, BATCH)]
    assert sum(sorted(batch) == sorted(s) for batch, s in zip(batches, sorted_batches, strict=True)) < 5


def test_processes_share_each_grouped_global_batch():
    lengths = _long_tailed(640)
    alone = _epoch(BatchOrder(640, BATCH, seed=9, lengths=lengths))
    ranks = [_epoch(BatchOrder(640, BATCH, seed=9, rank=rank, world=2, lengths=lengths)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == alone
