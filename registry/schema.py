"""Database rows (SQLAlchemy 2.x ORM), kept apart from the ``SFTRecord`` domain objects.

This module describes the newest schema; ``registry/migrations`` builds it step by step, and a test
checks that the two agree.

- ``series``: one per (kind, language-or-task name, base model); holds the version counter, so a
  version number is never handed out twice, even after the newest version is removed.
- ``sfts``: one per stored artifact (``sha256`` is unique: identical SFTs are stored once).
- ``registry_info``: key/value facts about the database, e.g. its ``registry_id`` (the artifact
  store records it, so that two databases never share, and garbage-collect, one store).
- ``artifact_locks``: never holds a committed row. A transaction that starts or stops a row pointing at
  an artifact (add, rm, gc) first inserts the artifact's sha256 here and deletes it before committing:
  the primary key makes every other such transaction for the same artifact wait, on any host (see core).
- ``tags``: aliases such as ``best`` or ``paper``; unique within a series, so ``ace@best`` names
  exactly one version (tagging another version moves the alias).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sftkit.artifact import sft_name
from sftkit.registry.records import SFTRecord, canonical_reference, record_from_columns

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Unique constraints cannot see NULLs as equal, so "no base model recorded" is stored as "".
UNKNOWN_BASE = ""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class InfoRow(Base):
    __tablename__ = "registry_info"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ArtifactLockRow(Base):
    __tablename__ = "artifact_locks"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)


class SeriesRow(Base):
    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("name", "kind", "base_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(String(255))
    last_version: Mapped[int] = mapped_column(Integer)


class SFTRow(Base):
    __tablename__ = "sfts"
    __table_args__ = (
        UniqueConstraint("series_id", "version"),
        Index(None, "language"),
        Index(None, "task"),
        Index(None, "base_model"),
        Index(None, "created", "id"),
        Index(None, "source_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="RESTRICT"))
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    language: Mapped[str | None] = mapped_column(String(64))
    task: Mapped[str | None] = mapped_column(String(64))
    base_model: Mapped[str] = mapped_column(String(255))
    base_revision: Mapped[str | None] = mapped_column(String(255))
    base_fingerprint: Mapped[str | None] = mapped_column(String(100))
    method: Mapped[str | None] = mapped_column(String(32))
    rank: Mapped[str | None] = mapped_column(String(32))
    keep: Mapped[float | None] = mapped_column(Float)
    k: Mapped[int | None] = mapped_column(BigInteger)
    density: Mapped[float | None] = mapped_column(Float)
    num_entries: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    trainer: Mapped[dict[str, Any]] = mapped_column(JSON)
    source_id: Mapped[int | None] = mapped_column(ForeignKey("sfts.id", ondelete="SET NULL"))
    source_reference: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    tags: Mapped[list[TagRow]] = relationship(
        back_populates="sft", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )

    @property
    def reference(self) -> str:
        return canonical_reference(self.kind, sft_name(self.kind, self.language, self.task), self.version)

    def to_record(self, path: Path, location: str | None) -> SFTRecord:
        columns = {column.key: getattr(self, column.key) for column in self.__table__.columns}
        return record_from_columns(columns, (tag.name for tag in self.tags), path, location)


class TagRow(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("series_id", "name"), Index(None, "sft_id"), Index(None, "name"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="RESTRICT"))
    sft_id: Mapped[int] = mapped_column(ForeignKey("sfts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))

    sft: Mapped[SFTRow] = relationship(back_populates="tags")


class SourceRow(Base):
    """One source of a multi-source task SFT (a single-source SFT uses ``SFTRow.source_id``)."""

    __tablename__ = "sft_sources"
    __table_args__ = (Index(None, "source_id"),)

    sft_id: Mapped[int] = mapped_column(ForeignKey("sfts.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int | None] = mapped_column(ForeignKey("sfts.id", ondelete="SET NULL"))
    reference: Mapped[str | None] = mapped_column(Text)  # kept when the source is removed with --force
