"""Multi-source task SFTs: several source languages, each batch trained with its own language SFT applied."""

from __future__ import annotations

import json

import pytest
import torch

from sftkit import toy
from sftkit.base_model import load_base
from sftkit.errors import BadInputError
from sftkit.fingerprint import base_fingerprint
from sftkit.metadata import SFTMetadata
from sftkit.params import encoder_of
from sftkit.sft import SparseFineTuning
from sftkit.training import make_config, train
from sftkit.training import trainer as trainer_module
from sftkit.training.streams import step_schedule

WORDS = "embeddings.word_embeddings.weight"
MARK = 100.0  # far beyond anything training moves: which marker is present says which SFT is applied


@pytest.fixture(scope="module")
def marked_sources(tiny_base):
    """Two language SFTs, each moving one word-embedding entry of its own by MARK."""
    model = load_base(str(tiny_base), "none")
    fingerprint, shape = base_fingerprint(model), tuple(encoder_of(model).get_parameter(WORDS).shape)
    sources = {}
    for language, entry in (("ace", 7), ("ban", 11)):
        delta = torch.zeros(shape)
        delta.view(-1)[entry] = MARK
        metadata = SFTMetadata(
            kind="language", language=language, base_model=str(tiny_base), base_fingerprint=fingerprint
        )
        sources[language] = (SparseFineTuning.from_dense_deltas({WORDS: delta}, metadata=metadata), entry)
    return sources


def _rows(toy_languages, labels, n, seed):
    rows = toy.labelled(toy_languages["src"], n * 3, seed=seed)
    return [row for row in rows if row[1] in labels][:n]


def test_each_batch_is_processed_with_its_own_language_sft(tiny_base, toy_languages, marked_sources):
    """Source ace only has negative/positive examples, ban only neutral ones: a batch's labels say its source."""
    data = {
        "ace": _rows(toy_languages, {"negative", "positive"}, 48, 0),
        "ban": _rows(toy_languages, {"neutral"}, 24, 1),
    }
    theta0 = encoder_of(load_base(str(tiny_base), "none")).get_parameter(WORDS).detach().view(-1)
    base = {language: float(theta0[entry]) for language, (_, entry) in marked_sources.items()}
    seen: list[tuple[str, tuple[bool, bool]]] = []

    def spy(module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is None:
            return
        words = encoder_of(module).get_parameter(WORDS).detach().view(-1)
        marks = tuple(
            float(words[entry]) - base[lang] > MARK / 2 for lang, (_, entry) in sorted(marked_sources.items())
        )
        source = "ban" if bool((labels == 1).all()) else "ace"  # 1 = neutral in toy.LABELS order
        assert source == "ban" or not bool((labels == 1).any()), "a batch mixed two sources"
        seen.append((source, marks))

    real_load_model = trainer_module._load_model

    def load_model_with_spy(*args, **kwargs):
        start = real_load_model(*args, **kwargs)
        start.model.register_forward_pre_hook(spy, with_kwargs=True)
        return start

    config = make_config(
        task="sa", base_model=str(tiny_base), recipe="quick", labels=toy.LABELS, max_steps=6, eval_steps=3, batch_size=8
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "_load_model", load_model_with_spy)
        result = train(
            config,
            train_data=data,
            sources={language: sft for language, (sft, _) in marked_sources.items()},
            source_lineages={"ace": {"reference": "lang:ace@1", "sha256": "a" * 64}},
        )
    assert {source for source, _ in seen} == {"ace", "ban"}  # both sources trained and were validated
    for source, (ace_on, ban_on) in seen:
        assert (ace_on, ban_on) == (source == "ace", source == "ban"), (source, ace_on, ban_on)
    # φ_T excludes the sources: after training the model is back to θ0 + φ_T (no marker left)
    words = encoder_of(result.model).get_parameter(WORDS).detach().view(-1)
    assert all(float(words[entry]) - base[lang] < MARK / 2 for lang, (_, entry) in marked_sources.items())
    sft = result.sft
    assert sft.metadata.source_sft is None
    assert [(s["language"], s["reference"]) for s in sft.metadata.source_sfts] == [("ace", "lang:ace@1"), ("ban", None)]
    assert set(sft.metadata.data["sources"]) == {"ace", "ban"}
    assert sft.metadata.trainer["source_sampling"] == "proportional"


def test_the_schedule_is_proportional_or_uniform_and_resumable():
    proportional = step_schedule([80, 16], batch_size=8, sampling="proportional", seed=3, steps=24)
    counts = [sum(1 for stream, _ in proportional if stream == s) for s in (0, 1)]
    assert counts == [20, 4]  # two rounds of 10 + 2 batches
    uniform = step_schedule([80, 16], batch_size=8, sampling="uniform", seed=3, steps=24)
    assert [sum(1 for stream, _ in uniform if stream == s) for s in (0, 1)] == [12, 12]
    for plan in (proportional, uniform):  # each stream's own steps count up from 0, in order
        for s in (0, 1):
            assert [step for stream, step in plan if stream == s] == list(range(sum(1 for x, _ in plan if x == s)))
    assert step_schedule([80, 16], 8, "proportional", 3, 10) == proportional[:10]  # a prefix: resume-safe
    assert step_schedule([80, 16], 8, "proportional", 4, 24) != proportional


def _write(path, rows):
    return toy.write_labelled_csv(path, rows)


def test_cli_multi_source_training_registers_every_source(cli, tiny_base, toy_languages, tmp_path):
    languages = {}
    for language in ("ace", "ban"):
        corpus = toy.write_corpus(tmp_path / f"{language}.txt", toy.corpus(toy_languages[language], 80))
        result = cli(
            "train", "--lang", language, "--base", tiny_base, "--recipe", "quick", "--corpus", corpus,
            "--max-steps", "2", "--eval-steps", "2",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        languages[language] = _write(tmp_path / f"{language}.csv", toy.labelled(toy_languages[language], 60))
    result = cli(
        "train", "--task", "sa", "--base", tiny_base, "--recipe", "quick", "--max-steps", "4", "--eval-steps", "2",
        "--source", f"ace={languages['ace']}", "--source", f"ban={languages['ban']}", "--source-sampling", "uniform",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = json.loads(cli("show", "task:sa", "--json").stdout)
    assert shown["sources"] == ["lang:ace@1", "lang:ban@1"]
    assert [s["reference"] for s in shown["config"]["source_sfts"]] == ["lang:ace@1", "lang:ban@1"]
    assert shown["config"]["trainer"]["source_sampling"] == "uniform"
    assert json.loads(cli("show", "lang:ace", "--json").stdout)["dependents"] == ["task:sa@1"]
    refused = cli("rm", "lang:ban")
    assert refused.exit_code == 2 and "source of task:sa@1" in refused.output
    table = cli("show", "task:sa").stdout
    assert "lang:ace@1" in table and "lang:ban@1" in table


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (["--source", "xx=data.csv"], "no SFT called 'lang:xx' in the registry"),
        (["--source", "ace"], "LANG=DATA"),
        (["--source", "ace=a.csv", "--source", "ace=b.csv"], "twice"),
        (["--source", "ace=a.csv", "--source-lang", "ace"], "not both"),
    ],
)
def test_cli_refuses_bad_sources_with_one_line(cli, tiny_base, sources, message):
    result = cli("train", "--task", "sa", "--base", tiny_base, "--recipe", "quick", *sources)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_sources_file_is_read_and_checked(cli, tiny_base, toy_languages, tmp_path):
    corpus = toy.write_corpus(tmp_path / "ace.txt", toy.corpus(toy_languages["ace"], 80))
    language = cli(
        "train", "--lang", "ace", "--base", tiny_base, "--recipe", "quick", "--corpus", corpus,
        "--max-steps", "2", "--eval-steps", "2", "--tag", "best",
    )  # fmt: skip
    assert language.exit_code == 0, language.output
    train_csv = _write(tmp_path / "train.csv", toy.labelled(toy_languages["ace"], 60))
    valid_csv = _write(tmp_path / "valid.csv", toy.labelled(toy_languages["ace"], 30, seed=5))
    spec = tmp_path / "sources.json"
    spec.write_text(json.dumps({"ace": {"train": str(train_csv), "validation": str(valid_csv), "sft": "ace@best"}}))
    args = ["train", "--task", "sa", "--base", tiny_base, "--recipe", "quick", "--max-steps", "2", "--eval-steps", "2"]
    result = cli(*args, "--sources", spec)
    assert result.exit_code == 0, result.output
    config = json.loads(cli("show", "task:sa", "--json").stdout)["config"]
    assert config["data"]["sources"]["ace"]["validation"]["sha256"]  # the given validation file was read
    assert config["trainer"]["sources"]["ace"] == {"train": str(train_csv), "validation": str(valid_csv)}
    spec.write_text(json.dumps({"ace": {"validation": str(valid_csv)}}))
    bad = cli(*args, "--sources", spec)
    assert bad.exit_code == 2 and 'needs {"train": DATA}' in bad.output
    spec.write_text("{not json")
    assert "not a readable JSON file" in cli(*args, "--sources", spec).output


def test_a_multi_source_token_task_keeps_its_task_type_and_metric(tiny_base, marked_sources, tmp_path):
    """Each source's data is read on its own: the run's token type and entity-F1 selection must survive that."""
    from test_token_training import _sentences, _write_conll

    data = {
        language: {"train": str(_write_conll(tmp_path / f"{language}.bio", _sentences("ner", 40, seed)))}
        for seed, language in enumerate(("ace", "ban"))
    }
    config = make_config(
        task="tags", base_model=str(tiny_base), recipe="quick", sources=data, max_steps=2, eval_steps=2
    )
    assert (config.resolved_task_type, config.best_metric) == ("token", "entity_f1")
    result = train(config, sources={language: sft for language, (sft, _) in marked_sources.items()})
    assert result.sft.metadata.head_type == "token-classification"
    assert "entity_f1" in result.sft.metadata.metrics["full"]


def test_every_source_needs_data_and_an_sft_and_labels_are_their_union(tiny_base, toy_languages, marked_sources):
    ace, ban = (sft for sft, _ in marked_sources.values())
    both = {"ace": {"train": "a.csv", "validation": None}, "ban": {"train": "b.csv", "validation": None}}
    config = make_config(task="sa", base_model=str(tiny_base), recipe="quick", sources=both, max_steps=2, eval_steps=2)
    with pytest.raises(BadInputError, match="unmatched: ban"):
        train(config, sources={"ace": ace})
    with pytest.raises(BadInputError, match="pass their language SFTs"):
        train(config)
    data = {  # ace knows two labels, ban a third one: the run classifies into all three
        "ace": _rows(toy_languages, {"negative", "positive"}, 40, 0),
        "ban": _rows(toy_languages, {"neutral", "positive"}, 40, 1),
    }
    plain = make_config(task="sa", base_model=str(tiny_base), recipe="quick", max_steps=2, eval_steps=2)
    result = train(plain, train_data=data, sources={"ace": ace, "ban": ban})
    assert result.sft.metadata.labels == ["negative", "neutral", "positive"]


def test_cli_sources_file_with_null_validation_holds_out(cli, tiny_base, toy_languages, tmp_path):
    spec = tmp_path / "sources.json"
    spec.write_text(json.dumps({"ace": {"train": "x.csv", "validation": None, "sft": 3}}))
    result = cli("train", "--task", "sa", "--base", tiny_base, "--recipe", "quick", "--sources", spec)
    assert result.exit_code == 2 and "must be strings" in result.output


def test_cli_multi_source_refusals_name_the_real_problem(cli, tiny_base, toy_languages, tmp_path):
    corpus = toy.write_corpus(tmp_path / "ban.txt", toy.corpus(toy_languages["ban"], 60))
    made = cli(
        "train", "--lang", "ban", "--base", tiny_base, "--recipe", "quick", "--corpus", corpus, "--max-steps", "2"
    )
    assert made.exit_code == 0, made.output
    data = _write(tmp_path / "ace.csv", toy.labelled(toy_languages["ace"], 40))
    base = ["train", "--task", "sa", "--base", tiny_base, "--recipe", "quick", "--max-steps", "2"]
    spec = tmp_path / "spec" / "sources.json"
    spec.parent.mkdir()
    spec.write_text(json.dumps({"ace": {"train": "../ace.csv", "sft": "ban"}}))  # relative to the spec file
    wrong_language = cli(*base, "--sources", spec)
    assert (
        wrong_language.exit_code == 2 and "lang:ban@1 is a language SFT for 'ban', not 'ace'" in wrong_language.output
    )
    assert "given per source" not in wrong_language.output
    validation = cli(*base, "--source", f"ace={data}", "--validation", data)
    assert validation.exit_code == 2 and '"validation" in a --sources file' in validation.output
    sampling = cli(*base, "--train", data, "--source-sampling", "uniform")
    assert sampling.exit_code == 2 and "chooses between several sources" in sampling.output
    spec.write_text('{"ace": {"train": "a.csv"}, "ace": {"train": "b.csv"}}')
    assert "ace given twice" in cli(*base, "--sources", spec).output
    spec.write_text("{}")
    assert "expected an object of source languages" in cli(*base, "--sources", spec).output
