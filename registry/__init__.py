"""The SFT registry: rows in SQLite (default) or any SQLAlchemy database, artifacts by content hash in the
home's store or at a location by URL (``s3://bucket/prefix``, a shared path, any fsspec URL).

Importing this package is cheap; SQLAlchemy is loaded on first use of ``Registry``, fsspec when bytes move.

    from sftkit.registry import Registry
    reg = Registry.open()        # $SFTKIT_HOME, $SFTKIT_REGISTRY_URL, $SFTKIT_ARTIFACT_URL, $SFTKIT_STORE
    record = reg.add(sft, tags=["best"])        # -> SFTRecord, e.g. record.reference == "lang:ace@1"
    sft = reg.load("ace@best")
"""

from __future__ import annotations

import importlib
from typing import Any

from sftkit.registry.records import SFTRecord, VerifyProblem

__all__ = ["Registry", "SFTRecord", "VerifyProblem"]


def __getattr__(name: str) -> Any:
    if name == "Registry":
        return importlib.import_module("sftkit.registry.core").Registry
    raise AttributeError(f"module 'sftkit.registry' has no attribute {name!r}")
