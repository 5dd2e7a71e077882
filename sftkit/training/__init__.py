"""The two-phase trainer: language SFTs (masked LM) and task SFTs (sequence classification; token
classification for NER / POS).

Importing this package is cheap; the heavy modules load on first use::

    from sftkit.training import make_config, train_sft, evaluate
    config = make_config(language="ace", base_model="xlm-roberta-base", recipe="paper-lang", train="ace.txt")
    sft = train_sft(config)
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "sftkit.training.config",
    "make_config": "sftkit.training.recipes",
    "RECIPES": "sftkit.training.recipes",
    "train": "sftkit.training.trainer",
    "train_sft": "sftkit.training.trainer",
    "TrainResult": "sftkit.training.trainer",
    "Reporter": "sftkit.training.trainer",
    "evaluate": "sftkit.training.evaluation",
    "evaluate_tagger": "sftkit.training.evaluation",
    "scorer": "sftkit.training.evaluation",
    "load_tagged": "sftkit.training.token_data",
    "load_corpus": "sftkit.training.data",
    "load_labelled": "sftkit.training.data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sftkit.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
