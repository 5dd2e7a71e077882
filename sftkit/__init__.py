"""sftkit: sparse fine-tunings (DEFT-X, LT-SFT) of multilingual encoders.

Importing the package is cheap (no torch): the command line must start fast. Heavy names are
resolved lazily on first attribute access, e.g. ``sftkit.SparseFineTuning``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SparseFineTuning": "sftkit.sft",
    "SFTMetadata": "sftkit.sft",
    "compose": "sftkit.compose",
    "export": "sftkit.compose",
    "compose_to_directory": "sftkit.compose",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sftkit' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
