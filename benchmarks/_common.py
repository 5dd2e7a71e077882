"""Helpers shared by benchmarks: one case per fresh process, its peak memory, timing, a machine note.

Peak memory of a case = the process's peak resident set (VmHWM) minus its resident set just before the
case, after resetting the peak (``/proc/self/clear_refs``, Linux ≥ 4.0), so that building the inputs
does not count. Running every case in its own process keeps one case's garbage out of another's numbers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MB = 1 << 20


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}: peak memory needs Linux")
    return int(match[1]) * 1024


def measure(function: Callable[[], Any]) -> tuple[float, int, Any]:
    """(seconds, extra peak resident bytes, result) of one call."""
    import gc

    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    return seconds, _status_bytes("VmHWM") - before, result


def best_of(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Fastest of ``repeats`` calls (the machine is shared: the minimum is the least disturbed run)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def run_case(script: Path, case: str, *args: str) -> dict[str, Any]:
    """Run ``script --case CASE ARGS`` in a fresh interpreter; it prints one JSON object as its last line."""
    completed = subprocess.run(
        [sys.executable, str(script), "--case", case, *args], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"case {case} failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_note() -> str:
    import torch

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, load {load}"
