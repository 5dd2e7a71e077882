"""The two-phase trainer end to end on the tiny toy model: language × task, DEFT-X × LT-SFT."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from sftkit import toy
from sftkit.base_model import load_base
from sftkit.compose import compose, export
from sftkit.errors import BadInputError, BaseMismatchError
from sftkit.fingerprint import base_fingerprint
from sftkit.params import head_parameters, maskable_parameters
from sftkit.training import evaluate, make_config, train
from sftkit.training import trainer as trainer_module
from sftkit.training.sparse import SparseUpdater

STEPS = {"max_steps": 8, "eval_steps": 4}


class _StartSpy(SparseUpdater):
    """Records the model's state at the moment the sparse phase begins."""

    seen: ClassVar[list[dict[str, torch.Tensor]]] = []

    def __init__(self, model, *args, **kwargs):
        _StartSpy.seen.append({name: p.detach().clone() for name, p in model.named_parameters(remove_duplicate=False)})
        super().__init__(model, *args, **kwargs)


@pytest.fixture(scope="module")
def runs(tiny_base, toy_languages, tmp_path_factory):
    """Language and task SFTs with both methods, phase-1 checkpoints kept for inspection."""
    results = {}
    texts = toy.corpus(toy_languages["ace"], 200)
    rows = toy.labelled(toy_languages["src"], 160)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "SparseUpdater", _StartSpy)
        for method in ("deftx", "lt-sft"):
            work = tmp_path_factory.mktemp(f"lang-{method}")
            config = make_config(language="ace", base_model=str(tiny_base), recipe="quick", method=method, **STEPS)
            results["language", method] = (train(config, train_data=texts, work_dir=work, keep_work_dir=True), work)
            results["language", method, "start"] = _StartSpy.seen[-1]
        source = results["language", "deftx"][0].sft
        for method in ("deftx", "lt-sft"):
            work = tmp_path_factory.mktemp(f"task-{method}")
            config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", method=method, **STEPS)
            lineage = {"reference": "lang:ace@1", "sha256": "abc", "language": "ace"}
            result = train(
                config, train_data=rows, source=source, source_lineage=lineage, work_dir=work, keep_work_dir=True
            )
            results["task", method] = (result, work)
            results["task", method, "start"] = _StartSpy.seen[-1]
    return results


def _theta0(tiny_base, kind, seed=42):
    torch.manual_seed(seed)
    head = "masked-lm" if kind == "language" else "sequence-classification"
    return load_base(str(tiny_base), head, list(toy.LABELS) if kind == "task" else None)


def _theta_start(tiny_base, kind, source=None):
    model = _theta0(tiny_base, kind)
    if source is not None:
        source.apply(model, with_head=False)
    return model


@pytest.mark.parametrize("kind", ["language", "task"])
@pytest.mark.parametrize("method", ["deftx", "lt-sft"])
def test_sft_has_exactly_k_entries_plus_head_and_nothing_outside_the_mask(runs, tiny_base, kind, method):
    result, _ = runs[kind, method]
    sft = result.sft
    source = runs["language", "deftx"][0].sft if kind == "task" else None
    start = _theta_start(tiny_base, kind, source)
    maskable = sum(p.numel() for _, p in maskable_parameters(start))
    assert sft.metadata.k == round(0.05 * maskable) == sft.num_entries
    assert sum(int(m.sum()) for m in result.masks.values()) == sft.metadata.k
    assert set(sft.full) == {name for name, _ in head_parameters(start)}
    trained = dict(maskable_parameters(result.model))
    for name, param in maskable_parameters(start):
        mask = result.masks[name].reshape(-1)
        got, begin = trained[name].detach().reshape(-1), param.detach().reshape(-1)
        assert torch.equal(got[~mask], begin[~mask]), name  # zero outside the mask
        if name in sft.diffs:
            delta = sft.diffs[name]
            assert torch.equal(delta.indices, mask.nonzero().flatten())
            assert torch.allclose(begin[delta.indices] + delta.values, got[delta.indices], atol=1e-6)
    meta = sft.metadata
    assert (meta.kind, meta.method, meta.rank) == (kind, method, "none" if method == "lt-sft" else "90var")
    assert meta.base_fingerprint == base_fingerprint(_theta0(tiny_base, kind))
    assert meta.head_type == ("masked-lm" if kind == "language" else "sequence-classification")
    assert meta.density == pytest.approx(meta.k / meta.maskable_entries)
    assert meta.data["train"]["sha256"].startswith("sha256:")
    assert {"full", "sparse"} <= set(meta.metrics) and meta.trainer["recipe"] == "quick"
    assert bool(meta.rank_report) == (method == "deftx")
    if kind == "task":
        assert meta.labels == list(toy.LABELS)
        assert meta.source_sft == {"reference": "lang:ace@1", "sha256": "abc", "language": "ace"}
    json.dumps(meta.to_dict())  # the metadata is plain JSON


@pytest.mark.parametrize("kind", ["language", "task"])
def test_sparse_phase_starts_from_theta_start_with_the_initial_head(runs, tiny_base, kind):
    source = runs["language", "deftx"][0].sft if kind == "task" else None
    expected = _theta_start(tiny_base, kind, source)  # same seed → same head initialisation
    seen = runs[kind, "deftx", "start"]
    for name, param in expected.named_parameters(remove_duplicate=False):
        assert torch.equal(seen[name], param.detach()), name
    # ... and the full phase really moved away from it (otherwise the reset would prove nothing)
    theta1 = load_file(str(runs[kind, "deftx"][1] / "full" / "best.safetensors"))
    moved = [k for k, v in theta1.items() if k.startswith("enc::") and not torch.equal(v, seen[_full(k, kind)])]
    assert moved


def _full(state_key: str, kind: str) -> str:
    return "roberta." + state_key.removeprefix("enc::")


def test_theta0_plus_source_plus_task_reproduces_the_trained_task_model(runs, tiny_base):
    language = runs["language", "deftx"][0].sft
    task_result = runs["task", "deftx"][0]
    composed = compose(str(tiny_base), [language, task_result.sft])
    trained = dict(task_result.model.named_parameters())
    for name, param in composed.named_parameters():
        assert torch.allclose(param, trained[name], rtol=0, atol=1e-6), name
    assert any(not torch.equal(p, _theta0(tiny_base, "task").get_parameter(n)) for n, p in composed.named_parameters())


@pytest.mark.parametrize("kind", ["language", "task"])
def test_rank_none_mask_is_plain_magnitude_selection_on_theta1(runs, kind):
    result, work = runs[kind, "lt-sft"]
    theta1 = load_file(str(work / "full" / "best.safetensors"))
    start = runs[kind, "lt-sft", "start"]
    names = list(result.masks)
    deltas = torch.cat([(theta1[f"enc::{n}"] - start[_full(f"enc::{n}", kind)]).abs().reshape(-1) for n in names])
    top = torch.zeros_like(deltas, dtype=torch.bool)
    top[deltas.topk(result.sft.metadata.k).indices] = True
    assert torch.equal(torch.cat([result.masks[n].reshape(-1) for n in names]), top)
    # DEFT-X, from the very same θ1 (same seed and data), picks a different mask: the denoising acts
    deftx_result, deftx_work = runs[kind, "deftx"]
    theta1_deftx = load_file(str(deftx_work / "full" / "best.safetensors"))
    assert all(torch.equal(theta1[key], theta1_deftx[key]) for key in theta1)
    assert not all(torch.equal(result.masks[n], deftx_result.masks[n]) for n in names)


def test_best_checkpoint_is_the_best_evaluation(runs):
    for key in (("language", "deftx"), ("task", "lt-sft")):
        metrics = runs[key][0].metrics
        for phase in ("full", "sparse"):
            summary = metrics[phase]
            metric = "loss" if key[0] == "language" else "macro_f1"
            values = [entry[metric] for entry in summary["history"]]
            best = min(values) if metric == "loss" else max(values)
            assert summary[metric] == best
            assert summary["history"][values.index(best)]["step"] == summary["best_step"]


class _Interrupt(trainer_module.NullReporter):
    def __init__(self, phase: str, at_step: int):
        self.phase, self.at_step, self.current = phase, at_step, None

    def phase_started(self, phase, total_steps, done_steps):
        self.current = phase

    def step(self, step, loss, lr, tokens):
        if self.current == self.phase and step == self.at_step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["full", "sparse"])
def test_resume_continues_an_interrupted_run_exactly(tiny_base, toy_languages, tmp_path, phase):
    rows = toy.labelled(toy_languages["src"], 64)
    # Batches of 8 from 64 rows: mega-batches of 16, so the (default) length grouping really regroups.
    config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", batch_size=8, max_steps=4, eval_steps=2)
    uninterrupted = train(config, train_data=rows).sft
    assert uninterrupted.metadata.trainer["group_by_length"] is True
    work = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config, train_data=rows, work_dir=work, reporter=_Interrupt(phase, 3))
    assert (work / "run.json").is_file()
    resumed = train(config, train_data=rows, work_dir=work, resume=True).sft
    for name, delta in uninterrupted.diffs.items():
        assert torch.equal(resumed.diffs[name].indices, delta.indices)
        assert torch.equal(resumed.diffs[name].values, delta.values), name
    for name, tensor in uninterrupted.full.items():
        assert torch.equal(resumed.full[name], tensor)
    assert not work.exists()  # checkpoints are removed after success
    with pytest.raises(BadInputError, match="nothing to resume"):
        train(config, train_data=rows, work_dir=work, resume=True)


def test_sparse_steps_set_the_sparse_phase_apart_share_phase_1_and_resume_exactly(tiny_base, toy_languages, tmp_path):
    rows = toy.labelled(toy_languages["src"], 64)
    config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", batch_size=8, max_steps=4, eval_steps=2)
    longer = config.with_changes(sparse_steps=6)
    result = train(longer, train_data=rows)
    assert result.metrics["full"]["steps"] == 4 and result.metrics["sparse"]["steps"] == 6
    assert [entry["step"] for entry in result.metrics["sparse"]["history"]] == [2, 4, 6]
    assert result.sft.metadata.trainer["sparse_phase_steps"] == 6
    # Unset, the option leaves a config's digest as it was before the option existed: run directories resume and
    # caches keyed by the digest (the miniature's SFT cache) stay valid.
    assert make_config(language="ace", recipe="quick", base_model="x").digest() == "e40722e7c75cd25f"

    # Phase 1 does not depend on the sparse phase's length: one full-phase cache entry serves both runs.
    cache = tmp_path / "full-phase"
    shorter = train(config, train_data=rows, full_phase_cache=cache).sft
    train(longer, train_data=rows, full_phase_cache=cache)
    assert len(list(cache.iterdir())) == 1
    assert any(not torch.equal(shorter.diffs[n].values, d.values) for n, d in result.sft.diffs.items())

    # Interrupted in the sparse phase past phase 1's last step, a resume continues exactly.
    work = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(longer, train_data=rows, work_dir=work, reporter=_Interrupt("sparse", 5))
    resumed = train(longer, train_data=rows, work_dir=work, resume=True).sft
    for name, delta in result.sft.diffs.items():
        assert torch.equal(resumed.diffs[name].values, delta.values), name
    with pytest.raises(BadInputError, match="sparse_steps must be positive"):
        config.with_changes(sparse_steps=0)


@pytest.mark.parametrize("phase", ["full", "sparse"])
def test_a_time_interval_checkpoint_between_evaluations_resumes_exactly(tiny_base, toy_languages, tmp_path, phase):
    """Validation only at the last step: the checkpoint at step 2 can only come from the time interval."""
    rows = toy.labelled(toy_languages["src"], 64)
    config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", max_steps=4, eval_steps=4)
    uninterrupted = train(config, train_data=rows).sft
    work = tmp_path / "run"
    every_step = 1e-6  # minutes: any step on the toy model takes longer
    with pytest.raises(KeyboardInterrupt):
        train(config, train_data=rows, work_dir=work, reporter=_Interrupt(phase, 3), checkpoint_minutes=every_step)
    assert json.loads((work / phase / "checkpoint" / "progress.json").read_text())["step"] == 2
    notes = _Notes()
    resumed = train(config, train_data=rows, work_dir=work, resume=True, reporter=notes).sft
    assert notes.messages[0] == f"resuming the run in {work}: {phase} phase at step 2 of 4"
    assert resumed.delta_digest() == uninterrupted.delta_digest()
    for name, tensor in uninterrupted.full.items():
        assert torch.equal(resumed.full[name], tensor), name


class _Notes(trainer_module.NullReporter):
    def __init__(self):
        self.messages = []

    def note(self, message):
        self.messages.append(message)


def test_resume_refuses_a_run_started_with_other_settings(tiny_base, toy_languages, tmp_path):
    rows = toy.labelled(toy_languages["src"], 64)
    config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", max_steps=4, eval_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, train_data=rows, work_dir=tmp_path / "run", reporter=_Interrupt("full", 3))
    with pytest.raises(BadInputError, match="different config"):
        train(config.with_changes(lr=1e-4), train_data=rows, work_dir=tmp_path / "run", resume=True)


def test_evaluate_a_composed_model_directory(runs, tiny_base, toy_languages, tmp_path):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    language = runs["language", "deftx"][0].sft
    task = runs["task", "deftx"][0].sft
    sfts = [language, task]
    out = export(compose(str(tiny_base), sfts), tmp_path / "model", sfts, tokenizer=str(tiny_base))
    rows = toy.labelled(toy_languages["ace"], 60, seed=3)
    data = toy.write_labelled_csv(tmp_path / "test.csv", rows)
    result = evaluate(out, data)
    # the obvious computation, independently
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        predicted = [
            model.config.id2label[int(model(**tokenizer(text, return_tensors="pt")).logits.argmax())]
            for text, _ in rows
        ]
    gold = [label for _, label in rows]
    assert result["n"] == 60
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(gold, predicted))
    assert result["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(gold, predicted, average="macro"))
    for label in toy.LABELS:
        assert result["per_class"][label]["support"] == gold.count(label)


def test_bad_requests_fail_clearly(tiny_base, other_base, toy_languages, runs):
    rows = toy.labelled(toy_languages["src"], 32)
    with pytest.raises(BadInputError, match="contradicts"):
        make_config(task="sa", base_model=str(tiny_base), method="lt-sft", rank="90var")
    with pytest.raises(BadInputError, match="maskable entries"):
        train(make_config(task="sa", base_model=str(tiny_base), recipe="quick", k="10M"), train_data=rows)
    with pytest.raises(BadInputError, match="no training data: pass --train"):
        train(make_config(task="sa", base_model=str(tiny_base), recipe="quick"))
    with pytest.raises(BaseMismatchError):
        train(
            make_config(task="sa", base_model=str(other_base), recipe="quick", max_steps=2),
            train_data=rows,
            source=runs["language", "deftx"][0].sft,
        )
    with pytest.raises(BadInputError, match="unknown recipe"):
        make_config(language="ace", recipe="nope")
    with pytest.raises(BadInputError, match="trains task SFTs"):
        make_config(language="ace", recipe="paper-sa")


def test_pair_task_trains_on_text_pairs_and_is_selected_by_accuracy(tiny_base, toy_languages, tmp_path):
    sentences = toy.labelled(toy_languages["src"], 120)
    pairs = [
        (a, b, "entailment" if la == lb else "contradiction")
        for (a, la), (b, lb) in zip(sentences[::2], sentences[1::2], strict=True)
    ]
    config = make_config(task="nli", base_model=str(tiny_base), recipe="quick", max_steps=4, eval_steps=2)
    assert config.best_metric == "accuracy" and config.is_pair
    result = train(config, train_data=pairs)
    assert result.sft.metadata.labels == ["contradiction", "entailment"]
    assert result.sft.metadata.data["train"]["pair"] is True
    assert {"accuracy", "macro_f1"} <= set(result.metrics["sparse"]["history"][0])
    tsv = tmp_path / "anli.tsv"
    tsv.write_text(
        "id\tlanguage\tpremise\thypothesis\tlabel\n"
        + "".join(f"{i}\tsrc\t{a}\t{b}\t{label}\n" for i, (a, b, label) in enumerate(pairs[:20]))
    )
    scores = evaluate(result.model, tsv, tokenizer=result.tokenizer)
    assert scores["n"] == 20 and set(scores["per_class"]) == {"contradiction", "entailment"}


def _language_sft_digest(base: str, texts: list[str]) -> str:
    """Train a short language SFT and return its deltas' digest (run in a worker process by the test below)."""
    config = make_config(language="ace", base_model=base, recipe="quick", method="lt-sft", **STEPS)
    return train(config, train_data=texts).sft.delta_digest()


def test_a_language_sft_trains_in_a_worker_process_as_in_the_main_one(tiny_base, toy_languages):
    """A job runner's worker process trains the SFT the main process does (transformers refuses a seeded
    MLM collator in any child process but a DataLoader worker; the trainer's collator keeps its seed)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    texts = toy.corpus(toy_languages["ace"], 200)
    here = _language_sft_digest(str(tiny_base), texts)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        there = pool.submit(_language_sft_digest, str(tiny_base), texts).result()
    assert there == here
