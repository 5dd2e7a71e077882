"""Masked-LM specifics of language SFTs: the untied frozen decoder, masked-only logits, head warm-up.

- The LT-SFT reference trains language SFTs with ``--freeze_decoder``: the output embedding becomes an
  untied copy of the word embeddings with ``requires_grad = False`` (composable-sft,
  ``examples/language-modeling/run_mlm.py``; DEFT-X adopts that setup, paper Appendix C). A tied decoder
  would send a softmax gradient to *every* vocabulary row, so magnitude selection would spend k on rows
  of tokens the language never uses; untied and frozen, word-embedding rows move only through the
  tokens the text contains.
- The MLM loss projects onto the vocabulary only at masked positions (fairseq's RoBERTa LM head does
  the same with ``masked_tokens``): on a 250 k vocabulary the full projection of every position is
  most of a step's time and memory, and it changes neither the loss nor any gradient.
- Bases without an MLM head (sentence encoders such as mE5 or MiniLM) get a fresh head; fitting it
  inside the full phase would put head-fitting noise into δ, so it is fitted first with the encoder
  frozen (``head_warmup_steps``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from sftkit.params import encoder_of
from sftkit.training.features import batch_tokens

# Attribute names of the module that maps hidden states to vocabulary logits, per architecture family
# (XLM-R/RoBERTa: ``lm_head``; BERT: ``cls``); each is applied position-wise, so it can run on any subset.
_MLM_HEAD_ATTRIBUTES = ("lm_head", "cls")


def mlm_head_of(model: nn.Module) -> nn.Module | None:
    """The position-wise MLM head module of ``model``, or None for an architecture we do not know."""
    for attribute in _MLM_HEAD_ATTRIBUTES:
        head = getattr(model, attribute, None)
        if isinstance(head, nn.Module):
            return head
    return None


def masked_lm_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the masked positions, their labels): the encoder runs on every position, the head on masked ones.

    Falls back to the model's own full projection for an architecture whose MLM head we do not know.
    """
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    selected = labels != -100
    head = mlm_head_of(model)
    if head is None:
        logits = model(**inputs).logits
        return logits[selected], labels[selected]
    hidden = encoder_of(model)(**inputs).last_hidden_state
    return head(hidden[selected]), labels[selected]


def masked_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the masked positions: equal to ``model(**batch).loss`` (mean), computed cheaply."""
    logits, labels = masked_lm_logits(model, batch)
    return nn.functional.cross_entropy(logits.float(), labels, reduction=reduction)


def warm_up_head(
    model: nn.Module,
    head: Sequence[tuple[str, nn.Parameter]],
    batch_at: Callable[[int], Mapping[str, torch.Tensor]],
    steps: int,
    lr: float,
    on_step: Callable[[int, float, float, int], None] | None = None,
) -> list[float]:
    """Fit a fresh MLM head with the encoder frozen; returns the losses.

    The encoder's parameters stop requiring grad for the duration (so autograd builds no graph through
    it, and a tied decoder, an encoder tensor, stays put) and get their flags back afterwards. AdamW
    with a linear decay to 0 over ``steps``; ``batch_at(step)`` supplies the batches, so the caller
    controls their order and seeding. ``on_step(step, loss, lr, tokens)`` follows progress.
    """

    if mlm_head_of(model) is None:
        raise ValueError(f"{type(model).__name__}: no known MLM head to warm up")
    encoder_params = list(encoder_of(model).parameters())
    flags = [param.requires_grad for param in encoder_params]
    optimizer = torch.optim.AdamW([param for _, param in head], lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    losses = []
    model.train()
    try:
        for param in encoder_params:
            param.requires_grad_(False)
        for step in range(steps):
            batch, lr = batch_at(step), scheduler.get_last_lr()[0]
            loss = masked_lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, losses[-1], lr, batch_tokens(batch))
    finally:
        for param, flag in zip(encoder_params, flags, strict=True):
            param.requires_grad_(flag)
    return losses
