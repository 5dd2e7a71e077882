"""Named sets of hyperparameters: the paper's (Appendix C, XLM-R base) and a CPU-sized smoke test.

Every value can be overridden (``make_config(..., lr=1e-4)`` / ``sftkit train --lr 1e-4``). ``k`` is
a count (``"7.6M"``) or a fraction of the model's maskable entries: the paper's 7.6 M and 14.2 M are
2.8 % and 5.1 % of XLM-R base's maskable entries, so pass ``k=0.028`` / ``0.051`` for other models.
Task learning rate and sequence length are not in DEFT-X's appendix; they follow LT-SFT (2e-5, 128).
Effective batch sizes are the paper's (8 for MLM, 16 for SA, 32 for NLI); where the LT-SFT reference's
recipes reach theirs by accumulation (``train_mlm.sh`` and ``train_sa.sh``: 4 × 2), so do these: MLM
4 × 2, SA 8 × 2 (the paper's 16 on the reference's 2 micro-batches), NLI 32 × 1 (``train_nli.sh``).
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType
from typing import Any

from sftkit.errors import BadInputError
from sftkit.training.config import TrainConfig

_PAPER_TASK = {
    "k": "14.2M",
    "lr": 2e-5,
    "max_length": 128,
    "eval_batch_size": 64,
    "l1": 0.0,
}

RECIPES: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType(
    {
        "paper-lang": MappingProxyType(
            {
                "kind": "language",
                "k": "7.6M",
                "batch_size": 4,
                "grad_accum": 2,
                "eval_batch_size": 32,
                "max_length": 256,
                "lr": 5e-5,
                "epochs": 100.0,
                "max_steps": 100_000,
                "min_steps": 30_000,
                "eval_steps": 1000,
                "holdout": 0.05,
                "l1": 0.1,
                "metric": "loss",
            }
        ),
        "paper-sa": MappingProxyType(
            {
                **_PAPER_TASK,
                "kind": "task",
                "epochs": 10.0,
                "batch_size": 8,
                "grad_accum": 2,
                "eval_steps": 250,
                "metric": "macro_f1",
            }
        ),
        "paper-nli": MappingProxyType(
            {
                **_PAPER_TASK,
                "kind": "task",
                "epochs": 5.0,
                "batch_size": 32,
                "grad_accum": 1,
                "eval_steps": 625,
                "metric": "accuracy",
            }
        ),
        # A CPU smoke test of the whole run on a real base: a language SFT on multilingual-e5-small (118 M
        # parameters, a fresh MLM head) end to end in under 3 minutes on 2 cores (benchmarks/smoke.py);
        # seconds on the tiny toy model (sftkit.toy). max_steps caps the head warm-up too.
        "quick": MappingProxyType(
            {
                "k": 0.05,
                "batch_size": 8,
                "eval_batch_size": 64,
                "max_length": 64,
                "lr": 2e-3,
                "epochs": 20.0,
                "max_steps": 10,
                "eval_steps": 5,
                "holdout": 0.1,
                "l1": 0.0,
            }
        ),
    }
)


def default_recipe(kind: str, task: str | None = None) -> str:
    if kind == "language":
        return "paper-lang"
    return "paper-nli" if task == "nli" else "paper-sa"


def make_config(
    *,
    language: str | None = None,
    task: str | None = None,
    recipe: str | None = None,
    **overrides: Any,
) -> TrainConfig:
    """Config for a language SFT (``language=``) or a task SFT (``task=``) from a recipe plus overrides.

    ``None`` overrides are ignored, so unset command-line flags keep the recipe's values. A
    ``method`` of ``lt-sft`` implies rank ``none`` and vice versa. A ``batch_size`` given without
    ``grad_accum`` is the whole step's (accumulation 1), whatever the recipe splits its own batch into.
    """
    if (language is None) == (task is None):
        raise BadInputError("give exactly one of a language (--lang) or a task (--task)")
    kind = "language" if language is not None else "task"
    recipe = recipe or default_recipe(kind, task)
    if recipe not in RECIPES:
        raise BadInputError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    values = dict(RECIPES[recipe])
    recipe_kind = values.pop("kind", kind)
    if recipe_kind != kind:
        raise BadInputError(f"recipe {recipe!r} trains {recipe_kind} SFTs, not {kind} SFTs")
    given = {key: value for key, value in overrides.items() if value is not None}
    if "batch_size" in given and "grad_accum" not in given:
        given["grad_accum"] = 1  # a batch size given alone is the step's: the recipe's split does not multiply it
    values.update(given)
    method, rank = values.get("method"), values.get("rank")
    if method == "lt-sft" and rank is None:
        values["rank"] = "none"
    elif method is None and rank is not None and str(rank).lower() == "none":
        values["method"] = "lt-sft"
    try:
        config = TrainConfig(kind=kind, language=language, task=task, recipe=recipe, **values)
    except TypeError as exc:
        raise BadInputError(f"bad training option: {exc}") from exc
    if config.token_task and overrides.get("metric") is None and config.metric is not None:
        # A recipe's metric is its own task's (SA's macro-F1): a token task picks entity F1 or accuracy.
        config = replace(config, metric=None)
    return config
