"""Engines, managed sessions, schema versions and database errors turned into clear messages.

SQLite (the default) gets WAL, a busy timeout and foreign keys on every connection, and its write
transactions start with ``BEGIN IMMEDIATE`` so that two writers queue instead of failing halfway.
Any other SQLAlchemy URL (e.g. PostgreSQL for a team) works the same way through the ORM.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from sftkit.errors import BadInputError, SftkitError
from sftkit.registry.location import BUSY_TIMEOUT_S, HEAD, SCHEMA_REVISIONS

_MIGRATIONS = Path(__file__).with_name("migrations")


class Database:
    """One registry database: its engine, sessions, schema version and error translation."""

    def __init__(self, url: str, readonly: bool = False) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise BadInputError(f"{url!r} is not a valid database URL (e.g. postgresql://user@host/db)") from exc
        self.display_url = parsed.render_as_string(hide_password=True)
        try:
            if parsed.get_backend_name() == "sqlite":
                self.engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S})
                event.listen(self.engine, "connect", _configure_sqlite if readonly else _configure_sqlite_wal)
                event.listen(self.engine, "begin", _begin_sqlite)
            else:
                connect_args = {"connect_timeout": 10} if parsed.get_driver_name() == "psycopg2" else {}
                self.engine = create_engine(parsed, connect_args=connect_args, pool_pre_ping=True)
        except (NoSuchModuleError, ModuleNotFoundError) as exc:
            raise BadInputError(
                f"no driver for {self.display_url} ({exc}); for PostgreSQL: pip install 'sftkit[postgres]'"
            ) from exc
        self._write_engine = self.engine.execution_options(sftkit_write=True)

    @contextlib.contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on any error."""
        engine = self._write_engine if write else self.engine
        with self.errors(), Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Database failures as one clear ``SftkitError`` (never a driver traceback)."""
        try:
            yield
        except IntegrityError:
            raise  # a constraint the caller handles (e.g. a concurrent insert of the same key)
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            if exc.statement is None or exc.connection_invalidated:
                raise BadInputError(
                    f"cannot connect to the registry database {self.display_url}: {reason} "
                    "(check --registry-url / SFTKIT_REGISTRY_URL)"
                ) from exc
            if "locked" in reason or "busy" in reason:
                raise SftkitError(
                    f"the registry database {self.display_url} stayed locked by another process for "
                    f"{BUSY_TIMEOUT_S} s; try again"
                ) from exc
            raise SftkitError(f"registry database error ({self.display_url}): {reason}") from exc
        except DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise SftkitError(f"registry database error ({self.display_url}): {reason}") from exc

    # ------------------------------------------------------------------ schema versions
    def revision(self) -> str | None:
        """The schema revision stamped in the database; None when it has no sftkit schema yet."""
        with self.errors(), self.engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            if "alembic_version" not in tables:
                if tables:
                    raise BadInputError(
                        f"{self.display_url} already holds tables ({', '.join(sorted(tables)[:5])}) but no sftkit "
                        "schema: point SFTKIT_REGISTRY_URL at an empty or sftkit database"
                    )
                return None
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def check_schema(self) -> None:
        """Create the schema in an empty database; refuse an older or newer one with what to do."""
        current = self.revision()
        if current == HEAD:
            return
        if current is None:
            self.upgrade()
        elif current in SCHEMA_REVISIONS:
            raise BadInputError(
                f"the registry database {self.display_url} has schema revision {current}, this sftkit needs "
                f"{HEAD}: run `sftkit db upgrade` (back the database up first if it matters)"
            )
        else:
            raise SftkitError(
                f"the registry database {self.display_url} has schema revision {current}, newer than this "
                f"sftkit knows ({HEAD}): upgrade sftkit"
            )

    def upgrade(self) -> tuple[str | None, str | None]:
        """Migrate to the newest schema in one transaction (concurrent upgrades queue); returns (before, after)."""
        from alembic import command  # alembic only when a schema is created or upgraded
        from alembic.config import Config

        before = self.revision()
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.errors(), self._write_engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        return before, self.revision()

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(dbapi_connection, _record) -> None:
    # Take over transaction control from the sqlite3 module (it would defer BEGIN until the first
    # write); ``_begin_sqlite`` then emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _configure_sqlite_wal(dbapi_connection, record) -> None:
    _configure_sqlite(dbapi_connection, record)
    # WAL is a persistent property of the file; switching to it needs an exclusive lock, for which
    # SQLite does not wait, so processes opening a brand-new registry together retry briefly.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            dbapi_connection.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _begin_sqlite(connection) -> None:
    write = connection.get_execution_options().get("sftkit_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
