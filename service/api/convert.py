"""Store records → the REST resources of `lorapool.types` (what clients and the openai SDK read)."""

from __future__ import annotations

from typing import Any, Optional, Sequence, TypeVar

from lorapool.types import (
    Adapter,
    FileObject,
    FineTuningJob,
    Hyperparameters,
    JobCheckpoint,
    JobError,
    JobEvent,
    JobPlacement,
    ListResponse,
    LoraParams,
    MemoryInfo,
    Model,
)

from ..store import (
    AdapterRecord,
    CheckpointRecord,
    EventRecord,
    FileRecord,
    JobRecord,
    ModelEntry,
)

T = TypeVar("T")


def job(rec: JobRecord) -> FineTuningJob:
    error = None
    if rec.error_code or rec.error_message:
        error = JobError(code=rec.error_code or "error", message=rec.error_message or "",
                         param=rec.error_param)
    hp = {k: v for k, v in rec.hyperparameters.items() if k in Hyperparameters.model_fields}
    return FineTuningJob(
        id=rec.id,
        model=rec.model,
        created_at=rec.created_at,
        finished_at=rec.finished_at,
        fine_tuned_model=rec.fine_tuned_model,
        organization_id=rec.tenant,
        result_files=list(rec.result_files),
        status=rec.status,  # type: ignore[arg-type]
        training_file=rec.training_file,
        validation_file=rec.validation_file,
        hyperparameters=Hyperparameters(**hp),
        trained_tokens=rec.trained_tokens,
        error=error,
        seed=rec.seed,
        # Only a running job has one (OpenAI's meaning); pool/progress.py keeps it current.
        estimated_finish=rec.estimated_finish if rec.status == "running" else None,
        integrations=list(rec.integrations),
        metadata=rec.metadata,
        suffix=rec.suffix,
        lora=LoraParams(**rec.lora) if rec.lora else LoraParams(),
        quantization=rec.quantization,  # type: ignore[arg-type]
        max_seq_len=rec.max_seq_len,
        micro_batch_size=rec.micro_batch_size,
        learning_rate=rec.learning_rate,
        checkpoint_every=rec.checkpoint_every,
        placement=JobPlacement(**rec.placement) if rec.placement else None,
        dataset=f"{rec.dataset['node']}:{rec.dataset['name']}" if rec.dataset else None,
        init_adapter=rec.init_adapter,
        node_id=rec.node_id,
        attempt=rec.attempt,
        step=rec.step,
        total_steps=rec.total_steps,
        memory=MemoryInfo(predicted_bytes=rec.predicted_memory,
                          measured_peak_bytes=rec.measured_peak_memory,
                          breakdown=dict(rec.memory_breakdown or {})),
    )


def event(rec: EventRecord) -> JobEvent:
    return JobEvent(id=rec.id, created_at=rec.created_at, level=rec.level,  # type: ignore[arg-type]
                    message=rec.message, type=rec.type, data=rec.data)  # type: ignore[arg-type]


def checkpoint(rec: CheckpointRecord, job_rec: JobRecord) -> JobCheckpoint:
    metrics: dict[str, Optional[float]] = {}
    for k, v in (rec.metrics or {}).items():
        if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            metrics[k] = None if v is None else float(v)
    return JobCheckpoint(
        id=rec.id,
        created_at=rec.created_at,
        fine_tuned_model_checkpoint=f"{job_rec.model}:{job_rec.id}:ckpt-step-{rec.step}",
        step_number=rec.step,
        metrics=metrics,
        fine_tuning_job_id=rec.job_id,
    )


def file(rec: FileRecord) -> FileObject:
    return FileObject(id=rec.id, bytes=rec.bytes, created_at=rec.created_at,
                      filename=rec.filename, purpose=rec.purpose, status="processed",
                      examples=rec.examples, sha256=rec.sha256)


def model(entry: ModelEntry) -> Model:
    return Model(id=entry.name, created=entry.created_at, owned_by="lorapool")


def adapter(rec: AdapterRecord) -> Adapter:
    return Adapter(id=rec.id, created_at=rec.created_at, base_model=rec.base_model,
                   base_model_sha256=rec.base_model_sha256, job_id=rec.job_id, bytes=rec.bytes,
                   sha256=rec.sha256, metrics=dict(rec.metrics or {}))


def page(items: Sequence[Any], has_more: bool = False) -> ListResponse[Any]:
    return ListResponse[Any](
        data=list(items),
        has_more=has_more,
        first_id=items[0].id if items else None,
        last_id=items[-1].id if items else None,
    )


def slice_page(items: Sequence[Any], after: Optional[str], limit: int,
               what: str) -> ListResponse[Any]:
    """Cursor pagination over a list already in memory (models, nodes, checkpoints)."""
    from .errors import bad_request

    start = 0
    if after is not None:
        ids = [i.id for i in items]
        if after not in ids:
            raise bad_request(f"'after' names no {what} in this list: '{after}'", param="after")
        start = ids.index(after) + 1
    chunk = list(items[start:start + limit])
    return page(chunk, has_more=start + limit < len(items))
