"""The store's Alembic migrations: `env.py`, the revision template and `versions/` (one file per
schema change, oldest first: `0001_baseline.py` is the schema as it stood when lorapool moved to
Alembic). Run through `lorapool.service.store.db.migrate` at store start and through
`python -m lorapool.service.store.migrate` by hand; see that module for how to add a revision.
"""
