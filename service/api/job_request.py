"""The body of POST /v1/fine_tuning/jobs and how it becomes the trainer's `TrainSpec`.

The OpenAI fields (`model`, `training_file`, `hyperparameters` …) plus lorapool's own (`lora`,
`quantization`, `max_seq_len` …). Bounds are checked here, so an absurd value is a 400 naming
the parameter before anything is stored. `"auto"` hyperparameters get lorapool's defaults.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorapool.types import JobPlacement, LoraParams

from ..store import ModelEntry
from ..train.spec import FastSpec, TrainSpec
from .errors import bad_request, from_pydantic

DEFAULT_N_EPOCHS = 3
DEFAULT_BATCH_SIZE = 8
BASE_LEARNING_RATE = 2e-4  # learning_rate_multiplier 1.0 means this
MAX_MICRO_BATCH_DEFAULT = 4  # when the client names none; auto-fit may shrink it further


# The bounds are types (not validators), so the OpenAPI schema states them: a client or
# fuzzer that follows the schema is not refused.
Epochs = Annotated[int, Field(ge=1, le=100)]
BatchSize = Annotated[int, Field(ge=1, le=1024)]
# allow_inf_nan=False: NaN compares false with every bound; refuse it by name.
LrMultiplier = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16, description="OpenAI's limits: 16 pairs, keys up to 64 characters, "
          "values up to 512"),
]
# "NODE:NAME", or {"node": ..., "name": ...}
DatasetRef = Union[
    Annotated[str, Field(min_length=1, max_length=256)],
    Annotated[dict[Annotated[str, Field(max_length=32)], Annotated[str, Field(max_length=256)]],
              Field(max_length=4)],
]


# Names a tracker shows (projects, runs, tags): printable, no path separators or control chars.
TrackerName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.:@+-]*$")]


class WandbIn(BaseModel):
    """W&B: logged by the server (offline mode unless its admin configures W&B), never a node."""

    model_config = ConfigDict(extra="forbid")
    project: TrackerName
    name: Optional[TrackerName] = None
    entity: Optional[TrackerName] = None
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=16)


class MlflowIn(BaseModel):
    """MLflow: a tracking URI (a path or file: URI, checked against the server's data dir when the
    job runs, or an http(s) server the admin allows); none: a file store under the data dir."""

    model_config = ConfigDict(extra="forbid")
    tracking_uri: Optional[str] = Field(None, min_length=1, max_length=512)
    experiment: TrackerName = "lorapool"
    run_name: Optional[TrackerName] = None

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        if any(ord(c) < 32 for c in v):
            raise ValueError("must not contain control characters")
        scheme = v.split(":", 1)[0].lower() if "://" in v or v.startswith("file:") else ""
        if scheme not in ("", "file", "http", "https"):
            raise ValueError("must be a path, a file: URI or an http(s):// server URI")
        if scheme in ("", "file") and ".." in v.replace("\\", "/").split("/"):
            raise ValueError("must not contain '..'")
        return v


class WandbIntegration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["wandb"]
    wandb: WandbIn


class MlflowIntegration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["mlflow"]
    mlflow: MlflowIn


Integration = Annotated[Union[WandbIntegration, MlflowIntegration], Field(discriminator="type")]


class HyperparametersIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Union[Literal["auto"], Epochs] = Field("auto", description="1–100")
    batch_size: Union[Literal["auto"], BatchSize] = Field("auto", description="1–1024")
    learning_rate_multiplier: Union[Literal["auto"], LrMultiplier] = Field(
        "auto", description="(0, 100]")


class _Supervised(BaseModel):
    model_config = ConfigDict(extra="allow")
    hyperparameters: Optional[HyperparametersIn] = None


class MethodIn(BaseModel):
    """OpenAI's `method`; lorapool trains supervised (SFT) only."""

    model_config = ConfigDict(extra="allow")
    type: Literal["supervised"] = "supervised"
    supervised: Optional[_Supervised] = None


class CreateJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=128)
    # One of training_file (an uploaded file) or dataset (a node-local data set, "NODE:NAME").
    training_file: Optional[str] = Field(None, min_length=1, max_length=64)
    dataset: Optional[DatasetRef] = None
    init_adapter: Optional[str] = Field(None, min_length=1, max_length=64)
    validation_file: Optional[str] = Field(None, min_length=1, max_length=64)
    hyperparameters: Optional[HyperparametersIn] = None
    suffix: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    metadata: Optional[Metadata] = None
    integrations: Optional[list[Integration]] = Field(
        None, max_length=4, description="experiment trackers the server logs the job to: "
        '{"type": "wandb", "wandb": {...}} or {"type": "mlflow", "mlflow": {...}}')
    method: Optional[MethodIn] = None
    # lorapool's own.
    lora: Optional[LoraParams] = None
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"
    max_seq_len: int = Field(1024, ge=8, le=32768)
    micro_batch_size: Optional[int] = Field(None, ge=1, le=1024)
    learning_rate: Optional[float] = Field(None, gt=0, le=1.0, allow_inf_nan=False)
    checkpoint_every: Optional[int] = Field(None, ge=1, le=1_000_000)
    placement: Optional[JobPlacement] = None
    # The trainer's fast path on CUDA nodes: "auto" (default), "off" (the reference path), or
    # per-piece switches ({"offload_activations": "off", ...}); see TrainSpec.fast.
    fast: Optional[Union[Literal["auto", "off"], FastSpec]] = None

    def effective_hyperparameters(self) -> HyperparametersIn:
        hp = self.hyperparameters
        if self.method is not None and self.method.supervised is not None:
            if self.method.supervised.hyperparameters is not None:
                if hp is not None:
                    raise bad_request("give hyperparameters either at the top level or in "
                                      "method.supervised, not both", param="hyperparameters")
                hp = self.method.supervised.hyperparameters
        return hp or HyperparametersIn()


# TrainSpec field → request param, for errors raised while building the spec.
SPEC_PARAM = {
    "n_epochs": "hyperparameters.n_epochs",
    "batch_size": "hyperparameters.batch_size",
    "micro_batch_size": "micro_batch_size",
    "learning_rate": "learning_rate",
    "max_seq_len": "max_seq_len",
    "lora": "lora",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
    "quantization": "quantization",
    "fast": "fast",
}


def _default_micro_batch(batch_size: int) -> int:
    return max(d for d in range(1, min(batch_size, MAX_MICRO_BATCH_DEFAULT) + 1)
               if batch_size % d == 0)


def resolve(req: CreateJobRequest, model: ModelEntry) -> tuple[TrainSpec, dict[str, Any]]:
    """The TrainSpec for this request on this model, and the resolved hyperparameters."""
    hp = req.effective_hyperparameters()
    n_epochs = DEFAULT_N_EPOCHS if hp.n_epochs == "auto" else int(hp.n_epochs)
    batch_size = DEFAULT_BATCH_SIZE if hp.batch_size == "auto" else int(hp.batch_size)
    if req.learning_rate is not None and hp.learning_rate_multiplier != "auto":
        raise bad_request("give learning_rate or hyperparameters.learning_rate_multiplier, not "
                          "both", param="learning_rate")
    if req.learning_rate is not None:
        lr = float(req.learning_rate)
    else:
        mult = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
        lr = BASE_LEARNING_RATE * mult
    micro = req.micro_batch_size or _default_micro_batch(batch_size)
    if micro > batch_size:
        raise bad_request(f"micro_batch_size ({micro}) exceeds the batch size ({batch_size})",
                          param="micro_batch_size")
    if batch_size % micro:
        raise bad_request(f"the batch size ({batch_size}) must be a multiple of "
                          f"micro_batch_size ({micro})", param="micro_batch_size")
    fields: dict[str, Any] = dict(
        base_model=model.path,
        base_model_id=model.name,
        trust_remote_code=model.trust_remote_code,
        quantization=req.quantization,
        max_seq_len=req.max_seq_len,
        n_epochs=n_epochs,
        batch_size=batch_size,
        micro_batch_size=micro,
        learning_rate=lr,
        seed=42 if req.seed is None else req.seed,
        checkpoint_every=req.checkpoint_every,
    )
    if req.lora is not None:
        fields["lora"] = req.lora.model_dump()
    if req.fast is not None:
        fields["fast"] = req.fast if isinstance(req.fast, str) else req.fast.model_dump()
    try:
        spec = TrainSpec(**fields)
    except ValidationError as exc:
        raise from_pydantic(exc, SPEC_PARAM) from exc
    pl = req.placement
    if pl is not None and pl.min_seq_len is not None and pl.min_seq_len > spec.max_seq_len:
        raise bad_request(f"placement.min_seq_len ({pl.min_seq_len}) exceeds max_seq_len "
                          f"({spec.max_seq_len})", param="placement.min_seq_len")
    if pl is not None and pl.min_workers is not None and pl.min_workers > pl.workers:
        raise bad_request(f"placement.min_workers ({pl.min_workers}) exceeds placement.workers "
                          f"({pl.workers})", param="placement.min_workers")
    if pl is not None and pl.workers > spec.batch_size:
        raise bad_request(f"placement.workers ({pl.workers}) exceeds the batch size "
                          f"({spec.batch_size}): every worker needs at least one row per step",
                          param="placement.workers")
    resolved = {"n_epochs": n_epochs, "batch_size": batch_size,
                "learning_rate_multiplier": lr / BASE_LEARNING_RATE}
    return spec, resolved


def check_workers(placement: dict[str, Any], executor: Any, spec: TrainSpec) -> None:
    """400 naming `placement.workers` / `placement.min_workers` when more workers are asked
    for than the pool has nodes that could ever hold the job (one worker per node).

    Each node is asked on its own (`check_fits` pinned to it); an empty pool says nothing yet,
    as for a single-worker job: donors may still join.
    """
    workers = int(placement.get("workers") or 1)
    if workers <= 1:
        return
    nodes = executor.nodes()
    if not nodes:
        return
    pinned = placement.get("node")
    names = [n.name for n in nodes if pinned is None or n.name == pinned]
    fitting = [name for name in names
               # `workers` stays: each worker holds one card (no split over a node's GPUs).
               if executor.check_fits(spec, {**placement, "node": name}) is None]
    if len(fitting) < workers:
        raise bad_request(
            f"placement.workers ({workers}) exceeds the {len(fitting)} node(s) of the pool that "
            f"could ever hold this job (one worker per node"
            f"{', node ' + pinned if pinned else ''})", param="placement.workers",
            code="too_many_workers")


def integrations(req: CreateJobRequest) -> list[dict[str, Any]]:
    """The request's integrations as stored on the job (and shown on the job object)."""
    return [i.model_dump(mode="json", exclude_none=True) for i in req.integrations or []]


def check_integrations(req: CreateJobRequest, tenant: str, data_dir: Any) -> None:
    """Refuse, before the job is stored, a tracker URI this server would not write to."""
    from ..pool.trackers import TrackerRefused, resolve_mlflow_uri

    for i, integ in enumerate(req.integrations or []):
        if isinstance(integ, MlflowIntegration):
            try:
                resolve_mlflow_uri(integ.mlflow.tracking_uri, data_dir, tenant)
            except TrackerRefused as exc:
                raise bad_request(f"Invalid 'integrations[{i}].mlflow.tracking_uri': {exc}",
                                  param=f"integrations[{i}].mlflow.tracking_uri") from exc
