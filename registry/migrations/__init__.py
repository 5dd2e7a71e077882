"""Alembic migrations of the registry schema (run through ``sftkit.registry.database``, no alembic.ini).

To add one: write ``versions/NNNN_what.py`` with ``down_revision`` = the previous head, update
``sftkit.registry.schema`` to match and append the revision to ``sftkit.registry.database.SCHEMA_REVISIONS``
(``tests/test_registry_schema.py`` checks all three agree).
"""
