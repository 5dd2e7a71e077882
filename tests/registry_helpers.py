"""Shared by the registry tests: tiny SFTs (no model needed) and database backends.

The PostgreSQL backend gives every test its own schema in the database named by
``SFTKIT_TEST_PG_URL`` (``.ci/postgres`` starts one), so parallel test workers never meet;
without that variable the PostgreSQL variants skip. The registry suite pairs it with an S3 bucket on
moto's server (the team setup); SQLite runs with the home's local store (the default).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def tiny_sft(
    name: str = "ace",
    kind: str = "language",
    seed: int = 0,
    base_model: str | None = "tiny-base",
    fingerprint: str | None = "sha256:tiny",
    **metadata,
):
    """A two-parameter SFT with random sparse deltas; different seeds give different content."""
    import torch

    from sftkit.sft import SFTMetadata, SparseFineTuning

    generator = torch.Generator().manual_seed(seed)

    def sparse(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * (torch.rand(shape, generator=generator) < 0.3)

    deltas = {
        "embeddings.word_embeddings.weight": sparse(12, 4),
        "encoder.layer.0.attention.self.query.weight": sparse(4, 4),
        "encoder.layer.1.intermediate.dense.weight": sparse(8, 4),
        "encoder.layer.1.intermediate.dense.bias": sparse(8),
    }
    meta = SFTMetadata(
        kind=kind,
        language=name if kind == "language" else None,
        task=name if kind == "task" else None,
        base_model=base_model,
        base_fingerprint=fingerprint,
        **metadata,
    )
    return SparseFineTuning.from_dense_deltas(deltas, full={"classifier.weight": torch.ones(2, 4)}, metadata=meta)


def base_sft(model, kind: str, name: str, base: str, seed: int):
    """A random SFT of every maskable parameter of ``model`` (5 % dense) plus its head: composable on ``base``."""
    import torch

    from sftkit.fingerprint import base_fingerprint
    from sftkit.params import head_parameters, maskable_parameters
    from sftkit.sft import SFTMetadata, SparseFineTuning
    from sftkit.toy import LABELS

    generator = torch.Generator().manual_seed(seed)
    deltas = {
        n: torch.randn(p.shape, generator=generator) * (torch.rand(p.shape, generator=generator) < 0.05)
        for n, p in maskable_parameters(model)
    }
    head = {n: torch.randn(p.shape, generator=generator) for n, p in head_parameters(model)}
    metadata = SFTMetadata(
        kind=kind,
        language=name if kind == "language" else None,
        task=name if kind == "task" else None,
        labels=list(LABELS) if kind == "task" else None,
        base_model=base,
        base_fingerprint=base_fingerprint(model),
    )
    return SparseFineTuning.from_dense_deltas(deltas, head, metadata)


def sft_dirs(root: Path, count: int, name: str = "ace", start_seed: int = 0) -> list[Path]:
    """``count`` distinct SFT directories, for processes that should not need torch."""
    return [tiny_sft(name, seed=start_seed + i).save(root / f"{name}-{i}") for i in range(count)]


def stored_files(location: str):
    """The file system and path of a stored artifact, local path or ``s3://`` URL alike (its real client)."""
    import fsspec

    return fsspec.core.url_to_fs(location, skip_instance_cache=True)


def write_stored(location: str, name: str, data: bytes | None) -> None:
    """Overwrite (or, with ``None``, delete) one file of a stored artifact where it is kept."""
    fs, path = stored_files(location)
    if data is None:
        fs.rm(f"{path}/{name}")
    else:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/{name}", data)


def read_stored(location: str, name: str) -> bytes:
    fs, path = stored_files(location)
    return fs.cat_file(f"{path}/{name}")


@contextlib.contextmanager
def backend_url(backend: str) -> Iterator[str | None]:
    """None (the SQLite file in the home) or a PostgreSQL URL with a fresh, private schema."""
    if backend == "sqlite":
        yield None
        return
    base = os.environ.get("SFTKIT_TEST_PG_URL")
    if not base:
        pytest.skip("SFTKIT_TEST_PG_URL is not set (.ci/postgres starts a server)")
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    schema = f"sftkit_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()
