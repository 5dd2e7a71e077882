"""Entry point of the ``sftkit`` console script.

Exit codes: 0 ok, 1 failure, 2 bad input (one clear line on stderr; the traceback only with -v),
130 interrupted.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from typer.core import TyperGroup

from sftkit import __version__
from sftkit.cli.context import err_console, state, transfer_bars
from sftkit.errors import BadInputError, SftkitError


class _ErrorHandlingGroup(TyperGroup):
    """Turns library errors into one line on stderr and the documented exit code."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/red] — nothing half-written was kept")
            raise typer.Exit(130) from None
        except SftkitError as exc:
            if state(ctx).verbose:
                raise
            kind = "error" if isinstance(exc, BadInputError) else "failed"
            err_console.print(f"[red]{kind}:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2 if isinstance(exc, BadInputError) else 1) from None
        finally:
            state(ctx).close()  # a server database's connections go back now, not when the process ends


app = typer.Typer(
    name="sftkit",
    cls=_ErrorHandlingGroup,
    help="Train, store, inspect and compose sparse fine-tunings (DEFT-X, LT-SFT) of multilingual encoders.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sftkit {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")] = False,
    home: Annotated[
        Path | None,
        typer.Option(envvar="SFTKIT_HOME", help="Registry home (registry.db, store/, cache/). Default ~/.sftkit."),
    ] = None,
    registry_url: Annotated[
        str | None,
        typer.Option(envvar="SFTKIT_REGISTRY_URL", help="SQLAlchemy URL of a shared registry database."),
    ] = None,
    artifact_url: Annotated[
        str | None,
        typer.Option(
            envvar="SFTKIT_ARTIFACT_URL",
            help="Where artifacts live: s3://bucket/prefix, a path, an fsspec URL (default: the home's store/).",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    st = state(ctx)
    st.verbose, st.quiet, st.home, st.registry_url = verbose, quiet, home, registry_url
    st.artifact_url, st.transfer_bars = artifact_url, transfer_bars(ctx)
    if not verbose:
        # Our own rich progress bars and one-line errors replace the libraries' tqdm bars and load reports.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# Each module defines ``register(app)``; library imports stay inside commands (see sftkit.cli.commands).
COMMAND_MODULES: tuple[str, ...] = (
    "sftkit.cli.commands.demo",
    "sftkit.cli.commands.compose",
    "sftkit.cli.commands.overlap",
    "sftkit.cli.commands.interop",
    "sftkit.cli.commands.train",
    "sftkit.cli.commands.registry_cmds",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()
