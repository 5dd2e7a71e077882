"""The two-phase trainer (LT-SFT, with DEFT-X's denoising between the phases).

1. Full phase: from θ_start (θ0, or θ0 + φ_source for a task SFT), fine-tune every maskable
   parameter and the head (LayerNorm frozen); keep the best checkpoint θ1 by the validation metric.
2. Selection: δ = θ1 − θ_start; DEFT-X denoises each matrix (``rank`` ``none`` skips this: LT-SFT);
   the mask is the k largest |δ| over all maskable parameters (``sftkit.deftx``).
3. Sparse phase: back to θ_start with the head as initialised, train only the masked entries and the
   head (``SparseUpdater``: memory ∝ k), optional L1 towards θ_start; keep the best checkpoint θ2.
4. φ = θ2 − θ_start at the mask (exactly k entries) plus the head, with metadata saying how it was made.

Models, tokenisers, collators and schedules are 🤗 transformers'; the loop is ours because the sparse
phase must not hold what a dense trainer holds (dense gradient buckets, dense optimiser state).
Runs under ``torchrun`` (DDP in the full phase, one flat all-reduce of ∝ k gradients in the sparse
phase); every step's randomness is seeded from (seed, phase, rank, step), so ``resume`` continues an
interrupted run exactly.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Generator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_linear_schedule_with_warmup

from sftkit import deftx
from sftkit.base_model import load_base_reporting, load_tokenizer, quiet_transformers, untie_decoder
from sftkit.errors import BadInputError, BaseMismatchError, SftkitError
from sftkit.fingerprint import base_fingerprint
from sftkit.params import encoder_of, head_parameters, is_maskable_name, maskable_parameters
from sftkit.sft import SFTMetadata, SparseDelta, SparseFineTuning
from sftkit.training.checkpoint import WARM_UP_ENTRY, CheckpointClock, RunDirectory
from sftkit.training.config import TrainConfig
from sftkit.training.distributed import Dist
from sftkit.training.evaluation import confusion_of, scores, tag_counts_of
from sftkit.training.features import (
    IGNORE,
    BatchOrder,
    batch_tokens,
    fixed_batches,
    make_collator,
)
from sftkit.training.full_phase_cache import FullPhase, FullPhaseCache, cache_key
from sftkit.training.mlm import masked_lm_loss, warm_up_head
from sftkit.training.optim import RowSparseAdamW, clip_grad_norm_
from sftkit.training.run_data import load_run_data, load_source_data
from sftkit.training.sparse import SparseUpdater, unique_head_parameters
from sftkit.training.streams import Stream, applied, sources_digest, step_schedule
from sftkit.training.token_metrics import tag_scores

PHASES = ("full", "sparse")
WARM_UP = "head warm-up"  # fitting a fresh MLM head before phase 1
# Checkpoints also this often (minutes), not only at evaluations: an interrupted run loses little.
DEFAULT_CHECKPOINT_MINUTES = 10.0
HEAD_TYPES = {"language": "masked-lm", "task": "sequence-classification", "token": "token-classification"}
# What a token task's validation reports (``token_metrics.tag_scores``; entity scores for NER only).
TOKEN_SCORES = ("entity_f1", "entity_precision", "entity_recall", "accuracy", "macro_f1")


def _head_type(config: TrainConfig) -> str:
    """The head a run trains: masked LM, sequence classification, or token classification (NER, POS)."""
    return HEAD_TYPES["token" if config.token_task else config.kind]


class Reporter(Protocol):
    """Progress events (only the main process reports); the CLI renders them as bars or log lines.

    ``step`` gets the learning rate the step used and the input tokens it processed (padding excluded,
    all processes together), so a reporter can show throughput without knowing the batches.
    """

    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None: ...
    def step(self, step: int, loss: float, lr: float, tokens: int) -> None: ...
    def evaluated(self, step: int, metrics: dict[str, Any]) -> None: ...
    def phase_finished(self, phase: str, summary: dict[str, Any]) -> None: ...
    def note(self, message: str) -> None: ...


class NullReporter:
    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
        pass

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        pass

    def evaluated(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def phase_finished(self, phase: str, summary: dict[str, Any]) -> None:
        pass

    def note(self, message: str) -> None:
        pass


@dataclass
class TrainResult:
    sft: SparseFineTuning
    model: Any  # θ2 with its head: θ_start + φ
    tokenizer: Any
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The selected entries as boolean masks of every maskable parameter (built on demand)."""
        masks = {}
        for name, param in maskable_parameters(self.model):
            mask = torch.zeros(param.numel(), dtype=torch.bool)
            if name in self.sft.diffs:
                mask[self.sft.diffs[name].indices] = True
            masks[name] = mask.view(param.shape)
        return masks


def train_sft(config: TrainConfig, **kwargs: Any) -> SparseFineTuning:
    """Train and return the SFT (see ``train`` for the keyword arguments)."""
    return train(config, **kwargs).sft


def train(
    config: TrainConfig,
    *,
    train_data: Sequence[Any] | Mapping[str, Any] | str | None = None,
    validation_data: Sequence[Any] | Mapping[str, Any] | str | None = None,
    source: SparseFineTuning | None = None,
    source_lineage: dict[str, Any] | None = None,
    sources: Mapping[str, SparseFineTuning] | None = None,
    source_lineages: Mapping[str, dict[str, Any]] | None = None,
    work_dir: str | Path | None = None,
    resume: bool = False,
    keep_work_dir: bool = False,
    reporter: Reporter | None = None,
    full_phase_cache: str | Path | None = None,
    checkpoint_minutes: float | None = DEFAULT_CHECKPOINT_MINUTES,
) -> TrainResult:
    """Train one SFT as ``config`` says.

    ``train_data`` / ``validation_data``: in-memory data (texts; ``(text, label)`` or ``(premise,
    hypothesis, label)`` tuples) or a path, overriding ``config.train`` / ``config.validation``.
    ``source``: the source-language SFT a task SFT starts from (θ_start = θ0 + φ_source); its
    ``source_lineage`` ({reference, sha256, language}) goes into the metadata. ``sources``: a multi-source
    task SFT's language SFTs by language (θ_start = θ0; each batch comes from one source with its SFT
    applied), their data in ``config.sources`` or as ``train_data`` / ``validation_data`` mappings by
    language, their lineage in ``source_lineages``. ``work_dir`` holds
    checkpoints (a temporary directory by default); ``resume`` continues the interrupted run in it.
    The run directory is removed after success unless ``keep_work_dir``. ``full_phase_cache``: a
    directory where phase 1 is looked up and stored, shared by runs that differ only in method, rank,
    keep or k (``sftkit.training.full_phase_cache``). ``checkpoint_minutes``: also checkpoint when this
    much time has passed since the last checkpoint, not only at evaluations (None or 0: only there).
    """
    dist = Dist.from_environment()
    try:
        run = _Run.set_up(
            config,
            dist,
            reporter if (reporter is not None and dist.is_main) else NullReporter(),
            (train_data, validation_data),
            source,
            source_lineage,
            sources,
            source_lineages,
            work_dir,
            resume,
            FullPhaseCache(full_phase_cache) if full_phase_cache is not None else None,
            checkpoint_minutes,
        )
        sft = run.execute()
        if work_dir is None or not keep_work_dir:
            run.run_dir.remove()
    except BaseException:
        dist.close(synchronise=False)
        raise
    dist.close()
    return TrainResult(sft, run.model, run.tokenizer, sft.metadata.metrics)


def _source_languages(config: TrainConfig, sources: Mapping[str, SparseFineTuning] | None) -> list[str]:
    """The source languages of a multi-source run (each needs data and an SFT); none for one stream."""
    named = set(config.sources or {})
    given = set(sources or {})
    if not named and not given:
        return []
    if named and not given:
        raise BadInputError(
            f"config.sources names {', '.join(sorted(named))}: pass their language SFTs as sources={{language: SFT}}"
        )
    if named and named != given:
        missing = ", ".join(sorted(named ^ given))
        raise BadInputError(f"every source language needs both data and a language SFT; unmatched: {missing}")
    return sorted(given)


def _check_source(source: SparseFineTuning, fingerprint: str, config: TrainConfig) -> None:
    """A source SFT must be a language SFT trained on this very base."""
    if config.kind == "language":
        raise BadInputError("a source-language SFT only applies to task SFTs")
    if source.metadata.kind != "language":
        raise BadInputError("the source SFT must be a language SFT")
    theirs = source.metadata.base_fingerprint
    if theirs is not None and theirs != fingerprint:
        raise BaseMismatchError(
            f"source-language SFT {source.metadata.name!r} was trained on base "
            f"{source.metadata.base_model!r}, not on {config.base_model!r}"
        )


@dataclass(frozen=True)
class _StartModel:
    model: nn.Module
    base_fingerprint: str
    head: list[tuple[str, nn.Parameter]]
    fresh_head: list[str]
    head_warmup_steps: int
    maskable_entries: int
    k: int


def _load_model(
    config: TrainConfig, device: torch.device, labels: list[str] | None, source: SparseFineTuning | None
) -> _StartModel:
    """θ_start: θ0 with the job's head (decoder untied and frozen for MLM), plus φ_source for a task SFT."""
    cfg, language_mode = config, config.kind == "language"
    torch.manual_seed(cfg.seed)  # the classifier head's initialisation
    with quiet_transformers():
        model, missing = load_base_reporting(cfg.base_model, _head_type(cfg), labels, cfg.base_revision)
    model = model.to(device)
    fingerprint = base_fingerprint(model)
    prefix = f"{model.base_model_prefix}."
    # Head weights the checkpoint lacked: a sentence encoder (mE5, MiniLM) loaded with a fresh MLM head.
    fresh_head = [name for name in missing if not name.startswith(prefix)]
    frozen = untie_decoder(model, freeze=True) if language_mode and cfg.freeze_decoder else None
    head = [(name, p) for name, p in unique_head_parameters(model) if p is not frozen]
    warmup_steps = cfg.head_warmup_for(bool(fresh_head)) if language_mode else 0
    if source is not None:
        _check_source(source, fingerprint, cfg)
        source.apply(model, with_head=False)
    maskable_entries = sum(param.numel() for _, param in maskable_parameters(model))
    k = resolve_k(cfg.k, maskable_entries)
    return _StartModel(model, fingerprint, head, fresh_head, warmup_steps, maskable_entries, k)


def _step_seed(seed: int, phase: int, rank: int, step: int) -> int:
    return (((seed * 7919 + phase) * 1_000_003 + step) * 131 + rank) % (2**63)


def resolve_k(k: int | float | str, maskable_entries: int) -> int:
    """A count (``7600000``, ``"7.6M"``), a fraction of the maskable entries (``0.028``) or ``"all"`` → a count."""
    if isinstance(k, str) and k.strip().lower() == "all":
        return maskable_entries
    value = deftx.parse_k(k) if isinstance(k, str) else k
    count = round(value * maskable_entries) if isinstance(value, float) and value < 1 else int(value)
    if not 1 <= count <= maskable_entries:
        raise BadInputError(f"k = {k} selects {count} entries, but the model has {maskable_entries} maskable entries")
    return count


class _DensePhase:
    """Full fine-tuning of the maskable parameters and the head (DDP across processes).

    Word embeddings train with row gradients (``nn.Embedding(sparse=True)``) and ``RowSparseAdamW``
    when nothing else reads them densely (no tied decoder), weight decay is 0 and the run is not
    distributed: rows never seen keep zero moments and an exactly zero AdamW update, so stepping only
    rows seen so far is exact and saves most of a step on a 250 k vocabulary. The L1 term towards
    θ_start (LT-SFT's ``full_l1_reg``: the reference regularises both phases) runs over the rows seen
    so far for the same reason: the others sit at θ_start, where |θ − θ_start| has zero subgradient.
    """

    def __init__(
        self,
        model: nn.Module,
        head: list[tuple[str, nn.Parameter]],
        dist: Dist,
        device: torch.device,
        start_state: Mapping[str, torch.Tensor],
        l1: float,
        scale: int,
        row_sparse_words: bool,
    ) -> None:
        for param in encoder_of(model).parameters():
            param.requires_grad_(False)
        self.maskable = list(maskable_parameters(model))
        self.head = head
        for _, param in self.maskable + self.head:
            param.requires_grad_(True)
        self.forward_model: nn.Module = model
        self.l1, self.scale = l1, max(1, scale)
        words = model.get_input_embeddings()
        self.words = words if row_sparse_words and not dist.active and words.weight.requires_grad else None
        self.seen_rows = torch.zeros(words.weight.shape[0], dtype=torch.bool)
        if self.words is not None:
            self.words.sparse = True
        self.l1_terms: list[tuple[nn.Parameter, torch.Tensor]] = []
        if l1:
            for name, param in self.maskable:
                self.l1_terms.append((param, start_state[f"enc::{name}"].to(param.device)))
            for name, param in self.head:
                self.l1_terms.append((param, start_state[f"head::{name}"].to(param.device)))
        if dist.active:
            self.forward_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

    def parameters(self) -> list[torch.Tensor]:
        return [param for _, param in self.maskable + self.head]

    def optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if self.words is not None and weight_decay == 0:
            return RowSparseAdamW(self.parameters(), lr=lr, weight_decay=0.0)
        if self.words is not None:  # weight decay moves every row: the dense update is the exact one
            self.words.sparse = False
            self.words = None
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)

    def observe(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.seen_rows[batch["input_ids"].reshape(-1).cpu()] = True

    def regularisation(self) -> torch.Tensor:
        """λ · Σ|θ − θ_start| / scale over the maskable parameters and the head (zero when λ = 0)."""
        if not self.l1:
            return torch.zeros(())
        words = self.words.weight if self.words is not None else None
        total = torch.zeros(())
        for param, start in self.l1_terms:
            if param is words:
                rows = self.seen_rows.nonzero().flatten().to(param.device)
                seen = nn.functional.embedding(rows, param, sparse=True)  # a row gradient, like the lookup's
                total = total + (seen - start.index_select(0, rows)).abs().sum()
            else:
                total = total + (param - start).abs().sum()
        return total * (self.l1 / self.scale)

    def reduce_gradients(self) -> None:
        pass  # DDP averaged them during backward

    def after_step(self) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor]:
        state = {f"enc::{name}": p.detach().cpu().clone() for name, p in self.maskable}
        state.update({f"head::{name}": p.detach().cpu().clone() for name, p in self.head})
        return state

    @torch.no_grad()
    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, param in self.maskable:
            param.copy_(state[f"enc::{name}"])
        for name, param in self.head:
            param.copy_(state[f"head::{name}"])
        words = self.words.weight if self.words is not None else None
        for param, start in self.l1_terms:  # a resumed run: rows seen before the interruption moved from θ_start
            if param is words:
                self.seen_rows |= (param.detach() != start).any(dim=1).cpu()

    def close(self) -> None:
        self.forward_model = None  # drops DDP's gradient hooks before the sparse phase
        if self.words is not None:
            self.words.sparse = False
        self.l1_terms.clear()
        gc.collect()


class _SparsePhase:
    """Only the masked entries and the head train; gradients (∝ k) are averaged across processes."""

    def __init__(
        self,
        model: nn.Module,
        head: list[tuple[str, nn.Parameter]],
        masks: Mapping[str, torch.Tensor],
        dist: Dist,
        l1: float,
        scale: int,
    ):
        self.updater = SparseUpdater(model, masks, l1=l1, l1_scale=scale, head=head)
        self.forward_model = model
        self.dist = dist

    def parameters(self) -> list[torch.Tensor]:
        return self.updater.parameters()

    def optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)

    def observe(self, batch: Mapping[str, torch.Tensor]) -> None:
        pass

    def regularisation(self) -> torch.Tensor:
        return self.updater.regularisation()

    def reduce_gradients(self) -> None:
        self.dist.average_gradients(self.updater.parameters())

    def after_step(self) -> None:
        self.updater.write_back()

    def state(self) -> dict[str, torch.Tensor]:
        return self.updater.state()

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.updater.load_state(state)

    def close(self) -> None:
        self.updater.close()


@dataclass
class _Run:
    """Everything one training run holds, built by ``_Run.set_up`` before its first step."""

    config: TrainConfig
    dist: Dist
    reporter: Reporter
    device: torch.device
    language_mode: bool  # MLM on raw text (a language SFT) or classification (a task SFT)
    tokenizer: Any
    streams: list[Stream]  # the training examples: one stream, or one per source language (multi-source)
    schedule: list[tuple[int, int]]  # per optimiser step: (stream, that stream's own step)
    validation_items: int  # how many validation examples
    validation_batches: list[tuple[int, dict[str, torch.Tensor]]]  # (stream, batch), collated once
    labels: list[str] | None  # a task's label names, in id order
    data_record: dict[str, Any]  # what the data was (sft_config.json's ``data``)
    collate: Any  # examples → a batch (MLM masking drawn from the step's seed)
    total_steps: int  # phase 1's (and the head warm-up's cap)
    sparse_steps: int  # the sparse phase's: config.sparse_steps, else total_steps
    model: nn.Module  # θ_start: θ0 (+ φ_source for a task SFT), moved to ``device``
    base_fingerprint: str  # θ0's, before any source SFT was applied
    head: list[tuple[str, nn.Parameter]]  # trained fully (not a frozen decoder)
    fresh_head: list[str]  # head weights the checkpoint lacked
    head_warmup_steps: int
    lineage: dict[str, Any] | None  # the source SFT's reference, sha256 and language
    source_lineages: list[dict[str, Any]] | None  # a multi-source SFT's sources, by language
    source_digest: str | None  # the source SFTs' content (part of the full-phase cache key)
    maskable_entries: int
    k: int  # entries to select
    run_dir: RunDirectory  # checkpoints, best states, the selection
    resuming: bool
    full_cache: FullPhaseCache | None
    checkpoint_minutes: float | None  # checkpoint also when this long since the last one
    # Filled in as the run goes on:
    head_warmup: dict[str, Any] = field(default_factory=dict)  # the warm-up's record

    @classmethod
    def set_up(
        cls,
        config: TrainConfig,
        dist: Dist,
        reporter: Reporter,
        data: tuple[Any, Any],
        source: SparseFineTuning | None,
        lineage: dict[str, Any] | None,
        sources: Mapping[str, SparseFineTuning] | None,
        source_lineages: Mapping[str, dict[str, Any]] | None,
        work_dir: str | Path | None,
        resume: bool,
        full_cache: FullPhaseCache | None,
        checkpoint_minutes: float | None,
    ) -> _Run:
        """Load the tokenizer, the data and θ_start, and open the run directory."""
        device = dist.device(config.device)
        if config.precision == "fp16" and device.type != "cuda":
            raise BadInputError(f"precision fp16 needs a CUDA GPU (this run is on {device.type}): use bf16 or fp32")
        if source is not None and sources:
            raise BadInputError("give one source-language SFT or several sources, not both")
        languages = _source_languages(config, sources)
        tokenizer = load_tokenizer(config.base_model, config.base_revision)
        if languages:
            loaded = load_source_data(config, tokenizer, data, languages)
        else:
            loaded = [load_run_data(config, tokenizer, *data)]
        labels = loaded[0].labels
        if source is not None and lineage is None:
            lineage = {"reference": None, "sha256": None, "language": source.metadata.language}
        start = _load_model(config, device, labels, source)
        sfts = dict(sources or {})
        for sft in sfts.values():
            _check_source(sft, start.base_fingerprint, config)
        lineages = None
        if sources:
            given = source_lineages or {}
            lineages = [
                {"reference": None, "sha256": None, **given.get(language, {}), "language": language}
                for language in sorted(sfts)
            ]
        language_mode = config.kind == "language"
        validation_collate = make_collator(config.collator_kind, tokenizer, config.mlm_probability, seed=config.seed)
        validation_batches = []
        for index, part in enumerate(loaded):
            # Task validation sorted by length (less padding; the metrics ignore order); MLM blocks are equal.
            held = part.validation_items if language_mode else sorted(part.validation_items, key=_length)
            validation_batches += [(index, b) for b in fixed_batches(held, validation_collate, config.eval_batch_size)]
        batch = config.effective_batch_size
        streams = [
            Stream(
                language,
                sfts.get(language) if language else None,
                part.train_items,
                BatchOrder(
                    len(part.train_items),
                    batch,
                    config.seed,
                    dist.rank,
                    dist.world,
                    lengths=[_length(item) for item in part.train_items] if config.group_by_length else None,
                ),
            )
            for language, part in zip(languages or [None], loaded, strict=True)
        ]
        sizes = [len(part.train_items) for part in loaded]
        total_steps, sparse_steps = config.total_steps(sum(sizes)), config.sparse_phase_steps(sum(sizes))
        record = (
            loaded[0].record
            if not languages
            else {"sources": {language: part.record for language, part in zip(languages, loaded, strict=True)}}
        )
        if work_dir is None and resume:
            raise BadInputError("resume needs the run directory of the interrupted run (work_dir)")
        directory = str(work_dir) if work_dir else None
        if directory is None and dist.is_main:
            directory = tempfile.mkdtemp(prefix="sftkit-run-")
        run_dir = RunDirectory(dist.broadcast(directory), writer=dist.is_main)
        manifest = {
            "config": config.to_dict(),
            "data": record,
            "source_sft": lineage if source is not None else lineages,
            "world_size": dist.world,
        }
        resuming = run_dir.start(manifest, resume)
        dist.barrier()
        if resuming:
            where = _resume_point(run_dir, (total_steps, sparse_steps), start)
            reporter.note(f"resuming the run in {run_dir.path}: {where}")
        digest = source.delta_digest() if source is not None else (sources_digest(sfts) if sfts else None)
        return cls(
            config=config,
            dist=dist,
            reporter=reporter,
            device=device,
            language_mode=language_mode,
            tokenizer=tokenizer,
            streams=streams,
            schedule=step_schedule(sizes, batch, config.source_sampling, config.seed, max(total_steps, sparse_steps)),
            validation_items=sum(len(part.validation_items) for part in loaded),
            validation_batches=validation_batches,
            labels=labels,
            data_record=record,
            collate=make_collator(config.collator_kind, tokenizer, config.mlm_probability),
            total_steps=total_steps,
            sparse_steps=sparse_steps,
            model=start.model,
            base_fingerprint=start.base_fingerprint,
            head=start.head,
            fresh_head=start.fresh_head,
            head_warmup_steps=start.head_warmup_steps,
            lineage=lineage if source is not None else None,
            source_lineages=lineages,
            source_digest=digest,
            maskable_entries=start.maskable_entries,
            k=start.k,
            run_dir=run_dir,
            resuming=resuming,
            full_cache=full_cache,
            checkpoint_minutes=checkpoint_minutes,
        )

    def _capture_start(self) -> dict[str, torch.Tensor]:
        """θ_start of the encoder and the head as it enters phase 1 (after any warm-up), on the CPU."""
        return {
            **{f"enc::{name}": p.detach().cpu().clone() for name, p in maskable_parameters(self.model)},
            **{f"head::{name}": p.detach().cpu().clone() for name, p in self.head},
        }

    def _warm_up_head(self) -> None:
        """Fit a fresh MLM head with the encoder frozen, so phase 1's δ holds no head-fitting noise."""
        steps = self.head_warmup_steps
        self.head_warmup = {"steps": steps, "fresh_head_weights": self.fresh_head}
        if not steps:
            return
        if self.resuming and (done := self.run_dir.done(WARM_UP_ENTRY)) is not None:
            self._load_head(self.run_dir.load_best(WARM_UP_ENTRY))  # fitted before the interruption: not again
            self.head_warmup = done
            return
        cfg = self.config
        wanted = cfg.head_warmup_for(bool(self.fresh_head), capped=False)
        capped = f" (max steps caps the {wanted})" if wanted > steps else ""
        self.reporter.note(f"fitting the fresh MLM head for {steps} steps{capped} with the encoder frozen")
        self.reporter.phase_started(WARM_UP, steps, 0)

        items = self.streams[0].items  # a language SFT: one stream
        whole = BatchOrder(len(items), cfg.batch_size, cfg.seed)  # every process: the same batches

        def batch_at(step: int) -> dict[str, torch.Tensor]:
            torch.manual_seed(_step_seed(cfg.seed, 2, 0, step))
            batch = self.collate([items[i] for i in whole.indices(step)])
            return {key: value.to(self.device) for key, value in batch.items()}

        losses = warm_up_head(self.model, self.head, batch_at, steps, cfg.head_warmup_lr, self.reporter.step)
        self.head_warmup.update({"lr": cfg.head_warmup_lr, "first_loss": losses[0], "last_loss": losses[-1]})
        if self.dist.is_main:
            self.run_dir.save_best(WARM_UP_ENTRY, {name: param for name, param in self.head})
            self.run_dir.mark_done(WARM_UP_ENTRY, self.head_warmup)
        self.reporter.phase_finished(WARM_UP, {"steps": steps, "first_loss": losses[0], "loss": losses[-1]})

    # ------------------------------------------------------------------ the run
    def execute(self) -> SparseFineTuning:
        """Phase 1 (or its cached result), selection, phase 2; returns φ."""
        cfg, resuming = self.config, self.resuming
        summaries = {}
        selection = self.run_dir.load_selection() if resuming else None
        if selection is None:
            full = self._cached_full_phase()
            if full is None:
                self._warm_up_head()
                start = self._capture_start()
                dense = _DensePhase(
                    self.model,
                    self.head,
                    self.dist,
                    self.device,
                    start,
                    cfg.l1,
                    self.maskable_entries,
                    row_sparse_words=cfg.freeze_decoder or not self.language_mode,
                )
                summary = self._train_phase(0, dense, resuming)
                dense.close()
                full = FullPhase(
                    self._full_deltas(start),
                    {name: start[f"head::{name}"] for name, _ in self.head},
                    {name: param.detach().cpu().clone() for name, param in self.head},
                    summary,
                )
                self._cache_full_phase(full)
            else:
                self.reporter.note("phase 1 taken from the full-phase cache")
                self._load_head(full.head_start)
                start = self._capture_start()
            self._record_full_phase(full)  # what a resume after the selection needs, however phase 1 was had
            summaries["full"] = full.summary
            masks, selection_info = self._select(full.summary, full.deltas)
            head_end = full.head_end
            del full
        else:
            masks, selection_info = selection
            summaries["full"] = self.run_dir.done("full") or {}
            self.head_warmup = self.run_dir.done(WARM_UP_ENTRY) or {}
            self._load_head(self.run_dir.load_best("start"))
            head_end = self.run_dir.load_best("head-end")
            start = self._capture_start()
        self._reset_to_start(start)
        del start  # the sparse phase keeps θ_start only at the k selected entries
        gc.collect()
        if not cfg.sparse_phase:
            diffs = self._selected_deltas(masks)
            SparseFineTuning(diffs, head_end).apply(self.model)  # θ_start + φ with θ1's head
            # The stored model (θ_start + μ ⊙ denoised δ, θ1's head) is not θ1: score what is kept.
            summaries["final"] = self._evaluate()
            sft = self._build_sft(diffs, summaries, selection_info)
        else:
            sparse = _SparsePhase(self.model, self.head, masks, self.dist, cfg.l1, self.maskable_entries)
            del masks  # the updater keeps the selected indices only: memory ∝ k
            summaries["sparse"] = self._train_phase(1, sparse, resuming)
            sft = self._build_sft(sparse.updater.deltas(), summaries, selection_info)
            sparse.close()
        self._check_ranks_agree(sft)
        for param in self.model.parameters():
            param.requires_grad_(True)
        return sft

    # ------------------------------------------------------------------ phase 1 shared between methods
    def _full_phase_key(self) -> str:
        return cache_key(
            self.config.full_phase_digest(),
            self.data_record,
            self.source_digest,
            self.base_fingerprint,
            self.dist.world,
        )

    def _cached_full_phase(self) -> FullPhase | None:
        if self.full_cache is None:
            return None
        full = self.full_cache.load(self._full_phase_key())
        if full is not None:
            self.head_warmup = full.summary.pop("head_warmup", {})
        return full

    def _full_deltas(self, start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """δ = θ1 − θ_start of every maskable parameter (float32, on the CPU)."""
        return {
            name: param.detach().float().cpu() - start[f"enc::{name}"].float()
            for name, param in maskable_parameters(self.model)
        }

    def _cache_full_phase(self, full: FullPhase) -> None:
        if self.dist.is_main and self.full_cache is not None:
            summary = {**full.summary, "head_warmup": self.head_warmup}
            self.full_cache.save(self._full_phase_key(), replace(full, summary=summary))

    def _record_full_phase(self, full: FullPhase) -> None:
        if self.dist.is_main:
            self.run_dir.save_best("start", full.head_start)
            self.run_dir.save_best("head-end", full.head_end)
            self.run_dir.mark_done(WARM_UP_ENTRY, self.head_warmup)

    @torch.no_grad()
    def _load_head(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, param in self.head:
            param.copy_(state[name].to(param.device))

    def _select(
        self, full_summary: dict[str, Any], deltas: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """δ = θ1 − θ_start → (DEFT-X denoising) → global top-k mask; computed once, shared by file."""
        cfg = self.config
        if self.dist.is_main:
            rank = deftx.parse_rank(cfg.rank)
            self.reporter.note(f"selecting {self.k:,} of {self.maskable_entries:,} entries (rank {cfg.rank})")
            report: list[dict[str, Any]] = []
            if rank is not None:
                deltas, report = deftx.denoise_all(deltas, rank, keep=cfg.keep, maskable=is_maskable_name)
            masks = deftx.select(deltas, self.k)
            if not cfg.sparse_phase:  # φ is the (denoised) δ at the mask: keep those values
                selected = {name: deltas[name].reshape(-1)[mask.reshape(-1)] for name, mask in masks.items()}
                self.run_dir.save_best("selected", selected)
            del deltas
            self.run_dir.save_selection(masks, {"rank_report": report, "k": self.k})
            self.run_dir.mark_done("full", full_summary)
        self.dist.barrier()
        loaded = self.run_dir.load_selection()
        assert loaded is not None
        return loaded

    def _selected_deltas(self, masks: Mapping[str, torch.Tensor]) -> dict[str, SparseDelta]:
        """φ without a sparse phase: the (denoised) δ at the mask, as ``_select`` stored it."""
        values = self.run_dir.load_best("selected")
        return {
            name: SparseDelta(tuple(mask.shape), mask.reshape(-1).nonzero().flatten(), values[name])
            for name, mask in masks.items()
            if bool(mask.any())
        }

    @torch.no_grad()
    def _reset_to_start(self, start: Mapping[str, torch.Tensor]) -> None:
        """θ_start for the encoder and the head as initialised: the sparse phase starts where the full one did."""
        for name, param in maskable_parameters(self.model):
            param.copy_(start[f"enc::{name}"])
        for name, param in self.head:
            param.copy_(start[f"head::{name}"])

    # ------------------------------------------------------------------ one phase
    def _train_phase(self, index: int, phase: _DensePhase | _SparsePhase, resuming: bool) -> dict[str, Any]:
        cfg, name = self.config, PHASES[index]
        steps = self.total_steps if index == 0 else self.sparse_steps
        if resuming and (done := self.run_dir.done(name)) is not None and index == 1:
            phase.load_state(self.run_dir.load_best(name))
            return done
        optimizer = phase.optimizer(cfg.lr, cfg.weight_decay)
        scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        warmup = int(cfg.warmup_ratio * steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, steps)
        metric = cfg.best_metric
        progress: dict[str, Any] = {"step": 0, "best": None, "best_step": None, "history": []}
        checkpoint = self.run_dir.load_checkpoint(name) if resuming else None
        if checkpoint is not None:
            state, optimizer_state, scheduler_state, progress = checkpoint
            phase.load_state(state)
            optimizer.load_state_dict(optimizer_state)
            scheduler.load_state_dict(scheduler_state)
            if scaler is not None and "grad_scaler" in progress:
                scaler.load_state_dict(progress["grad_scaler"])  # fp16: resume with the loss scale reached

        def save_checkpoint(step: int) -> None:
            progress["step"] = step
            if scaler is not None:
                progress["grad_scaler"] = scaler.state_dict()
            self.run_dir.save_checkpoint(name, phase.state(), optimizer, scheduler, progress)

        self.reporter.phase_started(name, steps, progress["step"])
        clock = CheckpointClock(self.checkpoint_minutes)
        self.model.train()
        for step in range(progress["step"], steps):
            stream, batches = self._micro_batches(index, step)
            lr, tokens = scheduler.get_last_lr()[0], sum(batch_tokens(batch) for batch in batches) * self.dist.world
            with applied(stream.sft, self.model):  # a multi-source batch: its language's SFT, exactly undone
                loss = self._accumulate(phase, batches, scaler)
            regulariser = phase.regularisation()  # on θ itself, once per step, after every micro-batch
            if regulariser.requires_grad:
                (scaler.scale(regulariser) if scaler is not None else regulariser).backward()
            phase.reduce_gradients()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm:
                clip_grad_norm_(phase.parameters(), cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            phase.after_step()
            self.reporter.step(step + 1, loss, lr, tokens)
            if (step + 1) % cfg.eval_steps == 0 or step + 1 == steps:
                metrics = self._evaluate()
                progress["history"].append({"step": step + 1, **metrics})
                if _better(metric, metrics[metric], progress["best"]):
                    progress["best"], progress["best_step"] = metrics[metric], step + 1
                    self.run_dir.save_best(name, phase.state())
                save_checkpoint(step + 1)
                clock.restart()
                self.reporter.evaluated(step + 1, metrics)
                self.dist.barrier()
            elif self.dist.is_main and clock.due():  # only the main process writes: no barrier needed
                save_checkpoint(step + 1)
                clock.restart()
        phase.load_state(self.run_dir.load_best(name))
        summary = {
            "steps": steps,
            "best_step": progress["best_step"],
            metric: progress["best"],
            "history": progress["history"],
        }
        if index == 1:
            self.run_dir.mark_done(name, summary)
        self.reporter.phase_finished(name, summary)
        return summary

    def _micro_batches(self, index: int, step: int) -> tuple[Stream, list[dict[str, torch.Tensor]]]:
        """The stream of optimiser step ``step`` and this process's examples of it, as ``grad_accum`` micro-batches."""
        cfg = self.config
        stream_index, stream_step = self.schedule[step]
        stream = self.streams[stream_index]
        torch.manual_seed(_step_seed(cfg.seed, index, self.dist.rank, step))
        examples = [stream.items[i] for i in stream.order.indices(stream_step)]
        size = -(-len(examples) // cfg.grad_accum)
        batches = [self.collate(examples[first : first + size]) for first in range(0, len(examples), size)]
        return stream, [{key: value.to(self.device) for key, value in batch.items()} for batch in batches]

    def _accumulate(
        self, phase: _DensePhase | _SparsePhase, batches: list[dict[str, torch.Tensor]], scaler: Any
    ) -> float:
        """Forward and backward over the micro-batches of one step; returns the step's loss (this process's).

        Each micro-batch's loss is weighted by its share of the step's labelled items (tokens for MLM
        and tagging, examples for classification) across all processes, so N micro-batches of b give the
        gradient of one batch of N·b — as transformers' Trainer normalises by ``num_items_in_batch``, the
        items of the whole step on every device. One all-reduce of the item count per step.
        """
        model = phase.forward_model
        counts = [int((batch["labels"] != IGNORE).sum()) for batch in batches]
        local_items = torch.tensor(sum(counts), dtype=torch.long, device=self.device)
        total_items = max(1, int(self.dist.sum_(local_items)))
        world = self.dist.world  # DDP and average_gradients divide by it: a process's items weigh world / total
        step_loss = 0.0
        for position, (batch, count) in enumerate(zip(batches, counts, strict=True)):
            phase.observe(batch)
            last = position == len(batches) - 1
            # DDP all-reduces on the last micro-batch only; the others accumulate locally.
            synchronised = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with synchronised:
                with self._autocast():
                    # MLM: logits at the masked positions only (sftkit.training.mlm); DDP needs its own forward.
                    if self.language_mode and model is self.model:
                        loss = masked_lm_loss(model, batch, reduction="sum") * world / total_items
                    else:  # a micro-batch without labelled items has a NaN mean: it contributes nothing
                        loss = model(**batch).loss.nan_to_num(0.0) * (count * world / total_items)
                step_loss += float(loss.detach())
                (scaler.scale(loss) if scaler is not None else loss).backward()
        return step_loss * total_items / (world * max(1, sum(counts)))  # the mean over this process's items

    def _autocast(self) -> Any:
        """Forward passes in the run's precision; master weights and gradients stay float32."""
        if self.config.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any]:
        """Validation metrics, each process scoring its share of the batches; sums all-reduced."""
        mine = self.validation_batches[self.dist.rank :: self.dist.world]
        self.model.eval()
        try:
            with self._autocast():
                batches = self._with_sources(mine)
                try:
                    return self._scores(batches)
                finally:
                    batches.close()  # a failed scoring still reverts the batch's source SFT
        finally:
            self.model.train()

    def _with_sources(
        self, batches: list[tuple[int, dict[str, torch.Tensor]]]
    ) -> Generator[dict[str, torch.Tensor], None, None]:
        """The batches, each one processed with its stream's language SFT applied (multi-source)."""
        for stream_index, batch in batches:
            with applied(self.streams[stream_index].sft, self.model):
                yield batch

    def _scores(self, mine: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """MLM loss over the masked tokens, a classifier's macro-F1 and accuracy, or a tagger's scores (entity
        F1 / precision / recall for NER, word accuracy and macro-F1 over tags or entity types)."""
        if self.language_mode:
            totals = torch.zeros(2, dtype=torch.float64)
            for batch in mine:
                batch = {key: value.to(self.device) for key, value in batch.items()}
                loss = masked_lm_loss(self.model, batch, reduction="sum")
                masked = float((batch["labels"] != IGNORE).sum())
                totals += torch.tensor([float(loss), masked], dtype=torch.float64)
            self.dist.sum_(totals)
            return {"loss": float(totals[0] / totals[1]) if totals[1] else float("nan")}
        assert self.labels is not None
        if self.config.token_task:
            tagged = tag_scores(self.dist.sum_(tag_counts_of(self.model, mine, self.labels)), self.labels)
            return {key: tagged[key] for key in TOKEN_SCORES if key in tagged}
        confusion = self.dist.sum_(confusion_of(self.model, mine, len(self.labels)))
        result = scores(confusion, self.labels)
        return {"macro_f1": result["macro_f1"], "accuracy": result["accuracy"]}

    # ------------------------------------------------------------------ the artifact
    def _build_sft(
        self, diffs: dict[str, SparseDelta], summaries: dict[str, Any], selection_info: dict[str, Any]
    ) -> SparseFineTuning:
        cfg = self.config
        trained = {id(param) for _, param in self.head}  # not a frozen decoder: it is θ0's word embeddings
        full = {
            name: param.detach().float().cpu().clone()
            for name, param in head_parameters(self.model)
            if id(param) in trained
        }
        trainer = cfg.to_dict()
        trainer.update(
            {
                "steps_per_phase": self.total_steps,
                "sparse_phase_steps": self.sparse_steps,
                "train_examples": sum(len(stream.items) for stream in self.streams),
                "validation_examples": self.validation_items,
                "world_size": self.dist.world,
                "device": self.device.type,
                "variant": cfg.variant,
            }
        )
        if self.language_mode:
            trainer["head_warmup"] = self.head_warmup
        metadata = SFTMetadata(
            kind=cfg.kind,
            language=cfg.language,
            task=cfg.task,
            labels=self.labels,
            base_model=cfg.base_model,
            base_revision=cfg.base_revision,
            base_fingerprint=self.base_fingerprint,
            head_type=_head_type(cfg),
            method=cfg.method,
            rank=str(cfg.rank).lower(),
            keep=cfg.keep if cfg.method == "deftx" else None,
            k=self.k,
            maskable_entries=self.maskable_entries,
            density=self.k / self.maskable_entries,
            source_sft=self.lineage,
            source_sfts=self.source_lineages,
            metrics=summaries,
            trainer=trainer,
            rank_report=selection_info.get("rank_report", []),
            data=self.data_record,
        )
        sft = SparseFineTuning(diffs, full, metadata)
        if sft.num_entries != self.k:
            raise SftkitError(f"internal error: the SFT has {sft.num_entries} entries, not k = {self.k}")
        return sft

    def _check_ranks_agree(self, sft: SparseFineTuning) -> None:
        """Every process must end with the same φ (same masks, same values); fail loudly otherwise."""
        if not self.dist.active:
            return
        digests = self.dist.gather(sft.delta_digest())
        if len(set(digests)) != 1:
            raise SftkitError(f"the {self.dist.world} processes ended with different SFTs: {digests}")


def _resume_point(run_dir: RunDirectory, steps: tuple[int, int], start: _StartModel) -> str:
    """Where a resumed run continues, in words: the phase and the step of its last checkpoint (``steps``: each
    phase's step count)."""
    phase, step = run_dir.resume_point()
    if step:
        return f"{phase} phase at step {step} of {steps[PHASES.index(phase)]}"
    if phase == "full" and start.head_warmup_steps and run_dir.done(WARM_UP_ENTRY) is None:
        return f"from the start ({WARM_UP} first)"
    return f"{phase} phase from its start"


def _length(item: Mapping[str, Any]) -> int:
    return len(item["input_ids"])


def _better(metric: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if metric == "loss" else value > best
