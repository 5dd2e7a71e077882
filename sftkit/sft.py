"""The SFT in memory: sparse deltas of the encoder, dense head tensors and metadata; save, load, apply.

The files it reads and writes are described in ``sftkit.artifact``. Sparse deltas are keyed by
parameter names relative to the encoder (``model.base_model``); head tensors by their names in the
full model (see ``sftkit.params``).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sftkit.artifact import CARD_NAME, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from sftkit.atomic import atomic_directory
from sftkit.card import sft_model_card
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.metadata import SFTMetadata
from sftkit.params import encoder_of

__all__ = ["VALUE_DTYPES", "SFTMetadata", "SparseDelta", "SparseFineTuning"]

VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INT32_LIMIT = 2**31


@dataclass
class SparseDelta:
    """Deltas of one parameter at ascending, unique, row-major flat ``indices``."""

    shape: tuple[int, ...]
    indices: torch.Tensor  # int64, 1-D
    values: torch.Tensor  # 1-D, same length

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.indices = self.indices.reshape(-1).to(torch.int64)
        self.values = self.values.reshape(-1)
        if self.indices.numel() != self.values.numel():
            raise BadInputError(
                f"{self.indices.numel()} indices but {self.values.numel()} values for shape {self.shape}"
            )

    @classmethod
    def from_dense(cls, delta: torch.Tensor) -> SparseDelta:
        """The non-zero entries of a dense delta."""
        flat = delta.detach().reshape(-1)
        indices = flat.nonzero().flatten()
        return cls(tuple(delta.shape), indices, flat[indices].clone())

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def validate(self, name: str) -> None:
        """Indices must be ascending, unique and inside the tensor (cheap O(nnz) check)."""
        idx = self.indices
        if idx.numel() == 0:
            return
        if int(idx[0]) < 0 or int(idx[-1]) >= self.numel:
            raise BadInputError(f"{name}: indices out of range for shape {self.shape}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise BadInputError(f"{name}: indices are not strictly ascending")

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dense = torch.zeros(self.numel, dtype=dtype or self.values.dtype)
        dense[self.indices] = self.values.to(dense.dtype)
        return dense.view(self.shape)


class SparseFineTuning:
    """A sparse fine-tuning φ: sparse encoder deltas, dense head tensors and metadata."""

    def __init__(
        self,
        diffs: Mapping[str, SparseDelta],
        full: Mapping[str, torch.Tensor] | None = None,
        metadata: SFTMetadata | None = None,
    ) -> None:
        self.diffs: dict[str, SparseDelta] = dict(diffs)
        self.full: dict[str, torch.Tensor] = dict(full or {})
        self.metadata = metadata or SFTMetadata()
        clash = set(self.diffs) & set(self.full)
        if clash:
            raise BadInputError(f"parameters stored both sparsely and densely: {sorted(clash)[:3]}")
        for name, delta in self.diffs.items():
            delta.validate(name)
        # Originals overwritten by apply(), per model, so revert() restores them bit for bit.
        self._applied: weakref.WeakKeyDictionary[nn.Module, list[list[tuple[torch.Tensor, Any, torch.Tensor]]]]
        self._applied = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_state_dicts(
        cls,
        start: Mapping[str, torch.Tensor],
        end: Mapping[str, torch.Tensor],
        masks: Mapping[str, torch.Tensor],
        full: Mapping[str, torch.Tensor] | None = None,
        metadata: SFTMetadata | None = None,
    ) -> SparseFineTuning:
        """φ = end − start at the entries of ``masks`` (names relative to the encoder).

        ``full`` holds the head tensors to store densely, keyed by full-model names.
        """
        diffs: dict[str, SparseDelta] = {}
        for name, mask in masks.items():
            if name not in start or name not in end:
                raise BadInputError(f"mask names parameter {name!r} that the state dicts lack")
            if mask.shape != start[name].shape or start[name].shape != end[name].shape:
                raise BadInputError(f"{name}: mask and state dict shapes differ")
            indices = torch.flatten(mask).nonzero().flatten()
            delta = end[name].reshape(-1)[indices].float() - start[name].reshape(-1)[indices].float()
            diffs[name] = SparseDelta(tuple(start[name].shape), indices, delta)
        head = {name: tensor.detach().clone().float() for name, tensor in (full or {}).items()}
        return cls(diffs, head, metadata)

    @classmethod
    def from_dense_deltas(
        cls,
        deltas: Mapping[str, torch.Tensor],
        full: Mapping[str, torch.Tensor] | None = None,
        metadata: SFTMetadata | None = None,
    ) -> SparseFineTuning:
        """Keep the non-zero entries of dense deltas (handy for imports and tests)."""
        return cls({name: SparseDelta.from_dense(delta) for name, delta in deltas.items()}, full, metadata)

    # ------------------------------------------------------------------ statistics
    @property
    def num_entries(self) -> int:
        """Number of sparse (tuned encoder) entries."""
        return sum(delta.nnz for delta in self.diffs.values())

    @property
    def num_full_entries(self) -> int:
        return sum(int(t.numel()) for t in self.full.values())

    def dense_delta(self, name: str) -> torch.Tensor:
        return self.diffs[name].to_dense()

    def delta_digest(self) -> str:
        """SHA-256 of the sparse deltas (names, int64 indices, float32 values): equal exactly when φ is.

        Heads and metadata are left out: what θ0 + φ looks like depends on these tensors only.
        """
        digest = hashlib.sha256()
        for name in sorted(self.diffs):
            delta = self.diffs[name]
            digest.update(name.encode())
            digest.update(delta.indices.to(torch.int64).numpy().tobytes())
            digest.update(delta.values.float().numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str], dtype: str = "float32", overwrite: bool = False) -> Path:
        """Write the SFT directory atomically: a crash never leaves a half-written SFT at ``path``."""
        if dtype not in VALUE_DTYPES:
            raise BadInputError(f"value dtype must be one of {', '.join(VALUE_DTYPES)}, not {dtype!r}")
        with atomic_directory(path, overwrite) as staging:
            self._write(staging, VALUE_DTYPES[dtype])
        return Path(path)

    def _write(self, directory: Path, value_dtype: torch.dtype) -> None:
        tensors: dict[str, torch.Tensor] = {}
        shapes: dict[str, list[int]] = {}
        for name, delta in self.diffs.items():
            index_dtype = torch.int64 if delta.numel >= _INT32_LIMIT else torch.int32
            tensors[f"{name}.indices"] = delta.indices.to(index_dtype).contiguous()
            tensors[f"{name}.values"] = delta.values.to(value_dtype).contiguous()
            shapes[name] = list(delta.shape)
        for name, tensor in self.full.items():
            tensors[f"{name}.full"] = tensor.detach().to(value_dtype).contiguous()
        header = {"format": "sftkit", "format_version": str(FORMAT_VERSION), "shapes": json.dumps(shapes)}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata=header)
        config = self.metadata.to_dict()
        config["value_dtype"] = next(k for k, v in VALUE_DTYPES.items() if v == value_dtype)
        config["num_entries"] = self.num_entries
        config["num_full_entries"] = self.num_full_entries
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (directory / CARD_NAME).write_text(sft_model_card(self.metadata, self.num_entries))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SparseFineTuning:
        directory = Path(path)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise BadInputError(f"{directory} is not an SFT directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadInputError(f"{config_path} is not valid JSON: {exc}") from exc
        if int(config.get("format_version", 1)) > FORMAT_VERSION:
            raise BadInputError(
                f"{directory} uses SFT format {config['format_version']}; this sftkit reads up to "
                f"{FORMAT_VERSION} — upgrade sftkit"
            )
        for derived in ("value_dtype", "num_entries", "num_full_entries"):
            config.pop(derived, None)
        try:
            tensors = load_file(str(weights_path))

            with safe_open(str(weights_path), framework="pt") as handle:
                header = handle.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise BadInputError(f"{weights_path} is corrupted or truncated: {exc}") from exc
        shapes = json.loads(header.get("shapes", "{}"))
        diffs: dict[str, SparseDelta] = {}
        full: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name, _, suffix = key.rpartition(".")
            if suffix == "full":
                full[name] = tensor
            elif suffix == "indices":
                if name not in shapes or f"{name}.values" not in tensors:
                    raise BadInputError(f"{weights_path}: {name} has indices but no shape or values")
                diffs[name] = SparseDelta(tuple(shapes[name]), tensor, tensors[f"{name}.values"])
            elif suffix != "values":
                raise BadInputError(f"{weights_path}: unexpected tensor {key!r}")
        return cls(diffs, full, SFTMetadata.from_dict(config))

    # ------------------------------------------------------------------ model surgery
    @torch.no_grad()
    def apply(self, model: nn.Module, scale: float = 1.0, with_head: bool = True) -> None:
        """Add ``scale`` × φ to ``model`` in place, entry by entry (no dense delta is built).

        Head tensors present in ``model`` (same name and shape) are copied in when ``with_head``;
        the others — e.g. a language SFT's MLM head on a classifier — are ignored. Atomic: every name and
        shape is checked before the first change, so a refused SFT leaves ``model`` bit-identical.
        """
        deltas, heads = self._targets(model, with_head)
        saved: list[tuple[torch.Tensor, Any, torch.Tensor]] = []
        for param, delta in deltas:
            flat = param.data.view(-1)
            index = delta.indices.to(param.device)
            saved.append((flat, index, flat[index].clone()))
            flat.index_add_(0, index, delta.values.to(device=param.device, dtype=param.dtype), alpha=scale)
        for param, tensor in heads:
            saved.append((param.data, None, param.data.clone()))
            param.data.copy_(tensor.to(device=param.device, dtype=param.dtype))
        self._applied.setdefault(model, []).append(saved)

    def _targets(
        self, model: nn.Module, with_head: bool
    ) -> tuple[list[tuple[nn.Parameter, SparseDelta]], list[tuple[nn.Parameter, torch.Tensor]]]:
        """The (parameter, delta) and (parameter, head tensor) pairs ``apply`` changes, all names and shapes checked."""
        params = dict(encoder_of(model).named_parameters(remove_duplicate=False))
        deltas = []
        for name, delta in self.diffs.items():
            param = params.get(name)
            if param is None:
                raise BaseMismatchError(f"the model has no parameter {name!r} that this SFT changes")
            if tuple(param.shape) != delta.shape:
                raise BaseMismatchError(
                    f"{name}: SFT shape {delta.shape} does not match the model's {tuple(param.shape)}"
                )
            deltas.append((param, delta))
        model_params = dict(model.named_parameters(remove_duplicate=False)) if with_head else {}
        heads = []
        for name, tensor in self.full.items():
            param = model_params.get(name)
            if param is None:
                continue
            if tuple(param.shape) != tuple(tensor.shape):
                raise BaseMismatchError(
                    f"head tensor {name}: SFT shape {tuple(tensor.shape)} does not match the "
                    f"model's {tuple(param.shape)} (different number of labels?)"
                )
            heads.append((param, tensor))
        return deltas, heads

    @torch.no_grad()
    def revert(self, model: nn.Module) -> None:
        """Undo the most recent ``apply`` on ``model`` exactly, restoring the overwritten entries."""
        stack = self._applied.get(model)
        if not stack:
            raise BadInputError("this SFT has not been applied to this model (nothing to revert)")
        for target, index, original in reversed(stack.pop()):
            if index is None:
                target.copy_(original)
            else:
                target[index] = original
