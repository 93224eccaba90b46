"""The service's state (tenants, tokens, models, files, jobs, events, checkpoints, adapters) in
any SQLAlchemy database, SQLite by default; `Store` is the facade (see `store.py`)."""

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
    "EvaluationRecord", "MergeRecord",
]
