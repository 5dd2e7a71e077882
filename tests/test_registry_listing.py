"""The SQLAlchemy-free listing (``sftkit.registry.listing``): the same records as ``Registry.find``, or a fallback."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from registry_helpers import tiny_sft

from sftkit.errors import BadInputError, SftkitError
from sftkit.registry import Registry
from sftkit.registry.listing import SQLiteListing, open_listing
from sftkit.registry.location import SCHEMA_REVISIONS
from sftkit.registry.query import SORT_KEYS

ROOT = Path(__file__).parents[1]


@pytest.fixture
def varied(sftkit_home) -> Path:
    """Languages and tasks on two bases, three methods, shared alias names, JSON metadata, a removal."""
    with Registry.open() as registry:
        source = registry.add(tiny_sft("id", seed=1, rank="90var", metrics={"val_loss": 1.25}), tags=["paper"])
        registry.add(tiny_sft("sa", kind="task", seed=2, metrics={"macro_f1": 0.7}), source=source, tags=["best"])
        registry.add(tiny_sft("ace", seed=3, method="deftx", keep=0.05, k=40), tags=["best", "paper"])
        registry.add(tiny_sft("ace", seed=4, method="lt-sft", rank="none"))
        registry.add(tiny_sft("ace", seed=5, base_model="other", fingerprint="sha256:o", trainer={"epochs": 3}))
        registry.add(tiny_sft("nli", kind="task", seed=6, method="lt-sft"))
        registry.add(tiny_sft("ban", seed=7, base_model=None, fingerprint=None))
        registry.add(tiny_sft("ace", seed=8))
        registry.remove("lang:ace@2")
        registry.tag("lang:ace@3", "best")  # moves the alias within the series
    return sftkit_home


FILTERS = [
    {},
    {"kind": "lang"},
    {"kind": "task"},
    {"language": "ace"},
    {"language": "ace", "base_model": "tiny-base"},
    {"task": "sa"},
    {"method": "lt-sft"},
    {"method": "deftx", "kind": "language"},
    {"tag": "best"},
    {"tag": "paper", "language": "id"},
    {"base_model": "nope"},
]


def test_the_listing_returns_exactly_what_registry_find_returns(varied):
    listing = open_listing()
    assert isinstance(listing, SQLiteListing)
    compared = 0
    with Registry.open() as registry:
        assert listing.url == registry.url
        cases = itertools.product(FILTERS, SORT_KEYS, (True, False), (None, 1, 3))
        for filters, sort, descending, limit in cases:
            query = dict(filters, sort=sort, descending=descending, limit=limit)
            ours = [record.to_dict() for record in listing.find(**query)]
            assert ours == [record.to_dict() for record in registry.find(**query)], query
            compared += len(ours)
        everything = listing.find()
    listing.close()
    assert compared > 1000
    assert sorted((r.reference, r.base_model) for r in everything) == [
        ("lang:ace@1", "other"), ("lang:ace@1", "tiny-base"), ("lang:ace@3", "tiny-base"),
        ("lang:ban@1", None), ("lang:id@1", "tiny-base"), ("task:nli@1", "tiny-base"), ("task:sa@1", "tiny-base"),
    ]  # fmt: skip
    by_reference = {r.reference: r for r in everything if r.base_model != "other"}
    assert by_reference["lang:ace@3"].tags == ("best",) and by_reference["lang:ace@1"].tags == ("paper",)
    assert by_reference["task:sa@1"].metrics == {"macro_f1": 0.7} and by_reference["lang:ban@1"].base_model is None
    assert all(r.created.tzinfo is not None and (r.path / "sft_config.json").is_file() for r in everything)


def test_bad_filters_are_the_same_clear_errors(varied):
    listing = open_listing()
    for query, message in (({"sort": "colour"}, "cannot sort by 'colour'"), ({"kind": "model"}, "kind must be")):
        with pytest.raises(BadInputError, match=message):
            listing.find(**query)


def test_anything_but_a_current_sqlite_home_gets_the_full_registry(sftkit_home, tmp_path, monkeypatch):
    from alembic import command
    from test_registry_schema import alembic_config

    fresh = open_listing()  # no database yet: Registry creates it on first use
    assert isinstance(fresh, Registry) and fresh.find() == []
    fresh.close()
    assert isinstance(open_listing(url=f"sqlite:///{tmp_path / 'elsewhere.db'}"), Registry)
    monkeypatch.setenv("SFTKIT_REGISTRY_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert isinstance(open_listing(), Registry)
    monkeypatch.delenv("SFTKIT_REGISTRY_URL")

    with Registry.open() as registry:
        registry.add(tiny_sft("ace", seed=1))
        with registry.db.engine.begin() as connection:
            command.downgrade(alembic_config(connection), SCHEMA_REVISIONS[0])
    outdated = open_listing()
    assert isinstance(outdated, Registry)
    with pytest.raises(BadInputError, match="sftkit db upgrade"):
        outdated.find()


def test_sftkit_list_answers_without_importing_sqlalchemy(varied):
    script = (
        "import sys; from typer.testing import CliRunner; from sftkit.cli.main import app\n"
        "result = CliRunner().invoke(app, ['list', '--json', '--kind', 'task'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.stdout)\n"
        "print('sqlalchemy' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    assert [r["reference"] for r in json.loads(result.stdout)] == ["task:nli@1", "task:sa@1"]
    assert result.stderr.strip() == "False"


def test_a_database_failure_while_listing_is_one_clear_error(varied):
    import sqlite3

    listing = open_listing()
    with sqlite3.connect(varied / "registry.db") as connection:
        connection.execute("ALTER TABLE tags RENAME TO tags_gone")
    with pytest.raises(SftkitError, match=r"registry database error \(sqlite:///.*registry.db\): no such table: tags"):
        listing.find()
    listing.close()
