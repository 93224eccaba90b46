"""The placement views of queued jobs, kept across scheduler passes.

Every pass the scheduler reads the queued jobs from the store as fresh records. Turning each
into a `TrainSpec` (pydantic validation) and a `JobView` again, with a model lookup each, cost
the scheduler more than planning itself once a thousand jobs wait — and fresh objects defeat the
placer's per-job caches, which are fastest when the same view comes back (`view is job`).

A queued job's spec and placement do not change after submit; what a pass may change is
which registered model its name points to (a model replaced under the same name). So a view is
reused while the job's id, its model's path and content hash, and its submit-time inputs stay
the same.

Each view also carries what placement needs to tell how long the job runs and where its base
model already is: `model_key` (the model's content id — the key a node caches it under),
`model_bytes` (what a node without it must fetch) and `tokens`, the job's training tokens as
`training_tokens` estimates them at queue time from its data's example count and size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..train.spec import TrainSpec

# (job id, tenant, spec, submitted at, placement, *, tokens=, model_key=, model_bytes=) → view
ViewMaker = Callable[..., Any]

# Bytes of training file per token: a rough rule for English text in a BPE vocabulary (~4
# characters a token). The JSONL framing ({"messages": [{"role": ...}]}) is counted as if it
# were text, which roughly stands in for the tokens the chat template adds.
BYTES_PER_TOKEN = 4.0


@dataclass(frozen=True)
class DataSize:
    """What the store knows of a job's training data at queue time: its example count (from
    validation at upload, or the node's report for a node-local data set) and its size in
    bytes (None: not known)."""

    examples: int
    bytes: Optional[int] = None


def training_tokens(spec: TrainSpec, size: Optional[DataSize]) -> Optional[float]:
    """The tokens the job will train on, estimated without a tokenizer: an example holds its
    bytes / `BYTES_PER_TOKEN` tokens, at most `max_seq_len` (longer ones are cut or dropped),
    or `max_seq_len` when the data's size is unknown; times the examples and epochs, or
    `max_steps` × `batch_size` examples when the job is bounded by steps. None when nothing is
    known of the data (the placer then uses its own default)."""
    if size is None or size.examples <= 0:
        return None
    per_example = float(spec.max_seq_len)
    if size.bytes is not None and size.bytes > 0:
        per_example = min(per_example, max(1.0, size.bytes / size.examples / BYTES_PER_TOKEN))
    if spec.max_steps:
        return float(spec.max_steps * spec.batch_size) * per_example
    return float(spec.n_epochs * size.examples) * per_example


class JobViews:
    """Queued job records → placement views, rebuilt only when their inputs change.

    `data_size(job record)`: what is known of the job's training data (None: nothing)."""

    def __init__(self, make_view: ViewMaker, max_size: int = 100_000,
                 data_size: Optional[Callable[[Any], Optional[DataSize]]] = None) -> None:
        self._make_view = make_view
        self._max_size = max_size
        self._data_size = data_size
        self._views: dict[str, tuple[tuple, Any]] = {}

    def views(self, queued: list[Any],
              models: dict[str, Any]) -> tuple[list[Any], dict[str, tuple[str, str]]]:
        """(views of the jobs that can be planned, {job id: (error code, message)} for the
        others: their model is gone, or their stored spec no longer validates)."""
        out: list[Any] = []
        errors: dict[str, tuple[str, str]] = {}
        keep: dict[str, tuple[tuple, Any]] = {}
        for job in queued:
            model = models.get(job.model)
            if model is None:
                errors[job.id] = ("model_not_found",
                                  f"model {job.model!r} is no longer registered")
                continue
            key = (str(model.path), model.sha256, job.created_at)
            hit = self._views.get(job.id)
            if hit is not None and hit[0] == key:
                view = hit[1]
            else:
                try:
                    spec = TrainSpec(**{**dict(job.spec), "base_model": str(model.path)})
                except ValueError as exc:  # pydantic's ValidationError is one
                    errors[job.id] = ("invalid_spec", f"the job's stored settings are not "
                                      f"valid for this version: {exc}")
                    continue
                size = self._data_size(job) if self._data_size is not None else None
                model_bytes = getattr(model, "bytes", None)
                view = self._make_view(job.id, job.tenant, spec, float(job.created_at),
                                       job.placement, tokens=training_tokens(spec, size),
                                       model_key=model.sha256,
                                       model_bytes=int(model_bytes) if model_bytes else None)
            keep[job.id] = (key, view)
            out.append(view)
        # Only the jobs still queued stay: a placed, cancelled or finished job's view goes.
        self._views = keep if len(keep) <= self._max_size else {}
        return out, errors
