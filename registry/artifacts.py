"""The content-addressed artifact store: SFT directories under ``<store>/<sha[:2]>/<sha256>/``.

An artifact is the SFT directory's files ``sft_config.json``, ``sft_model.safetensors`` and (if
present) ``README.md``; its sha256 covers each file's name and bytes in that order (the
safetensors header in canonical JSON), so identical SFTs are stored once.

Writers build and fsync a complete copy in a private, flock-ed directory under ``.staging/`` (in
parallel), then rename it into place; removal renames into ``.trash/`` before deleting. Whatever
a killed process leaves behind is only ever in ``.staging/``, ``.trash/`` or an unreferenced hash
directory, which ``gc`` removes. An exclusive ``flock`` on ``.lock`` serialises placing, removing
and collecting (with the database transaction that goes with each), so ``gc`` never races an add
and a removal never deletes a directory that an add is reusing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sftkit.artifact import ARTIFACT_FILES, CONFIG_NAME, KINDS, WEIGHTS_NAME, WeightsSummary, read_weights_summary
from sftkit.errors import BadInputError, NotFoundError, SftkitError
from sftkit.safetensors_header import read_raw_header

if TYPE_CHECKING:
    from sftkit.sft import SparseFineTuning

REQUIRED_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArtifactInfo:
    """A checked SFT directory: its parsed config, header summary, content hash and size."""

    path: Path
    config: dict[str, Any]
    weights: WeightsSummary
    sha256: str
    size_bytes: int


def hash_artifact(directory: Path) -> tuple[str, int]:
    """Content hash and total size (bytes on disk) of the artifact files in ``directory``."""
    digest = hashlib.sha256()
    total = 0
    for name in ARTIFACT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        total += path.stat().st_size
        with path.open("rb") as handle:
            head = _canonical_safetensors_header(handle) if name == WEIGHTS_NAME else b""
            digest.update(f"{name}\0".encode() + head)
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """Artifact directories of one registry, addressed by sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._staging = root / ".staging"
        self._trash = root / ".trash"

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    # ------------------------------------------------------------------ locking
    def ensure_writable(self) -> None:
        try:
            for directory in (self.root, self._staging, self._trash):
                directory.mkdir(parents=True, exist_ok=True)
            probe = self._staging / f".probe-{uuid.uuid4().hex}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise BadInputError(
                f"the artifact store {self.root} is not writable ({exc.strerror or exc}): "
                "use a writable --home / SFTKIT_HOME (or SFTKIT_STORE)"
            ) from exc

    @contextlib.contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """The store lock: exclusive to place, remove and collect; shared to start a staging area.

        Released by the kernel if the process dies.
        """
        self.ensure_writable()
        with (self.root / ".lock").open("a") as handle:
            _flock_within(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, self.root / ".lock")
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def claim(self, registry_id: str) -> None:
        """Bind the store to one registry database (call under ``lock``).

        ``gc`` deletes what its database does not reference, so a store shared by two databases
        would lose artifacts: refuse that instead.
        """
        marker = self.root / ".registry-id"
        if not marker.is_file():
            staged = self._trash / f"registry-id-{uuid.uuid4().hex}"
            staged.write_text(registry_id + "\n")
            os.rename(staged, marker)
            return
        owner = marker.read_text().strip()
        if owner != registry_id:
            raise BadInputError(
                f"the artifact store {self.root} belongs to another registry database (id {owner}, this one is "
                f"{registry_id}): give each registry database its own SFTKIT_HOME or SFTKIT_STORE"
            )

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private directory to build an artifact in (no store lock needed while building).

        Its ``flock`` marks it as in use: ``gc`` only collects staging areas whose owner has died.
        Created under the shared store lock, so ``gc`` never sees one before it is locked.
        """
        workdir = self._staging / uuid.uuid4().hex
        with self.lock(shared=True):
            workdir.mkdir()
            fd = os.open(workdir, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield workdir / "sft"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            os.close(fd)

    @staticmethod
    def copy_into(source: Path, target: Path) -> None:
        target.mkdir()
        for name in ARTIFACT_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, target / name)

    @staticmethod
    def save_into(sft: SparseFineTuning, target: Path) -> None:
        sft.save(target)

    @staticmethod
    def seal(staged: Path) -> None:
        """Flush a staged artifact to disk, so that once renamed it survives a power cut too."""
        for name in ARTIFACT_FILES:
            if (staged / name).is_file():
                _fsync(staged / name)
        _fsync(staged)

    def place(self, staged: Path, sha256: str) -> Path:
        """Make the sealed ``staged`` directory the artifact ``sha256`` (call under ``lock``)."""
        final = self.path_for(sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if final.is_dir() and hash_artifact(final)[0] == sha256:
                return final  # a complete leftover of an earlier, interrupted add: identical bytes
            self.discard(final)
        os.rename(staged, final)
        _fsync(final.parent)
        return final

    def discard(self, path: Path) -> None:
        """Remove an artifact directory, first atomically out of sight (call under ``lock``)."""
        if not path.exists():
            return
        doomed = self._trash / uuid.uuid4().hex
        self._trash.mkdir(parents=True, exist_ok=True)
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def collect(self, referenced: set[str]) -> list[Path]:
        """Remove leftovers and artifact directories no row references (call under ``lock``)."""
        removed = self._leftovers()
        for entry in removed:
            _remove(entry)
        for prefix in self._prefix_dirs():
            for entry in prefix.iterdir():
                if _SHA256.fullmatch(entry.name) and entry.name not in referenced:
                    self.discard(entry)
                    removed.append(entry)
            with contextlib.suppress(OSError):
                prefix.rmdir()  # only succeeds when empty
        return removed

    def _leftovers(self) -> list[Path]:
        """Trash, and staging areas whose owner is gone (their lock is free)."""
        entries = list(self._trash.iterdir()) if self._trash.is_dir() else []
        for entry in self._staging.iterdir() if self._staging.is_dir() else []:
            if entry.is_dir() and not entry.is_symlink():
                fd = os.open(entry, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live add is building it
                finally:
                    os.close(fd)
            entries.append(entry)
        return entries

    def _prefix_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{2}", p.name)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _flock_within(handle: Any, operation: int, path: Path) -> None:
    """``flock`` that gives up with a clear error after ``$SFTKIT_LOCK_TIMEOUT`` seconds (default 600).

    Store operations hold the lock for milliseconds; waiting longer means another process is stuck
    holding it, and a clear error beats a command that hangs forever.
    """
    deadline = time.monotonic() + float(os.environ.get("SFTKIT_LOCK_TIMEOUT", "600"))
    delay = 0.005
    while True:
        try:
            fcntl.flock(handle, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise SftkitError(
                    f"the artifact store lock {path} is held by another process; retry, or find the stuck "
                    "sftkit process (e.g. `fuser` on that file)"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
