"""The registry's query vocabulary: filters, sort orders and the one ``find`` signature.

Two engines answer queries — ``Registry`` (SQLAlchemy, any database) and ``SQLiteListing``
(the standard library's ``sqlite3``, for a fast ``sftkit list``). Both inherit ``find`` from
``Finder`` and implement ``run_query``; the sort orders are SQL expressions both engines use as is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from sftkit.errors import BadInputError
from sftkit.registry.records import SFTRecord
from sftkit.registry.references import KIND_ALIASES

# Sort key → SQL expressions over the ``sfts`` table (the row id always breaks ties, same direction).
SORT_KEYS: dict[str, tuple[str, ...]] = {
    "created": ("created",),
    "version": ("version",),
    "name": ("coalesce(language, task)", "version"),
    "kind": ("kind",),
    "language": ("language",),
    "task": ("task",),
    "base": ("base_model",),
    "method": ("method",),
    "density": ("density",),
    "entries": ("num_entries",),
    "k": ("k",),
    "size": ("size_bytes",),
}


@dataclass(frozen=True)
class Query:
    """A validated ``find``: column equalities, an optional tag, an order and a limit."""

    kind: str | None = None
    language: str | None = None
    task: str | None = None
    base_model: str | None = None
    method: str | None = None
    tag: str | None = None
    sort: str = "created"
    descending: bool = True
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind is not None:
            if self.kind not in KIND_ALIASES:
                raise BadInputError(f"kind must be 'language' (or 'lang') or 'task', not {self.kind!r}")
            object.__setattr__(self, "kind", KIND_ALIASES[self.kind])
        if self.sort not in SORT_KEYS:
            raise BadInputError(f"cannot sort by {self.sort!r}: choose one of {', '.join(SORT_KEYS)}")

    @property
    def equalities(self) -> dict[str, str]:
        """Column → required value, for the filters that were given."""
        given = {
            "kind": self.kind,
            "language": self.language,
            "task": self.task,
            "base_model": self.base_model,
            "method": self.method,
        }
        return {column: value for column, value in given.items() if value is not None}

    @property
    def order(self) -> tuple[str, ...]:
        """SQL expressions to order by, the row id last (ties broken the same way by both engines)."""
        return (*SORT_KEYS[self.sort], "id")


class Finder(ABC):
    """Anything that answers ``find``: the full ``Registry`` or the fast read-only listing."""

    url: str

    def find(
        self,
        kind: str | None = None,
        language: str | None = None,
        task: str | None = None,
        base_model: str | None = None,
        method: str | None = None,
        tag: str | None = None,
        sort: str = "created",
        descending: bool = True,
        limit: int | None = None,
    ) -> list[SFTRecord]:
        """Records matching every given filter, sorted by ``sort`` (one of ``SORT_KEYS``)."""
        return self.run_query(Query(kind, language, task, base_model, method, tag, sort, descending, limit))

    @abstractmethod
    def run_query(self, query: Query) -> list[SFTRecord]:
        """The records of a validated query."""
