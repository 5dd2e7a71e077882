"""How ``sftkit train`` shows the trainer's progress: rich bars on a terminal, plain lines in a log.

Both implement the trainer's ``Reporter``; ``training_reporter`` picks one (or none with ``--quiet``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer

from sftkit.cli.context import err_console, live_display, progress, state
from sftkit.cli.progress_lines import LineLog, clock, log_interval

if TYPE_CHECKING:
    from sftkit.training.trainer import Reporter

PHASE_LABELS = {"full": "full phase", "sparse": "sparse phase"}


def phase_summary(phase: str, summary: dict[str, Any], metric: str) -> str:
    """The line that closes a phase: the warm-up's loss trend, or a phase's best validation score."""
    if phase not in PHASE_LABELS:  # the head warm-up: no validation, a loss trend
        return f"{phase}: {summary['steps']} steps, MLM loss {summary['first_loss']:.4f} → {summary['loss']:.4f}"
    best, step = summary.get(metric), f"{summary['best_step']}/{summary['steps']}"
    return f"{PHASE_LABELS[phase]}: best validation {metric} {best:.4f} at step {step}"


class RichReporter:
    """One progress bar per phase showing the step, the training loss and the last validation metric."""

    def __init__(self, bar: Any, metric: str) -> None:
        self.bar, self.metric, self.task = bar, metric, None

    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
        description = {"full": "full fine-tuning", "sparse": "sparse phase"}.get(phase, phase)
        self.task = self.bar.add_task(description, total=total_steps, completed=done_steps, loss="–", score="–")

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")

    def evaluated(self, step: int, metrics: dict[str, Any]) -> None:
        self.bar.update(self.task, score=f"val {self.metric} {metrics[self.metric]:.4f}")

    def phase_finished(self, phase: str, summary: dict[str, Any]) -> None:
        self.bar.console.print(phase_summary(phase, summary, self.metric), highlight=False)

    def note(self, message: str) -> None:
        self.bar.console.print(message, highlight=False)


class LogReporter:
    """Plain lines for a log: each phase's start and end, every validation, and its steps at the first,
    the last and every log interval between — step / total, loss, learning rate, tokens per second
    (training time since the previous line, validations left out), elapsed time and ETA (from this
    session's pace, so a resume is not skewed)."""

    def __init__(self, log: LineLog, metric: str) -> None:
        self.log, self.metric = log, metric
        self.label, self.total, self.first = "", 0, 0
        self.started = self.since = self.stepped = 0.0
        self.tokens = 0

    def phase_started(self, phase: str, total_steps: int, done_steps: int) -> None:
        self.label, self.total, self.first = PHASE_LABELS.get(phase, phase), total_steps, done_steps
        self.started = self.since = self.stepped = time.monotonic()
        self.tokens = 0
        resuming = f", continuing after step {done_steps}" if done_steps else ""
        self.log.print(f"{self.label}: {total_steps} steps{resuming}")

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.tokens += tokens
        now = self.stepped = time.monotonic()
        if step != self.first + 1 and step != self.total and not self.log.due():
            return
        elapsed = now - self.started
        rate = self.tokens / max(now - self.since, 1e-9)
        eta = elapsed / (step - self.first) * (self.total - step)
        self.log.print(
            f"{self.label}: step {step}/{self.total} ({step / self.total:.0%}) · loss {loss:.4f} · lr {lr:.2e} · "
            f"{rate:,.0f} tok/s · elapsed {clock(elapsed)} · ETA {clock(eta)}"
        )
        self.since, self.tokens = now, 0

    def evaluated(self, step: int, metrics: dict[str, Any]) -> None:
        self.since += time.monotonic() - self.stepped  # the validation's time is not training throughput
        values = " · ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        self.log.print(f"{self.label}: step {step}/{self.total} · validation {values}")

    def phase_finished(self, phase: str, summary: dict[str, Any]) -> None:
        took = clock(time.monotonic() - self.started)
        self.log.print(f"{phase_summary(phase, summary, self.metric)} (done in {took})")

    def note(self, message: str) -> None:
        self.log.print(message)


def _progress_bar(ctx: typer.Context) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = progress(ctx, transient=False)
    bar.columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[score]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    return bar


@contextmanager
def training_reporter(ctx: typer.Context, metric: str) -> Iterator[Reporter | None]:
    """Bars on a terminal, lines in a log (``SFTKIT_LOG_INTERVAL``), nothing with ``--quiet``."""
    if live_display(ctx):
        bar = _progress_bar(ctx)
        with bar:
            yield RichReporter(bar, metric)
    elif state(ctx).quiet:
        yield None
    else:
        yield LogReporter(LineLog(err_console, log_interval()), metric)
