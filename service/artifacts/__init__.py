"""Content-addressed storage of datasets, checkpoints and adapters (see `store.py`)."""

from .store import (
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    ArtifactTooLarge,
    ArtifactWriter,
)

__all__ = [
    "ArtifactError", "ArtifactNotFound", "ArtifactStore", "ArtifactTooLarge", "ArtifactWriter",
]
