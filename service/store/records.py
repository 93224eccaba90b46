"""The plain records the `Store` hands out: detached pydantic copies of database rows.

Callers (API handlers, the scheduler's thread) get values, never live ORM objects, so nothing
lazy-loads behind their back and a record can cross threads freely. Times are Unix seconds.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"validating_files", "queued", "running"})


class _Record(BaseModel):
    model_config = ConfigDict(from_attributes=True, extra="forbid")


class ModelEntry(_Record):
    """A base model the admin registered (or a built-in one): a name clients use, a path only
    the head sees."""

    name: str
    path: str  # an HF folder or a .gguf file on the head
    format: Literal["hf", "gguf"]
    sha256: str  # of the .gguf file, or over the folder's files in a stable order
    bytes: int = 0
    trust_remote_code: bool = False  # the folder has an auto_map and the admin allowed it
    builtin: bool = False
    created_at: int = Field(default_factory=lambda: int(time.time()))


class FileRecord(_Record):
    id: str
    tenant: str
    filename: str
    bytes: int
    sha256: str
    purpose: str
    created_at: int
    examples: Optional[int] = None
    format: Optional[str] = None
    artifact_id: str


class JobRecord(_Record):
    """Every field of the REST `FineTuningJob` plus what the service keeps about the run."""

    id: str
    tenant: str
    model: str
    model_sha256: Optional[str] = None
    status: str = "queued"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    started_at: Optional[int] = None
    finished_at: Optional[int] = None
    fine_tuned_model: Optional[str] = None
    training_file: Optional[str] = None
    validation_file: Optional[str] = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    trained_tokens: Optional[int] = None
    seed: int = 42
    estimated_finish: Optional[int] = None
    # Experiment trackers (wandb, mlflow) the server logs this job to; see pool/trackers.py.
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: Optional[dict[str, str]] = None
    suffix: Optional[str] = None
    result_files: list[str] = Field(default_factory=list)
    # lorapool's own request fields.
    lora: dict[str, Any] = Field(default_factory=dict)
    quantization: str = "nf4"
    max_seq_len: int = 1024
    micro_batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    checkpoint_every: Optional[int] = None
    # Where it may run (lorapool.types.JobPlacement fields; empty: anywhere it fits).
    placement: dict[str, Any] = Field(default_factory=dict)
    # A node-local data set instead of `training_file`: {"node", "name", "examples"}; the data
    # stays on that node (the job is pinned there through `placement.node`).
    dataset: Optional[dict[str, Any]] = None
    # An adapter id whose weights the LoRA modules start from (federated rounds).
    init_adapter: Optional[str] = None
    # The resolved TrainSpec fields, except `base_model` (a head path the scheduler fills in).
    spec: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: Optional[str] = None
    # The run.
    cancel_requested: bool = False
    node_id: Optional[str] = None
    attempt: int = 0
    step: Optional[int] = None
    total_steps: Optional[int] = None
    predicted_memory: Optional[int] = None
    measured_peak_memory: Optional[int] = None
    memory_breakdown: dict[str, int] = Field(default_factory=dict)
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    error_param: Optional[str] = None
    adapter_id: Optional[str] = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class EventRecord(_Record):
    id: str
    job_id: str
    # The row's position (autoincrement, commit order): followers use it to join a catch-up
    # read with the live feed without a gap or a duplicate. 0 for a record not from the store.
    seq: int = 0
    created_at: int
    level: str = "info"
    type: str = "message"
    message: str
    data: Optional[dict[str, Any]] = None


class JobStatusChange(_Record):
    """Published (never stored) when a job's status changes: followers of the job's event
    stream learn from it that the job ended, without asking the database."""

    job_id: str
    status: str

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class CheckpointRecord(_Record):
    id: str
    job_id: str
    step: int
    artifact_id: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: int


class AdapterRecord(_Record):
    id: str
    tenant: str
    base_model: str
    base_model_sha256: Optional[str] = None
    job_id: Optional[str] = None
    artifact_id: str
    bytes: int = 0
    sha256: Optional[str] = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: int


# -- merges and evaluations (pool tasks) ------------------------------------------------------

TASK_STATUSES = ("queued", "running", "succeeded", "failed")
TASK_TERMINAL = frozenset({"succeeded", "failed"})


class _TaskRecord(_Record):
    id: str
    tenant: str
    status: str = "queued"
    idempotency_key: Optional[str] = None
    created_at: int = Field(default_factory=lambda: int(time.time()))
    started_at: Optional[int] = None
    finished_at: Optional[int] = None
    node: Optional[str] = None
    attempt: int = 0
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    error_param: Optional[str] = None

    @property
    def terminal(self) -> bool:
        return self.status in TASK_TERMINAL


class MergeRecord(_TaskRecord):
    """A merge of adapters as asked (`adapters`, `method`, `weights`, `params`) and as done."""

    method: str
    adapters: list[str] = Field(default_factory=list)
    weights: Optional[list[float]] = None  # None: the adapters' sample counts (FedAvg)
    params: dict[str, Any] = Field(default_factory=dict)  # merge_adapters' keyword arguments
    name: Optional[str] = None
    suffix: Optional[str] = None
    evaluate_on: Optional[str] = None  # a file id: evaluate the result on it when done
    result_adapter: Optional[str] = None
    applied_weights: Optional[list[float]] = None
    rank: Optional[int] = None
    relative_error: Optional[float] = None
    deviation_from_exact: Optional[float] = None
    evaluation_id: Optional[str] = None


class EvaluationRecord(_TaskRecord):
    """Held-out loss of base model `model` (+ `adapter_id`, when given) on file `file_id`."""

    model: str
    model_sha256: Optional[str] = None
    adapter_id: Optional[str] = None
    file_id: str
    params: dict[str, Any] = Field(default_factory=dict)  # quantization, max_seq_len, …
    merge_id: Optional[str] = None
    loss: Optional[float] = None
    perplexity: Optional[float] = None
    tokens: Optional[int] = None
    examples: Optional[int] = None
