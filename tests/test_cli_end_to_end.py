"""The installed ``sftkit`` script, in fresh processes: the user's three example commands (demo: test_demo.py)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sftkit import toy

SFTKIT = shutil.which("sftkit")
pytestmark = pytest.mark.skipif(SFTKIT is None, reason="the sftkit console script is not installed")


def run(*args: str, env: dict[str, str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SFTKIT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_the_users_three_example_commands(tiny_base, toy_languages, tmp_path):
    env = {
        **os.environ,
        "SFTKIT_HOME": str(tmp_path / "home"),
        "SFTKIT_BASE": str(tiny_base),  # instead of xlm-roberta-base, which cannot be downloaded here
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("SFTKIT_REGISTRY_URL", None)
    quick = ["--recipe", "quick", "--max-steps", "20", "--eval-steps", "10"]
    for code in ("ace", "ban"):
        toy.write_corpus(tmp_path / f"{code}.txt", toy.corpus(toy_languages[code], 200))
    toy.write_labelled_csv(tmp_path / "sa.csv", toy.labelled(toy_languages["src"], 200))
    with (tmp_path / "nli.tsv").open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["premise", "hypothesis", "label"])
        for (premise, _), (hypothesis, _) in zip(
            toy.labelled(toy_languages["src"], 150), toy.labelled(toy_languages["src"], 150, seed=1), strict=True
        ):
            writer.writerow([premise, hypothesis, "entailment" if len(premise) > len(hypothesis) else "neutral"])

    # 1. sftkit train --lang ace --rank 90var   (data given by flag: no download here)
    done = run("train", "--lang", "ace", "--rank", "90var", "--corpus", "ace.txt", *quick, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lang:ace@1" in done.stdout
    for extra in (
        ["--lang", "ban", "--corpus", "ban.txt"],
        ["--task", "sa", "--train", "sa.csv"],
        ["--task", "nli", "--train", "nli.tsv"],
    ):
        done = run("train", *extra, *quick, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    # 2. sftkit overlap ace nli
    done = run("overlap", "ace", "nli", "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["mode"] == "pair"
    assert 0.0 <= report["pairs"][0]["total"]["overlap"] <= 1.0
    assert run("overlap", "ace", "nli", env=env, cwd=tmp_path).returncode == 0

    # 3. sftkit compose --task sa --lang ban -o model/
    done = run("compose", "--task", "sa", "--lang", "ban", "-o", "model/", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "model" / "sftkit_compose.json").read_text())
    assert [part["reference"] for part in record["sfts"]] == ["task:sa@1", "lang:ban@1"]
    done = run("eval", "model/", "--data", "sa.csv", "--json", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n"] == 200

    # Bad input from a fresh process: one line on stderr, exit code 2, no traceback.
    done = run("compose", "--task", "nope", "-o", "other/", env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
