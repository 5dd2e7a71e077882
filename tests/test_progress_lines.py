"""Progress in logs: with stderr not a terminal, ``sftkit train`` and the other long commands print plain lines.

Every run goes through the CLI with redirected output (typer's CliRunner captures stderr; it is no terminal),
on the tiny base saved without an MLM head, so the head warm-up is one of the phases.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from sftkit import toy
from sftkit.cli.main import app

STEPS = 4
CLOCK = r"\d+:\d\d:\d\d"
STEP_LINE = (
    r"^{phase}: step (\d+)/{total} \(\d+%\) · loss \d+\.\d{{4}} · lr \d\.\d\de[-+]\d\d · [\d,]+ tok/s · "
    rf"elapsed {CLOCK} · ETA {CLOCK}$"
)
PHASES = ("head warm-up", "full phase", "sparse phase")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, toy_languages):
    return toy.write_corpus(tmp_path_factory.mktemp("corpus") / "ace.txt", toy.corpus(toy_languages["ace"], 120))


def _invoke(headless_base, corpus, out, *options: str, env: dict[str, str] | None = None, more=("--eval-steps", "2")):
    """``sftkit [OPTIONS] train --lang ace … [MORE]`` on the headless tiny base, 4 steps per phase."""
    args = [*options, "train", "--lang", "ace", "--corpus", str(corpus), "--base", str(headless_base)]
    args += ["--recipe", "quick", "--max-steps", str(STEPS), "--no-register", "-o", str(out), *more]
    return CliRunner().invoke(app, args, env={"SFTKIT_HOME": str(out.parent / "home"), **(env or {})})


def _train(headless_base, corpus, out, *options: str, env: dict[str, str] | None = None):
    """A run validating at steps 2 and 4 that must succeed."""
    result = _invoke(headless_base, corpus, out, *options, env=env)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _steps(stderr: str, phase: str) -> list[int]:
    pattern = re.compile(STEP_LINE.format(phase=phase, total=STEPS))
    return [int(match[1]) for line in stderr.splitlines() if (match := pattern.match(line))]


def test_every_phase_logs_its_steps_validations_and_end(headless_base, corpus, tmp_path):
    stderr = _train(headless_base, corpus, tmp_path / "sft", env={"SFTKIT_LOG_INTERVAL": "0"}).stderr
    lines = stderr.splitlines()
    for phase in PHASES:
        assert f"{phase}: {STEPS} steps" in lines
        assert _steps(stderr, phase) == [1, 2, 3, 4]  # interval 0: every step
    for phase in PHASES[1:]:
        for step in (2, 4):
            assert any(re.fullmatch(rf"{phase}: step {step}/4 · validation loss \d+\.\d{{4}}", line) for line in lines)
        end = rf"{phase}: best validation loss \d+\.\d{{4}} at step \d/4 \(done in {CLOCK}\)"
        assert any(re.fullmatch(end, line) for line in lines)
    end = rf"head warm-up: 4 steps, MLM loss \d+\.\d{{4}} → \d+\.\d{{4}} \(done in {CLOCK}\)"
    assert any(re.fullmatch(end, line) for line in lines)
    order = [next(i for i, line in enumerate(lines) if line.startswith(phase)) for phase in PHASES]
    assert order == sorted(order)


def test_max_steps_bounds_the_head_warm_up_and_says_so(headless_base, corpus, tmp_path):
    result = _train(headless_base, corpus, tmp_path / "sft")
    assert "fitting the fresh MLM head for 4 steps (max steps caps the 200) with the encoder frozen" in result.stderr
    trainer = json.loads((tmp_path / "sft" / "sft_config.json").read_text())["trainer"]
    assert trainer["head_warmup"]["steps"] == STEPS and trainer["steps_per_phase"] == STEPS
    # The default interval (30 s) outlasts this run: a phase's first and last steps only.
    assert all(_steps(result.stderr, phase) == [1, STEPS] for phase in PHASES)


def test_quiet_silences_the_progress_lines(headless_base, corpus, tmp_path):
    result = _train(headless_base, corpus, tmp_path / "sft", "-q", env={"SFTKIT_LOG_INTERVAL": "0"})
    assert result.stderr == ""
    assert result.stdout.strip() == str(tmp_path / "sft")


def test_a_bad_log_interval_is_one_clear_error(headless_base, corpus, tmp_path):
    args = ["train", "--lang", "ace", "--corpus", str(corpus), "--base", str(headless_base), "--recipe", "quick"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "x")], env={"SFTKIT_LOG_INTERVAL": "soon"})
    assert result.exit_code == 2
    assert "SFTKIT_LOG_INTERVAL must be a number of seconds ≥ 0 (0 = every step), not 'soon'" in result.stderr


def test_export_import_and_eval_log_their_stages(tiny_base, toy_languages, sftkit_home, tmp_path, monkeypatch):
    """Interval 0: every stage logs; by default only a stage lasting over 5 s does (none of these)."""
    runner = CliRunner()
    data = toy.write_labelled_csv(tmp_path / "sa.csv", toy.labelled(toy_languages["src"], 60))
    train = ["train", "--task", "sa", "--train", str(data), "--base", str(tiny_base), "--recipe", "quick"]
    assert runner.invoke(app, [*train, "--max-steps", "2"]).exit_code == 0
    quick_stages = runner.invoke(app, ["export", "sa", "-o", str(tmp_path / "quick")])
    assert quick_stages.exit_code == 0 and quick_stages.stderr == ""
    monkeypatch.setenv("SFTKIT_LOG_INTERVAL", "0")
    exported = runner.invoke(app, ["export", "sa", "-o", str(tmp_path / "lt")])
    assert exported.exit_code == 0, exported.output
    assert re.search(rf"^writing lt-sft to {tmp_path / 'lt'}: done in {CLOCK}$", exported.stderr, re.M)
    imported = runner.invoke(app, ["import", str(tmp_path / "lt"), "--task", "sa-copy"])
    assert imported.exit_code == 0, imported.output
    assert f"importing lt-sft SFT from {tmp_path / 'lt'}…" in imported.stderr.splitlines()
    evaluated = runner.invoke(app, ["eval", "sa", "--data", str(data), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert re.search(rf"^evaluating sa on {data}: done in {CLOCK}$", evaluated.stderr, re.M)
    assert json.loads(evaluated.stdout)["n"] == 60  # the lines stay on stderr: stdout is still pure JSON
    quiet = runner.invoke(app, ["-q", "eval", "sa", "--data", str(data), "--json"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_an_interruption_after_the_warm_up_keeps_the_fitted_head(headless_base, corpus, tmp_path, monkeypatch):
    """Ctrl-C at the full phase's first step, before any checkpoint: the fitted head is kept and not fitted again."""
    from sftkit.cli.training_progress import LogReporter

    original_step = LogReporter.step

    def interrupt(self, step, loss, lr, tokens):
        if self.label == "full phase":
            raise KeyboardInterrupt
        original_step(self, step, loss, lr, tokens)

    monkeypatch.setattr(LogReporter, "step", interrupt)
    out = tmp_path / "sft"
    interrupted = _invoke(headless_base, corpus, out, more=("--eval-steps", str(STEPS)))
    assert interrupted.exit_code == 130
    assert "(head warm-up done): run the same command with --resume" in interrupted.stderr
    monkeypatch.setattr(LogReporter, "step", original_step)
    resumed = _invoke(headless_base, corpus, out, more=("--eval-steps", str(STEPS), "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert ": full phase from its start" in resumed.stderr
    assert "head warm-up:" not in resumed.stderr  # no warm-up lines: it did not run again
    assert json.loads((out / "sft_config.json").read_text())["trainer"]["head_warmup"]["steps"] == STEPS
