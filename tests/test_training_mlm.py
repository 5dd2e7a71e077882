"""Language SFTs as the LT-SFT reference trains them: untied frozen decoder, fresh-head warm-up, masked-only logits,
phase 1 shared between methods, and compositions consistent with the untied head."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from sftkit import toy
from sftkit.base_model import load_base
from sftkit.compose import compose, compose_to_directory
from sftkit.errors import BadInputError
from sftkit.params import encoder_of
from sftkit.training import make_config, train
from sftkit.training.config import HEAD_WARMUP_STEPS
from sftkit.training.features import make_collator, tokenize_corpus
from sftkit.training.mlm import masked_lm_loss, mlm_head_of, warm_up_head

STEPS = {"max_steps": 8, "eval_steps": 4}
WORDS = "embeddings.word_embeddings.weight"


@pytest.fixture(scope="module")
def ace_texts(toy_languages):
    return toy.corpus(toy_languages["ace"], 200)


@pytest.fixture(scope="module")
def language_runs(tiny_base, ace_texts):
    """One language SFT with the default (frozen untied decoder) and one with the decoder tied."""
    runs = {}
    for frozen in (True, False):
        config = make_config(language="ace", base_model=str(tiny_base), recipe="quick", freeze_decoder=frozen, **STEPS)
        runs[frozen] = train(config, train_data=ace_texts)
    return runs


def _used_token_share(sft, tokenizer, texts) -> float:
    used = {token for ids in tokenizer(texts)["input_ids"] for token in ids}
    delta = sft.diffs[WORDS]
    rows = (delta.indices // delta.shape[1]).tolist()
    return sum(row in used for row in rows) / len(rows)


def test_frozen_decoder_puts_word_embedding_entries_on_the_corpus_tokens(language_runs, tiny_base, ace_texts):
    """Default: ≥ 95 % of φ_L's word-embedding entries on rows of tokens the corpus uses. Tied (the old
    behaviour), the decoder's softmax gradient reaches every row and the share drops (stated here)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    frozen, tied = language_runs[True].sft, language_runs[False].sft
    frozen_share = _used_token_share(frozen, tokenizer, ace_texts)
    tied_share = _used_token_share(tied, tokenizer, ace_texts)
    assert frozen_share >= 0.95
    assert tied_share < 0.75 < frozen_share, (frozen_share, tied_share)  # measured here: ≈ 0.99 vs ≈ 0.5
    assert frozen.metadata.trainer["freeze_decoder"] is True
    assert tied.metadata.trainer["freeze_decoder"] is False


def test_frozen_decoder_is_neither_trained_nor_stored(language_runs, tiny_base):
    result = language_runs[True]
    assert "lm_head.decoder.weight" not in result.sft.full
    assert {"lm_head.dense.weight", "lm_head.bias"} <= set(result.sft.full)
    theta0 = load_base(str(tiny_base), "masked-lm")
    decoder = result.model.get_output_embeddings().weight
    assert decoder is not result.model.get_input_embeddings().weight
    assert torch.equal(decoder, theta0.get_input_embeddings().weight)  # still θ0's word embeddings


def test_masked_lm_composition_keeps_the_decoder_at_theta0(language_runs, tiny_base, tmp_path):
    """Composed as a masked LM, φ_L moves the word embeddings and the decoder stays θ0's, as in training."""
    sft = language_runs[True].sft
    theta0 = load_base(str(tiny_base), "masked-lm")
    composed = compose(str(tiny_base), [sft], head="masked-lm")
    expected = theta0.get_input_embeddings().weight + sft.dense_delta(WORDS)
    assert torch.equal(composed.get_input_embeddings().weight, expected)
    assert torch.equal(composed.get_output_embeddings().weight, theta0.get_input_embeddings().weight)
    reloaded = AutoModelForMaskedLM.from_pretrained(
        compose_to_directory(str(tiny_base), [sft], tmp_path / "mlm", head="masked-lm")
    )
    assert torch.equal(reloaded.get_output_embeddings().weight, theta0.get_input_embeddings().weight)
    assert torch.equal(reloaded.get_input_embeddings().weight, expected)


def test_classifier_composition_never_sees_the_language_mlm_head(language_runs, tiny_base, toy_languages):
    language = language_runs[True].sft
    config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", **STEPS)
    task = train(config, train_data=toy.labelled(toy_languages["src"], 120)).sft
    composed = compose(str(tiny_base), [task, language])
    theta0 = load_base(str(tiny_base), "none")
    words = composed.base_model.embeddings.word_embeddings.weight
    expected = theta0.embeddings.word_embeddings.weight + task.dense_delta(WORDS) + language.dense_delta(WORDS)
    torch.testing.assert_close(words, expected, rtol=0, atol=1e-6)
    for name, tensor in task.full.items():
        assert torch.equal(dict(composed.named_parameters())[name], tensor)


def test_masked_only_logits_give_the_full_projection_loss_and_gradients(tiny_base, ace_texts):
    model = load_base(str(tiny_base), "masked-lm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    items = tokenize_corpus(tokenizer, ace_texts[:40], 64)
    batch = make_collator("language", tokenizer, 0.15, seed=3)(items[:6])
    assert mlm_head_of(model) is model.lm_head
    for mode in ("eval", "train"):
        getattr(model, mode)()
        torch.manual_seed(0)
        full = model(**batch).loss
        full_grads = torch.autograd.grad(full, list(model.parameters()), allow_unused=True)
        torch.manual_seed(0)  # the same dropout masks in train mode
        cheap = masked_lm_loss(model, batch)
        cheap_grads = torch.autograd.grad(cheap, list(model.parameters()), allow_unused=True)
        torch.testing.assert_close(cheap, full, rtol=1e-6, atol=1e-6)
        for ours, theirs in zip(cheap_grads, full_grads, strict=True):
            if theirs is None:
                assert ours is None or not ours.any()
            else:
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_head_warm_up_fits_the_head_and_leaves_the_encoder_alone(headless_base, ace_texts):
    model = load_base(str(headless_base), "masked-lm")
    tokenizer = AutoTokenizer.from_pretrained(headless_base)
    items = tokenize_corpus(tokenizer, ace_texts, 64)
    collate = make_collator("language", tokenizer, 0.15, seed=1)
    encoder_before = {name: p.detach().clone() for name, p in encoder_of(model).named_parameters()}
    head = [(name, p) for name, p in model.named_parameters() if name.startswith("lm_head.") and p.requires_grad]
    head = [(name, p) for name, p in head if p is not model.get_output_embeddings().weight]
    losses = warm_up_head(model, head, lambda step: collate(items[(step * 4) % 40 : (step * 4) % 40 + 4]), 30, 1e-2)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    for name, param in encoder_of(model).named_parameters():
        assert torch.equal(param, encoder_before[name]), name


def test_headless_base_gets_an_automatic_warm_up_recorded_in_the_sft(headless_base, ace_texts):
    config = make_config(language="ace", base_model=str(headless_base), recipe="quick", **STEPS)
    sft = train(config, train_data=ace_texts).sft
    warmup = sft.metadata.trainer["head_warmup"]
    assert warmup["steps"] == STEPS["max_steps"] < HEAD_WARMUP_STEPS  # max_steps caps every phase
    assert make_config(language="ace", recipe="paper-lang").head_warmup_for(fresh_head=True) == HEAD_WARMUP_STEPS
    assert "lm_head.dense.weight" in warmup["fresh_head_weights"]
    assert warmup["last_loss"] < warmup["first_loss"]
    off = train(config.with_changes(head_warmup_steps=0), train_data=ace_texts).sft
    assert off.metadata.trainer["head_warmup"]["steps"] == 0


def test_full_phase_cache_is_shared_by_methods_and_changes_nothing(tiny_base, ace_texts, tmp_path):
    cache = tmp_path / "full-phase"
    config = make_config(language="ace", base_model=str(tiny_base), recipe="quick", **STEPS)
    train(config, train_data=ace_texts, full_phase_cache=cache)
    assert len(list(cache.iterdir())) == 1
    lt_sft = config.with_changes(method="lt-sft", rank="none")
    notes = []

    class Notes:
        def __getattr__(self, name):
            return lambda *args: notes.append(args[0]) if name == "note" else None

    cached = train(lt_sft, train_data=ace_texts, full_phase_cache=cache, reporter=Notes()).sft
    fresh = train(lt_sft, train_data=ace_texts).sft
    assert any("full-phase cache" in str(note) for note in notes)
    assert len(list(cache.iterdir())) == 1
    assert set(cached.diffs) == set(fresh.diffs)
    for name, delta in fresh.diffs.items():
        assert torch.equal(cached.diffs[name].indices, delta.indices), name
        torch.testing.assert_close(cached.diffs[name].values, delta.values, rtol=0, atol=1e-7)
    other_seed = config.with_changes(seed=7)
    train(other_seed, train_data=ace_texts, full_phase_cache=cache)
    assert len(list(cache.iterdir())) == 2  # a different phase 1 is a different entry


def test_task_sfts_on_different_source_sfts_never_share_a_full_phase(language_runs, tiny_base, toy_languages, tmp_path):
    """θ_start = θ0 + φ_source: the key follows the source SFT's content, not its language (a bug caught by the
    miniature, where LT-SFT's and DEFT-X's φ_ind, both 'ind', shared one entry)."""
    cache = tmp_path / "full-phase"
    rows = toy.labelled(toy_languages["src"], 120)
    config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", **STEPS)
    for source in (language_runs[True].sft, language_runs[False].sft):  # both are language "ace"
        train(config, train_data=rows, source=source, full_phase_cache=cache)
    assert len(list(cache.iterdir())) == 2
    train(config.with_changes(method="lt-sft", rank="none"), train_data=rows, source=source, full_phase_cache=cache)
    assert len(list(cache.iterdir())) == 2  # same source, other method: shared


def test_bad_mlm_options_are_one_clear_error():
    with pytest.raises(BadInputError, match="language SFTs only"):
        make_config(task="sa", recipe="quick", head_warmup_steps=5)
    with pytest.raises(BadInputError, match="head_warmup_steps must not be negative"):
        make_config(language="ace", recipe="quick", head_warmup_steps=-1)


def test_cli_flags_reach_the_sft_config(cli, tiny_base, ace_texts, tmp_path):
    corpus = toy.write_corpus(tmp_path / "ace.txt", ace_texts)
    out = tmp_path / "tied"
    args = ["train", "--lang", "ace", "--corpus", corpus, "--base", tiny_base, "--recipe", "quick"]
    result = cli(*args, "--max-steps", 4, "--eval-steps", 2, "--no-freeze-decoder", "--head-warmup-steps", 3, "-o", out)
    assert result.exit_code == 0, result.output
    trainer = json.loads((out / "sft_config.json").read_text())["trainer"]
    assert trainer["freeze_decoder"] is False and trainer["head_warmup"]["steps"] == 3
    assert "tied decoder, head warm-up 3 steps" in result.output
    bad = cli("train", "--task", "sa", "--train", corpus, "--base", tiny_base, "--head-warmup-steps", 3)
    assert bad.exit_code == 2 and "language SFTs only" in bad.output


@pytest.mark.parametrize("phase", ["full", "sparse"])
def test_language_run_on_a_headless_base_resumes_exactly(headless_base, ace_texts, tmp_path, phase):
    """Warm-up, frozen decoder, row-sparse AdamW and phase-1 L1 together survive an interruption exactly."""
    from sftkit.training import trainer as trainer_module

    class Interrupt(trainer_module.NullReporter):
        current = None

        def phase_started(self, name, total_steps, done_steps):
            self.current = name

        def step(self, step, loss, lr, tokens):
            if self.current == phase and step == 3:
                raise KeyboardInterrupt

    class Phases(trainer_module.NullReporter):
        def __init__(self):
            self.started = []

        def phase_started(self, name, total_steps, done_steps):
            self.started.append(name)

    options = {"max_steps": 4, "eval_steps": 2, "l1": 0.1, "head_warmup_steps": 3}
    config = make_config(language="ace", base_model=str(headless_base), recipe="quick", **options)
    uninterrupted = train(config, train_data=ace_texts).sft
    work = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config, train_data=ace_texts, work_dir=work, reporter=Interrupt())
    phases = Phases()
    resumed = train(config, train_data=ace_texts, work_dir=work, resume=True, reporter=phases).sft
    assert "head warm-up" not in phases.started  # the fitted head was kept: not fitted again
    assert set(resumed.diffs) == set(uninterrupted.diffs)
    for name, delta in uninterrupted.diffs.items():
        assert torch.equal(resumed.diffs[name].indices, delta.indices), name
        assert torch.equal(resumed.diffs[name].values, delta.values), name
    for name, tensor in uninterrupted.full.items():
        assert torch.equal(resumed.full[name], tensor), name
    assert resumed.metadata.trainer == uninterrupted.metadata.trainer
    assert resumed.metadata.trainer["head_warmup"]["steps"] == 3
