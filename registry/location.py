"""Where a registry lives and which schema it must have: plain paths, URLs and constants, no SQLAlchemy.

Shared by ``Registry`` and the SQLAlchemy-free ``sftkit.registry.listing`` so both open the same files and
name an artifact's bytes the same way. Nothing here imports fsspec: ``sftkit list`` must start fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

DB_NAME = "registry.db"
CACHE_NAME = "cache"
# The registry_info key that records where a registry keeps its artifacts (absent: each machine's own store).
ARTIFACT_URL_KEY = "artifact_url"
# Oldest first; the last one is what this sftkit needs. Must match registry/migrations/versions.
SCHEMA_REVISIONS = ("0001", "0002", "0003", "0004")
HEAD = SCHEMA_REVISIONS[-1]
BUSY_TIMEOUT_S = 60


def default_home() -> Path:
    return Path(os.environ.get("SFTKIT_HOME") or "~/.sftkit").expanduser()


def home_directory(home: str | os.PathLike[str] | None) -> Path:
    return Path(home).expanduser() if home else default_home()


def registry_url(url: str | None) -> str | None:
    """The database URL given, else ``$SFTKIT_REGISTRY_URL``; None means the SQLite file in the home."""
    return url or os.environ.get("SFTKIT_REGISTRY_URL") or None


def store_directory(home_dir: Path, store: str | os.PathLike[str] | None = None) -> Path:
    return Path(store or os.environ.get("SFTKIT_STORE") or home_dir / "store").expanduser()


def artifact_url(url: str | None) -> str | None:
    """The artifact location given, else ``$SFTKIT_ARTIFACT_URL``; None means the registry's recorded one."""
    return url or os.environ.get("SFTKIT_ARTIFACT_URL") or None


def normalized_artifact_url(url: str) -> str:
    """One spelling per location, so that the URL recorded in a registry compares equal to the one given.

    A plain path (or ``file://``) becomes an absolute ``file://`` URL; other URLs lose a trailing slash.
    """
    text = url.strip()
    if "://" not in text:
        return Path(text).expanduser().resolve().as_uri()
    if text.startswith("file://"):
        return Path(unquote(urlsplit(text).path)).resolve().as_uri()
    return text.rstrip("/")


def local_artifact_root(url: str) -> Path | None:
    """The directory of a ``file://`` location; None for any other (remote) location."""
    return Path(unquote(urlsplit(url).path)) if url.startswith("file://") else None


def artifact_address(url: str, sha256: str) -> str:
    """Where an artifact's files live: ``<url>/<sha[:2]>/<sha256>`` (a sha256 is hex), a plain path when local."""
    root = local_artifact_root(url)
    return str(root / sha256[:2] / sha256) if root is not None else f"{url}/{sha256[:2]}/{sha256}"


def cache_directory(home_dir: Path) -> Path:
    """This machine's read-through cache of remote artifacts, by sha256."""
    return home_dir / CACHE_NAME


def writable_directory(path: Path) -> bool:
    """Creates ``path`` if needed; False when that fails or it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def sqlite_file_uri(path: Path, readonly: bool = False) -> str:
    """SQLite URI of a registry file.

    ``readonly`` opens it as immutable: a WAL database in a directory we cannot write to is otherwise
    unreadable. The price: a change made meanwhile by someone who can write is not seen reliably.
    """
    if readonly:
        return f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1"
    return f"file:{quote(str(path.resolve()))}"


def sqlite_url(path: Path, readonly: bool = False) -> str:
    """SQLAlchemy URL of a SQLite registry file (see ``sqlite_file_uri`` for ``readonly``)."""
    if readonly:
        return f"sqlite:///{sqlite_file_uri(path, readonly=True)}&uri=true"
    return f"sqlite:///{path.resolve()}"
