"""``sftkit demo`` wall time: two workers against one, in one run (issue 18: ≤ 120 s wall on 2 cores).

Runs the installed ``sftkit demo --seed S --json`` twice in fresh processes on a quiet machine, first with
``--workers 1`` (the baseline: every SFT in turn on one thread) and then with ``--workers 2`` (two SFTs at
once in worker processes), and prints both wall times, their ratio, the CPU time of each, and whether the
two runs measured the same numbers (they must: each SFT is computed alone, on its own seeds), and the same as
``benchmarks/demo_seeds.py`` recorded for that seed. The report goes to ``benchmarks/results/demo_wall.json``.

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
from pathlib import Path
from typing import Any

TARGET_SECONDS = 120.0
RECORDS = Path(__file__).resolve().parent / "results"
SEEDS_RECORD = RECORDS / "demo_seeds.json"


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


def matches_seeds_record(seed: int, run: dict[str, Any]) -> bool | None:
    """Whether the run's scores are those demo_seeds.py recorded for the seed (None: no such record)."""
    if not SEEDS_RECORD.is_file():
        return None
    rows = [row for row in json.loads(SEEDS_RECORD.read_text())["rows"] if row["seed"] == seed]
    if not rows:
        return None
    scores = {(s["method"], s["language"], s["composition"]): s["macro_f1"] for s in run["results"]["scores"]}
    return all(
        scores[row["method"], row["language"], "θ0 + φ_T"] == row["alone"]
        and scores[row["method"], row["language"], "θ0 + φ_T + φ_L"] == row["composed"]
        for row in rows
    )


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
        "same_as_demo_seeds_record": matches_seeds_record(args.seed, two),
    }
    RECORDS.mkdir(exist_ok=True)
    (RECORDS / "demo_wall.json").write_text(json.dumps(report, indent=1) + "\n")
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
            f"same results: {report['same_results']}; as demo_seeds.py's record: "
            f"{report['same_as_demo_seeds_record']}"
        )
    return 0 if report["same_results"] and report["same_as_demo_seeds_record"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
