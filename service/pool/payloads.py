"""What travels to a node for one job attempt: data and Ray object refs, never a head path.

`PayloadBuilder` reads the job's model, data files, resume checkpoint and starting adapter from
the store and the artifact store and packs them as `Blob`s (content key + files as Ray
objects), which the runner materialises into its node's own cache (runner.py, transfer.py).
"""

from __future__ import annotations

from typing import Any, Optional, TypedDict

import ray

from .model_objects import ModelObjects


class Blob(TypedDict, total=False):
    """A folder or file set by content key; `entry` names the file to use (gguf / jsonl)."""

    key: str
    files: dict[str, Any]  # relpath → Ray ObjectRef (or bytes)
    entry: str


class Payload(TypedDict, total=False):
    """The argument of a runner's `run()`."""

    spec: dict[str, Any]  # TrainSpec fields less base_model (the runner sets its local path)
    model: Blob
    data: Optional[Blob]
    validation: Optional[Blob]
    resume: Optional[Blob]
    attempt: int
    dataset: Optional[str]  # a node-local data set, by name only
    init_adapter: Optional[Blob]
    device_kind: str  # multi-worker jobs only: the chosen node's device kind
    # What the scheduler reserved on the node (the placement's estimate and the CUDA context it
    # counted): the trainer keeps within it (spec.MemoryBudget).
    memory_budget: dict[str, Any]
    # A job split over several GPUs of the node (multi_gpu.NodeSplit.split_spec(), as a dict):
    # the runner's train() loads the model split over them. Absent for a one-card job.
    split: dict[str, Any]


def memory_budget(estimate: Any) -> dict[str, Any]:
    """The `memory_budget` entry of a payload for a placement `estimate` (a MemoryEstimate)."""
    return {"total": int(estimate.total),
            "context_bytes": estimate.breakdown.get("cuda_context")}


class PayloadBuilder:
    """Builds `Payload`s from the store and the artifact store; see the module docstring."""

    def __init__(self, store: Any, artifacts: Any, models: ModelObjects) -> None:
        self.store = store
        self.artifacts = artifacts
        self.models = models

    def build(self, job: Any, placement: Any) -> tuple[Payload, int]:
        """The payload for `job` placed as `placement`, and the step it resumes from (0: none)."""
        model = self.store.get_model(job.model)
        resume, resume_step = self.resume(job.id)
        spec_fields = placement.spec.model_dump(mode="json")
        spec_fields.pop("base_model")
        payload: Payload = {
            "spec": spec_fields,
            "model": self.model(model),
            "data": self.file(job.training_file),
            "validation": self.file(job.validation_file),
            "resume": resume,
            "attempt": int(getattr(job, "attempt", 0) or 0),
            # A node-local data set travels by name only; the runner opens it on its node.
            "dataset": (getattr(job, "dataset", None) or {}).get("name"),
            "init_adapter": self.adapter(getattr(job, "init_adapter", None)),
            "memory_budget": memory_budget(placement.estimate),
        }
        return payload, resume_step

    def model(self, model: Any) -> Blob:
        return self.models.payload(model)

    def file(self, file_id: Optional[str]) -> Optional[Blob]:
        """An uploaded data file, as one Ray object."""
        if not file_id:
            return None
        rec = self.store.get_file(file_id)
        data = self.artifacts.read_bytes(rec.artifact_id)
        return {"key": rec.sha256, "files": {"data.jsonl": ray.put(data)}, "entry": "data.jsonl"}

    def resume(self, job_id: str) -> tuple[Optional[Blob], int]:
        """The job's latest stored checkpoint and its step, or (None, 0)."""
        checkpoints = self.store.list_checkpoints(job_id)
        if not checkpoints:
            return None, 0
        last = max(checkpoints, key=lambda c: c.step)
        return self.folder(last.artifact_id), last.step

    def adapter(self, adapter_id: Optional[str]) -> Optional[Blob]:
        """An adapter to start from, as bytes like a resume checkpoint (federated rounds)."""
        if not adapter_id:
            return None
        return self.folder(self.store.get_adapter(adapter_id).artifact_id)

    def folder(self, artifact_id: str) -> Blob:
        """A stored folder (checkpoint, adapter) as Ray objects, keyed by its content id."""
        return {"key": artifact_id.replace(":", "-"),
                "files": {n: ray.put(b) for n, b in self.artifacts.read_files(artifact_id).items()}}
