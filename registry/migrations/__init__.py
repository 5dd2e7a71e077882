"""Alembic migrations of the registry schema (run through ``registry.database``, no alembic.ini).

To add one: write ``versions/NNNN_what.py`` with ``down_revision`` = the previous head, update
``registry.schema`` to match and append the revision to ``registry.database.SCHEMA_REVISIONS``
(``tests/test_registry_schema.py`` checks all three agree).
"""
