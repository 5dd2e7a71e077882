"""Base-model fingerprints: refuse to compose an SFT with a base it was not trained on.

The fingerprint is a SHA-256 over the encoder's architecture (model type, every parameter's name and
shape) and a fixed strided sample of at most ``SAMPLE`` values of each parameter, taken in float32.
It changes when the architecture, any shape, or the weights change (any re-training moves nearly
every entry, so a strided sample sees it), yet costs milliseconds even for XLM-R large: it reads
about ``SAMPLE`` values per parameter, not the whole model. Heads and poolers are excluded, so an MLM
model and a classifier loaded from the same checkpoint share one fingerprint; the storage dtype is
excluded, so a float16 copy of a float32 checkpoint with equal values matches too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from sftkit.params import encoder_of, is_maskable_name, is_norm_name

SAMPLE = 4096
PREFIX = "sha256:"


def sample_stride(numel: int) -> tuple[int, int]:
    """(stride, count): the fingerprint samples flat positions 0, stride, 2·stride, … (``count`` of them)."""
    stride = max(1, numel // SAMPLE)
    return stride, min(SAMPLE, -(-numel // stride))


def sample(tensor: torch.Tensor) -> torch.Tensor:
    """The fingerprint sample of one tensor, as a float32 copy (callers may modify the tensor later)."""
    flat = tensor.detach().reshape(-1)
    stride, count = sample_stride(flat.numel())
    return flat[::stride][:count].to(dtype=torch.float32, device="cpu", copy=True)


def fingerprint_samples(model_type: str, samples: Iterable[tuple[str, tuple[int, ...], torch.Tensor]]) -> str:
    """Fingerprint from (encoder-relative name, shape, ``sample(tensor)``) triples, in any order."""
    digest = hashlib.sha256(f"sftkit-fingerprint-v1|{model_type}".encode())
    for name, shape, values in sorted(samples, key=lambda item: item[0]):
        if not (is_maskable_name(name) or is_norm_name(name)):
            continue
        digest.update(f"|{name}|{tuple(shape)}".encode())
        digest.update(values.numpy().tobytes())
    return PREFIX + digest.hexdigest()


def base_fingerprint(model: nn.Module) -> str:
    encoder = encoder_of(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(encoder).__name__)
    return fingerprint_samples(model_type, ((n, tuple(p.shape), sample(p)) for n, p in encoder.named_parameters()))
