"""Migration scripts, one per schema revision (loaded by alembic from this directory)."""
