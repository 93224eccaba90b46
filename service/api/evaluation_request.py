"""How an evaluation is asked for and resolved into the trainer's spec fields.

Loss numbers only compare when the base model is loaded and the data tokenized the same way, so
an evaluation defaults to what the adapter was trained with — its job's quantization,
max_seq_len and loss_on (for a merged adapter: its first input's, followed back through
merges) — and to lorapool's training defaults for the base model alone.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..store import AdapterRecord, FileRecord
from .context import AppContext
from .errors import bad_request

DEFAULTS = {"quantization": "nf4", "max_seq_len": 1024, "loss_on": "assistant"}
MAX_MERGE_DEPTH = 8


class EvaluationParams(BaseModel):
    """Optional settings of an evaluation (defaults: as the adapter was trained)."""

    model_config = ConfigDict(extra="forbid")

    quantization: Optional[Literal["nf4", "fp4", "int8", "none"]] = None
    max_seq_len: Optional[int] = Field(None, ge=8, le=32768)
    loss_on: Optional[Literal["assistant", "all"]] = None
    batch_size: int = Field(8, ge=1, le=256, description="examples per forward pass")


def check_eval_file(ctx: AppContext, owner: str, file_id: str, param: str) -> FileRecord:
    """The caller's own uploaded data file (validated when it was uploaded), else a 400."""
    rec = ctx.store.get_file(file_id, owner)
    if rec is None:
        raise bad_request(f"Invalid value for '{param}': no file with id '{file_id}' (upload it "
                          "with POST /v1/files first)", param=param, code="file_not_found")
    if rec.purpose != "fine-tune":
        raise bad_request(f"Invalid value for '{param}': file '{file_id}' has purpose "
                          f"'{rec.purpose}', not 'fine-tune'", param=param)
    return rec


def training_spec(ctx: AppContext, adapter: Optional[AdapterRecord]) -> dict[str, Any]:
    """The spec the adapter was trained with ({} when unknown)."""
    for _ in range(MAX_MERGE_DEPTH):
        if adapter is None:
            return {}
        if adapter.job_id:
            job = ctx.store.get_job(adapter.job_id)
            return dict(job.spec) if job is not None else {}
        merge = ctx.store.merge_for_adapter(adapter.id)
        if merge is None or not merge.adapters:
            return {}
        adapter = ctx.store.get_adapter(merge.adapters[0])
    return {}


def resolve_eval_params(ctx: AppContext, params: Optional[EvaluationParams],
                        adapter: Optional[AdapterRecord]) -> dict[str, Any]:
    """TrainSpec fields for the evaluation task (without the base model, which the pool
    fills in with the node-local copy)."""
    params = params or EvaluationParams()
    trained = training_spec(ctx, adapter)
    out = {}
    for key, default in DEFAULTS.items():
        value = getattr(params, key)
        out[key] = value if value is not None else trained.get(key, default)
    out["micro_batch_size"] = out["batch_size"] = params.batch_size
    return out
