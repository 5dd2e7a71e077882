"""Plain progress lines for logs: what long work prints when stderr is not a terminal (a file, nohup, SLURM, CI).

Rich draws nothing there (its live bars and spinners need a terminal), so a ten-minute run would look
dead. Instead a stage that outlasts ``STAGE_DELAY`` prints a line then and one when it ends, and
step-wise work a line at its first and last step and every ``SFTKIT_LOG_INTERVAL`` seconds between
(default 30; 0 = every step, and every stage at once).
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta

from rich.console import Console

from sftkit.errors import BadInputError

INTERVAL_VARIABLE = "SFTKIT_LOG_INTERVAL"
DEFAULT_INTERVAL = 30.0
STAGE_DELAY = 5.0  # seconds before a stage announces itself: quicker ones (and quick refusals) print nothing


def log_interval() -> float:
    """Seconds between periodic lines, from ``SFTKIT_LOG_INTERVAL``."""
    raw = os.environ.get(INTERVAL_VARIABLE, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise BadInputError(f"{INTERVAL_VARIABLE} must be a number of seconds ≥ 0 (0 = every step), not {raw!r}")
    return value


def clock(seconds: float) -> str:
    """``0:04:05``: elapsed times and ETAs in log lines."""
    return str(timedelta(seconds=round(seconds)))


class LineLog:
    """Lines on ``console`` (markup off, never wrapped, so a log stays greppable) and when the next is due."""

    def __init__(self, console: Console, interval: float) -> None:
        self.console, self.interval = console, interval
        self.last: float | None = None

    def print(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)
        self.last = time.monotonic()

    def due(self) -> bool:
        """Whether a periodic line is due: ``interval`` seconds since the last line."""
        return self.last is None or time.monotonic() - self.last >= self.interval
