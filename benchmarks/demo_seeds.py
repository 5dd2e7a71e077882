"""``sftkit demo`` over seeds 0–4: does the language SFT help, for each method and toy target language?

Runs the installed ``sftkit demo --seed S --json`` (the very pipeline a user runs, one thread each, two
seeds at a time on 2 cores) and prints, per seed, method and language, macro-F1 of θ0 + φ_T and of
θ0 + φ_T + φ_L, the composition effect, and DEFT-X − LT-SFT on the composed model; then the summary the
demo is held to (issue 18): the language SFT helps in ≥ 16 of the 20 cases and by ≥ +0.03 on average per
method. Each seed's JSON is kept in ``benchmarks/out/demo_seeds/`` (a rerun reuses it; ``--fresh`` redoes
it), the table and summary go to ``benchmarks/results/demo_seeds.json``.

    python benchmarks/demo_seeds.py              # seeds 0–4
    python benchmarks/demo_seeds.py --seeds 0 1  # some seeds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "demo_seeds"
RECORD = HERE / "results" / "demo_seeds.json"
ALONE, COMPOSED = "θ0 + φ_T", "θ0 + φ_T + φ_L"
GOAL_CASES, GOAL_MEAN = 16, 0.03


def run_seed(seed: int, fresh: bool, out: Path = OUT) -> dict[str, Any]:
    """One ``sftkit demo --seed`` run in a fresh process and a temporary home; its JSON is cached."""
    cached = out / f"seed-{seed}.json"
    if cached.is_file() and not fresh:
        return json.loads(cached.read_text())
    sftkit = shutil.which("sftkit")
    if sftkit is None:
        raise SystemExit("error: the sftkit console script is not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SFTKIT_REGISTRY_URL", None)
    with tempfile.TemporaryDirectory(prefix=f"demo-seed-{seed}-") as home:
        started = time.perf_counter()
        done = subprocess.run(
            [sftkit, "-q", "demo", "--seed", str(seed), "--workers", "1", "--home", home, "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(f"error: sftkit demo --seed {seed} failed:\n{done.stderr}")
    result = json.loads(done.stdout) | {"wall_seconds": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=1))
    print(f"seed {seed}: {result['seconds']} s", file=sys.stderr, flush=True)
    return result


def rows_of(results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (seed, method, language): both compositions, the composition effect."""
    rows = []
    for seed, result in sorted(results.items()):
        scores = {(s["method"], s["language"], s["composition"]): s["macro_f1"] for s in result["scores"]}
        for method, language in sorted({(m, lang) for m, lang, _ in scores}):
            alone, composed = scores[method, language, ALONE], scores[method, language, COMPOSED]
            rows.append(
                {
                    "seed": seed,
                    "method": method,
                    "language": language,
                    "alone": alone,
                    "composed": composed,
                    "effect": composed - alone,
                    "source_macro_f1": result["source_language"]["macro_f1"],
                }
            )
    return rows


def summary_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    methods = sorted({row["method"] for row in rows})
    per_method = {
        method: {
            "cases_helped": sum(row["effect"] > 0 for row in rows if row["method"] == method),
            "cases": sum(row["method"] == method for row in rows),
            "mean_effect": statistics.fmean(row["effect"] for row in rows if row["method"] == method),
            "mean_alone": statistics.fmean(row["alone"] for row in rows if row["method"] == method),
            "mean_composed": statistics.fmean(row["composed"] for row in rows if row["method"] == method),
        }
        for method in methods
    }
    composed = {(row["seed"], row["language"], row["method"]): row["composed"] for row in rows}
    differences = [
        composed[seed, language, "deftx"] - composed[seed, language, "lt-sft"]
        for seed, language, method in composed
        if method == "deftx" and (seed, language, "lt-sft") in composed
    ]
    helped = sum(row["effect"] > 0 for row in rows)
    return {
        "cases_helped": helped,
        "cases": len(rows),
        "per_method": per_method,
        "deftx_minus_ltsft_composed": {
            "mean": statistics.fmean(differences) if differences else None,
            "deftx_better": sum(d > 0 for d in differences),
            "cases": len(differences),
        },
        "goal_met": helped >= GOAL_CASES * len(rows) / 20
        and all(m["mean_effect"] >= GOAL_MEAN for m in per_method.values()),
    }


def render(rows: list[dict[str, Any]], summary: dict[str, Any], results: dict[int, dict[str, Any]]) -> str:
    composed = {(row["seed"], row["language"], row["method"]): row["composed"] for row in rows}
    lines = [
        "| seed | language | method | θ0 + φ_T | θ0 + φ_T + φ_L | effect | DEFT-X − LT-SFT (composed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seed, language = row["seed"], row["language"]
        difference = ""
        if row["method"] == "deftx" and (seed, language, "lt-sft") in composed:
            difference = f"{composed[seed, language, 'deftx'] - composed[seed, language, 'lt-sft']:+.3f}"
        lines.append(
            f"| {row['seed']} | {row['language']} | {row['method']} | {row['alone']:.3f} | {row['composed']:.3f} | "
            f"{row['effect']:+.3f} | {difference} |"
        )
    lines.append("")
    for method, values in summary["per_method"].items():
        lines.append(
            f"{method}: language SFT helps in {values['cases_helped']}/{values['cases']} cases, mean effect "
            f"{values['mean_effect']:+.3f} ({values['mean_alone']:.3f} → {values['mean_composed']:.3f})"
        )
    difference = summary["deftx_minus_ltsft_composed"]
    if difference["mean"] is not None:
        lines.append(
            f"DEFT-X − LT-SFT (composed): mean {difference['mean']:+.3f}, DEFT-X better in "
            f"{difference['deftx_better']}/{difference['cases']}"
        )
    seconds = [result["seconds"] for result in results.values()]
    lines.append(
        f"helped in {summary['cases_helped']}/{summary['cases']} cases; goal (≥ {GOAL_CASES}/20, ≥ +{GOAL_MEAN} per "
        f"method) {'met' if summary['goal_met'] else 'NOT met'}; demo {min(seconds):.0f}–{max(seconds):.0f} s per seed"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=2, help="demos at a time (each runs on one thread)")
    parser.add_argument("--fresh", action="store_true", help="rerun seeds whose JSON is cached")
    parser.add_argument("--out", type=Path, default=OUT, help="where each seed's JSON is cached")
    args = parser.parse_args()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(
            zip(args.seeds, pool.map(lambda seed: run_seed(seed, args.fresh, args.out), args.seeds), strict=True)
        )
    rows = rows_of(results)
    summary = summary_of(rows)
    print(render(rows, summary, results))
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
