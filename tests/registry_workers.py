"""Child processes of the concurrency and crash tests. They add SFT *directories* (the CLI ones through
``sftkit import``), and start in a fraction of a second from a fork server that preloaded their imports."""

from __future__ import annotations

import functools
import itertools
import json
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


@functools.cache
def _sftkit():
    """The ``sftkit`` command, built once per process (typer builds it anew on each CliRunner call: ~0.1 s)."""
    from typer.main import get_command

    from sftkit.cli.main import app

    return get_command(app)


def run_cli(environment: dict[str, str], *args: str) -> tuple[int, str, str]:
    """``sftkit ARGS…`` in this process, as a user on the machine ``environment`` describes: exit code, out, err."""
    from typer.testing import CliRunner

    code = 0
    with CliRunner().isolation(env=environment) as (stdout, stderr, _):
        try:
            _sftkit().main(args=list(args), prog_name="sftkit")
        except SystemExit as exc:
            code = exc.code or 0
        return code, stdout.getvalue().decode(), stderr.getvalue().decode()


def cli_import(environment: dict[str, str], directory: Path) -> str:
    """``sftkit import DIR --json``; its sha256."""
    code, output, errors = run_cli(environment, "import", str(directory), "--json")
    if code != 0:
        raise RuntimeError(f"sftkit import {directory} failed ({code}): {errors}")
    return json.loads(output)["sha256"]


def cli_repeat(environment: dict[str, str], args: list[str], codes: str, times: int | None = None, stop=None) -> None:
    """Run one command ``times`` times, or until ``stop`` is set, whatever each one's outcome, appending each
    exit code and error line to ``codes``. With ``times``, ``stop`` is set at the end: the other's signal."""
    with open(codes, "a") as log:
        count = 0
        while (times is None and not stop.is_set()) or (times is not None and count < times):
            code, _, errors = run_cli(environment, *args)
            log.write(f"{code}\t{errors.strip()}\n")
            log.flush()
            count += 1
    if times is not None and stop is not None:
        stop.set()


def cli_import_all(environment: dict[str, str], directories: list[Path]) -> None:
    for directory in directories:
        cli_import(environment, directory)


def cli_import_until_killed(environment: dict[str, str], directories: list[Path], ready, log: str) -> None:
    """Import through the CLI until killed, appending each import's sha256 to ``log`` once the command returned.

    Readiness is signalled after the first import: the process is warm (clients built), so a kill then
    lands inside an import rather than in start-up.
    """
    with open(log, "a") as done:
        for position, directory in enumerate(itertools.cycle(directories)):
            done.write(cli_import(environment, directory) + "\n")
            done.flush()
            if position == 0:
                ready.set()
