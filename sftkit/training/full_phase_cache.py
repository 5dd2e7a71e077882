"""Phase 1 shared between methods: δ = θ1 − θ_start and the sparse phase's starting head, kept on disk.

LT-SFT and every DEFT-X variant run the same full fine-tuning on the same data and seed; only what
happens after it (denoising, selection, the sparse phase) differs. A run given a cache directory looks
up its phase 1 by ``TrainConfig.full_phase_digest()`` plus the data, the source SFT and the base
fingerprint, and stores it after training, so comparing methods costs one full phase, not one each.

Layout: ``<directory>/<key>/{delta.safetensors, head.safetensors, full.json}``, each key written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sftkit.atomic import atomic_directory

_DELTA, _HEAD, _SUMMARY = "delta.safetensors", "head.safetensors", "full.json"


def cache_key(config_digest: str, data: Any, source_digest: str | None, base_fingerprint: str | None) -> str:
    """One key per (phase-1 settings, data fingerprints, source-language SFT content, base model).

    ``source_digest`` is ``SparseFineTuning.delta_digest()`` of the source SFT: θ_start = θ0 + φ_source
    depends on its deltas, not on its name (two source SFTs of one language, e.g. trained by different
    methods, must never share a phase 1).
    """
    material = json.dumps([config_digest, data, source_digest, base_fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


class FullPhaseCache:
    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]] | None:
        """(δ by encoder name, the starting head by full name, phase-1 summary), or None if absent."""
        entry = self.directory / key
        if not (entry / _SUMMARY).is_file():
            return None
        summary = json.loads((entry / _SUMMARY).read_text())
        return load_file(str(entry / _DELTA)), load_file(str(entry / _HEAD)), summary

    def save(
        self,
        key: str,
        deltas: Mapping[str, torch.Tensor],
        head: Mapping[str, torch.Tensor],
        summary: dict[str, Any],
    ) -> None:
        with atomic_directory(self.directory / key, overwrite=True) as staging:
            save_file({name: t.contiguous() for name, t in deltas.items()}, str(staging / _DELTA))
            save_file({name: t.contiguous() for name, t in head.items()}, str(staging / _HEAD))
            (staging / _SUMMARY).write_text(json.dumps(summary, indent=1, sort_keys=True, default=str) + "\n")
