"""This machine's read-through cache of remote artifacts: ``$SFTKIT_HOME/cache/<sha[:2]>/<sha256>/``.

A fill downloads into a private directory under ``.partial/``, checks the sha256 and only then renames the
directory into place, so an entry is always complete and verified; a failed or killed fill leaves at most a
``.partial/`` directory, which ``prune`` removes once its owner is gone (a live fill holds an ``flock`` on
it: the cache belongs to one machine, where ``flock`` is sound). Use refreshes an entry's time, and
``prune`` evicts the least recently used entries beyond a size bound.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sftkit.errors import NotFoundError, SftkitError
from sftkit.registry.artifacts import SHA256_PATTERN, checked_sha256, hash_artifact
from sftkit.registry.objects import ArtifactStore

_PARTIAL = ".partial"


@dataclass(frozen=True)
class CacheEntry:
    sha256: str
    path: Path
    size_bytes: int
    used: float


class ArtifactCache:
    """Verified local copies of remote artifacts, by sha256."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / checked_sha256(sha256)

    def fill(self, store: ArtifactStore, sha256: str, reference: str) -> Path:
        """The cached copy of ``sha256``, downloaded from ``store`` first if needed (and verified)."""
        final = self.path_for(sha256)
        if final.is_dir():
            os.utime(final)
            return final
        with self._partial(f"caching {reference}") as partial:
            store.download(sha256, partial)
            if not any(partial.iterdir()):
                raise NotFoundError(
                    f"the artifact of {reference} is missing at {store.address(sha256)} (`sftkit verify` lists "
                    "every damaged SFT)"
                )
            if hash_artifact(partial)[0] != sha256:
                raise SftkitError(
                    f"the artifact of {reference} at {store.address(sha256)} does not match its sha256 "
                    f"{sha256[:12]}: it was modified or damaged there, so it is not used (`sftkit verify`)"
                )
            self._place(partial, final)
        return final

    def adopt(self, directory: Path, sha256: str) -> None:
        """Keep a verified local copy (the one just uploaded by ``add``), so this machine never downloads it."""
        if self.path_for(sha256).is_dir():
            return
        with contextlib.suppress(SftkitError), self._partial("keeping a cached copy") as partial:
            for source in directory.iterdir():
                shutil.copyfile(source, partial / source.name)
            self._place(partial, self.path_for(sha256))

    def evict(self, sha256: str) -> None:
        """Drop an entry that no longer verifies (it is fetched again on next use)."""
        remove_tree(self.path_for(sha256))

    @contextlib.contextmanager
    def _partial(self, action: str) -> Iterator[Path]:
        """A private directory to fill, removed whatever happens; a full disk is one clear error."""
        workdir = self.root / _PARTIAL / uuid.uuid4().hex
        try:
            workdir.mkdir(parents=True)
            fd = os.open(workdir, os.O_RDONLY)
        except OSError as exc:
            raise SftkitError(f"cannot write the artifact cache {self.root} ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield workdir
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise SftkitError(
                    f"no space left in the artifact cache {self.root} while {action}: free space or "
                    "`sftkit cache --prune --max-size …` (nothing half-written was kept)"
                ) from exc
            raise
        finally:
            remove_tree(workdir)
            os.close(fd)

    @staticmethod
    def _place(partial: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(partial, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise  # otherwise another process cached the same artifact meanwhile: same bytes

    # ------------------------------------------------------------------ bounding
    def entries(self) -> list[CacheEntry]:
        """Cached artifacts, least recently used first."""
        found = []
        for prefix in self.root.glob("??"):
            for entry in prefix.iterdir() if prefix.is_dir() else []:
                if SHA256_PATTERN.fullmatch(entry.name) and entry.is_dir():
                    size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                    found.append(CacheEntry(entry.name, entry, size, entry.stat().st_mtime))
        return sorted(found, key=lambda e: e.used)

    def prune(self, max_bytes: int) -> list[CacheEntry]:
        """Evict least recently used entries until the cache holds at most ``max_bytes``; also drop dead fills."""
        for partial in (self.root / _PARTIAL).iterdir() if (self.root / _PARTIAL).is_dir() else []:
            fd = os.open(partial, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live fill
            finally:
                os.close(fd)
            remove_tree(partial)
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        evicted = []
        for entry in entries:
            if total <= max_bytes:
                break
            remove_tree(entry.path)
            total -= entry.size_bytes
            evicted.append(entry)
        return evicted


def remove_tree(path: Path) -> None:
    """Remove a directory or file, whatever is left of it."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
