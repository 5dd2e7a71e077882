"""Directories that appear complete or not at all: a crash or Ctrl-C never leaves half an artifact.

Everything is written into a hidden staging directory next to the target, which is renamed into place
only after the last file is written (a rename is atomic on one file system). Used for SFT directories,
composed models, LT-SFT exports and training checkpoints alike.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sftkit.errors import BadInputError


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file or non-empty directory unless ``overwrite``."""
    occupied = target.exists() and (not target.is_dir() or any(target.iterdir()))
    if occupied and not overwrite:
        raise BadInputError(f"{target} already exists (use --force / overwrite=True to replace it)")


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that replaces ``target`` only once the block has finished writing it."""
    target = Path(target)
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        check_target(target, overwrite)  # again: another process may have written it meanwhile
        if target.exists():
            retired = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(retired)
            staging.rename(target)
            if retired.is_dir():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                retired.unlink()
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
