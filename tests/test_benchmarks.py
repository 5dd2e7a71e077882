"""The performance suite still runs: ``benchmarks/run_all.py --quick`` end to end (timings are not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK_SUITE = {"deftx", "select", "compose", "train_memory (language)", "overlap", "registry"}


@pytest.mark.slow
def test_run_all_quick_runs_every_benchmark():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(done.stdout)
    assert document["quick"] is True
    assert document["failures"] == []
    assert all(outcome["error"] is None and outcome["returncode"] is not None for outcome in document["benchmarks"])
    by_benchmark: dict[str, list[dict]] = {}
    for row in document["rows"]:
        by_benchmark.setdefault(row["benchmark"], []).append(row)
    assert set(by_benchmark) == QUICK_SUITE
    for name, rows in by_benchmark.items():
        for row in rows:
            assert isinstance(row["ours"], int | float) and row["ours"] >= 0, (name, row)
            assert isinstance(row["ratio"], int | float), (name, row)
            assert row["target"], (name, row)
    # The exactness rows are verdicts on correctness, not timing: they must hold at any size.
    exact = [row for row in document["rows"] if row["target"] == "identical"]
    assert {row["benchmark"] for row in exact} == {"select", "overlap"}
    assert all(row["passed"] is True for row in exact)


def test_run_all_reports_a_crashed_benchmark(tmp_path, monkeypatch):
    """A script that dies without rows fails the suite and is named, in quick and full mode alike."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('no rows here')\nsys.exit(3)\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    outcome = run_all.run_one(run_all.Benchmark("broken", "broken.py"), quick=True)
    assert outcome.returncode == 3 and outcome.rows == []
    assert "no JSON rows" in outcome.error
    assert run_all.failures([outcome], quick=True) == [f"broken: {outcome.error}"]
    missed = run_all.Outcome("x", [], 1.0, 1, rows=[{"benchmark": "x", "metric": "m", "passed": False}])
    assert run_all.failures([missed], quick=True) == []
    assert run_all.failures([missed], quick=False) == ["x: m"]


def test_nusax_mini_table_is_mean_and_std_over_seeds(tmp_path):
    """The miniature's summary (its full run is too long for CI): per-language mean ± std, average over targets,
    rows without scores left out, the paper's rows beside ours only for the five real targets."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import nusax_mini
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    budget = nusax_mini.QUICK  # one target (ace)
    state = nusax_mini.State(tmp_path / "state.json")
    core = nusax_mini.rows("core")
    for seed, ace in enumerate([0.50, 0.60]):
        for row in core:
            state.set_score(row, seed, "ace", {"macro_f1": ace, "accuracy": 0.0, "n": 100})
    resumed = nusax_mini.State(tmp_path / "state.json")  # what a rerun reads back
    table = nusax_mini.summarise(resumed, budget, [0, 1], "extras")
    assert list(table) == core  # the extra rows have no scores yet: left out, not shown as zeros
    mean, std = table[core[0]]["ace"]
    assert mean == pytest.approx(55.0) and std == pytest.approx(7.0710678)
    assert table[core[0]]["avg"] == table[core[0]]["ace"]
    lines = nusax_mini.markdown(table, budget, [0, 1]).splitlines()
    assert lines[0] == "| row | ace | avg |"
    assert lines[2] == f"| {core[0]} | 55.0 ± 7.1 | 55.0 ± 7.1 |"
    assert len(lines) == 2 + len(core)  # no paper rows for a one-language table
    full = nusax_mini.markdown(
        {row: {lang: (50.0, 1.0) for lang in (*nusax_mini.TARGETS, "avg")} for row in core}, nusax_mini.CORE, [0, 1]
    ).splitlines()
    assert len(full) == 2 + len(core) + len(nusax_mini.PAPER_ROWS)
    assert nusax_mini.QUICK.digest() != nusax_mini.CORE.digest()
    ablations = nusax_mini.rows("ablations")  # DEFT-X 90var beside its three Table 5 variants
    assert ablations[:2] == core[2:] and len(ablations) == 2 * (1 + len(nusax_mini.ABLATION_METHODS))


def test_nusax_mini_refuses_a_base_that_is_not_xlmr(tmp_path, tiny_base):
    """--base DIR must hold an XLM-R-family encoder: anything else is one clear line and exit code 2."""
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    script = str(ROOT / "benchmarks" / "nusax_mini.py")
    for base, says in ((bert, "not an XLM-R-family encoder"), (tmp_path / "nothing", "neither me5-small")):
        done = subprocess.run([sys.executable, script, "--base", str(base)], capture_output=True, text=True)
        if "the data is not at" in done.stderr:
            pytest.skip("NusaX is not available")
        assert done.returncode == 2, done.stderr
        assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1
