"""The REST resources lorapool speaks, as pydantic models.

One source of truth for the wire format: the server builds its responses from these models and
the client parses them with the same models. The shapes are a superset of the OpenAI fine-tuning
API (`fine_tuning.job`, `fine_tuning.job.event`, `fine_tuning.job.checkpoint`, `file`, `model`,
`list`), so the official OpenAI SDK reads them unchanged; lorapool's own fields sit beside the
OpenAI ones and OpenAI clients ignore them.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

Quantization = Literal["nf4", "fp4", "int8", "none"]


class _Resource(BaseModel):
    # Unknown fields from a newer server must not break an older client.
    model_config = ConfigDict(extra="allow")


class LoraParams(BaseModel):
    """LoRA shape of a job. Mirrors the trainer's `LoraSpec`."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, le=1e5, description="LoRA scaling numerator (alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0: the fastest path)")
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False


class Hyperparameters(BaseModel):
    """The OpenAI `hyperparameters` object. `"auto"` lets lorapool choose."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Union[Literal["auto"], int] = "auto"
    batch_size: Union[Literal["auto"], int] = "auto"
    learning_rate_multiplier: Union[Literal["auto"], float] = "auto"


class JobError(BaseModel):
    code: str
    message: str
    param: Optional[str] = None


class MemoryInfo(BaseModel):
    """Predicted (by `estimate_memory`) and measured peak GPU memory of a job, in bytes."""

    predicted_bytes: Optional[int] = None
    measured_peak_bytes: Optional[int] = None
    breakdown: dict[str, int] = Field(default_factory=dict)


class JobPlacement(BaseModel):
    """Where a job may run (lorapool's own): the scheduler honours every field it is given."""

    model_config = ConfigDict(extra="forbid")

    node: Optional[str] = Field(None, min_length=1, max_length=128,
                                description="run only on this node (name)")
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="the node must carry every one of these labels")
    min_memory_gib: Optional[float] = Field(None, gt=0, le=4096,
                                            description="the node's GPU must have at least this")
    require_bf16: bool = False
    priority: int = Field(0, ge=-100, le=100, description="higher goes first within a tenant")
    min_seq_len: Optional[int] = Field(
        None, ge=8, le=32768, description="auto-fit may shorten max_seq_len down to this")
    allow_autofit: bool = Field(True, description="false: run exactly as submitted, or wait")
    # Data-parallel training (issue 10): each worker holds the 4-bit base and the adapter on
    # its own GPU; only LoRA gradients cross the network.
    workers: int = Field(1, ge=1, le=256, description="GPUs (nodes) to train on at once")
    min_workers: Optional[int] = Field(
        None, ge=1, le=256,
        description="go on with this many when donors leave (default: workers; the server "
        "refuses more than workers)")


class FineTuningJob(_Resource):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    model: str
    created_at: int
    finished_at: Optional[int] = None
    fine_tuned_model: Optional[str] = None
    organization_id: str
    result_files: list[str] = Field(default_factory=list)
    status: JobStatus
    training_file: Optional[str] = None
    validation_file: Optional[str] = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    trained_tokens: Optional[int] = None
    error: Optional[JobError] = None
    seed: int = 42
    estimated_finish: Optional[int] = None
    integrations: list[Any] = Field(default_factory=list)
    metadata: Optional[dict[str, str]] = None
    suffix: Optional[str] = None
    # lorapool's own fields.
    lora: LoraParams = Field(default_factory=LoraParams)
    quantization: Quantization = "nf4"
    max_seq_len: int = 1024
    micro_batch_size: Optional[int] = None
    learning_rate: Optional[float] = None
    checkpoint_every: Optional[int] = None
    placement: Optional[JobPlacement] = None
    dataset: Optional[str] = None  # "NODE:NAME": a node-local data set instead of training_file
    init_adapter: Optional[str] = None  # adapter id the LoRA modules started from
    node_id: Optional[str] = None
    attempt: int = 0
    step: Optional[int] = None
    total_steps: Optional[int] = None
    memory: MemoryInfo = Field(default_factory=MemoryInfo)


EventLevel = Literal["info", "warn", "error"]


class JobEvent(_Resource):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: EventLevel = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: Optional[dict[str, Any]] = None


class JobCheckpoint(_Resource):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Optional[float]] = Field(default_factory=dict)
    fine_tuning_job_id: str


class FileObject(_Resource):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str = "fine-tune"
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: Optional[str] = None
    # lorapool's own: what validation counted.
    examples: Optional[int] = None
    sha256: Optional[str] = None


class FileDeleted(_Resource):
    object: Literal["file"] = "file"
    id: str
    deleted: bool = True


class Model(_Resource):
    object: Literal["model"] = "model"
    id: str
    created: int
    owned_by: str = "lorapool"
    # GET /v1/models/{id} only: where it comes from, its content hash, the public (Hub) id its
    # exported adapters name, and whether the admin lets `models download` fetch it.
    source: Optional[Literal["builtin", "registered"]] = None
    format: Optional[str] = None
    sha256: Optional[str] = None
    bytes: Optional[int] = None
    public_id: Optional[str] = None
    downloadable: Optional[bool] = None


class Export(_Resource):
    """The state of a pool-built export (merged model, GGUF adapter, base download)."""

    object: Literal["export"] = "export"
    id: Optional[str] = None
    format: str
    status: str
    adapter: Optional[str] = None
    model: Optional[str] = None


class Adapter(_Resource):
    object: Literal["adapter"] = "adapter"
    id: str
    created_at: int
    base_model: str
    base_model_sha256: Optional[str] = None
    job_id: Optional[str] = None
    bytes: int = 0
    sha256: Optional[str] = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    # Sharing: the tenants it is shared with (shown to its owner only) and, for an adapter
    # shared with you, who owns it.
    shared_with: list[str] = Field(default_factory=list)
    owner: Optional[str] = None
    # A merged adapter: the merge that made it and the name it was given.
    merge_id: Optional[str] = None
    name: Optional[str] = None


class NodeDataset(BaseModel):
    """A node-local data set a donor offers (`lorapool donate --dataset NAME=PATH`): only its
    counts and validation errors ever leave the node, never its content or path."""

    model_config = ConfigDict(extra="allow")

    name: str
    examples: Optional[int] = None
    lines: Optional[int] = None
    format: Optional[str] = None
    valid: bool = False
    errors: list[str] = Field(default_factory=list)  # "line N: reason", as for an upload
    # The tenants the donor granted it to: the server's own business, never serialised.
    tenants: Optional[list[str]] = Field(None, exclude=True)


class NodeGpu(BaseModel):
    """One GPU of a node: a job too big for any one card may run split over a node's GPUs."""

    model_config = ConfigDict(extra="allow")

    index: int
    name: Optional[str] = None
    compute_capability: Optional[str] = None
    total_memory_bytes: int = 0
    free_memory_bytes: int = 0
    reserved_memory_bytes: int = 0  # what lorapool's jobs hold on this GPU


class Node(_Resource):
    object: Literal["node"] = "node"
    id: str
    name: str
    gpu_name: Optional[str] = None
    compute_capability: Optional[str] = None
    bf16: bool = False
    total_memory_bytes: int = 0
    free_memory_bytes: int = 0
    reserved_memory_bytes: int = 0
    state: Literal["idle", "training", "reclaimed", "offline"] = "idle"
    jobs: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    # Node-local data sets a job may name as `dataset: "NODE:NAME"` instead of a file.
    datasets: list[NodeDataset] = Field(default_factory=list)
    last_heartbeat: Optional[float] = None
    speed: Optional[float] = None  # measured TFLOP/s (a short matmul at join, refreshed idle)
    # Every GPU of the node (the fields above describe the one one-card jobs use); empty on a
    # CPU node.
    gpus: list[NodeGpu] = Field(default_factory=list)


class FederationParticipant(BaseModel):
    """One participant of a federation: a name, and its data — an uploaded file of the
    creator's, or a node-local data set ("NODE:NAME") that never leaves its node."""

    model_config = ConfigDict(extra="allow")

    name: str
    tenant: Optional[str] = None
    training_file: Optional[str] = None
    dataset: Optional[str] = None
    examples: Optional[int] = None
    weight: Optional[float] = None


class FederationRound(BaseModel):
    """One round: the jobs it ran, who took part, who dropped out (and why), its global
    adapter and metrics (aggregation weights, re-factorisation error, train loss)."""

    model_config = ConfigDict(extra="allow")

    round: int
    status: Literal["running", "completed", "failed", "cancelled"]
    started_at: float
    deadline_at: float
    finished_at: Optional[int] = None
    init_adapter: Optional[str] = None
    jobs: dict[str, str] = Field(default_factory=dict)  # participant → job id
    statuses: dict[str, str] = Field(default_factory=dict)
    took_part: list[str] = Field(default_factory=list)
    dropped: dict[str, str] = Field(default_factory=dict)  # participant → reason
    global_adapter: Optional[str] = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    error: Optional[str] = None


FederationStatus = Literal["running", "succeeded", "failed", "cancelled"]


class Federation(_Resource):
    object: Literal["federation"] = "federation"
    id: str
    created_at: int
    finished_at: Optional[int] = None
    organization_id: str
    status: FederationStatus
    model: str
    participants: list[FederationParticipant] = Field(default_factory=list)
    rounds_total: int
    current_round: int = 0
    method: str
    params: dict[str, Any] = Field(default_factory=dict)
    min_quorum: int
    round_deadline_s: float
    local_steps: Optional[int] = None
    local_epochs: Optional[int] = None
    rounds: list[FederationRound] = Field(default_factory=list)
    global_adapter: Optional[str] = None  # the latest round's
    error: Optional[JobError] = None


T = TypeVar("T")


class ListResponse(_Resource, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: Optional[str] = None
    last_id: Optional[str] = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- merges and evaluations (lorapool's own) --------------------------------------------------

TaskStatus = Literal["queued", "running", "succeeded", "failed"]
TASK_TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed"})


class Merge(_Resource):
    """A merge of adapters run on the pool (POST /v1/merges); its result is a new adapter."""

    object: Literal["merge"] = "merge"
    id: str
    created_at: int
    started_at: Optional[int] = None
    finished_at: Optional[int] = None
    status: TaskStatus
    adapters: list[str]
    method: str
    weights: Optional[list[float]] = None  # as asked; None: training-sample counts (FedAvg)
    applied_weights: Optional[list[float]] = None  # as applied (normalised)
    params: dict[str, Any] = Field(default_factory=dict)
    name: Optional[str] = None
    suffix: Optional[str] = None
    evaluate_on: Optional[str] = None
    result_adapter: Optional[str] = None
    rank: Optional[int] = None
    relative_error: Optional[float] = None  # svd methods: what truncation to the rank lost
    deviation_from_exact: Optional[float] = None
    evaluation_id: Optional[str] = None
    node: Optional[str] = None
    error: Optional[JobError] = None


class Evaluation(_Resource):
    """Held-out loss and perplexity of a base model (+ an adapter) on a file, run on the pool."""

    object: Literal["evaluation"] = "evaluation"
    id: str
    created_at: int
    started_at: Optional[int] = None
    finished_at: Optional[int] = None
    status: TaskStatus
    model: str
    adapter: Optional[str] = None  # None: the base model alone
    file: str
    params: dict[str, Any] = Field(default_factory=dict)
    merge_id: Optional[str] = None
    loss: Optional[float] = None
    perplexity: Optional[float] = None
    tokens: Optional[int] = None  # label tokens scored
    examples: Optional[int] = None
    node: Optional[str] = None
    error: Optional[JobError] = None
