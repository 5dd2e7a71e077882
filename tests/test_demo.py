"""``sftkit demo`` (the README's first command) as a user runs it: the installed script in a fresh process.

One run (it trains eight SFTs): every stage's outcome is checked from ``--json`` and from the files it
leaves in ``--home``, and its wall and CPU time are measured and reported (``record_property`` and stdout;
run pytest with ``-s`` or ``-rP`` to see them). The bound is on CPU time, which a parallel test worker or
another job barely moves, while wall time doubles or triples under load.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sftkit import toy

SFTKIT = shutil.which("sftkit")
# ≈ 2× a run's CPU time here (193 s on one worker since the language SFTs train 1 000 steps per phase to learn
# their targets' words, issue 18; 217 s on two, which add their start-up): a machine 2× slower passes, a demo that
# doubled its work would not. Its wall time (114 s on 2 quiet cores, issue 18's bound 120 s) is a benchmark:
# benchmarks/demo_wall.py.
CPU_SECONDS_BOUND = 450.0
STAGES = (
    "toy world and θ0",
    "training and registering",
    "overlap",
    "composition and evaluation",
    "export and pipeline",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SFTKIT is None, reason="the sftkit console script is not installed"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(results from --json, --home directory, wall seconds) of one ``sftkit demo`` run."""
    tmp = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SFTKIT_HOME": str(tmp / "sftkit-home")}
    env.pop("SFTKIT_REGISTRY_URL", None)
    home = tmp / "demo"
    started, cpu_before = time.perf_counter(), _children_cpu_seconds()
    done = subprocess.run(
        [SFTKIT, "demo", "--home", str(home), "--json"],
        env=env,
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall, cpu = time.perf_counter() - started, _children_cpu_seconds() - cpu_before
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), home, wall, cpu


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_demo_time_is_reported_and_bounded(demo, record_property):
    """Wall time is reported; the bound is on CPU time (the demo's and its worker processes'), which other jobs
    on the machine barely move, while wall time doubles or triples under a parallel suite plus a benchmark."""
    results, _, wall, cpu = demo
    record_property("demo_wall_seconds", round(wall, 1))
    record_property("demo_cpu_seconds", round(cpu, 1))
    record_property("demo_reported_seconds", results["seconds"])
    record_property("demo_stage_seconds", json.dumps(results["timings"]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nsftkit demo: {wall:.1f} s wall, {cpu:.1f} s CPU (process), {results['seconds']} s reported by the demo, "
        f"stages {results['timings']}, load average {load:.2f} on {os.cpu_count()} CPUs"
    )
    assert results["workers"] == min(2, os.cpu_count() or 1)  # two SFTs at once by default on 2 cores or more
    assert tuple(results["timings"]) == STAGES  # every stage ran, in order, and was timed
    assert sum(results["timings"].values()) <= results["seconds"] + 0.5 <= wall + 0.5
    assert cpu <= CPU_SECONDS_BOUND, f"sftkit demo used {cpu:.0f} s of CPU (bound {CPU_SECONDS_BOUND:.0f} s)"


def test_demo_trains_and_registers_both_methods(demo):
    results, home, _, _ = demo
    records = {record["reference"]: record for record in results["registry"]}
    assert len(records) == 8  # (3 language SFTs + 1 task SFT) × (DEFT-X, LT-SFT)
    by_method = {method: [r for r in records.values() if r["method"] == method] for method in ("deftx", "lt-sft")}
    for method, rank in (("deftx", "90var"), ("lt-sft", "none")):
        mine = by_method[method]
        assert sorted((r["kind"], r["language"] or r["task"]) for r in mine) == [
            ("language", "ace"),
            ("language", "ban"),
            ("language", "src"),
            ("task", "sa"),
        ]
        assert {r["rank"] for r in mine} == {rank}
        (task,) = (r for r in mine if r["kind"] == "task")
        source = records[task["source_reference"]]  # the task SFT was trained on top of its method's src SFT
        assert (source["kind"], source["language"], source["method"]) == ("language", "src", method)
        sparse, full = task["metrics"]["sparse"]["macro_f1"], task["metrics"]["full"]["macro_f1"]
        assert sparse > 0.6  # phase-2 validation, 3 classes
        # The task SFT's k is chosen, as the paper's K, so that the sparse phase keeps what phase 1 learnt (at
        # the paper's 5.1 % share the toy lost 0.08 of it here).
        assert sparse >= full - 0.05
    for record in records.values():
        assert record["num_entries"] == record["k"] > 0
        assert 0.0 < record["density"] < 1.0
        assert record["metrics"]["full"]["steps"] > 0 and record["metrics"]["sparse"]["steps"] > 0
    # Phase 1 is trained by DEFT-X and shared with LT-SFT only where it is the same computation (same
    # data, settings and start): the language SFTs; the task SFTs start from different source SFTs.
    assert {r["reference"]: r["phase_1"] for r in by_method["deftx"]} == {
        r["reference"]: "trained" for r in by_method["deftx"]
    }
    shared = {r["kind"]: r["phase_1"] for r in by_method["lt-sft"]}
    assert shared == {"language": "reused", "task": "trained"}

    # The registry the demo wrote is a normal registry: the CLI lists the same SFTs from --home.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SFTKIT_REGISTRY_URL", None)
    listed = subprocess.run([SFTKIT, "--home", str(home), "list", "--json"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert {record["reference"] for record in json.loads(listed.stdout)} == set(records)
    assert not (home / "registry").exists()  # --home means one thing: the registry's home


def test_demo_overlap_composition_and_evaluation(demo):
    results, _, _, _ = demo
    assert set(results["overlap"]) == {"deftx", "lt-sft"}
    for values in results["overlap"].values():
        assert set(values) == {"ace", "ban"} and all(0.0 <= value <= 1.0 for value in values.values())
    cells = {(row["language"], row["method"], row["composition"]) for row in results["scores"]}
    assert len(cells) == 8  # 2 target languages × 2 methods × (task alone, task + language)
    assert all(0.0 <= row["macro_f1"] <= 1.0 and row["n"] == 400 for row in results["scores"])
    # The task was really learned: far above chance (macro-F1 1/3 for a uniform guess) on the source
    # language, and above it zero-shot on the target languages.
    assert results["source_language"]["macro_f1"] > 0.6
    assert sum(row["macro_f1"] for row in results["scores"]) / len(results["scores"]) > 0.4


def test_demo_exported_model_loads_and_reproduces_the_pipeline_call(demo):
    from transformers import AutoModelForSequenceClassification, pipeline

    results, home, _, _ = demo
    exported = Path(results["exported"]["path"])
    assert exported.is_relative_to(home)
    record = json.loads((exported / "sftkit_compose.json").read_text())
    assert [part["reference"] for part in record["sfts"]] == ["task:sa@1", "lang:ace@1"]
    model = AutoModelForSequenceClassification.from_pretrained(exported)
    assert sorted(model.config.id2label.values()) == sorted(toy.LABELS)
    reported = results["exported"]["prediction"]
    again = pipeline("text-classification", model=str(exported))(results["exported"]["text"])[0]
    assert reported["label"] in toy.LABELS
    assert again["label"] == reported["label"] and again["score"] == pytest.approx(reported["score"], abs=1e-5)


def test_demo_next_steps_run_on_what_it_left(demo, tmp_path):
    """Every command the demo suggests works as printed on its --home (the training one with fewer steps)."""
    results, home, _, _ = demo
    assert results["home"] == str(home.resolve())
    commands = results["next_steps"]
    assert commands and all(str(home.resolve()) in command for command in commands)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SFTKIT_REGISTRY_URL", None)
    outputs = {}
    for command in commands:
        argv = shlex.split(command)
        if "train" in argv:
            argv += ["--max-steps", "4", "--eval-steps", "2"]
        done = subprocess.run([SFTKIT, *argv[1:]], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        outputs[argv[argv.index("--home") + 2] if "--home" in argv else argv[1]] = done.stdout
    assert "lang:ace@1" in outputs["list"]
    assert (home / "models" / "sa-ban" / "sftkit_compose.json").is_file()
    assert "macro" in outputs["eval"].lower()


def test_demo_refuses_a_home_it_did_not_make(tmp_path):
    """--home is a registry home: the demo never writes its toy SFTs into a directory holding other things."""
    (tmp_path / "registry.db").write_text("a real registry")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([SFTKIT, "demo", "--home", str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "not made by sftkit demo" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "registry.db").read_text() == "a real registry"
