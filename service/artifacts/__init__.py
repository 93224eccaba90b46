"""Content-addressed storage of datasets, checkpoints and adapters (see `store.py`)."""

from .store import (
    ArtifactCorrupt,
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    ArtifactStoreFull,
    ArtifactTooLarge,
    ArtifactWriter,
)

__all__ = [
    "ArtifactCorrupt", "ArtifactError", "ArtifactNotFound", "ArtifactStore", "ArtifactStoreFull",
    "ArtifactTooLarge", "ArtifactWriter",
]
