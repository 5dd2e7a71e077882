"""Schema versions: migrations build exactly the ORM schema; old, new and foreign databases are refused clearly."""

from __future__ import annotations

import pytest
from registry_helpers import BACKENDS, backend_url, tiny_sft
from sqlalchemy import create_engine, text

from sftkit.errors import BadInputError, SftkitError
from sftkit.registry import Registry
from sftkit.registry.database import HEAD, SCHEMA_REVISIONS


@pytest.fixture(params=BACKENDS)
def url(request, sftkit_home):
    sftkit_home.mkdir()
    with backend_url(request.param) as backend:
        yield backend or f"sqlite:///{sftkit_home / 'registry.db'}"


def alembic_config(connection):
    from alembic.config import Config

    from sftkit.registry.database import _MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def test_revisions_in_code_match_the_migration_scripts():
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config(None))
    history = [script.revision for script in reversed(list(scripts.walk_revisions()))]
    assert tuple(history) == SCHEMA_REVISIONS and scripts.get_current_head() == HEAD


def test_migrations_build_exactly_the_orm_schema(url, sftkit_home):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from sftkit.registry.schema import Base

    with Registry.open(home=sftkit_home, url=url) as registry:
        assert registry.find() == []  # first use creates the schema
        assert registry.status()["revision"] == HEAD
        with registry.db.engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_an_old_schema_is_refused_until_db_upgrade(url, sftkit_home):
    from alembic import command

    with Registry.open(home=sftkit_home, url=url) as registry:
        record = registry.add(tiny_sft("ace", seed=1), tags=["best"])
        with registry.db.engine.begin() as connection:
            command.downgrade(alembic_config(connection), SCHEMA_REVISIONS[0])

    with Registry.open(home=sftkit_home, url=url) as registry:
        status = registry.status()
        assert (status["revision"], status["up_to_date"]) == (SCHEMA_REVISIONS[0], False)
        with pytest.raises(BadInputError, match=rf"revision 0001, this sftkit needs {HEAD}: run `sftkit db upgrade`"):
            registry.find()
        with pytest.raises(BadInputError, match="sftkit db upgrade"):
            registry.add(tiny_sft("ace", seed=2))
        assert registry.upgrade() == (SCHEMA_REVISIONS[0], HEAD)
        assert registry.resolve("ace@best").sha256 == record.sha256  # data survived the round trip
        assert registry.upgrade() == (HEAD, HEAD)


def test_a_newer_schema_asks_to_upgrade_sftkit(url, sftkit_home):
    with Registry.open(home=sftkit_home, url=url) as registry:
        registry.find()
        with registry.db.engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with Registry.open(home=sftkit_home, url=url) as registry, pytest.raises(SftkitError, match="upgrade sftkit"):
        registry.find()


def test_a_database_of_something_else_is_left_alone(url, sftkit_home):
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE customers (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with Registry.open(home=sftkit_home, url=url) as registry:
        with pytest.raises(BadInputError, match=r"already holds tables \(customers\) but no sftkit schema"):
            registry.find()
        with pytest.raises(BadInputError, match="no sftkit schema"):
            registry.upgrade()


def test_a_store_is_never_shared_by_two_databases(sftkit_home, tmp_path):
    with Registry.open(home=sftkit_home) as registry:
        registry.add(tiny_sft("ace", seed=1))
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with Registry.open(home=sftkit_home, url=other) as registry:
        with pytest.raises(BadInputError, match="belongs to another registry database"):
            registry.add(tiny_sft("ban", seed=2))
        with pytest.raises(BadInputError, match="belongs to another registry database"):
            registry.gc()  # would otherwise delete lang:ace@1's artifact
    with Registry.open(home=sftkit_home) as registry:
        assert registry.verify() == [] and len(registry.find()) == 1
