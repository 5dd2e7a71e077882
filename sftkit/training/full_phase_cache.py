"""Phase 1 shared between methods: δ = θ1 − θ_start and the head before and after it, kept on disk.

LT-SFT and every DEFT-X variant run the same full fine-tuning on the same data and seed; only what
happens after it (denoising, selection, the sparse phase) differs. A run given a cache directory looks
up its phase 1 by ``TrainConfig.full_phase_digest()`` plus the data, the source SFT and the base
fingerprint, and stores it after training, so comparing methods costs one full phase, not one each.

Layout: ``<directory>/<key>/{delta.safetensors, head.safetensors, head-end.safetensors, full.json}``, each
key written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sftkit.atomic import atomic_directory

_DELTA, _HEAD, _HEAD_END, _SUMMARY = "delta.safetensors", "head.safetensors", "head-end.safetensors", "full.json"
_FORMAT = 2  # part of every key: entries of an older layout are simply not found


def cache_key(
    config_digest: str, data: Any, source_digest: str | None, base_fingerprint: str | None, world_size: int = 1
) -> str:
    """One key per (phase-1 settings, data fingerprints, source-language SFT content, base model, processes).

    The number of processes is part of it: each process draws its own MLM masks and dropout, so one
    process and two train different phase 1s from the same settings.

    ``source_digest`` is ``SparseFineTuning.delta_digest()`` of the source SFT: θ_start = θ0 + φ_source
    depends on its deltas, not on its name (two source SFTs of one language, e.g. trained by different
    methods, must never share a phase 1).
    """
    material = [_FORMAT, config_digest, data, source_digest, base_fingerprint, world_size]
    material = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class FullPhase:
    """What phase 1 leaves for the rest of a run."""

    deltas: Mapping[str, torch.Tensor]  # δ = θ1 − θ_start by encoder name (float32)
    head_start: Mapping[str, torch.Tensor]  # the head entering phase 1 (after any warm-up), by full name
    head_end: Mapping[str, torch.Tensor]  # θ1's head (a variant without the sparse phase keeps it)
    summary: dict[str, Any]


class FullPhaseCache:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def load(self, key: str) -> FullPhase | None:
        """Phase 1 stored under ``key``, or None if absent."""
        entry = self.directory / key
        if not (entry / _SUMMARY).is_file():
            return None
        summary = json.loads((entry / _SUMMARY).read_text())
        return FullPhase(
            load_file(str(entry / _DELTA)), load_file(str(entry / _HEAD)), load_file(str(entry / _HEAD_END)), summary
        )

    def save(self, key: str, phase: FullPhase) -> None:
        with atomic_directory(self.directory / key, overwrite=True) as staging:
            for name, tensors in ((_DELTA, phase.deltas), (_HEAD, phase.head_start), (_HEAD_END, phase.head_end)):
                save_file({key: t.contiguous() for key, t in tensors.items()}, str(staging / name))
            (staging / _SUMMARY).write_text(json.dumps(phase.summary, indent=1, sort_keys=True, default=str) + "\n")
