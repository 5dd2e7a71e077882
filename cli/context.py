"""Shared CLI state: consoles, global options, registry access and the one SFT resolver.

Nothing here imports torch or transformers at import time: commands that need no model must start
in well under half a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sftkit.registry import Registry, SFTRecord
    from sftkit.registry.query import Finder
    from sftkit.sft import SparseFineTuning

console = Console()
err_console = Console(stderr=True)


@dataclass
class State:
    """Global options, resolved flags → environment → defaults."""

    verbose: bool = False
    quiet: bool = False
    home: Path | None = None
    registry_url: str | None = None
    _registry: Registry | None = None

    def registry(self) -> Registry:
        if self._registry is None:
            from sftkit.registry import Registry

            self._registry = Registry.open(home=self.home, url=self.registry_url)
        return self._registry

    def listing(self) -> Finder:
        """For read-only ``find``: skips SQLAlchemy's import when the registry allows (see registry.listing)."""
        if self._registry is not None:
            return self._registry
        from sftkit.registry.listing import open_listing

        return open_listing(home=self.home, url=self.registry_url)


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else mixed in."""
    typer.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def resolve(ctx: typer.Context, reference: str) -> SFTRecord:
    """The single resolver: registry names/versions/aliases, SFT directories and ``hf:owner/repo``."""
    st = state(ctx)
    if reference.startswith("hf:"):
        from sftkit.hub import default_cache_root, pull

        # Not registered: using a Hub SFT leaves no trace in the registry (``sftkit pull`` registers).
        directory = pull(reference, cache_root=default_cache_root(st.home))
        return st.registry().describe_directory(directory)
    return st.registry().resolve(reference)


def load_sft(ctx: typer.Context, reference: str) -> tuple[SFTRecord, SparseFineTuning]:
    record = resolve(ctx, reference)
    return record, state(ctx).registry().load(record)


def progress(ctx: typer.Context, transient: bool = True):
    """A rich progress bar that respects ``--quiet``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=transient,
        disable=state(ctx).quiet or (not err_console.is_terminal and os.environ.get("SFTKIT_PROGRESS") != "1"),
    )
