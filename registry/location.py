"""Where a registry lives and which schema it must have: plain paths and constants, no SQLAlchemy.

Shared by ``Registry`` and the SQLAlchemy-free ``sftkit.registry.listing`` so both open the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

DB_NAME = "registry.db"
# Oldest first; the last one is what this sftkit needs. Must match registry/migrations/versions.
SCHEMA_REVISIONS = ("0001", "0002", "0003")
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
