"""``sftkit train`` and ``sftkit eval`` through the CLI: the registry round trip and every bad-input path."""

from __future__ import annotations

import json

import pytest
from cli_helpers import one_line_error
from typer.testing import CliRunner

from sftkit import toy
from sftkit.cli.main import app
from sftkit.registry import Registry
from sftkit.sft import SparseFineTuning
from sftkit.training import evaluate

runner = CliRunner()
FAST = ["--recipe", "quick", "--max-steps", "6", "--eval-steps", "3"]


@pytest.fixture
def files(tmp_path, toy_languages):
    return {
        "corpus": toy.write_corpus(tmp_path / "ace.txt", toy.corpus(toy_languages["ace"], 150)),
        "train": toy.write_labelled_csv(tmp_path / "src.csv", toy.labelled(toy_languages["src"], 120)),
        "test": toy.write_labelled_csv(tmp_path / "ace.csv", toy.labelled(toy_languages["ace"], 50, seed=5)),
    }


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


def test_train_register_source_lineage_and_eval(sftkit_home, tiny_base, files, tmp_path):
    base = ["--base", str(tiny_base)]
    language = _ok(["train", "--lang", "ace", "--rank", "90var", "--corpus", str(files["corpus"]), *base, *FAST])
    assert language.stdout.strip().splitlines()[-1] == "lang:ace@1"

    saved = tmp_path / "sa-sft"
    task_args = ["train", "--task", "sa", "--source-lang", "ace", "--train", str(files["train"]), "--method", "lt-sft"]
    task = _ok([*task_args, "-o", str(saved), "--tag", "first", *base, *FAST])
    assert task.stdout.strip().splitlines()[-1] == "task:sa@1"

    registry = Registry.open()
    lang_record, task_record = registry.resolve("lang:ace"), registry.resolve("sa@first")
    assert (lang_record.method, lang_record.rank, lang_record.kind) == ("deftx", "90var", "language")
    assert (task_record.method, task_record.rank) == ("lt-sft", "none")
    assert task_record.source_reference == "lang:ace@1"
    on_disk = SparseFineTuning.load(saved)
    assert on_disk.metadata.source_sft == {
        "reference": "lang:ace@1",
        "sha256": lang_record.sha256,
        "language": "ace",
    }
    assert on_disk.num_entries == on_disk.metadata.k == task_record.num_entries
    assert not any((sftkit_home / "runs").iterdir())  # checkpoints removed after success

    scores = json.loads(_ok(["eval", "sa", "--data", str(files["test"]), "--json"]).stdout)
    assert scores["n"] == 50 and set(scores) == {"macro_f1", "accuracy", "per_class", "n"}
    assert sum(row["support"] for row in scores["per_class"].values()) == 50

    model_dir = tmp_path / "model"
    _ok(["compose", "--task", "sa", "--lang", "ace", "-o", str(model_dir)])
    table = _ok(["eval", str(model_dir), "--data", str(files["test"])]).stdout
    expected = evaluate(model_dir, files["test"])
    assert f"macro-F1 {expected['macro_f1']:.4f}" in table and "negative" in table


def test_no_register_writes_only_the_output_directory(sftkit_home, tiny_base, files, tmp_path):
    out = tmp_path / "lt"
    args = ["train", "--lang", "ace", "--method", "lt-sft", "--corpus", str(files["corpus"]), "--no-register"]
    result = _ok([*args, "-o", str(out), "--base", str(tiny_base), "--k", "1000", *FAST])
    assert result.stdout.strip() == str(out)
    sft = SparseFineTuning.load(out)
    assert sft.num_entries == 1000 and sft.metadata.rank == "none"
    assert Registry.open().find() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--corpus", "x.txt"], "exactly one of --lang"),
        (["train", "--lang", "ace", "--task", "sa"], "exactly one of --lang"),
        (["train", "--lang", "a/b"], "not a valid name"),
        (["train", "--task", "sa", "--method", "lt-sft", "--rank", "90var", "--train", "{train}"], "contradicts"),
        (["train", "--task", "sa", "--method", "deftx", "--rank", "none", "--train", "{train}"], "contradicts"),
        (["train", "--task", "sa", "--corpus", "{corpus}"], "use --train"),
        (["train", "--lang", "ace", "--corpus", "{corpus}", "--no-register"], "needs --output"),
        (["train", "--lang", "ace", "--corpus", "{corpus}", "--source-lang", "x"], "apply to task SFTs"),
        (["train", "--lang", "ace"], "offline: pass --corpus FILE"),
        (["train", "--task", "nli"], "offline: pass --train FILE"),
        (["train", "--task", "pos"], "no built-in source for task 'pos'"),
        (["train", "--lang", "ace", "--corpus", "{corpus}", "--k", "abc"], "invalid k"),
        (["train", "--lang", "ace", "--corpus", "{corpus}", "--rank", "7x"], "rank"),
        (["train", "--lang", "ace", "--corpus", "{corpus}", "--recipe", "paper-nli"], "trains task SFTs"),
        (["train", "--lang", "ace", "--corpus", "{corpus}", "--k", "10M", *FAST], "maskable entries"),
        (["train", "--lang", "ace", "--corpus", "{latin1}", *FAST], "line 2: not valid UTF-8"),
        (["train", "--task", "sa", "--train", "{train}", "--source-lang", "nope"], "nope"),
        (["train", "--lang", "ace", "--corpus", "{missing}"], "no such file"),
        (["eval", "{missing}", "--data", "{test}"], ""),
    ],
)
def test_bad_input_exits_2_with_one_line(sftkit_home, tiny_base, files, tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"fine\ncaf\xe9\n")
    paths = {**{k: str(v) for k, v in files.items()}, "latin1": str(latin1), "missing": str(tmp_path / "nope.txt")}
    filled = [arg.format(**paths) for arg in args]
    if filled[0] == "train" and "--base" not in filled:
        filled += ["--base", str(tiny_base)]
    result = runner.invoke(app, filled)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_eval_refuses_a_language_sft(sftkit_home, tiny_base, files):
    _ok(["train", "--lang", "ace", "--corpus", str(files["corpus"]), "--base", str(tiny_base), *FAST])
    result = runner.invoke(app, ["eval", "lang:ace", "--data", str(files["test"])])
    assert result.exit_code == 2
    assert "is a language SFT" in result.stderr


def test_sparse_steps_from_the_command_line_are_recorded(sftkit_home, tiny_base, files):
    _ok(
        [
            "train",
            "--lang",
            "ace",
            "--corpus",
            str(files["corpus"]),
            "--base",
            str(tiny_base),
            *FAST,
            "--sparse-steps",
            "9",
        ]
    )
    record = Registry.open().resolve("lang:ace")
    assert (record.metrics["full"]["steps"], record.metrics["sparse"]["steps"]) == (6, 9)
    refused = runner.invoke(app, ["train", "--lang", "ace", "--corpus", str(files["corpus"]), "--sparse-steps", "0"])
    assert refused.exit_code == 2 and "--sparse-steps must be positive, not 0" in refused.stderr


def test_train_and_eval_on_real_americasnli_files(sftkit_home, tiny_base):
    from conftest import requires_data

    dev = requires_data("americasnli", "dev", "aym.tsv")
    test = requires_data("americasnli", "test", "aym.tsv")
    args = ["train", "--task", "nli", "--train", str(dev), "--validation", str(test), "--base", str(tiny_base)]
    result = _ok([*args, "--recipe", "quick", "--max-steps", "2", "--eval-steps", "2", "--max-length", "32"])
    assert result.stdout.strip().splitlines()[-1] == "task:nli@1"
    record = Registry.open().resolve("task:nli")
    assert record.metrics["sparse"]["accuracy"] is not None
    scores = json.loads(_ok(["eval", "nli", "--data", str(test), "--json", "--max-length", "32"]).stdout)
    assert scores["n"] == 750
    assert {label: row["support"] for label, row in scores["per_class"].items()} == {
        "contradiction": 250,
        "entailment": 250,
        "neutral": 250,
    }


def test_interrupted_training_resumes_with_the_same_command(sftkit_home, tiny_base, files, monkeypatch):
    from sftkit.cli.training_progress import LogReporter

    args = ["train", "--task", "sa", "--train", str(files["train"]), "--base", str(tiny_base), *FAST]
    original_step = LogReporter.step

    def interrupt(self, step, loss, lr, tokens):
        if step == 5:
            raise KeyboardInterrupt
        original_step(self, step, loss, lr, tokens)

    monkeypatch.setattr(LogReporter, "step", interrupt)
    interrupted = runner.invoke(app, args)
    assert interrupted.exit_code == 130
    assert "(full phase, step 3): run the same command with --resume" in interrupted.stderr
    assert len(list((sftkit_home / "runs").iterdir())) == 1
    monkeypatch.setattr(LogReporter, "step", original_step)
    resumed = _ok([*args, "--resume"])
    assert ": full phase at step 3 of 6" in resumed.stderr
    assert "full phase: 6 steps, continuing after step 3" in resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == "task:sa@1"
    assert not any((sftkit_home / "runs").iterdir())
    nothing = runner.invoke(app, [*args, "--resume"])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.stderr


def test_other_column_names_get_the_flags_that_read_them(sftkit_home, tiny_base, files, tmp_path):
    """A header without text/label names the columns found and --text-column / --label-column (train and eval)."""
    renamed = {}
    for name in ("train", "test"):
        lines = files[name].read_text().splitlines()
        assert lines[0] == "id,text,label"
        renamed[name] = tmp_path / f"renamed-{name}.csv"
        renamed[name].write_text("\n".join(["id,sentence,gold", *lines[1:]]) + "\n")
    train = ["train", "--task", "sa", "--train", str(renamed["train"]), "--base", str(tiny_base), *FAST]
    line = one_line_error(runner.invoke(app, train))
    assert "line 2" not in line
    assert "no column 'text' (--text-column), 'label' (--label-column); the columns are id, sentence, gold" in line
    assert "--text-column NAME / --label-column NAME" in line
    columns = ["--text-column", "sentence", "--label-column", "gold"]
    assert _ok([*train, *columns]).stdout.strip().splitlines()[-1] == "task:sa@1"

    line = one_line_error(runner.invoke(app, ["eval", "sa", "--data", str(renamed["test"])]))
    assert "the columns are id, sentence, gold" in line and "--label-column" in line
    scores = json.loads(_ok(["eval", "sa", "--data", str(renamed["test"]), *columns, "--json"]).stdout)
    assert scores["n"] == 50
