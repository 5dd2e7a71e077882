"""Shared fixtures: a tiny XLM-R-shaped base (random weights, tokenizer trained on the fly) and toy data.

Everything is built offline in a few hundred milliseconds; session-scoped so it is built once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention between xdist workers

import torch

torch.set_num_threads(1)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def toy_languages():
    from sftkit import toy

    return toy.make_languages()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, toy_languages) -> Path:
    """Directory of a 2-layer, hidden-64 XLM-R-style MLM checkpoint with its tokenizer."""
    from sftkit import toy

    texts = [text for language in toy_languages.values() for text in toy.corpus(language, 300)]
    return toy.build_tiny_base(tmp_path_factory.mktemp("tiny-base"), texts)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory, toy_languages) -> Path:
    """Same shapes as ``tiny_base`` but other weights: compose must refuse to mix them."""
    from sftkit import toy

    texts = [text for language in toy_languages.values() for text in toy.corpus(language, 300)]
    return toy.build_tiny_base(tmp_path_factory.mktemp("other-base"), texts, seed=1)


@pytest.fixture(scope="session")
def headless_base(tiny_base, tmp_path_factory) -> Path:
    """The tiny base saved without an MLM head, like a sentence encoder (mE5, MiniLM): a run fits a fresh one."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("headless")
    AutoModel.from_pretrained(tiny_base, add_pooling_layer=False).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(out)
    return out


@pytest.fixture
def sftkit_home(tmp_path, monkeypatch) -> Path:
    """An empty registry home for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("SFTKIT_HOME", str(home))
    monkeypatch.delenv("SFTKIT_REGISTRY_URL", raising=False)
    return home


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's standalone S3 server on 127.0.0.1: a real HTTP endpoint that s3fs talks to exactly as to AWS."""
    import logging
    import socket

    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(s3_endpoint, tmp_path, monkeypatch) -> dict[str, str]:
    """The standard AWS variables, pointing every S3 client at the test server (and at no user config)."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "SFTKIT_ARTIFACT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket(aws_env) -> str:
    """A fresh, empty bucket on the test server; its name."""
    import uuid

    import s3fs

    name = f"sftkit-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture
def cli(sftkit_home):
    """Run ``sftkit ARGS…`` in-process (typer's CliRunner) against the test's empty registry home."""
    from typer.testing import CliRunner

    from sftkit.cli.main import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def requires_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test cleanly when it is absent."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path
