"""How ``sftkit compose --tune`` shows its search: a rich bar on a terminal, plain lines in a log, then the table
of trials."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from sftkit.cli.context import console, err_console, live_display, progress, state
from sftkit.cli.progress_lines import LineLog, log_interval

if TYPE_CHECKING:
    from sftkit.tuning import Trial, Tuning


@contextmanager
def trial_reporter(ctx: typer.Context, metric: str) -> Iterator[Callable[[Trial, int, int], None]]:
    """``on_trial`` for ``sftkit.tuning.tune``: a bar with the best score so far, or a line per log interval."""
    best: list[float] = []

    def better(trial: Trial) -> float:
        best[:] = [max([*best, trial.score])]
        return best[0]

    if live_display(ctx):
        with progress(ctx, transient=False) as bar:
            task = bar.add_task(f"tuning on {metric}", total=None)

            def advance(trial: Trial, done: int, total: int) -> None:
                top = better(trial)
                bar.update(task, completed=done, total=total, description=f"tuning · best {metric} {top:.4f}")

            yield advance
            bar.update(task, total=bar.tasks[0].completed)  # coordinate search may stop before its bound
        return
    if state(ctx).quiet:
        yield lambda trial, done, total: None
        return
    log = LineLog(err_console, log_interval())
    count = [0, 0]  # trials done, the search's bound

    def line(trial: Trial, done: int, total: int) -> None:
        top = better(trial)
        count[:] = [done, total]
        if done == 1 or done == total or log.due():
            log.print(f"tuning: trial {done}/{total}, {metric} {trial.score:.4f}, best {top:.4f}")

    yield line
    if count[0] and count[0] < count[1]:  # coordinate search stopped before its bound
        log.print(f"tuning: done after {count[0]} trials, best {metric} {best[0]:.4f}")


def print_trials(tuning: Tuning, metric: str, references: Sequence[str], dev: Any) -> None:
    """The table of trials, best marked, on stdout."""
    from rich.table import Table

    best = tuning.best
    searched_density = len({trial.density for trial in tuning.trials}) > 1
    # The heading is a line of its own, never wrapped: as a table title it broke inside a long dev-set path.
    console.print(f"--tune on {dev}: {len(tuning.trials)} trials ({tuning.search} search)", soft_wrap=True)
    table = Table()
    table.add_column("#", justify="right")
    for position in tuning.tuned:
        table.add_column(f"w {references[position]}", justify="right")
    if searched_density:
        table.add_column("D", justify="right")
    table.add_column(metric, justify="right")
    for number, trial in enumerate(tuning.trials, 1):
        cells = [str(number), *(f"{trial.weights[i]:g}" for i in tuning.tuned)]
        cells += [f"{trial.density:g}"] if searched_density and trial.density is not None else []
        cells.append(f"{trial.score:.4f}")
        table.add_row(*cells, style="bold green" if trial is best else None)
    console.print(table)
