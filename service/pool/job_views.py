"""The placement views of queued jobs, kept across scheduler passes.

Every pass the scheduler reads the queued jobs from the store as fresh records. Turning each
into a `TrainSpec` (pydantic validation) and a `JobView` again, with a model lookup each, cost
the scheduler more than planning itself once a thousand jobs wait — and fresh objects defeat the
placer's per-job caches, which are fastest when the same view comes back (`view is job`).

A queued job's spec and placement do not change after submit; what a pass may change is
which registered model its name points to (a model replaced under the same name). So a view is
reused while the job's id, its model's path and content hash, and its submit-time inputs stay
the same.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..train.spec import TrainSpec

ViewMaker = Callable[[str, str, TrainSpec, float, Optional[dict[str, Any]]], Any]


class JobViews:
    """Queued job records → placement views, rebuilt only when their inputs change."""

    def __init__(self, make_view: ViewMaker, max_size: int = 100_000) -> None:
        self._make_view = make_view
        self._max_size = max_size
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
                view = self._make_view(job.id, job.tenant, spec, float(job.created_at),
                                       job.placement)
            keep[job.id] = (key, view)
            out.append(view)
        # Only the jobs still queued stay: a placed, cancelled or finished job's view goes.
        self._views = keep if len(keep) <= self._max_size else {}
        return out, errors
