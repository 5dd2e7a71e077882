"""Which parameters an SFT may touch, and how parameter names map to layers and modules.

One definition shared by the trainer, the denoiser, the selector, the artifact and the overlap
statistics, so that they can never disagree about what "maskable" means.

Naming convention (see ``sftkit.sft``): sparse deltas are keyed by names *relative to the encoder*
(``model.base_model``), e.g. ``encoder.layer.3.attention.self.query.weight``, so that a language
SFT trained with an MLM head applies to a classification model or a bare ``AutoModel``. Dense
head tensors are keyed by their name in the full model, e.g. ``classifier.out_proj.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|block|h)\.(\d+)\.")
_NORM_RE = re.compile(r"(?:^|\.)(?:LayerNorm|layer_norm|layernorm|ln_\w*|norm\w*)\.(?:weight|bias)$", re.I)
# Parameters of the encoder that belong to the task head in function: BERT-style poolers feed the
# classifier and are absent from MLM models, so they are trained densely and stored as head tensors.
_HEAD_PREFIXES = ("pooler.",)


def is_norm_name(name: str) -> bool:
    """True for LayerNorm-style parameters, which stay frozen (DEFT-X, LT-SFT)."""
    return bool(_NORM_RE.search(name))


def _norm_parameter_names(module: nn.Module) -> set[str]:
    from torch import nn  # here, not above: `sftkit show` reads parameter names without importing torch

    names: set[str] = set()
    for module_name, sub in module.named_modules():
        if isinstance(sub, nn.LayerNorm) or "norm" in type(sub).__name__.lower():
            for param_name, _ in sub.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def is_maskable_name(name: str) -> bool:
    """Name-only test, for state dicts without a model (names relative to the encoder)."""
    return not is_norm_name(name) and not name.startswith(_HEAD_PREFIXES)


def maskable_parameters(model: nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Encoder parameters that an SFT may change: all weights and biases except norms and poolers.

    ``model`` may be a full model with a head (its ``base_model`` is used) or a bare encoder.
    Names are relative to the encoder.
    """
    encoder = encoder_of(model)
    norms = _norm_parameter_names(encoder)
    for name, param in encoder.named_parameters():
        if name not in norms and is_maskable_name(name):
            yield name, param


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder (``base_model``) of a model with a head, or the model itself."""
    return getattr(model, "base_model", model)


def head_parameters(model: nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters trained fully and stored densely: everything outside the encoder plus the pooler.

    Tensors tied to an encoder parameter (an MLM decoder tied to the word embeddings) are skipped:
    they are stored once, as part of the encoder. Names are those of the full model.
    """
    encoder = encoder_of(model)
    encoder_tensors = {id(p) for p in encoder.parameters()}
    prefix = f"{model.base_model_prefix}." if encoder is not model else ""
    for name, param in model.named_parameters(remove_duplicate=False):
        inside = name.startswith(prefix) and encoder is not model
        relative = name[len(prefix) :] if inside else name
        pooler_like = inside and relative.startswith(_HEAD_PREFIXES)
        outside_untied = not inside and id(param) not in encoder_tensors
        if pooler_like or outside_untied:
            yield name, param


def layer_of(name: str) -> int | None:
    """Transformer layer index of a parameter name, or None (embeddings, heads)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


MODULE_KINDS = (
    "embeddings",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.o",
    "ffn.in",
    "ffn.out",
    "bias",
    "norm",
    "other",
)

_MODULE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("embeddings", re.compile(r"embed", re.I)),
    ("attn.q", re.compile(r"(?:\.|^)(?:query|q_proj|q_lin|q)\.")),
    ("attn.k", re.compile(r"(?:\.|^)(?:key|k_proj|k_lin|k)\.")),
    ("attn.v", re.compile(r"(?:\.|^)(?:value|v_proj|v_lin|v)\.")),
    ("attn.o", re.compile(r"attention\.output\.dense\.|(?:\.|^)(?:o_proj|out_lin|o)\.")),
    ("ffn.in", re.compile(r"intermediate\.dense\.|(?:\.|^)(?:fc1|lin1|up_proj|wi)\.")),
    ("ffn.out", re.compile(r"(?:^|\.)output\.dense\.|(?:\.|^)(?:fc2|lin2|down_proj|wo)\.")),
)


def module_of(name: str) -> str:
    """Coarse module kind of a parameter name: one of ``MODULE_KINDS`` (biases form their own kind)."""
    if is_norm_name(name):
        return "norm"
    if is_bias(name):
        return "bias"
    for kind, pattern in _MODULE_PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def is_bias(name: str) -> bool:
    return name.endswith(".bias") or name == "bias"
