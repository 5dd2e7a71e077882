"""Child processes of the concurrency and crash tests. They add SFT *directories*, so they import
the registry but never torch, and start in a fraction of a second from a fork server."""

from __future__ import annotations

import itertools
from pathlib import Path

from sftkit.registry import Registry


def add_all(home: str, url: str | None, directories: list[Path]) -> None:
    with Registry.open(home=home, url=url) as registry:
        for directory in directories:
            registry.add(directory)


def add_until_killed(home: str, url: str | None, directories: list[Path], ready) -> None:
    """Signal readiness once the registry is open, then add as fast as possible, forever (re-adding
    stored content takes the deduplicating path, which stages and locks just the same)."""
    with Registry.open(home=home, url=url) as registry:
        registry.find(limit=1)
        ready.set()
        for directory in itertools.cycle(directories):
            registry.add(directory)
