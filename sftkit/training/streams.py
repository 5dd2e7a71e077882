"""Where each training step's batch comes from: one stream of examples, or one per source language.

A multi-source task SFT (the LT-SFT reference's ``--multisource_data`` recipes) trains on labelled data
of several source languages; every batch comes from one source, and that source's language SFT is
applied to the model while the batch is processed. Which source a step draws from is fixed in advance
by the seed (``step_schedule``), so a resumed run continues exactly and every process agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sftkit.sft import SparseFineTuning
from sftkit.training.config import SAMPLINGS
from sftkit.training.features import BatchOrder


@dataclass(frozen=True)
class Stream:
    """Training examples that share one language SFT (None: nothing is applied per batch)."""

    language: str | None
    sft: SparseFineTuning | None
    items: list[dict[str, Any]]  # tokenised examples
    order: BatchOrder  # which of them each of this stream's steps trains on (this process's share)


def step_schedule(sizes: Sequence[int], batch_size: int, sampling: str, seed: int, steps: int) -> list[tuple[int, int]]:
    """(stream, the stream's own step) for every optimiser step.

    ``proportional``: as the reference's multi-source loader, each round visits every stream's batches
    once (⌈size / batch⌉ of them) in a seeded random order, so a source is drawn in proportion to its
    data. ``uniform``: each round visits every stream once, whatever its size.
    """
    assert sampling in SAMPLINGS, sampling  # TrainConfig validated it
    per_round = [-(-size // batch_size) if sampling == "proportional" else 1 for size in sizes]
    slots = [stream for stream, count in enumerate(per_round) for _ in range(count)]
    order: list[int] = []
    round_index = 0
    while len(order) < steps:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
        order.extend(slots[i] for i in torch.randperm(len(slots), generator=generator).tolist())
        round_index += 1
    seen = [0] * len(sizes)
    result = []
    for stream in order[:steps]:
        result.append((stream, seen[stream]))
        seen[stream] += 1
    return result


@contextmanager
def applied(sft: SparseFineTuning | None, model: nn.Module) -> Iterator[None]:
    """``sft`` added to the encoder for the duration (exactly undone after), or nothing when None."""
    if sft is None:
        yield
        return
    sft.apply(model, with_head=False)
    try:
        yield
    finally:
        sft.revert(model)


def sources_digest(sources: dict[str, SparseFineTuning]) -> str:
    """The content of several source SFTs, by language: part of a multi-source run's full-phase key."""
    digest = hashlib.sha256()
    for language in sorted(sources):
        digest.update(f"{language}\0{sources[language].delta_digest()}\0".encode())
    return digest.hexdigest()
