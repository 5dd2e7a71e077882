"""The run directory: what an interrupted run needs to resume, written so a crash never corrupts it.

Layout::

    run.json                      configuration, data fingerprints, lineage (a resume must match it)
    <phase>/checkpoint/           last checkpoint: state.safetensors, optimizer.pt, scheduler.pt, progress.json
    <phase>/best.safetensors      best state so far by the validation metric
    <phase>/done.json             the phase finished; its metrics (head-warm-up/: the fitted fresh MLM head)
    selection.safetensors / .json the mask chosen after the full phase, and the rank report

Only the main process writes. Files are written to a temporary name and renamed; the checkpoint
directory is staged whole and swapped in. Optimiser states are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sftkit.atomic import atomic_directory
from sftkit.errors import BadInputError

MANIFEST = "run.json"
WARM_UP_ENTRY = "head-warm-up"  # a language run's fitted fresh MLM head and its record


class CheckpointClock:
    """Says when a checkpoint is due by time, so long stretches between evaluations lose little to a crash.

    ``minutes`` None or 0: never (checkpoints only at evaluations).
    """

    def __init__(self, minutes: float | None) -> None:
        self.seconds = minutes * 60 if minutes else None
        self.restart()

    def restart(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.last >= self.seconds


@contextmanager
def _damaged_is_bad_input(directory: Path) -> Iterator[None]:
    """A truncated or tampered file in the run directory: one clear error, not a library traceback."""
    try:
        yield
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(
            f"the run directory {directory} is damaged ({first}); start the run again without resume"
        ) from exc


def _as_json(data: Any) -> Any:
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def _atomic_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temporary, path)


def _atomic_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(temporary))
    os.replace(temporary, path)


class RunDirectory:
    def __init__(self, path: str | os.PathLike[str], writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    # ------------------------------------------------------------------ manifest
    def start(self, manifest: dict[str, Any], resume: bool) -> bool:
        """Check (resume) or write (fresh start) the manifest; True when resuming an earlier run."""
        existing = self.path / MANIFEST
        if resume:
            if not existing.is_file():
                raise BadInputError(f"nothing to resume in {self.path}: no interrupted run with these settings")
            with _damaged_is_bad_input(self.path):
                previous = json.loads(existing.read_text())
            current = _as_json(manifest)
            if current != previous:
                changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
                raise BadInputError(
                    f"cannot resume the run in {self.path}: it was started with different {', '.join(changed)}"
                )
            return True
        if self.writer:
            if self.path.is_file() or (self.path.is_dir() and any(self.path.iterdir()) and not existing.is_file()):
                raise BadInputError(f"{self.path} is not a run directory: choose an empty or new directory")
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            _atomic_json(existing, manifest)
        return False

    def has_progress(self) -> bool:
        """Whether a resume would skip any work: a checkpoint, a finished phase or a selection is stored."""
        phases = ("full", "sparse")
        stored = [self.path / phase / "checkpoint" for phase in phases]
        stored += [self.path / phase / "done.json" for phase in (WARM_UP_ENTRY, *phases)]
        stored.append(self.path / "selection.json")
        return any(path.exists() for path in stored)

    def resume_point(self) -> tuple[str, int]:
        """(phase, step) a resume continues from: the sparse phase once a mask is selected, else the full one."""
        phase = "sparse" if (self.path / "selection.json").is_file() else "full"
        progress = self.path / phase / "checkpoint" / "progress.json"
        with _damaged_is_bad_input(self.path):
            return phase, json.loads(progress.read_text())["step"] if progress.is_file() else 0

    def remove(self) -> None:
        if self.writer:
            shutil.rmtree(self.path, ignore_errors=True)

    # ------------------------------------------------------------------ per phase
    def _phase(self, phase: str) -> Path:
        directory = self.path / phase
        if self.writer:
            directory.mkdir(parents=True, exist_ok=True)
        return directory

    def save_best(self, phase: str, state: Mapping[str, torch.Tensor]) -> None:
        if self.writer:
            _atomic_tensors(self._phase(phase) / "best.safetensors", state)

    def load_best(self, phase: str) -> dict[str, torch.Tensor]:
        with _damaged_is_bad_input(self.path):
            return load_file(str(self.path / phase / "best.safetensors"))

    def save_checkpoint(
        self,
        phase: str,
        state: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        progress: dict[str, Any],
    ) -> None:
        if not self.writer:
            return
        with atomic_directory(self._phase(phase) / "checkpoint", overwrite=True) as staging:
            save_file(
                {name: t.detach().cpu().contiguous() for name, t in state.items()}, str(staging / "state.safetensors")
            )
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            (staging / "progress.json").write_text(json.dumps(progress, indent=2, default=str))

    def load_checkpoint(self, phase: str) -> tuple[dict[str, torch.Tensor], Any, Any, dict[str, Any]] | None:
        directory = self.path / phase / "checkpoint"
        if not (directory / "progress.json").is_file():
            return None
        with _damaged_is_bad_input(self.path):
            state = load_file(str(directory / "state.safetensors"))
            optimizer = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
            scheduler = torch.load(directory / "scheduler.pt", map_location="cpu", weights_only=True)
            return state, optimizer, scheduler, json.loads((directory / "progress.json").read_text())

    def mark_done(self, phase: str, summary: dict[str, Any]) -> None:
        if self.writer:
            _atomic_json(self._phase(phase) / "done.json", summary)
            shutil.rmtree(self.path / phase / "checkpoint", ignore_errors=True)

    def done(self, phase: str) -> dict[str, Any] | None:
        path = self.path / phase / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # ------------------------------------------------------------------ mask selection
    def save_selection(self, masks: Mapping[str, torch.Tensor], info: dict[str, Any]) -> None:
        if not self.writer:
            return
        indices = {name: mask.reshape(-1).nonzero().flatten() for name, mask in masks.items()}
        shapes = {name: list(mask.shape) for name, mask in masks.items()}
        _atomic_tensors(self.path / "selection.safetensors", indices)
        _atomic_json(self.path / "selection.json", {**info, "shapes": shapes})

    def load_selection(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        info_path = self.path / "selection.json"
        if not info_path.is_file():
            return None
        with _damaged_is_bad_input(self.path):
            info = json.loads(info_path.read_text())
            shapes = info.pop("shapes")
            stored = load_file(str(self.path / "selection.safetensors"))
        masks = {}
        for name, indices in stored.items():
            mask = torch.zeros(int(torch.Size(shapes[name]).numel()), dtype=torch.bool)
            mask[indices] = True
            masks[name] = mask.view(shapes[name])
        return masks, info
