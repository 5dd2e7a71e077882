"""``sftkit demo --workers``: the SFTs trained side by side in worker processes are the SFTs one process trains.

The demo's own schedules are cut to a few steps (the pipeline, the jobs and their order stay the demo's), and
the same seed runs with one worker (in this process) and with two (spawned processes, each training one SFT
at a time). Everything the demo measures must be identical, every SFT's tensors too, and the registry must
number them the same way whichever job ended first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sftkit.cli.commands import demo
from sftkit.cli.main import app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{workers: (results from --json, --home)} of two short demo runs of seed 3."""
    patch = pytest.MonkeyPatch()
    patch.setitem(
        demo.SCHEDULES, "language", demo.SCHEDULES["language"] | {"max_steps": 6, "min_steps": 6, "eval_steps": 3}
    )
    patch.setitem(demo.SCHEDULES, "task", demo.SCHEDULES["task"] | {"max_steps": 6, "eval_steps": 3})
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.delenv("SFTKIT_REGISTRY_URL", raising=False)
    outcomes = {}
    try:
        for workers in (1, 2):
            home = tmp_path_factory.mktemp(f"workers-{workers}") / "demo"
            done = CliRunner().invoke(
                app, ["demo", "--seed", "3", "--workers", str(workers), "--home", str(home), "--json"]
            )
            assert done.exit_code == 0, done.output
            outcomes[workers] = json.loads(done.stdout), home
    finally:
        patch.undo()
    return outcomes


def _tensors_by_reference(results: dict, home: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        record["reference"]: load_file(
            home / "store" / record["sha256"][:2] / record["sha256"] / "sft_model.safetensors"
        )
        for record in results["registry"]
    }


def test_two_workers_measure_what_one_does(runs):
    (one, _), (two, _) = runs[1], runs[2]
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["scores"] == two["scores"]
    assert one["source_language"] == two["source_language"]
    assert one["overlap"] == two["overlap"]
    assert one["exported"]["prediction"] == two["exported"]["prediction"]


def test_two_workers_train_the_same_sfts_and_register_them_alike(runs):
    (one, one_home), (two, two_home) = runs[1], runs[2]
    listed = {
        workers: [(r["reference"], r["method"], r["phase_1"]) for r in results["registry"]]
        for workers, (results, _) in runs.items()
    }
    assert listed[1] == listed[2]
    # DEFT-X's SFT of every name is @1 and trains the language's phase 1; LT-SFT's is @2 and reuses it.
    for reference, method, phase_1 in listed[2]:
        assert reference.endswith("@1" if method == "deftx" else "@2")
        assert phase_1 == ("reused" if method == "lt-sft" and reference.startswith("lang:") else "trained")
    tensors = {1: _tensors_by_reference(one, one_home), 2: _tensors_by_reference(two, two_home)}
    for reference, mine in tensors[1].items():
        theirs = tensors[2][reference]
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[name], theirs[name]) for name in mine), reference
    # Each task SFT names its own method's source SFT in the registry.
    for results in (one, two):
        records = {record["reference"]: record for record in results["registry"]}
        for record in records.values():
            if record["kind"] == "task":
                source = records[record["source_reference"]]
                assert (source["language"], source["method"]) == ("src", record["method"])


def test_workers_must_be_positive(tmp_path):
    done = CliRunner().invoke(app, ["demo", "--workers", "0", "--home", str(tmp_path / "demo")])
    assert done.exit_code == 2
    assert "workers" in done.output and not (tmp_path / "demo").exists()


def test_a_job_listed_before_what_it_needs_is_refused(tmp_path):
    from sftkit.cli.commands.demo_jobs import Job, run_jobs

    first, second = Job(("src", "deftx"), "a", None, {}), Job(("sa", "deftx"), "b", None, {}, (("src", "deftx"),))
    for workers in (1, 2):
        with pytest.raises(ValueError, match="sa-deftx is listed before what it needs"):
            run_jobs(
                [second, first],
                workers=workers,
                directory=tmp_path,
                full_phase_cache=tmp_path,
                reporter_for=lambda job: None,
                finished=lambda job, directory, phases: None,
                lineage_of=lambda key: {},
            )
