"""What an artifact is and how it is hashed; where artifacts are kept is ``sftkit.registry.objects``.

An artifact is the SFT directory's files ``sft_config.json``, ``sft_model.safetensors`` and (if
present) ``README.md``; its sha256 covers each file's name and bytes in that order (the
safetensors header in canonical JSON), so identical SFTs are stored once, wherever they are kept:
the same hash is computed over a local directory and over the objects of a remote location.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sftkit.artifact import ARTIFACT_FILES, CONFIG_NAME, KINDS, WEIGHTS_NAME, WeightsSummary, read_weights_summary
from sftkit.errors import BadInputError, NotFoundError, SftkitError
from sftkit.safetensors_header import read_raw_header

REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
# Opens one artifact file for reading, or returns None when the artifact has no such file.
FileOpener = Callable[[str], "BinaryIO | None"]


@dataclass(frozen=True)
class ArtifactInfo:
    """A checked SFT directory: its parsed config, header summary, content hash and size."""

    path: Path
    config: dict[str, Any]
    weights: WeightsSummary
    sha256: str
    size_bytes: int


def checked_sha256(sha256: str) -> str:
    """A sha256 that is safe to build a path or key from (rows of a shared database are not trusted blindly)."""
    if not SHA256_PATTERN.fullmatch(sha256):
        raise SftkitError(f"{sha256!r} is not a sha256: the registry database holds a damaged row")
    return sha256


def hash_artifact(directory: Path) -> tuple[str, int]:
    """Content hash and total size (bytes on disk) of the artifact files in ``directory``."""

    def open_file(name: str) -> BinaryIO | None:
        path = directory / name
        return path.open("rb") if path.is_file() else None

    return hash_files(open_file)


def hash_files(open_file: FileOpener, on_bytes: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Content hash and total size of the artifact files ``open_file`` hands out (local or remote alike).

    ``on_bytes`` hears of every chunk read: a progress bar for remote objects.
    """
    digest = hashlib.sha256()
    total = 0
    for name in ARTIFACT_FILES:
        handle = open_file(name)
        if handle is None:
            continue
        with handle:
            head = _canonical_safetensors_header(handle) if name == WEIGHTS_NAME else b""
            total += handle.tell()
            digest.update(f"{name}\0".encode() + head)
            while chunk := handle.read(CHUNK):
                total += len(chunk)
                digest.update(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
    return digest.hexdigest(), total


def _canonical_safetensors_header(handle: BinaryIO) -> bytes:
    """The header as sorted, compact JSON; the handle is left at the start of the tensor data.

    safetensors writes its ``__metadata__`` map in a random order, so saving the same SFT twice
    gives different bytes; the hash must not see that. An unreadable header is hashed raw, which
    then simply fails to match.
    """
    try:
        header = read_raw_header(handle)[1]
    except ValueError:
        handle.seek(0)
        return b""
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\0"


def check_sft_directory(directory: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], WeightsSummary]:
    """Check that ``directory`` is an SFT directory, without torch: its config and weights header.

    Raises ``BadInputError`` naming what is missing or broken.
    """
    path = Path(directory).expanduser()
    if not path.exists():
        raise NotFoundError(f"{directory} does not exist (expected an SFT directory or a registry reference)")
    if not path.is_dir():
        raise BadInputError(f"{path} is not a directory (expected an SFT directory)")
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise BadInputError(f"{path} is not an SFT directory: {' and '.join(missing)} missing")
    try:
        config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or config.get("kind") not in KINDS:
        raise BadInputError(f"{path / CONFIG_NAME} is not an SFT config: 'kind' must be 'language' or 'task'")
    return path, config, read_weights_summary(path / WEIGHTS_NAME)


def inspect_artifact(directory: str | os.PathLike[str]) -> ArtifactInfo:
    """``check_sft_directory`` plus the content hash and size."""
    path, config, weights = check_sft_directory(directory)
    sha256, size = hash_artifact(path)
    return ArtifactInfo(path, config, weights, sha256, size)
