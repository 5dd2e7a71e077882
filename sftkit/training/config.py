"""One record of every choice a training run makes; stored verbatim in the SFT's metadata.

A ``TrainConfig`` is plain data (JSON-ready), so a run can be repeated, resumed (its hash names the
run directory) and audited from the artifact alone. Recipes (``sftkit.training.recipes``) fill it in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

from sftkit import deftx
from sftkit.artifact import KINDS, sft_name
from sftkit.errors import BadInputError
from sftkit.training.token_data import load_tagged, looks_tagged
from sftkit.training.token_metrics import ENTITY_METRIC, TAG_METRIC, best_metric

METHODS = ("deftx", "lt-sft")
METRICS = ("loss", "macro_f1", "accuracy", "entity_f1")
PRECISIONS = ("fp32", "bf16", "fp16")
SAMPLINGS = ("proportional", "uniform")
# Automatic head warm-up length for a base without an MLM head (batch-size steps at head_warmup_lr).
HEAD_WARMUP_STEPS = 200
PAIR_TASKS = ("nli",)
# Task SFTs classify a text ("sequence") or tag every word ("token": NER, POS); these names are token tasks.
TASK_TYPES = ("sequence", "token")
TOKEN_TASKS = ("ner", "pos")
TOKEN_METRICS = ("entity_f1", "accuracy", "macro_f1")
# Fields that act only after phase 1 (selection and what follows): they do not change θ1.
SELECTION_FIELDS = ("method", "rank", "keep", "k", "sparse_phase", "sparse_steps", "recipe", "extra")
# Fields added after configs were first hashed, with the default that leaves them out of ``digest``.
_LATER = {"sparse_steps": None}


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
    # Multi-source task SFTs: source language → {"train": data, "validation": data or None}; each batch comes
    # from one source with that language's SFT applied. Sampling: "proportional" to data size or "uniform".
    sources: dict[str, dict[str, str | None]] | None = None
    source_sampling: str = "proportional"
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str = "label"
    pair: bool | None = None
    labels: tuple[str, ...] | None = None
    # "sequence" or "token"; None = token for TOKEN_TASKS, else from the training file (CoNLL suffix, JSONL
    # with a tokens list: ``token_data.looks_tagged``), else sequence. ``to_dict`` records the resolved type.
    # Token data's JSONL keys: ``tokens`` / ``tags``, or text_column / label_column when set.
    task_type: str | None = None
    holdout: float = 0.05
    # Schedule: steps = clamp(epochs × steps per epoch, min_steps, max_steps), the same in both phases unless
    # sparse_steps sets the sparse phase's apart (the LT-SFT reference's sparse_ft_*_per_iteration settings are
    # separate from the full phase's): the sparse phase starts again from θ0 with k entries to move, and may
    # need longer to get back to where phase 1 ended.
    epochs: float = 1.0
    max_steps: int | None = None
    min_steps: int = 0
    sparse_steps: int | None = None
    eval_steps: int = 1000
    batch_size: int = 8  # per micro-batch; an optimiser step sees batch_size × grad_accum examples
    grad_accum: int = 1
    eval_batch_size: int = 32
    max_length: int = 256
    # Training batches of similar length (transformers' group_by_length: seeded mega-batches sorted by
    # length), so dynamic padding adds few tokens; nothing is dropped. MLM's blocks share one length, so
    # there it changes nothing but where the one shorter last block falls.
    group_by_length: bool = True
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
    # (HEAD_WARMUP_STEPS when the base lacks an MLM head, else 0); 0 = off. max_steps caps it too.
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

    @cached_property
    def resolved_task_type(self) -> str | None:
        """``"token"`` (NER, POS: a tag per word) or ``"sequence"`` for a task SFT, None for a language SFT."""
        if self.kind != "task":
            return None
        if self.task_type is not None:
            return self.task_type
        if self.task in TOKEN_TASKS:
            return "token"
        data = self._first_train_file
        return "token" if data is not None and looks_tagged(data, self.token_keys[0]) else "sequence"

    @property
    def token_task(self) -> bool:
        """A token-level task SFT (NER, POS): a token-classification head, tagged data, entity / tag scores."""
        return self.resolved_task_type == "token"

    @property
    def token_keys(self) -> tuple[str, str]:
        """The JSONL keys of token data's words and tags: ``tokens`` / ``tags`` unless the columns are set."""
        return self.text_column or "tokens", self.label_column if self.label_column != "label" else "tags"

    @property
    def collator_kind(self) -> str:
        """``features.make_collator``'s kind: MLM masking, tag padding (token tasks) or plain padding."""
        return "tagging" if self.token_task else self.kind

    @property
    def _first_train_file(self) -> str | None:
        if self.train is not None:
            return self.train
        sources = self.sources or {}
        return next((d.get("train") for d in sources.values() if isinstance(d, dict) and d.get("train")), None)

    @cached_property
    def best_metric(self) -> str:
        """Checkpoint selection: validation loss for MLM, accuracy for NLI, macro-F1 otherwise; token tasks:
        entity F1 for BIO / IOBES entity tags (NER), accuracy for other tag sets (POS), decided by ``labels``,
        else the training file's tags, else the task name (``ner``)."""
        if self.metric:
            return self.metric
        if self.kind == "language":
            return "loss"
        if self.token_task:
            return self._token_metric()
        return "accuracy" if self.task in PAIR_TASKS else "macro_f1"

    def _token_metric(self) -> str:
        labels = self.labels
        data = self._first_train_file
        if labels is None and data is not None and looks_tagged(data, self.token_keys[0]) is not False:
            try:
                labels = tuple(load_tagged(data, tokens_key=self.token_keys[0], tags_key=self.token_keys[1]).labels)
            except BadInputError:
                labels = None  # unreadable here; the trainer reports the error when it loads the data
        if labels is None:
            return ENTITY_METRIC if self.task == "ner" else TAG_METRIC
        return best_metric(labels)

    def with_changes(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied; ``None`` values mean "keep" (unset CLI flags)."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["labels"] = list(self.labels) if self.labels is not None else None
        data["task_type"] = self.resolved_task_type
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
        """Stable hash of the whole configuration: names the run directory used by ``--resume``. Options added
        after a release are hashed only when set, so a config written before them keeps its digest (its run
        directory resumes, caches keyed by it stay valid)."""
        data = self.to_dict()
        return _digest({key: value for key, value in data.items() if not (key in _LATER and value == _LATER[key])})

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
        self._check_sources()
        if self.precision not in PRECISIONS:
            raise BadInputError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise BadInputError(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        self._check_task_type()
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
        if self.sparse_steps is not None and self.sparse_steps <= 0:
            raise BadInputError(f"sparse_steps must be positive, not {self.sparse_steps}")
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

    def _check_sources(self) -> None:
        if self.source_sampling not in SAMPLINGS:
            raise BadInputError(f"source sampling must be one of {', '.join(SAMPLINGS)}, not {self.source_sampling!r}")
        if self.sources is None:
            return
        if self.kind != "task":
            raise BadInputError("several source languages apply to task SFTs only")
        if not self.sources:
            raise BadInputError("a multi-source task SFT needs at least one source language")
        if self.train is not None or self.validation is not None:
            raise BadInputError("give the data of each source language (LANG=DATA), not --train/--validation as well")
        for language, data in self.sources.items():
            if not isinstance(data, dict) or set(data) - {"train", "validation"}:
                raise BadInputError(f"source {language!r}: expected {{'train': …, 'validation': …}}, not {data!r}")

    def _check_task_type(self) -> None:
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise BadInputError(
                f"task type must be one of {', '.join(TASK_TYPES)} (a label per text or a tag per word), "
                f"not {self.task_type!r}"
            )
        if self.task_type is not None and self.kind != "task":
            raise BadInputError("a task type (sequence or token) applies to task SFTs only")
        if self.metric is None or self.kind != "task":
            return
        if self.token_task and self.metric not in TOKEN_METRICS:
            raise BadInputError(f"a token task is selected by one of {', '.join(TOKEN_METRICS)}, not {self.metric!r}")
        if not self.token_task and self.metric == "entity_f1":
            raise BadInputError("metric entity_f1 scores token tasks (NER); a sequence task uses macro_f1 or accuracy")

    def _check_method_specs(self) -> None:
        """Rank and k are checked now, not after hours of the full phase."""
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
        names = []
        if not self.sparse_phase:
            everything = str(self.k).strip().lower() == "all"
            names.append("w/o magnitude pruning + sparse fine-tuning" if everything else "w/o sparse fine-tuning")
        if self.method == "deftx" and self.keep == 0:
            names.append("w/o higher-order components")
        return "; ".join(names) or None

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimiser step."""
        return self.batch_size * self.grad_accum

    def head_warmup_for(self, fresh_head: bool, capped: bool = True) -> int:
        """Head warm-up steps of a run whose base lacks (``fresh_head``) or has an MLM head.

        ``max_steps`` caps it like every phase (``capped``), so a smoke run's ``--max-steps`` bounds the
        whole run rather than leaving 200 warm-up steps on a 250 k-row vocabulary.
        """
        if self.head_warmup_steps is not None:
            steps = self.head_warmup_steps
        else:
            steps = HEAD_WARMUP_STEPS if fresh_head and self.kind == "language" else 0
        return min(steps, self.max_steps) if capped and self.max_steps is not None else steps

    def total_steps(self, examples: int) -> int:
        """Optimiser steps of one phase for ``examples`` training examples (LT-SFT's rule)."""
        per_epoch = -(-examples // self.effective_batch_size)
        steps = max(round(self.epochs * per_epoch), self.min_steps, 1)
        return min(steps, self.max_steps) if self.max_steps is not None else steps

    def sparse_phase_steps(self, examples: int) -> int:
        """Optimiser steps of the sparse phase: ``sparse_steps``, else as many as phase 1."""
        return self.sparse_steps if self.sparse_steps is not None else self.total_steps(examples)


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
