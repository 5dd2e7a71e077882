"""Where the paper's data lives, for ``sftkit train`` without data flags.

Language SFTs train on the language's Wikipedia (the 2023-11-01 dump on the Hub); the sentiment task
trains on Indonesian SMSA and is evaluated on NusaX; NLI trains on English MultiNLI and is evaluated
on AmericasNLI. All of them come through 🤗 ``datasets`` (an optional extra) from the Hub, so offline
the only way is local files — and the error says so in one line.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from sftkit.errors import BadInputError


@dataclass(frozen=True)
class DefaultSource:
    description: str
    train: str
    validation: str | None
    evaluation: str | None  # what the paper reports on (for the user's `sftkit eval`)
    text_column: str | None = None
    text_pair_column: str | None = None


WIKIPEDIA_DUMP = "20231101"
_TASKS = {
    "sa": DefaultSource(
        "SMSA (IndoNLU) for training, NusaX-senti for evaluation",
        train="hf:indonlp/indonlu:smsa@train",
        validation="hf:indonlp/indonlu:smsa@validation",
        evaluation="hf:indonlp/NusaX-senti:{language}@test",
        text_column="text",
    ),
    "nli": DefaultSource(
        "MultiNLI for training, AmericasNLI for evaluation",
        train="hf:nyu-mll/multi_nli@train",
        validation="hf:nyu-mll/multi_nli@validation_matched",
        evaluation="hf:americas_nli:{language}@test",
        text_column="premise",
        text_pair_column="hypothesis",
    ),
}


def default_source(kind: str, name: str) -> DefaultSource:
    """The real source a user would train on, or a one-line error when there is none or no way to get it."""
    flag = "--corpus" if kind == "language" else "--train"
    if kind == "language":
        source = DefaultSource(
            f"the {name} Wikipedia ({WIKIPEDIA_DUMP} dump)",
            train=f"hf:wikimedia/wikipedia:{WIKIPEDIA_DUMP}.{name}",
            validation=None,
            evaluation=None,
            text_column="text",
        )
    elif name in _TASKS:
        source = _TASKS[name]
    else:
        raise BadInputError(f"no training data given and no built-in source for task {name!r}: pass {flag} FILE")
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    if importlib.util.find_spec("datasets") is None or offline:
        why = "offline" if offline else "the 🤗 datasets extra is not installed"
        raise BadInputError(
            f"no training data given; the default is {source.description} ({source.train}) from the Hugging Face Hub, "
            f"but {why}: pass {flag} FILE"
        )
    return source
