"""``benchmarks/nusax_merge.py`` and ``nusax_parts.py`` end to end on a miniature cache made of tiny SFTs (the real
NusaX text, a toy θ0)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from merge_helpers import tiny_miniature_cache

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
    import torch

    from sftkit.compose import compose

    mini, merge = _import("nusax_mini"), _import("nusax_merge")
    cache, (task, language, _) = tiny_miniature_cache(tmp_path, tiny_base, mini)
    budget = merge.Cache(cache).budget

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


@needs_data
def test_language_sft_parts_on_a_cache_of_tiny_sfts(tmp_path, tiny_base):
    """``benchmarks/nusax_parts.py``: φ_L split into its embedding and layer entries, each composed with φ_T."""
    import torch

    from sftkit.compose import compose

    mini, parts = _import("nusax_mini"), _import("nusax_parts")
    cache, (task, language, _) = tiny_miniature_cache(tmp_path, tiny_base, mini)

    # The two parts partition φ_L: every entry in exactly one, so composing both is composing φ_L.
    embeddings, layers = parts.restricted(language, "embeddings"), parts.restricted(language, "layers")
    assert embeddings.diffs and layers.diffs and not set(embeddings.diffs) & set(layers.diffs)
    assert set(embeddings.diffs) | set(layers.diffs) == set(language.diffs)
    whole = compose(str(tiny_base), [task, language]).state_dict()
    split = compose(str(tiny_base), [task, embeddings, layers]).state_dict()
    assert all(torch.allclose(whole[name], split[name], atol=1e-6) for name in whole)
    shares = parts.anatomy(language)
    assert sum(share["entries"] for share in shares.values()) == pytest.approx(1.0)
    assert 0.0 < shares["embeddings"]["abs_mass"] < 1.0

    assert parts.main(["--cache", str(cache), "--seeds", "1", "--resamples", "50"]) == 0
    report = json.loads((cache / "parts.json").read_text())
    assert len(report["macro_f1"]) == 2 * 4  # per method: θ0 + φ_T, + φ_L, + φ_L[embeddings], + φ_L[layers]
    assert len(report["effects"]) == 2 * 2 * 2 and all(set(per) == {"ace", "avg"} for per in report["effects"].values())
    assert report["language_sft_parts"]["lang-ace-lt-sft"] == shares
    # A part's row holds the predictions of the model compose builds from φ_T and that part.
    state = json.loads((cache / "parts_state.json").read_text())["scores"]
    run = _import("nusax_merge").Run(_import("nusax_merge").Cache(cache), state_name="parts_state.json")
    texts = [text for text, _ in run.cache.test_rows("ace")]
    budget = run.cache.budget
    expected = mini.predict(
        compose(str(tiny_base), [task, layers]), run.tokenizer, texts, budget.task_max_length, budget.precision
    )
    assert state[f"{parts.part_row('LT-SFT', 'layers')}|0|ace"]["predictions"] == expected
