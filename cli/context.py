"""Shared CLI state: consoles, global options, registry access and the one SFT resolver.

Nothing here imports torch or transformers at import time: commands that need no model must start
in well under half a second.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from sftkit.cli.progress_lines import STAGE_DELAY, LineLog, clock, log_interval

if TYPE_CHECKING:
    from sftkit.registry import Registry, SFTRecord
    from sftkit.registry.objects import TransferProgress
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
    artifact_url: str | None = None
    transfer_bars: TransferProgress | None = None
    _registry: Registry | None = None

    def registry(self) -> Registry:
        if self._registry is None:
            from sftkit.registry import Registry

            self._registry = Registry.open(home=self.home, url=self.registry_url, artifacts=self.artifact_url)
            self._registry.progress = self.transfer_bars
        return self._registry

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def listing(self) -> Finder:
        """For read-only ``find``: skips SQLAlchemy's import when the registry allows (see registry.listing)."""
        if self._registry is not None:
            return self._registry
        from sftkit.registry.listing import open_listing

        return open_listing(home=self.home, url=self.registry_url, artifacts=self.artifact_url)


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


def transfer_bars(ctx: typer.Context) -> TransferProgress | None:
    """Byte progress bars for the registry's large uploads and downloads, on a terminal only.

    Inside another live display (an ``activity`` spinner) rich cannot draw a second one: that transfer
    then runs under the spinner.
    """
    if not live_display(ctx):
        return None

    @contextmanager
    def bar(label: str, total: int) -> Iterator[Any]:
        from rich.errors import LiveError
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        bars = Progress(*columns, console=err_console, transient=True)
        try:
            bars.start()
        except LiveError:
            yield lambda _count: None
            return
        task = bars.add_task(label, total=total)
        try:
            yield lambda count: bars.advance(task, count)
        finally:
            bars.stop()

    return bar


def live_display(ctx: typer.Context) -> bool:
    """Rich bars and spinners: on a terminal (or forced by ``SFTKIT_PROGRESS=1``), unless ``--quiet``."""
    return not state(ctx).quiet and (err_console.is_terminal or os.environ.get("SFTKIT_PROGRESS") == "1")


def progress(ctx: typer.Context, transient: bool = True):
    """A rich progress bar that respects ``--quiet`` (and draws nothing off a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=transient,
        disable=not live_display(ctx),
    )


@contextmanager
def activity(ctx: typer.Context, message: str) -> Iterator[None]:
    """One stage of long work: a spinner on a terminal; nothing with ``--quiet``.

    In a log (``progress_lines``) a stage still running after ``STAGE_DELAY`` seconds (or the log interval,
    if shorter) says so in a line, and in another when it ends; a quick stage prints nothing, so a refused
    command's stderr stays its one error line and ``--json`` output stays alone.
    """
    if live_display(ctx):
        with err_console.status(f"{message}…", spinner="dots"):
            yield
        return
    if state(ctx).quiet:
        yield
        return
    log, started, delay = LineLog(err_console, 0), time.monotonic(), min(STAGE_DELAY, log_interval())
    announce = threading.Timer(delay, log.print, (f"{message}…",))
    if delay:
        announce.start()
    else:
        log.print(f"{message}…")  # interval 0: at once, not racing the stage
    try:
        yield
    finally:
        announce.cancel()
        if delay:
            announce.join()  # a line being printed is finished before the next one
    if log.last is not None:
        log.print(f"{message}: done in {clock(time.monotonic() - started)}")
