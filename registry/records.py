"""Domain objects handed out by the registry; plain data, independent of the database rows."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sftkit.artifact import CONFIG_NAME, sft_name
from sftkit.errors import NotFoundError

KIND_PREFIXES = {"language": "lang", "task": "task"}


def canonical_reference(kind: str, name: str, version: int | None) -> str:
    """``lang:ace@2`` / ``task:sa@1``: the reference that always names exactly this version."""
    prefix = f"{KIND_PREFIXES.get(kind, kind)}:{name}"
    return prefix if version is None else f"{prefix}@{version}"


@dataclass(frozen=True)
class SFTRecord:
    """One registered SFT (or, with ``id=None``, an SFT directory outside the registry).

    ``path`` is a normal SFT directory (``sftkit.sft.SparseFineTuning.load`` reads it); for a stored
    SFT it lies in the content-addressed store, or for a remote store in this machine's cache (where it
    appears once ``Registry.local_copy`` or ``load`` fetched it), and must not be modified. ``location``
    is the URL of a stored SFT's bytes (None for a directory outside the registry).
    """

    id: int | None
    reference: str
    kind: str
    language: str | None
    task: str | None
    version: int | None
    base_model: str | None
    base_revision: str | None
    base_fingerprint: str | None
    method: str | None
    rank: str | None
    keep: float | None
    k: int | None
    density: float | None
    num_entries: int
    sha256: str
    size_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    source_id: int | None = None
    source_reference: str | None = None
    created: datetime | None = None
    tags: tuple[str, ...] = ()
    path: Path | None = None
    location: str | None = None

    @property
    def name(self) -> str:
        """The language code of a language SFT, the task name of a task SFT."""
        return sft_name(self.kind, self.language, self.task) or ""

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]

    def config(self) -> dict[str, Any]:
        """The full ``sft_config.json`` of the artifact (labels, rank report, data, …)."""
        if self.path is None or not (self.path / CONFIG_NAME).is_file():
            raise NotFoundError(f"the artifact of {self.reference} is missing at {self.path} (run `sftkit verify`)")
        return json.loads((self.path / CONFIG_NAME).read_text(encoding="utf-8"))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths and times as strings, tags as a list."""
        data = asdict(self)
        data["path"] = str(self.path) if self.path is not None else None
        data["created"] = self.created.isoformat() if self.created is not None else None
        data["tags"] = list(self.tags)
        return data


@dataclass(frozen=True)
class VerifyProblem:
    """An artifact that is missing or whose content no longer matches its recorded hash."""

    reference: str
    sha256: str
    location: str  # where the bytes should be: a URL, or a path for a store on this machine
    problem: str

    def __str__(self) -> str:
        return f"{self.reference}: {self.problem} ({self.location})"

    def to_dict(self) -> dict[str, str]:
        return {"reference": self.reference, "sha256": self.sha256, "location": self.location, "problem": self.problem}


def record_from_columns(columns: Mapping[str, Any], tags: Iterable[str], path: Path, location: str | None) -> SFTRecord:
    """An ``SFTRecord`` from the values of one ``sfts`` row (ORM attributes or a raw SQL row alike)."""
    created = columns["created"]
    if created is not None and created.tzinfo is None:  # SQLite drops the zone; we always store UTC
        created = created.replace(tzinfo=timezone.utc)
    kind = columns["kind"]
    name = sft_name(kind, columns["language"], columns["task"])
    return SFTRecord(
        id=columns["id"],
        reference=canonical_reference(kind, name, columns["version"]),
        kind=kind,
        language=columns["language"],
        task=columns["task"],
        version=columns["version"],
        base_model=columns["base_model"] or None,
        base_revision=columns["base_revision"],
        base_fingerprint=columns["base_fingerprint"],
        method=columns["method"],
        rank=columns["rank"],
        keep=columns["keep"],
        k=columns["k"],
        density=columns["density"],
        num_entries=columns["num_entries"],
        sha256=columns["sha256"],
        size_bytes=columns["size_bytes"],
        metrics=dict(columns["metrics"] or {}),
        trainer=dict(columns["trainer"] or {}),
        source_id=columns["source_id"],
        source_reference=columns["source_reference"],
        created=created,
        tags=tuple(sorted(tags)),
        path=path,
        location=location,
    )
