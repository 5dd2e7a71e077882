"""Training modes of issue 14: gradient accumulation, mixed precision and the paper's ablations (Tables 4, 5)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sftkit import deftx, toy
from sftkit.base_model import load_base
from sftkit.compose import compose
from sftkit.params import is_maskable_name, maskable_parameters
from sftkit.training import make_config, train
from sftkit.training import trainer as trainer_module
from sftkit.training.full_phase_cache import FullPhaseCache

STEPS = {"max_steps": 4, "eval_steps": 2}


@pytest.fixture(scope="module")
def still_base(tiny_base, tmp_path_factory):
    """The tiny base without dropout: a step's gradient is then a function of its examples alone."""
    base = tmp_path_factory.mktemp("still-base") / "base"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (base / "config.json").write_text(json.dumps(config))
    return base


@pytest.fixture(scope="module")
def rows(toy_languages):
    return toy.labelled(toy_languages["src"], 96)


def _phase_one(cache_dir) -> dict[str, torch.Tensor]:
    """δ = θ1 − θ_start of the single run stored in a full-phase cache directory."""
    (entry,) = [path.name for path in cache_dir.iterdir()]
    full = FullPhaseCache(cache_dir).load(entry)
    assert full is not None
    return dict(full.deltas)


def test_two_micro_batches_of_b_equal_one_batch_of_2b(still_base, rows, tmp_path):
    runs = {}
    for name, batch, accum in (("accumulated", 8, 2), ("whole", 16, 1)):
        config = make_config(
            task="sa", base_model=str(still_base), recipe="quick", batch_size=batch, grad_accum=accum, **STEPS
        )
        cache = tmp_path / name
        result = train(config, train_data=rows, full_phase_cache=cache)
        runs[name] = (result.sft, _phase_one(cache))
    (sft_a, delta_a), (sft_b, delta_b) = runs["accumulated"], runs["whole"]
    assert sft_a.metadata.trainer["grad_accum"] == 2 and sft_b.metadata.trainer["grad_accum"] == 1
    assert sft_a.metadata.trainer["steps_per_phase"] == sft_b.metadata.trainer["steps_per_phase"]
    moved = 0.0
    for name, delta in delta_b.items():
        torch.testing.assert_close(delta_a[name], delta, rtol=1e-4, atol=1e-5)
        moved = max(moved, float(delta.abs().max()))
    assert moved > 1e-3  # phase 1 really trained: the comparison is not between two zeros
    assert sft_a.diffs.keys() == sft_b.diffs.keys()
    for name, delta in sft_b.diffs.items():
        assert torch.equal(sft_a.diffs[name].indices, delta.indices), name
        torch.testing.assert_close(sft_a.diffs[name].values, delta.values, rtol=1e-4, atol=1e-5)


def test_one_micro_batch_more_changes_the_run(still_base, rows, tmp_path):
    """The control: accumulation is not a no-op (two micro-batches of 8 differ from one batch of 8)."""
    deltas = {}
    for accum in (1, 2):
        config = make_config(
            task="sa", base_model=str(still_base), recipe="quick", batch_size=8, grad_accum=accum, **STEPS
        )
        train(config, train_data=rows, full_phase_cache=tmp_path / str(accum))
        deltas[accum] = _phase_one(tmp_path / str(accum))
    assert any(not torch.allclose(deltas[1][name], deltas[2][name], atol=1e-5) for name in deltas[1])


def test_bf16_autocast_trains_in_bf16_and_stores_float32(still_base, rows, tmp_path):
    deltas = {}
    for precision in ("fp32", "bf16"):
        config = make_config(task="sa", base_model=str(still_base), recipe="quick", precision=precision, **STEPS)
        result = train(config, train_data=rows, full_phase_cache=tmp_path / precision)
        deltas[precision] = _phase_one(tmp_path / precision)
        assert result.sft.metadata.trainer["precision"] == precision
        assert all(delta.values.dtype == torch.float32 for delta in result.sft.diffs.values())
        assert all(param.dtype == torch.float32 for param in result.model.parameters())  # master weights
        assert all(tensor.dtype == torch.float32 for tensor in result.sft.full.values())  # the head
        assert all(delta.dtype == torch.float32 for delta in deltas[precision].values())  # δ
        # The mask is the top k of the float32 δ (denoised as the run's rank says), entry for entry.
        denoised, _ = deftx.denoise_all(deltas[precision], deftx.parse_rank(config.rank), keep=config.keep)
        expected = deftx.select(denoised, result.sft.metadata.k)
        assert all(torch.equal(result.masks[name], mask) for name, mask in expected.items())
    a = torch.cat([d.flatten() for d in deltas["fp32"].values()])
    b = torch.cat([d.flatten() for d in deltas["bf16"].values()])
    assert not torch.equal(a, b)  # bf16 forward passes really ran …
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9  # … and learnt the same thing


def test_length_grouping_is_recorded_changes_phase_one_and_keys_the_full_phase_cache(still_base, rows, tmp_path):
    """Batches of 8 from 96 rows: mega-batches of 24, so grouping changes which examples meet."""
    cache = tmp_path / "cache"
    for grouped in (True, False):
        config = make_config(
            task="sa", base_model=str(still_base), recipe="quick", batch_size=8, group_by_length=grouped, **STEPS
        )
        result = train(config, train_data=rows, full_phase_cache=cache)
        assert result.sft.metadata.trainer["group_by_length"] is grouped
    entries = [FullPhaseCache(cache).load(entry.name) for entry in cache.iterdir()]
    assert len(entries) == 2  # the ungrouped run did not reuse the grouped run's phase 1
    a, b = (torch.cat([d.flatten() for d in entry.deltas.values()]) for entry in entries if entry is not None)
    assert not torch.allclose(a, b, atol=1e-5)
    assert make_config(task="sa", recipe="quick").group_by_length is True  # on by default


# ---------------------------------------------------------------------------------------------- variants


@pytest.fixture(scope="module")
def variants(tiny_base, toy_languages, tmp_path_factory):
    """One language SFT per variant, all from one shared phase 1 (the full-phase cache)."""
    texts = toy.corpus(toy_languages["ace"], 160)
    cache = tmp_path_factory.mktemp("cache")
    settings = {
        "standard": {},
        "keep-0": {"keep": 0.0},
        "no-sparse": {"sparse_phase": False},
        "dense-denoised": {"sparse_phase": False, "k": "all"},
    }
    results = {}
    for name, changes in settings.items():
        config = make_config(language="ace", base_model=str(tiny_base), recipe="quick", rank="4", **STEPS, **changes)
        results[name] = train(config, train_data=texts, full_phase_cache=cache)
    return results, _phase_one(cache)


def _denoised(delta, keep):
    denoised, _ = deftx.denoise_all(delta, deftx.parse_rank("4"), keep=keep, maskable=is_maskable_name)
    return denoised


def _mask_of(sft, shapes):
    masks = {name: torch.zeros(shape, dtype=torch.bool).flatten() for name, shape in shapes.items()}
    for name, delta in sft.diffs.items():
        masks[name][delta.indices] = True
    return masks


def test_variants_are_recorded(variants):
    results, _ = variants
    recorded = {name: result.sft.metadata.trainer["variant"] for name, result in results.items()}
    assert recorded == {
        "standard": None,
        "keep-0": "w/o higher-order components",
        "no-sparse": "w/o sparse fine-tuning",
        "dense-denoised": "w/o magnitude pruning + sparse fine-tuning",
    }
    assert "sparse" in results["standard"].sft.metadata.metrics
    assert "sparse" not in results["no-sparse"].sft.metadata.metrics


def test_keep_0_selects_from_the_low_rank_part_alone(variants):
    results, delta = variants
    k = results["keep-0"].sft.metadata.k
    shapes = {name: tuple(d.shape) for name, d in delta.items()}
    expected = deftx.select(_denoised(delta, 0.0), k)
    chosen = _mask_of(results["keep-0"].sft, shapes)
    for name in shapes:
        assert torch.equal(chosen[name], expected[name].flatten()), name
    with_residual = _mask_of(results["standard"].sft, shapes)
    assert any(not torch.equal(chosen[name], with_residual[name]) for name in shapes)


def test_without_the_sparse_phase_phi_is_the_denoised_delta_at_the_mask(variants, tiny_base):
    results, delta = variants
    denoised = _denoised(delta, 0.05)
    sft = results["no-sparse"].sft
    masks = deftx.select(denoised, sft.metadata.k)
    assert sft.num_entries == sft.metadata.k
    for name, mask in masks.items():
        if not bool(mask.any()):
            assert name not in sft.diffs
            continue
        stored = sft.diffs[name]
        assert torch.equal(stored.indices, mask.flatten().nonzero().flatten()), name
        assert torch.equal(stored.values, denoised[name].flatten()[stored.indices]), name
    # Not retrained: the standard run's φ at the same entries moved away from the denoised δ.
    standard = results["standard"].sft
    assert any(not torch.equal(standard.diffs[n].values, sft.diffs[n].values) for n in sft.diffs if n in standard.diffs)


def test_the_dense_denoised_variant_stores_every_maskable_entry(variants, tiny_base):
    results, delta = variants
    sft = results["dense-denoised"].sft
    model = load_base(str(tiny_base), "masked-lm")
    maskable = sum(param.numel() for _, param in maskable_parameters(model))
    assert sft.num_entries == maskable == sft.metadata.maskable_entries
    denoised = _denoised(delta, 0.05)
    for name, stored in sft.diffs.items():
        assert torch.equal(stored.values, denoised[name].flatten()), name


@pytest.mark.parametrize("variant", ["keep-0", "no-sparse", "dense-denoised"])
def test_each_variant_composes_to_theta0_plus_phi(variants, tiny_base, variant):
    results, _ = variants
    sft = results[variant].sft
    theta0 = dict(maskable_parameters(load_base(str(tiny_base), "none")))
    composed = dict(maskable_parameters(compose(str(tiny_base), [sft], head="none")))
    for name, param in composed.items():
        expected = theta0[name].detach().clone().flatten()
        if name in sft.diffs:
            expected[sft.diffs[name].indices] += sft.diffs[name].values
        assert torch.equal(param.detach().flatten(), expected), name
    trained = dict(maskable_parameters(results[variant].model))  # the run's own model is θ0 + φ too
    for name, param in trained.items():
        assert torch.allclose(param.detach(), composed[name].detach(), atol=1e-6), name


# ---------------------------------------------------------------------------------------------- the CLI


def test_cli_trains_a_variant_with_accumulation_and_shows_it(cli, tiny_base, toy_languages, tmp_path):
    corpus = toy.write_corpus(tmp_path / "ace.txt", toy.corpus(toy_languages["ace"], 120))
    args = ["train", "--lang", "ace", "--base", tiny_base, "--recipe", "quick", "--corpus", corpus]
    result = cli(
        *args,
        *("--max-steps", "2", "--eval-steps", "2", "--no-sparse-phase", "--grad-accum", "2", "--batch-size", "8"),
        "--no-group-by-length",
    )
    assert result.exit_code == 0, result.output
    shown = cli("show", "lang:ace", "--json")
    trainer = json.loads(shown.stdout)["config"]["trainer"]
    assert trainer["variant"] == "w/o sparse fine-tuning"
    assert (trainer["grad_accum"], trainer["batch_size"], trainer["sparse_phase"]) == (2, 8, False)
    assert trainer["group_by_length"] is False
    table = cli("show", "lang:ace")
    assert "w/o sparse fine-tuning" in table.stdout and "8 × 2 micro-batches" in table.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--grad-accum", "0"], "--grad-accum must be a positive whole number"),
        (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
        (["--precision", "fp8"], "precision must be one of fp32, bf16, fp16"),
        (["--keep", "1.5"], "--keep must be a fraction in [0, 1]"),
        (["--method", "lt-sft", "--keep", "0"], "LT-SFT (--rank none) does not denoise"),
    ],
)
def test_cli_refuses_bad_modes_with_one_line(cli, tiny_base, toy_languages, tmp_path, flags, message):
    corpus = toy.write_corpus(tmp_path / "ace.txt", toy.corpus(toy_languages["ace"], 40))
    result = cli("train", "--lang", "ace", "--base", tiny_base, "--recipe", "quick", "--corpus", corpus, *flags)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------- review fixes


class _StopInSparsePhase(trainer_module.NullReporter):
    def __init__(self):
        self.phase = None

    def phase_started(self, phase, total_steps, done_steps):
        self.phase = phase

    def step(self, step, loss, lr, tokens):
        if self.phase == "sparse" and step == 2:
            raise KeyboardInterrupt


def test_a_run_whose_phase_1_came_from_the_cache_resumes_exactly(still_base, rows, tmp_path):
    cache = tmp_path / "cache"
    lt_sft = make_config(task="sa", base_model=str(still_base), recipe="quick", method="lt-sft", **STEPS)
    train(lt_sft, train_data=rows, full_phase_cache=cache)  # fills the cache
    deftx_config = lt_sft.with_changes(method="deftx", rank="4")
    uninterrupted = train(deftx_config, train_data=rows, full_phase_cache=cache).sft
    work = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(deftx_config, train_data=rows, full_phase_cache=cache, work_dir=work, reporter=_StopInSparsePhase())
    resumed = train(deftx_config, train_data=rows, full_phase_cache=cache, work_dir=work, resume=True).sft
    assert resumed.delta_digest() == uninterrupted.delta_digest()
    for name, tensor in uninterrupted.full.items():
        assert torch.equal(resumed.full[name], tensor), name


def test_the_variant_without_sparse_phase_scores_the_model_it_keeps(variants):
    results, _ = variants
    metrics = results["no-sparse"].sft.metadata.metrics
    assert set(metrics) == {"full", "final"} and metrics["final"]["loss"] > 0


def test_a_batch_size_given_alone_is_the_whole_step():
    config = make_config(task="sa", recipe="paper-sa", batch_size=16)
    assert (config.batch_size, config.grad_accum, config.effective_batch_size) == (16, 1, 16)
    assert make_config(task="sa", recipe="paper-sa").effective_batch_size == 16  # the paper's, as 8 × 2
    assert make_config(task="sa", recipe="paper-sa", batch_size=4, grad_accum=4).effective_batch_size == 16
