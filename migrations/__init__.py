"""Alembic migrations for voxq's schema (`env.py`, `versions/`)."""

# The Postgres advisory lock every `alembic upgrade` (voxq migrate, voxq dev, tests) holds while it runs, so
# concurrent runs (two API replicas' init containers) take turns: the second finds the schema at head.
# "voxq_mig" in ASCII, a fixed 64-bit key no other voxq lock uses.
MIGRATION_LOCK_ID = 0x766F78715F6D6967
