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


def _nusax_mini():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import nusax_mini
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return nusax_mini


def _plain_macro_f1(gold, predicted, num_labels=3):
    """The obvious implementation: per-class precision, recall, F1, averaged over the classes that occur."""
    f1s = []
    for label in range(num_labels):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        n_gold, n_predicted = gold.count(label), predicted.count(label)
        if n_gold == 0 and n_predicted == 0:
            continue
        precision = tp / n_predicted if n_predicted else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


def _plain_bootstrap(cells, resamples, seed):
    """Loops: the same row ids for every cell per resample, drawn as paired_bootstrap draws them."""
    import numpy as np

    n = len(cells[0][0])
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    effects = []
    for ids in draws:
        total = 0.0
        for gold, a, b in cells:
            g, x, y = ([values[i] for i in ids] for values in (gold, a, b))
            total += _plain_macro_f1(g, x) - _plain_macro_f1(g, y)
        effects.append(100 * total / len(cells))
    return effects


def _predictions(rng, gold, accuracy):
    """Each row right with probability ``accuracy``, else a uniformly wrong label."""
    return [g if rng.random() < accuracy else (g + rng.randrange(1, 3)) % 3 for g in gold]


def test_nusax_mini_bootstrap_matches_a_plain_implementation():
    import random

    import numpy as np

    from sftkit.training.evaluation import confusion_matrix, scores

    nusax_mini = _nusax_mini()
    rng = random.Random(7)
    gold = [rng.randrange(3) for _ in range(60)]
    cells = [(gold, _predictions(rng, gold, 0.7), _predictions(rng, gold, 0.6)) for _ in range(3)]
    for _, a, _b in cells:  # the vectorised macro-F1 is sftkit's (and the plain one)
        import torch

        expected = scores(confusion_matrix(torch.tensor(gold), torch.tensor(a), 3), ["n", "u", "p"])["macro_f1"]
        assert nusax_mini.macro_f1_rows([gold], [a], 3)[0] == pytest.approx(expected)
        assert _plain_macro_f1(gold, a) == pytest.approx(expected)
    missing = [0, 0, 1, 1]  # a class absent from gold and predictions is left out of the average
    assert nusax_mini.macro_f1_rows([missing], [[0, 1, 1, 1]], 3)[0] == pytest.approx(
        _plain_macro_f1(missing, [0, 1, 1, 1])
    )
    result = nusax_mini.paired_bootstrap(cells, resamples=200, seed=3)
    plain = _plain_bootstrap(cells, 200, 3)
    observed = 100 * np.mean([_plain_macro_f1(g, a) - _plain_macro_f1(g, b) for g, a, b in cells])
    assert result["effect"] == pytest.approx(observed)
    assert result["low"] == pytest.approx(np.percentile(plain, 2.5))
    assert result["high"] == pytest.approx(np.percentile(plain, 97.5))
    assert result["resamples"] == 200 and result["cells"] == 3
    with pytest.raises(ValueError, match="same number of test rows"):
        nusax_mini.paired_bootstrap([(gold, gold, gold), (gold[:10], gold[:10], gold[:10])])


def test_nusax_mini_bootstrap_tells_an_effect_from_none():
    nusax_mini = _nusax_mini()
    import random

    rng = random.Random(11)
    gold = [rng.randrange(3) for _ in range(400)]
    strong = [(gold, _predictions(rng, gold, 0.85), _predictions(rng, gold, 0.55)) for _ in range(3)]
    clear = nusax_mini.paired_bootstrap(strong, resamples=500, seed=0)
    assert clear["effect"] > 20 and clear["low"] > 0 and clear["distinguishable"]
    reversed_ = nusax_mini.paired_bootstrap([(g, b, a) for g, a, b in strong], resamples=500, seed=0)
    assert reversed_["high"] < 0 and reversed_["distinguishable"]
    same = [(gold, p, list(p)) for p in (_predictions(rng, gold, 0.7) for _ in range(3))]
    zero = nusax_mini.paired_bootstrap(same, resamples=500, seed=0)
    assert zero["effect"] == 0 and zero["low"] == zero["high"] == 0 and not zero["distinguishable"]
    # Two systems of equal skill that err on different rows: the CI straddles 0.
    noisy = [(gold, _predictions(rng, gold, 0.7), _predictions(rng, gold, 0.7)) for _ in range(3)]
    tie = nusax_mini.paired_bootstrap(noisy, resamples=500, seed=0)
    assert tie["low"] < 0 < tie["high"] and not tie["distinguishable"]


def test_nusax_mini_effects_pair_rows_of_the_state(tmp_path):
    """effects() reads each row's stored predictions, per target and on average; markdown bolds a CI without 0."""
    nusax_mini = _nusax_mini()
    state = nusax_mini.State(tmp_path / "state.json")
    gold = {"ace": [0, 1, 2, 0, 1, 2, 0, 1]}
    lt, dx = nusax_mini.CORE_METHODS
    for seed in (0, 1):
        for row, predictions in (
            (nusax_mini.alone_row(lt), [0, 0, 0, 0, 0, 0, 0, 0]),
            (nusax_mini.composed_row(lt), gold["ace"]),
            (nusax_mini.alone_row(dx), gold["ace"]),
            (nusax_mini.composed_row(dx), gold["ace"]),
        ):
            state.set_score(row, seed, "ace", {"macro_f1": 0.0, "accuracy": 0.0, "n": 8, "predictions": predictions})
    table = nusax_mini.effects(nusax_mini.State(tmp_path / "state.json"), ("ace",), [0, 1], gold, resamples=100)
    composition_lt, composition_dx, method, _ = nusax_mini.comparisons()
    assert table[composition_lt]["ace"]["effect"] > 50 and table[composition_lt]["avg"]["distinguishable"]
    assert table[composition_dx]["ace"]["effect"] == 0 and table[method]["ace"]["effect"] == 0
    lines = nusax_mini.effects_markdown(table, ("ace",)).splitlines()
    assert lines[0].endswith("| ace | avg |") and lines[2].count("**") == 4 and "**" not in lines[3]


def test_nusax_mini_cost_estimate_and_settings():
    nusax_mini = _nusax_mini()
    core = nusax_mini.cost_estimate(nusax_mini.CORE, 3, nusax_mini.TWO_THREAD_SECONDS)
    assert core["total"] <= 120  # the core's budget on 2 cores
    assert nusax_mini.cost_estimate(nusax_mini.CORE, 3)["total"] > core["total"]  # 1 thread, loaded
    parts = {key: value for key, value in core.items() if key != "total"}
    assert sum(parts.values()) == pytest.approx(core["total"], abs=0.1 * len(parts))
    table2 = nusax_mini.cost_estimate(replace_budget(nusax_mini.CORE, source_init=True), 3)
    assert table2["language SFTs, phase 1 (shared)"] > core["language SFTs, phase 1 (shared)"]  # + φ_ind
    assert not nusax_mini.CORE.source_init and nusax_mini.CORE.precision == "bf16"
    assert nusax_mini.CORE.task_max_length >= 128 and nusax_mini.CORE.language_max_length >= 128
    assert replace_budget(nusax_mini.CORE, source_init=True).digest() != nusax_mini.CORE.digest()
    # the fitted base is shared by every budget with the same head fit
    assert replace_budget(nusax_mini.CORE, task_steps=7).head_fit_digest() == nusax_mini.CORE.head_fit_digest()
    assert nusax_mini.QUICK.head_fit_digest() != nusax_mini.CORE.head_fit_digest()
    # A longer sparse phase for the language SFTs: its own cache directory and cost, phase 1's config unchanged;
    # unset, the budget keeps the digest (and cache directory) it had before the option existed.
    assert nusax_mini.CORE.digest() == "3364d05b201d"
    longer = replace_budget(nusax_mini.CORE, language_sparse_steps=2 * nusax_mini.CORE.language_steps)
    assert longer.digest() != nusax_mini.CORE.digest()
    part = "language SFTs, sparse phases"
    assert nusax_mini.cost_estimate(longer, 3)[part] == pytest.approx(
        2 * nusax_mini.cost_estimate(nusax_mini.CORE, 3)[part], abs=0.2
    )
    assert nusax_mini.cost_estimate(longer, 3, nusax_mini.TWO_THREAD_SECONDS)["total"] <= 120  # still the budget
    experiment = nusax_mini.Experiment.__new__(nusax_mini.Experiment)  # only its language_config is asked here
    experiment.budget, experiment.base, experiment.device = longer, "base", "cpu"
    config = experiment.language_config("ace", "LT-SFT")
    assert config.sparse_steps == longer.language_sparse_steps and config.max_steps == longer.language_steps
    experiment.budget = nusax_mini.CORE
    assert experiment.language_config("ace", "LT-SFT").full_phase_digest() == config.full_phase_digest()


def replace_budget(budget, **changes):
    from dataclasses import replace

    return replace(budget, **changes)
