"""``Registry.find`` for the default SQLite registry on the standard library alone.

``sftkit list`` is the command people run most, and importing SQLAlchemy costs more than everything
else it does together (≈ 0.16 s of a ≈ 0.45 s start). ``open_listing`` therefore answers with a
``SQLiteListing`` (``sqlite3``, read-only) when the registry is the SQLite file in a home at the
current schema, and with a full ``Registry`` otherwise (a server URL, a database still to create or
to upgrade), whose messages then apply. The filters and sort orders are defined once, as SQL;
a test runs both paths over the same registry and compares every record. The query vocabulary both
share is ``sftkit.registry.query``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Any

from sftkit.errors import SftkitError
from sftkit.registry.location import (
    ARTIFACT_URL_KEY,
    BUSY_TIMEOUT_S,
    DB_NAME,
    HEAD,
    artifact_address,
    artifact_url,
    cache_directory,
    home_directory,
    local_artifact_root,
    normalized_artifact_url,
    registry_url,
    sqlite_file_uri,
    store_directory,
    writable_directory,
)
from sftkit.registry.query import Finder, Query
from sftkit.registry.records import SFTRecord, record_from_columns


class SQLiteListing(Finder):
    """Read-only ``find`` over a SQLite registry file at schema ``HEAD``."""

    def __init__(self, connection: sqlite3.Connection, url: str, artifacts: str, cache_dir: Path) -> None:
        self._connection = connection
        self.url = url
        self._artifacts = artifacts
        self._local_root = local_artifact_root(artifacts)
        self._cache_dir = cache_dir

    @classmethod
    def open(cls, home_dir: Path, store_dir: Path, requested: str | None = None) -> SQLiteListing | None:
        """None when this registry needs the full ``Registry`` (missing, other schema, unreadable, or an
        artifact location asked for that differs from the recorded one: its message then applies)."""
        db_path = home_dir / DB_NAME
        if not db_path.is_file():
            return None
        readonly = not writable_directory(home_dir)
        uri = sqlite_file_uri(db_path, readonly=readonly) + ("" if readonly else "?mode=ro")
        try:
            # Autocommit mode: ``find`` opens its own read transaction.
            connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error:
            return None
        try:
            revision = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.Error:
            revision = None
        if revision is None or revision[0] != HEAD:
            connection.close()
            return None
        recorded = connection.execute("SELECT value FROM registry_info WHERE key = ?", (ARTIFACT_URL_KEY,)).fetchone()
        artifacts = recorded[0] if recorded else normalized_artifact_url(str(store_dir))
        if requested and normalized_artifact_url(requested) != artifacts:
            connection.close()
            return None
        return cls(connection, f"sqlite:///{db_path.resolve()}", artifacts, cache_directory(home_dir))

    def close(self) -> None:
        self._connection.close()

    def run_query(self, query: Query) -> list[SFTRecord]:
        conditions = [f"{column} = ?" for column in query.equalities]
        parameters: list[Any] = list(query.equalities.values())
        if query.tag is not None:
            conditions.append("id IN (SELECT sft_id FROM tags WHERE name = ?)")
            parameters.append(query.tag)
        direction = "DESC" if query.descending else "ASC"
        sql = "SELECT * FROM sfts"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY " + ", ".join(f"{expression} {direction}" for expression in query.order)
        if query.limit is not None:
            sql += " LIMIT ?"
            parameters.append(query.limit)
        try:
            with closing(self._connection.cursor()) as cursor:
                cursor.execute("BEGIN")  # rows and tags from one snapshot
                try:
                    rows = list(_dict_rows(cursor.execute(sql, parameters)))
                    tags = self._tags([row["id"] for row in rows])
                finally:
                    cursor.execute("COMMIT")
        except sqlite3.Error as exc:  # one clear line, as the SQLAlchemy path gives (never a driver traceback)
            raise SftkitError(f"registry database error ({self.url}): {exc}") from exc
        return [
            record_from_columns(_decoded(row), tags.get(row["id"], ()), self._path(row["sha256"]), self._address(row))
            for row in rows
        ]

    def _path(self, sha256: str) -> Path:
        """As ``Registry`` gives it: in the local store, or where this machine caches a remote artifact."""
        root = self._local_root if self._local_root is not None else self._cache_dir
        return root / sha256[:2] / sha256

    def _address(self, row: dict[str, Any]) -> str:
        return artifact_address(self._artifacts, row["sha256"])

    def _tags(self, ids: list[int]) -> dict[int, list[str]]:
        tags: dict[int, list[str]] = {}
        for start in range(0, len(ids), 500):  # SQLite caps bound parameters per statement
            chunk = ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT sft_id, name FROM tags WHERE sft_id IN ({marks})"
            for sft_id, name in self._connection.execute(query, chunk):
                tags.setdefault(sft_id, []).append(name)
        return tags


def _dict_rows(cursor: sqlite3.Cursor) -> Iterator[dict[str, Any]]:
    names = [column[0] for column in cursor.description]
    for values in cursor:
        yield dict(zip(names, values, strict=True))


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """SQLite's storage of the JSON and DateTime columns, decoded as SQLAlchemy's types do."""
    return row | {
        "metrics": json.loads(row["metrics"]) if row["metrics"] is not None else None,
        "trainer": json.loads(row["trainer"]) if row["trainer"] is not None else None,
        "created": datetime.fromisoformat(row["created"]) if row["created"] is not None else None,
    }


def open_listing(
    home: str | os.PathLike[str] | None = None,
    url: str | None = None,
    store: str | os.PathLike[str] | None = None,
    artifacts: str | None = None,
) -> Finder:
    """Something with ``find`` and ``url`` for this registry, as cheaply as it can be had."""
    url = registry_url(url)
    if url is None:
        home_dir = home_directory(home)
        listing = SQLiteListing.open(home_dir, store_directory(home_dir, store), artifact_url(artifacts))
        if listing is not None:
            return listing
    from sftkit.registry.core import Registry  # SQLAlchemy only when the fast path cannot answer

    return Registry.open(home=home, url=url, store=store, artifacts=artifacts)
