"""Compose straight from the base checkpoint's safetensors into the output directory, tensor by tensor.

Why: loading the whole model, touching every page with the sparse updates and saving it again costs
several times a plain copy of the checkpoint (transformers 5 memory-maps checkpoints, so the plain
``from_pretrained`` + ``save_pretrained`` is little more than a file copy). Streaming copies each base
tensor chunk by chunk from the checkpoint through a small pool of reused buffers (one per worker
thread, plus one being written), adds Σ wᵢ φᵢ (or the merge, ``Plan.addition``) there and writes it
(``sftkit.safetensors_io``); no model is ever materialised — mergekit's lazy per-tensor idea.

The target layout (parameter names, shapes, which ones form the head) comes from the model class
instantiated on the ``meta`` device, so nothing is guessed; when a checkpoint cannot be mapped onto it
name by name (no safetensors, persistent buffers, tied heads, unusual key names),
``stream_composition`` returns ``None`` and the caller falls back to the in-memory path.
"""

from __future__ import annotations

import json
import shutil
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig
from transformers.utils.hub import convert_file_size_to_int

from sftkit.artifact import CARD_NAME
from sftkit.atomic import atomic_directory
from sftkit.base_model import head_class, local_files_only
from sftkit.card import composed_model_card
from sftkit.composition_plan import COMPOSE_RECORD, Plan, compose_record
from sftkit.errors import BadInputError
from sftkit.fingerprint import fingerprint_samples, sample_stride
from sftkit.merging import Addition
from sftkit.params import encoder_of, head_parameters
from sftkit.safetensors_io import (
    TensorInfo,
    itemsize,
    open_tensors,
    packed_order,
    read_header,
    read_into,
    write_sequential,
)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", *TOKENIZER_FILES]


def base_snapshot(base: str, revision: str | None) -> Path:
    """A local directory holding the base checkpoint: the path itself, or a Hub snapshot."""
    path = Path(base)
    if path.is_dir():
        return path

    local = local_files_only(base, revision)
    try:
        return Path(
            snapshot_download(base, revision=revision, allow_patterns=_SNAPSHOT_PATTERNS, local_files_only=local)
        )
    except Exception as exc:  # huggingface_hub raises many types (offline, not found, auth, validation)
        raise BadInputError(f"cannot load base model {base!r}: {str(exc).splitlines()[0]}") from exc


def _checkpoint_files(snapshot: Path) -> list[Path] | None:
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [snapshot / name for name in sorted(set(weight_map.values()))]
    single = snapshot / "model.safetensors"
    return [single] if single.is_file() else None


def _target_model(snapshot: Path, composition: Plan):
    """The output model class on the meta device: names, shapes and head, with no weights."""
    auto, overrides = head_class(composition.head, composition.labels)
    config = AutoConfig.from_pretrained(snapshot, **overrides)
    with torch.device("meta"):
        return auto.from_config(config)


def _shard_limit(max_shard_size: str | int) -> int:
    return convert_file_size_to_int(max_shard_size)


class _Sources:
    """Where each target parameter's base values live in the checkpoint's mapped files."""

    def __init__(self, tensors: dict[str, tuple[int, TensorInfo]], model) -> None:
        self.tensors = tensors
        self.encoder_is_model = encoder_of(model) is model
        self.prefix = model.base_model_prefix

    def relative(self, name: str) -> str:
        """Encoder-relative name of a full-model parameter name (the key of SFT deltas)."""
        return name if self.encoder_is_model else name.removeprefix(f"{self.prefix}.")

    def key_of(self, name: str) -> str | None:
        relative = self.relative(name)
        return next((c for c in (name, relative, f"{self.prefix}.{relative}") if c in self.tensors), None)


def stream_composition(
    base: str, composition: Plan, target: Path, revision: str | None, max_shard_size: str | int, overwrite: bool
) -> Path | None:
    """Write the composed model directory, or return ``None`` when the checkpoint needs the full path."""
    snapshot = base_snapshot(base, revision)
    files = _checkpoint_files(snapshot)
    if files is None:
        return None
    model = _target_model(snapshot, composition)
    state = model.state_dict()
    if len(state) != len(dict(model.named_parameters(remove_duplicate=False))):
        return None  # persistent buffers or tied parameters: let save_pretrained decide what to write
    head_names = {name for name, _ in head_parameters(model)}
    composition.check_head(sorted(head_names))
    try:
        for file in files:
            read_header(file)
    except (KeyError, ValueError, OSError):
        return None  # a dtype or header this reader does not know
    with open_tensors(files) as tensors:
        sources = _Sources(tensors, model)
        keys = {name: sources.key_of(name) for name in state if name not in head_names}
        if None in keys.values() or any(tensors[k][1].shape != tuple(state[n].shape) for n, k in keys.items() if k):
            return None
        composition.check_shapes({sources.relative(n): tuple(state[n].shape) for n in keys}, base)
        with atomic_directory(target, overwrite) as staging:
            samples = _write_weights(staging, state, keys, sources, composition, _shard_limit(max_shard_size))
            # Checked after the single pass over the weights, so no tensor is read twice.
            fingerprint = fingerprint_samples(model.config.model_type, samples)
            composition.check_fingerprint(fingerprint, base)
            _write_side_files(staging, snapshot, model, composition, base, fingerprint)
        return target


CHUNK_BYTES = 32 * 2**20  # per reused buffer: large enough to amortise system calls, small enough to stay cached


def _patch_chunk(
    descriptor: int,
    info: TensorInfo,
    first: int,
    last: int,
    addition: Future[Addition],
    buffer: bytearray,
) -> tuple[int, torch.Tensor]:
    """Read entries [first, last) of a base tensor into ``buffer`` and add Σ wᵢ φᵢ (or the merge) there.

    Returns the byte length and the base's fingerprint sample in that range (taken before any delta).
    Deltas are added with ``index_add_`` in the tensor's dtype, in SFT order, as
    ``SparseFineTuning.apply`` does, so both composition paths give bit-identical weights; a sign election
    merges just this chunk's entries (``merging.Addition``), here on a worker thread. ``addition`` is computed on
    the pool too (submitted before the parameter's chunks, so a worker never waits on a job queued behind it),
    which keeps a merge's trim and draws off the thread that writes.
    """
    size = itemsize(info.dtype)
    raw = memoryview(buffer)[: (last - first) * size]
    read_into(descriptor, info.start + first * size, raw)
    chunk = torch.frombuffer(raw, dtype=info.dtype)
    stride, count = sample_stride((info.end - info.start) // size)
    lo, hi = -(-first // stride), min(count, -(-last // stride))  # sample positions i·stride in range
    base_sample = chunk[lo * stride - first :: stride][: max(0, hi - lo)].to(torch.float32, copy=True)
    addition.result().add_to(chunk, first, last)
    del chunk
    raw.release()
    return (last - first) * size, base_sample


def _shards(sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Greedy packing of parameters, in order, into shards of at most ``limit`` bytes."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, nbytes in sizes.items():
        if shards[-1] and total + nbytes > limit:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += nbytes
    return shards


def _write_weights(
    staging: Path,
    state: dict[str, torch.Tensor],
    keys: dict[str, str | None],
    sources: _Sources,
    composition: Plan,
    shard_limit: int,
) -> list[tuple[str, tuple[int, ...], torch.Tensor]]:
    """Write the weights shard by shard; return the base's fingerprint samples read on the way."""
    head = composition.head_part.sft.full if composition.head_part else {}
    head_dtype = next(sources.tensors[k][1].dtype for k in keys.values() if k)
    dtypes = {name: sources.tensors[keys[name]][1].dtype if keys.get(name) else head_dtype for name in state}
    sizes = {name: state[name].numel() * itemsize(dtypes[name]) for name in state}
    shards = _shards(sizes, shard_limit)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    pieces: dict[str, list[torch.Tensor]] = {}

    def jobs(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], pool: Executor) -> Iterator[tuple[str, Any]]:
        for name, dtype, _ in packed_order(layout):
            key = keys.get(name)
            if key is None:
                yield name, memoryview(head[name].to(dtype).contiguous().view(-1).view(torch.uint8).numpy())
                continue
            descriptor, info = sources.tensors[key]
            addition = pool.submit(composition.addition, sources.relative(name))
            numel, per_chunk = state[name].numel(), CHUNK_BYTES // itemsize(dtype)
            for first in range(0, numel, per_chunk):
                yield name, (descriptor, info, first, min(numel, first + per_chunk), addition)

    workers = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        free = [bytearray(CHUNK_BYTES) for _ in range(workers + 1)]

        def stream(layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> Iterator[memoryview]:
            """Chunks in file order, patched by the pool while earlier ones are being written."""
            pending: deque[tuple[str, Any, bytearray | None]] = deque()

            def oldest() -> Iterator[memoryview]:
                name, work, buffer = pending.popleft()
                if buffer is None:
                    yield work
                    return
                length, base_sample = work.result()
                pieces.setdefault(name, []).append(base_sample)
                yield memoryview(buffer)[:length]
                free.append(buffer)  # written: the writer asked for the next chunk

            for name, job in jobs(layout, pool):
                if isinstance(job, memoryview):
                    pending.append((name, job, None))
                    continue
                while not free:
                    yield from oldest()
                buffer = free.pop()
                pending.append((name, pool.submit(_patch_chunk, *job, buffer), buffer))
            while pending:
                yield from oldest()

        for filename, shard in zip(names, shards, strict=True):
            layout = [(n, dtypes[n], tuple(state[n].shape)) for n in shard]
            write_sequential(staging / filename, layout, stream(layout))
    if len(shards) > 1:
        weight_map = {name: filename for filename, shard in zip(names, shards, strict=True) for name in shard}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [(sources.relative(n), tuple(state[n].shape), torch.cat(pieces[n])) for n in pieces]


def _write_side_files(staging: Path, snapshot: Path, model, composition: Plan, base: str, fingerprint: str) -> None:
    config = model.config
    config.architectures = [type(model).__name__]
    config.save_pretrained(staging)
    copied = [name for name in TOKENIZER_FILES if (snapshot / name).is_file()]
    if not copied:
        raise BadInputError(f"cannot load the tokenizer of {base!r}: no tokenizer files in {snapshot}")
    for name in copied:
        shutil.copyfile(snapshot / name, staging / name)
    record = compose_record(
        base, fingerprint, type(model).__name__, composition.parts, composition.merge, composition.tuning
    )
    (staging / COMPOSE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    card = composed_model_card(
        base, record["sfts"], composition.labels, composition.head, record["merge"], record.get("tuning")
    )
    (staging / CARD_NAME).write_text(card)
