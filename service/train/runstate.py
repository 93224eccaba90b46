"""`RunState`: where a run stands — the trainer's live progress and exactly what a checkpoint
saves as `trainer_state.json` (the tensors — adapter, optimizer, RNG — sit beside it).

The Trainer keeps one `RunState` and mutates it; `checkpoint.save_checkpoint` writes it with
`to_json()` and `load_checkpoint` reads it back with `from_json()`. Format 2 added the fp16 loss
scaler's state and the count of skipped steps; a format-1 file (written before) reads with
those at their defaults, so older checkpoints still resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass
class RunState:
    """Progress after optimizer step `step` (0 = nothing trained yet)."""

    step: int = 0
    total_steps: int = 0
    epoch: int = 0  # current epoch (0-based)
    index_in_epoch: int = 0  # examples of the epoch's shuffled order already consumed
    micro_batch_size: int = 1  # in use now (the OOM fallback may have halved it)
    grad_accum: int = 1
    n_examples: int = 0  # rows of training data (packed rows when packing)
    seed: int = 0
    base_model_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    loss_scaler: dict[str, Any] | None = None  # GradScaler state (fp16 compute only)
    skipped_steps: int = 0  # optimizer steps skipped on overflowing fp16 gradients
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "RunState":
        """Read a saved state; raises ValueError for an unknown format or unknown fields."""
        version = raw.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"format_version {version}, this trainer reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        return cls(**raw)
