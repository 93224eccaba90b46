"""The service's state (tenants, tokens, models, files, jobs, events, checkpoints, adapters) in
any SQLAlchemy database, SQLite by default; `Store` is the facade (see `store.py`).

The schema is managed by Alembic: the models are in schema.py (and federations.py), the
revisions in migrations/versions/, and every `Store` start brings its database to the newest
revision (`db.migrate`; a database from a newer lorapool raises `SchemaError`). To change the
schema, edit the models and run `python -m lorapool.service.store.migrate revision -m "…"`
(see migrate.py and db.py's docstring).
"""

from .db import SchemaError
from .records import (
    ACTIVE,
    TERMINAL,
    AdapterRecord,
    CheckpointRecord,
    EvaluationRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    MergeRecord,
    ModelEntry,
)
from .store import NotFound, Store, new_id

__all__ = [
    "ACTIVE", "TERMINAL", "AdapterRecord", "CheckpointRecord", "EventRecord", "FileRecord",
    "JobRecord", "ModelEntry", "NotFound", "Store", "new_id",
    "EvaluationRecord", "MergeRecord", "SchemaError",
]
