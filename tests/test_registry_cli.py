"""`sftkit list / show / tag / rm / verify / gc / db` through the real Typer app."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from registry_helpers import tiny_sft
from typer.testing import CliRunner

from sftkit.cli.main import app
from sftkit.params import layer_of, module_of
from sftkit.registry import Registry
from sftkit.registry.location import HEAD

REPORT = [
    {"name": "encoder.layer.0.attention.self.query.weight", "shape": [4, 4], "rank": 2, "energy": 0.91, "kept": 1},
    {"name": "embeddings.word_embeddings.weight", "shape": [12, 4], "rank": 3, "energy": 0.9, "kept": 2},
]


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def stocked(sftkit_home):
    """lang:id@1 (tagged paper) ← task:sa@1, plus lang:ace@1 and lang:ace@2 (LT-SFT)."""
    with Registry.open() as registry:
        source = registry.add(tiny_sft("id", seed=1, rank="90var", rank_report=REPORT), tags=["paper"])
        task = tiny_sft("sa", kind="task", seed=2, labels=["neg", "pos"], metrics={"macro_f1": 0.75})
        registry.add(task, source=source)
        registry.add(tiny_sft("ace", seed=3))
        registry.add(tiny_sft("ace", seed=4, method="lt-sft", rank="none"))
    return sftkit_home


def test_list_renders_filters_and_prints_json(stocked):
    result = run("list")
    assert result.exit_code == 0
    for reference in ("lang:id@1", "task:sa@1", "lang:ace@1", "lang:ace@2"):
        assert reference in result.stdout

    records = json.loads(run("list", "--json").stdout)
    assert [r["reference"] for r in records] == ["lang:ace@2", "lang:ace@1", "task:sa@1", "lang:id@1"]
    required = {"reference", "kind", "language", "task", "version", "base_model", "method", "path"}
    assert all(required <= set(r) for r in records)
    assert all((Path(r["path"]) / "sft_config.json").is_file() for r in records)

    def refs(*flags: str) -> list[str]:
        return [r["reference"] for r in json.loads(run("list", *flags, "--json").stdout)]

    assert refs("--kind", "task") == ["task:sa@1"]
    assert refs("--lang", "ace", "--sort", "version", "--asc") == ["lang:ace@1", "lang:ace@2"]
    assert refs("--method", "lt-sft") == ["lang:ace@2"]
    assert refs("--tag", "paper") == ["lang:id@1"]
    assert refs("--base", "nope") == []
    assert refs("--limit", "1") == ["lang:ace@2"]
    assert "No SFT matches" in run("list", "--task", "nli").stdout
    assert "cannot sort by 'colour'" in one_error_line(run("list", "--sort", "colour"))


def test_list_on_an_empty_registry_says_how_to_fill_it(sftkit_home):
    result = run("list")
    assert result.exit_code == 0 and "is empty" in result.stdout and "sftkit train" in result.stdout
    assert json.loads(run("list", "--json").stdout) == []


def expected_density(sft, key) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = {}
    for name, delta in sft.diffs.items():
        entry = totals.setdefault(key(name), [0, 0])
        entry[0] += int((delta.to_dense() != 0).sum())
        entry[1] += delta.to_dense().numel()
    return {group: tuple(v) for group, v in totals.items()}


def test_show_prints_metadata_lineage_densities_and_rank_report(stocked):
    result = run("show", "task:sa")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "task:sa@1" in out and "macro_f1=0.75" in out and "neg, pos" in out
    assert "lineage  task:sa@1 ← lang:id@1" in out
    assert "density per layer" in out and "layer 1" in out and "density per module" in out and "ffn.in" in out

    source = run("show", "id@paper")
    assert "source of  task:sa@1" in source.stdout
    assert "rank report" in source.stdout and "energy" in source.stdout and "0.91" in source.stdout


def test_show_json_is_one_record_with_all_metadata(stocked):
    data = json.loads(run("show", "lang:id", "--json").stdout)
    assert data["reference"] == "lang:id@1" and data["tags"] == ["paper"] and data["dependents"] == ["task:sa@1"]
    assert data["config"]["rank_report"] == REPORT and data["config"]["rank"] == "90var"
    sft = tiny_sft("id", seed=1)

    def layer(name: str) -> str:
        index = layer_of(name)
        return f"layer {index}" if index is not None else "embeddings"

    for field, key in (("density_by_layer", layer), ("density_by_module", module_of)):
        got = {row["group"]: (row["entries"], row["size"]) for row in data[field]}
        assert got == expected_density(sft, key)
        assert all(abs(row["density"] - row["entries"] / row["size"]) < 1e-12 for row in data[field])
    task = json.loads(run("show", "sa", "--json").stdout)
    assert task["lineage"] == ["lang:id@1"] and task["source_reference"] == "lang:id@1"


def test_show_accepts_an_unregistered_directory(stocked, tmp_path):
    directory = tiny_sft("bjn", seed=9).save(tmp_path / "bjn")
    data = json.loads(run("show", directory, "--json").stdout)
    assert data["id"] is None and data["language"] == "bjn" and data["lineage"] == []
    assert "not registered" in run("show", directory).stdout


def test_tag_moves_aliases_and_removes_them(stocked):
    assert "tagged lang:ace@1 as best" in run("tag", "lang:ace@1", "best").stdout
    moved = run("tag", "ace", "best")
    assert "tagged lang:ace@2 as best (moved from lang:ace@1)" in moved.stdout
    assert json.loads(run("show", "ace@best", "--json").stdout)["version"] == 2
    assert "removed tag best from lang:ace@2" in run("tag", "ace@2", "best", "--remove").stdout
    assert "no version" in one_error_line(run("show", "ace@best"))
    assert "not a valid tag" in one_error_line(run("tag", "ace", "4"))
    assert "has no tag 'best'" in one_error_line(run("tag", "ace", "best", "--remove"))


def test_rm_protects_sources_unless_forced(stocked):
    line = one_error_line(run("rm", "id"))
    assert "lang:id@1 is the source of task:sa@1" in line and "--force" in line
    assert "lang:id@1" in run("list").stdout
    result = run("rm", "id", "--force")
    assert result.exit_code == 0 and "removed lang:id@1" in result.stdout
    assert json.loads(run("show", "sa", "--json").stdout)["source_reference"] == "lang:id@1"
    assert "no SFT called 'id' is left" in one_error_line(run("rm", "id"))


def test_verify_and_gc(stocked):
    result = run("verify")
    assert result.exit_code == 0 and "all artifacts verified" in result.stdout
    with Registry.open() as registry:
        damaged = registry.resolve("lang:ace@1")
        orphan = registry.store.path_for("cd" * 32)
    (damaged.path / "README.md").write_text("edited by hand")
    tiny_sft("zzz", seed=5).save(orphan)

    result = run("verify")
    assert result.exit_code == 1 and "lang:ace@1" in result.stderr and "does not match" in result.stderr
    problems = json.loads(run("verify", "--json").stdout)
    assert [(p["reference"], p["problem"]) for p in problems] == [("lang:ace@1", "content does not match its sha256")]

    result = run("gc")  # the orphan is younger than the default grace period: it might be an upload in flight
    assert result.exit_code == 0 and "0 unreferenced store entries removed" in result.stdout and orphan.exists()
    assert "'soon' is not a duration" in one_error_line(run("gc", "--grace", "soon"))
    result = run("gc", "--grace", "0s")
    assert result.exit_code == 0 and str(orphan) in result.stdout
    assert "1 unreferenced store entry removed" in result.stdout
    assert not orphan.exists() and damaged.path.exists()


def test_db_status_and_upgrade(stocked):
    from alembic import command
    from alembic.config import Config

    from sftkit.registry.database import _MIGRATIONS

    status = json.loads(run("db", "status", "--json").stdout)
    assert status["up_to_date"] and status["revision"] == status["head"]
    assert "up to date" in run("db", "upgrade").stdout

    with Registry.open() as registry, registry.db.engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert "run `sftkit db upgrade`" in one_error_line(run("list"))
    result = run("db", "upgrade")
    assert result.exit_code == 0 and f"from schema 0001 to {HEAD}" in result.stdout
    assert "lang:id@1" in run("list").stdout


def test_an_unreachable_database_is_one_line(sftkit_home):
    line = one_error_line(run("--registry-url", "postgresql+psycopg2://u@127.0.0.1:9/db", "list"))
    assert "cannot connect to the registry database" in line and "SFTKIT_REGISTRY_URL" in line


def test_registry_commands_never_import_torch(stocked):
    """They must start fast: no torch/transformers, not even for show's densities."""
    script = (
        "import sys; from typer.testing import CliRunner; from sftkit.cli.main import app\n"
        "for args in (['--help'], ['list'], ['show', 'task:sa'], ['show', 'id', '--json'], ['tag', 'ace', 'x'],\n"
        "             ['tag', 'ace', 'x', '--remove'], ['rm', 'lang:ace@1'], ['verify'], ['db', 'status']):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout


PHASES = {
    "full": {
        "steps": 100,
        "best_step": 50,
        "macro_f1": 0.6125,
        "history": [
            {"step": 50, "eval_loss": 0.8811, "macro_f1": 0.6125, "accuracy": 0.7},
            {"step": 100, "eval_loss": 0.9402, "macro_f1": 0.5933, "accuracy": 0.65},
        ],
    },
    "sparse": {
        "steps": 100,
        "best_step": 100,
        "macro_f1": 0.6401,
        "history": [{"step": 100, "eval_loss": 0.8534, "macro_f1": 0.6401, "accuracy": 0.72}],
    },
    "note": "imported",
}


def test_show_renders_each_phase_as_a_table_of_best_and_last(sftkit_home):
    with Registry.open() as registry:
        registry.add(tiny_sft("sa", kind="task", labels=["neg", "pos"], metrics=PHASES))
    out = run("show", "task:sa").stdout
    assert "history=" not in out and "best_step=" not in out
    assert "full phase · 100 steps · best macro_f1 0.6125 at step 50\n" in out
    assert "sparse phase · 100 steps · best macro_f1 0.6401 at step 100" in out
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in _rows(out)]
    header = next(line for line in out.splitlines() if "eval_loss" in line)
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["", "step", "accuracy", "eval_loss", "macro_f1"]
    assert rows == [
        ["best", "50", "0.7", "0.8811", "0.6125"],  # full phase
        ["last", "100", "0.65", "0.9402", "0.5933"],
        ["best", "100", "0.72", "0.8534", "0.6401"],  # sparse phase
        ["last", "100", "0.72", "0.8534", "0.6401"],
    ]
    assert "note=imported" in out  # a value that is no phase summary stays in the metadata table


def _rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("│ best") or line.startswith("│ last")]


def test_list_shows_a_short_base_in_80_columns_and_the_full_one_with_wide(sftkit_home):
    """A real process with COLUMNS set: rich fixes an in-process console's width when it is created."""
    import os

    base = "/data/models/shared/multilingual-e5-small"
    with Registry.open() as registry:
        registry.add(tiny_sft("ace", base_model=base))
        registry.add(
            tiny_sft("sa", kind="task", seed=1, labels=["neg", "pos"], base_model="FacebookAI/xlm-roberta-base")
        )

    def listing(columns: int, *flags: str) -> str:
        env = {**os.environ, "COLUMNS": str(columns), "SFTKIT_HOME": str(sftkit_home)}
        command = [sys.executable, "-c", "from sftkit.cli.main import main; main()", "list", *flags]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    short = listing(80)
    assert "multilingual-e5-small" in short and "xlm-roberta-base" in short
    assert "/data/models" not in short and "FacebookAI" not in short
    assert max(len(line) for line in short.splitlines()) <= 80
    assert "lang:ace@1 multilingual-e5-small deftx" in " ".join(short.split())
    assert f"lang:ace@1 {base} deftx" in " ".join(listing(160, "--wide").split())
    assert {r["base_model"] for r in json.loads(run("list", "--json").stdout)} == {base, "FacebookAI/xlm-roberta-base"}
