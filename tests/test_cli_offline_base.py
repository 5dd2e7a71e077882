"""A base that only the Hub has, with no Hub: one line naming --base / SFTKIT_BASE / HF_HUB_OFFLINE within seconds.

Run as subprocesses: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE when it is imported. The
unreachable Hub is a loopback port nobody listens on (refused at once, as a machine without network is);
before the fix the default base took about 50 s of retries to fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SFTKIT = shutil.which("sftkit") or str(Path(sys.executable).with_name("sftkit"))
FAST_FAIL_SECONDS = 20  # the process itself (torch + transformers imports) takes several on a loaded machine


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SFTKIT_HOME": str(tmp_path / "home"), **extra}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty Hugging Face cache
    for name in ("SFTKIT_BASE", "SFTKIT_REGISTRY_URL", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run([SFTKIT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - started


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "ace.txt"
    path.write_text("lon meuadah u sikula\nkamoe meurunoe basa\n" * 10)
    return path


@pytest.mark.parametrize("mode", ["unreachable", "offline"])
def test_default_base_without_the_hub_fails_fast_naming_the_way_out(tmp_path, corpus, mode):
    extra = (
        {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_OFFLINE": "0"}
        if mode == "unreachable"
        else {"HF_HUB_OFFLINE": "1"}
    )
    done, seconds = _run(["train", "--lang", "ace", "--corpus", str(corpus)], _env(tmp_path, **extra), tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "'xlm-roberta-base'" in lines[0]
    for hint in ("--base DIR", "SFTKIT_BASE", "HF_HUB_OFFLINE"):
        assert hint in lines[0]
    assert ("cannot reach the Hugging Face Hub" if mode == "unreachable" else "HF_HUB_OFFLINE is set") in lines[0]
    assert seconds < FAST_FAIL_SECONDS, f"took {seconds:.1f} s"


def test_a_cached_base_loads_from_the_cache_when_the_hub_is_unreachable(tmp_path, tiny_base):
    """Reachability decides local_files_only: a cached base loads at once instead of after minutes of retries."""
    env = _env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_OFFLINE="0")
    repo = Path(env["HF_HOME"]) / "hub" / "models--someone--tiny"
    commit = "0" * 40
    shutil.copytree(tiny_base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "from sftkit.base_model import load_base, load_tokenizer\n"
        "load_tokenizer('someone/tiny'); print(type(load_base('someone/tiny', 'masked-lm')).__name__)"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "XLMRobertaForMaskedLM"
    assert time.perf_counter() - started < FAST_FAIL_SECONDS
