"""``sftkit demo`` wall time: two workers against one, in one run (issue 18: ≤ 120 s wall on 2 cores).

Runs the installed ``sftkit demo --seed S --json`` twice in fresh processes on a quiet machine, first with
``--workers 1`` (the baseline: every SFT in turn on one thread) and then with ``--workers 2`` (two SFTs at
once in worker processes), and prints both wall times, their ratio, the CPU time of each, and whether the
two runs measured the same numbers (they must: each SFT is computed alone, on its own seeds).

    python benchmarks/demo_wall.py [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

TARGET_SECONDS = 120.0


def run_demo(sftkit: str, seed: int, workers: int) -> dict[str, Any]:
    """One demo in a fresh process and a temporary home: its JSON, wall and CPU seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SFTKIT_REGISTRY_URL", None)
    with tempfile.TemporaryDirectory(prefix="demo-wall-") as home:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(
            [sftkit, "-q", "demo", "--seed", str(seed), "--workers", str(workers), "--home", home, "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"error: sftkit demo --workers {workers} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "workers": workers,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "results": json.loads(done.stdout),
    }


def measured(run: dict[str, Any]) -> dict[str, Any]:
    """What a demo run measured, without its timings and paths: equal for equal computations."""
    results = run["results"]
    return {key: results[key] for key in ("scores", "source_language", "overlap")} | {
        "prediction": results["exported"]["prediction"]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args(argv)
    sftkit = shutil.which("sftkit")
    if sftkit is None:
        raise SystemExit("error: the sftkit console script is not installed (pip install -e .)")
    load = os.getloadavg()[0]
    one, two = (run_demo(sftkit, args.seed, workers) for workers in (1, 2))
    report = {
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "load_average_before": round(load, 2),
        "baseline": {k: one[k] for k in ("workers", "wall_seconds", "cpu_seconds")},
        "two_workers": {k: two[k] for k in ("workers", "wall_seconds", "cpu_seconds")},
        "speedup": round(one["wall_seconds"] / two["wall_seconds"], 2),
        "two_workers_within_target": two["wall_seconds"] <= TARGET_SECONDS,
        "same_results": measured(one) == measured(two),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"sftkit demo --seed {args.seed} on {report['cpus']} CPUs (load average {report['load_average_before']}):"
        )
        for run in (one, two):
            print(f"  --workers {run['workers']}: {run['wall_seconds']} s wall, {run['cpu_seconds']} s CPU")
        print(
            f"  two workers: {report['speedup']}× the baseline's speed; "
            f"{'within' if report['two_workers_within_target'] else 'OVER'} the {TARGET_SECONDS:.0f} s target; "
            f"same results: {report['same_results']}"
        )
    return 0 if report["same_results"] else 1


if __name__ == "__main__":
    sys.exit(main())
