"""``benchmarks/nusax_merge.py`` end to end on a miniature cache made of tiny SFTs (the real NusaX text, a toy θ0)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from merge_helpers import random_sfts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "nusax_merge.py"


def _import(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


needs_data = pytest.mark.skipif(not _import("nusax_data").DATA_ROOT.is_dir(), reason="NusaX is not available")


def test_a_directory_that_is_no_cache_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--cache", str(tmp_path)], capture_output=True, text=True)
    if "the data is not at" in done.stderr:
        pytest.skip("NusaX is not available")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path} is not a nusax_mini cache directory (no budget.json)"
    ]


@needs_data
def test_merges_and_tuning_on_a_cache_of_tiny_sfts(tmp_path, tiny_base):
    from dataclasses import asdict, replace

    import torch

    from sftkit.compose import compose

    mini, merge = _import("nusax_mini"), _import("nusax_merge")
    cache = tmp_path / "quick-table9-tiny"
    budget = replace(mini.QUICK, base=str(tiny_base), test_rows=20)
    cache.mkdir()
    (cache / "budget.json").write_text(json.dumps({**asdict(budget), "fitted_base": str(tiny_base)}))
    task, language, _ = random_sfts(tiny_base)
    paths = {}  # as the miniature records them in its state: SFTs live in a cache shared by budgets
    for method in mini.CORE_METHODS:
        key = mini.method_key(method)
        for name, sft in ((f"task-{key}-s0", task), (f"lang-ace-{key}", language)):
            sft.save(tmp_path / "sft" / name)
            paths[name] = str(tmp_path / "sft" / name)
    (cache / "state.json").write_text(json.dumps({"scores": {}, "seconds": {}, "sft_paths": paths}))

    assert merge.main(["--cache", str(cache), "--seeds", "1", "--resamples", "50"]) == 0
    report = json.loads((cache / "merge.json").read_text())
    rows = merge.rows_of(mini.CORE_METHODS)
    assert list(report["macro_f1"]) == rows and len(rows) == 2 * (2 + len(merge.SETTINGS))
    # Each merge against the method's plain composition and its task SFT alone, and each LT-SFT merge against
    # DEFT-X's plain composition (merge-time conflict resolution against training-time denoising).
    assert len(report["effects"]) == 2 * 2 * len(merge.SETTINGS) + len(merge.SETTINGS)
    assert "LT-SFT, ties D 0.3 − DEFT-X 90var, sum, w 1" in report["effects"]
    assert all(set(per) == {"ace", "avg"} for per in report["effects"].values())
    tuned = report["tuning"][f"{merge.merged_row('LT-SFT', 'ties, w_L and D tuned on dev')}|0|ace"]
    assert tuned["trials"] == 25 and tuned["search"] == "grid" and tuned["weights"][0] == 1.0

    # A merged row's predictions are those of the model compose builds, predicted as nusax_mini predicts.
    state = json.loads((cache / "merge_state.json").read_text())["scores"]
    model = compose(str(tiny_base), [task, language], merge="dare-ties", density=0.6)
    texts = [text for text, _ in merge.Cache(cache).test_rows("ace")]
    tokenizer = merge.Run(merge.Cache(cache)).tokenizer
    expected = mini.predict(model, tokenizer, texts, budget.task_max_length, budget.precision)
    assert state[f"{merge.merged_row('DEFT-X 90var', 'dare-ties D 0.6')}|0|ace"]["predictions"] == expected
    assert torch.tensor(expected).unique().numel() > 1  # the tiny head is not constant: the comparison can fail
