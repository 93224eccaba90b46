"""The scheduler's queued-job views: the same view object comes back pass after pass (so the
placer's per-job caches hit by identity), a model replaced under its name or a job that left
the queue rebuilds or drops its view, and a job that cannot be planned is reported, not raised."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lorapool.service.pool.job_views import JobViews
from lorapool.service.pool.scheduler import job_view


@dataclass
class _Model:  # the fields of a store ModelEntry the views read
    name: str
    path: Path
    sha256: str


@dataclass
class _Job:  # the fields of a store JobRecord the views read
    id: str
    tenant: str
    model: str
    created_at: int
    spec: dict[str, Any] = field(default_factory=lambda: {"max_seq_len": 64})
    placement: Optional[dict[str, Any]] = None


def test_a_queued_job_keeps_its_view_until_its_model_changes(tmp_path):
    views = JobViews(job_view)
    models = {"m": _Model("m", tmp_path / "m", "aaa")}
    jobs = [_Job("j1", "acme", "m", 10), _Job("j2", "globex", "m", 11, placement={"priority": 2})]

    first, errors = views.views(jobs, models)
    assert not errors
    assert [v.job_id for v in first] == ["j1", "j2"]
    assert first[0].spec.base_model == str(tmp_path / "m") and first[0].spec.max_seq_len == 64
    assert first[1].priority == 2

    again, _ = views.views(jobs, models)
    assert again[0] is first[0] and again[1] is first[1]  # nothing rebuilt

    models["m"] = _Model("m", tmp_path / "m2", "bbb")  # re-registered under the same name
    moved, _ = views.views(jobs, models)
    assert moved[0] is not first[0]
    assert moved[0].spec.base_model == str(tmp_path / "m2")


def test_jobs_that_left_the_queue_are_forgotten_and_bad_ones_reported(tmp_path):
    views = JobViews(job_view)
    models = {"m": _Model("m", tmp_path / "m", "aaa")}
    j1, j2 = _Job("j1", "acme", "m", 10), _Job("j2", "acme", "m", 11)
    first, _ = views.views([j1, j2], models)
    views.views([j2], models)  # j1 was placed
    back, _ = views.views([j1, j2], models)  # j1 requeued: built again, j2 kept
    assert back[0] is not first[0] and back[1] is first[1]

    gone = _Job("j3", "acme", "vanished", 12)
    broken = _Job("j4", "acme", "m", 13, spec={"max_seq_len": -5})
    out, errors = views.views([j2, gone, broken], models)
    assert [v.job_id for v in out] == ["j2"]
    assert errors["j3"][0] == "model_not_found" and "vanished" in errors["j3"][1]
    assert errors["j4"][0] == "invalid_spec" and "max_seq_len" in errors["j4"][1]
