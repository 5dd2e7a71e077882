"""An SFT's metadata (``sft_config.json``): what it adapts and how it was made. No torch needed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sftkit import __version__
from sftkit.artifact import FORMAT_VERSION, KINDS, sft_name
from sftkit.errors import BadInputError


@dataclass
class SFTMetadata:
    """Everything known about how an SFT was made; stored as ``sft_config.json``."""

    kind: str = "language"  # "language" | "task"
    language: str | None = None
    task: str | None = None
    labels: list[str] | None = None
    base_model: str | None = None
    base_revision: str | None = None
    base_fingerprint: str | None = None
    head_type: str | None = None  # "masked-lm" | "sequence-classification" | None
    method: str = "deftx"  # "deftx" | "lt-sft"
    rank: str | None = None  # rank spec as given: "90var", "100", "none"
    keep: float | None = None
    k: int | None = None
    maskable_entries: int | None = None
    density: float | None = None
    source_sft: dict[str, Any] | None = None  # lineage of a task SFT: reference, sha256, language
    source_sfts: list[dict[str, Any]] | None = None  # a multi-source task SFT's sources, each as source_sft
    metrics: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    rank_report: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    sftkit_version: str = __version__
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInputError(f"SFT kind must be 'language' or 'task', not {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTMetadata:
        """Unknown keys (written by a newer sftkit) are kept in ``extra`` rather than lost."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        unknown = {key: value for key, value in data.items() if key not in known}
        metadata = cls(**values)
        metadata.extra.update(unknown)
        return metadata

    @property
    def name(self) -> str:
        """Short human name: the language code of a language SFT, the task of a task SFT."""
        return sft_name(self.kind, self.language, self.task) or "unnamed"

    @property
    def trained_with_frozen_decoder(self) -> bool:
        """A language SFT trained with the untied, frozen MLM decoder (every one since the option exists)."""
        return self.kind == "language" and bool(self.trainer.get("freeze_decoder"))
