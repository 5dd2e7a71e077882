"""One record of every choice a training run makes; stored verbatim in the SFT's metadata.

A ``TrainConfig`` is plain data (JSON-ready), so a run can be repeated, resumed (its hash names the
run directory) and audited from the artifact alone. Recipes (``sftkit.training.recipes``) fill it in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from sftkit.artifact import sft_name
from sftkit.errors import BadInputError

KINDS = ("language", "task")
METHODS = ("deftx", "lt-sft")
METRICS = ("loss", "macro_f1", "accuracy")
PRECISIONS = ("fp32", "bf16", "fp16")
SAMPLINGS = ("proportional", "uniform")
# Automatic head warm-up length for a base without an MLM head (batch-size steps at head_warmup_lr).
HEAD_WARMUP_STEPS = 200
PAIR_TASKS = ("nli",)
# Fields that act only after phase 1 (selection and what follows): they do not change θ1.
SELECTION_FIELDS = ("method", "rank", "keep", "k", "sparse_phase", "recipe", "extra")


@dataclass(frozen=True)
class TrainConfig:
    """What to train (kind, name, base, method) and how (schedule, optimiser, data options)."""

    kind: str
    language: str | None = None
    task: str | None = None
    base_model: str = "xlm-roberta-base"
    base_revision: str | None = None
    recipe: str | None = None
    # The method: DEFT-X denoising (rank spec) before magnitude selection of k entries.
    method: str = "deftx"
    rank: str = "90var"
    keep: float = 0.05
    k: int | float | str = "7.6M"  # a count, a fraction of the maskable entries, or "all"
    # False: φ = the (denoised) δ at the mask, no retraining — the paper's "w/o sparse fine-tuning"
    # ablation (Table 5); with k "all", φ is the denoised δ itself ("w/o magnitude pruning + sparse FT").
    sparse_phase: bool = True
    # Data: paths or ``hf:owner/name[:config][@split]``; columns for CSV/TSV/JSONL.
    train: str | None = None
    validation: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    pair: bool | None = None
    labels: tuple[str, ...] | None = None
    holdout: float = 0.05
    # Schedule: steps = clamp(epochs × steps per epoch, min_steps, max_steps), the same in both phases.
    epochs: float = 1.0
    max_steps: int | None = None
    min_steps: int = 0
    eval_steps: int = 1000
    batch_size: int = 8  # per micro-batch; an optimiser step sees batch_size × grad_accum examples
    grad_accum: int = 1
    eval_batch_size: int = 32
    max_length: int = 256
    lr: float = 5e-5
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    l1: float = 0.0
    mlm_probability: float = 0.15
    # Language SFTs (MLM): the decoder untied from the word embeddings and frozen, as the LT-SFT reference's
    # language recipe (--freeze_decoder) and DEFT-X (Appendix C) train them; False keeps it tied (the
    # decoder then moves with the embeddings and pushes every vocabulary row).
    freeze_decoder: bool = True
    # Steps fitting a freshly initialised MLM head with the encoder frozen before phase 1; None = automatic
    # (HEAD_WARMUP_STEPS when the base lacks an MLM head, else 0); 0 = off.
    head_warmup_steps: int | None = None
    head_warmup_lr: float = 1e-3
    metric: str | None = None
    seed: int = 42
    device: str = "auto"
    # Forward passes under torch.autocast in bf16 or fp16 (fp16: CUDA only, with a gradient scaler);
    # master weights, δ, masks and stored values stay float32.
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def name(self) -> str:
        return sft_name(self.kind, self.language, self.task) or ""

    @property
    def is_pair(self) -> bool | None:
        """Text pairs (NLI) or single texts; None = decide from the data's columns."""
        if self.pair is not None:
            return self.pair
        if self.text_pair_column:
            return True
        return True if self.task in PAIR_TASKS else None

    @property
    def best_metric(self) -> str:
        """Checkpoint selection: validation loss for MLM, accuracy for NLI, macro-F1 otherwise."""
        if self.metric:
            return self.metric
        if self.kind == "language":
            return "loss"
        return "accuracy" if self.task in PAIR_TASKS else "macro_f1"

    def with_changes(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied; ``None`` values mean "keep" (unset CLI flags)."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels) if self.labels is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInputError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**data)

    def full_phase_digest(self) -> str:
        """Hash of what decides phase 1 (not the method's selection settings): runs that differ only in
        method, rank, keep or k share one full phase (``full_phase_cache``)."""
        return _digest({key: value for key, value in self.to_dict().items() if key not in SELECTION_FIELDS})

    def digest(self) -> str:
        """Stable hash of the whole configuration: names the run directory used by ``--resume``."""
        return _digest(self.to_dict())

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"kind must be 'language' or 'task', not {self.kind!r}")
        if self.kind == "language" and not self.language:
            raise BadInputError("a language SFT needs a language code (--lang)")
        if self.kind == "task" and not self.task:
            raise BadInputError("a task SFT needs a task name (--task)")
        if self.method not in METHODS:
            raise BadInputError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if (self.method == "lt-sft") != (str(self.rank).lower() == "none"):
            raise BadInputError(
                f"method {self.method!r} contradicts rank {self.rank!r}: LT-SFT means rank 'none' (no denoising), "
                "DEFT-X needs a rank such as '90var' or '100'"
            )
        self._check_method_specs()
        if not 0.0 <= self.keep <= 1.0:
            raise BadInputError(f"keep must be a fraction in [0, 1], not {self.keep}")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise BadInputError(f"grad_accum must be a positive whole number of micro-batches, not {self.grad_accum!r}")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise BadInputError(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if self.kind == "language" and self.best_metric != "loss":
            raise BadInputError("a language SFT is selected by validation loss (metric 'loss')")
        positive = {
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "max_length": self.max_length,
            "eval_steps": self.eval_steps,
            "lr": self.lr,
            "epochs": self.epochs,
        }
        for name, value in positive.items():
            if not value > 0:
                raise BadInputError(f"{name} must be positive, not {value}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise BadInputError(f"max_steps must be positive, not {self.max_steps}")
        if self.head_warmup_steps is not None and self.head_warmup_steps < 0:
            raise BadInputError(f"head_warmup_steps must not be negative, not {self.head_warmup_steps}")
        if self.kind == "task" and self.head_warmup_steps:
            raise BadInputError("head warm-up fits a fresh MLM head: it applies to language SFTs only")
        if not self.head_warmup_lr > 0:
            raise BadInputError(f"head_warmup_lr must be positive, not {self.head_warmup_lr}")
        for name in ("weight_decay", "max_grad_norm", "l1", "warmup_ratio", "min_steps"):
            if getattr(self, name) < 0:
                raise BadInputError(f"{name} must not be negative, not {getattr(self, name)}")
        if self.warmup_ratio >= 1:
            raise BadInputError(f"warmup_ratio must be below 1, not {self.warmup_ratio}")
        if not 0.0 <= self.holdout < 1.0:
            raise BadInputError(f"holdout must be a fraction in [0, 1), not {self.holdout}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise BadInputError(f"mlm_probability must be in (0, 1), not {self.mlm_probability}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise BadInputError(f"labels must be distinct: {list(self.labels)}")

    def _check_method_specs(self) -> None:
        """Rank and k are checked now, not after hours of the full phase."""
        from sftkit import deftx

        try:
            deftx.parse_rank(str(self.rank))
        except ValueError as exc:
            raise BadInputError(str(exc)) from None
        if isinstance(self.k, str):
            if self.k.strip().lower() != "all":
                deftx.parse_k(self.k)
        elif isinstance(self.k, bool) or not self.k > 0:
            raise BadInputError(f"k must be a positive count or a fraction in (0, 1), not {self.k!r}")

    @property
    def variant(self) -> str | None:
        """Which of the DEFT-X paper's ablations (Table 5) this run is, if any."""
        if not self.sparse_phase:
            if str(self.k).strip().lower() == "all":
                return "w/o magnitude pruning + sparse fine-tuning"
            return "w/o sparse fine-tuning"
        if self.method == "deftx" and self.keep == 0:
            return "w/o higher-order components"
        return None

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimiser step."""
        return self.batch_size * self.grad_accum

    def total_steps(self, examples: int) -> int:
        """Optimiser steps of one phase for ``examples`` training examples (LT-SFT's rule)."""
        per_epoch = -(-examples // self.effective_batch_size)
        steps = max(round(self.epochs * per_epoch), self.min_steps, 1)
        return min(steps, self.max_steps) if self.max_steps is not None else steps


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
