"""Base-model fingerprints: refuse to compose an SFT with a base it was not trained on.

The fingerprint is a SHA-256 over the encoder's architecture (model type, every parameter's name,
shape and dtype) and a fixed strided sample of at most ``SAMPLE`` values of each parameter. It
changes when the architecture, any shape, or the weights change (any re-training moves nearly every
entry, so a strided sample sees it), yet costs milliseconds even for XLM-R large: it reads about
``SAMPLE`` × (number of parameters) values, not the whole model. Heads and poolers are excluded, so
an MLM model and a classifier loaded from the same checkpoint share one fingerprint.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from sftkit.params import encoder_of, is_maskable_name, is_norm_name

SAMPLE = 4096
PREFIX = "sha256:"


def base_fingerprint(model: nn.Module) -> str:
    encoder = encoder_of(model)
    model_type = getattr(getattr(model, "config", None), "model_type", type(encoder).__name__)
    digest = hashlib.sha256(f"sftkit-fingerprint-v1|{model_type}".encode())
    for name, param in sorted(encoder.named_parameters(), key=lambda item: item[0]):
        if not (is_maskable_name(name) or is_norm_name(name)):
            continue
        digest.update(f"|{name}|{tuple(param.shape)}|{param.dtype}".encode())
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLE)
        sample = flat[::stride][:SAMPLE].to(dtype=torch.float32, device="cpu").contiguous()
        digest.update(sample.numpy().tobytes())
    return PREFIX + digest.hexdigest()
