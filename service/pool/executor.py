"""The contract between the API and the pool: what the API may ask of whatever runs jobs.

The API never speaks Ray. It writes a job to the store as `queued`, then calls `wake()`; the
pool's scheduler (service/pool/scheduler.py) reads queued jobs from the store, places them and
drives them to a final state. `cancel()` reaches a running job; `check_fits()` lets the API
refuse at submit time a job that no node of the pool could ever hold.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from lorapool.types import Node

from ..train.spec import TrainSpec


class JobExecutor(Protocol):
    def wake(self) -> None:
        """A job was queued or changed: schedule soon (non-blocking)."""

    def cancel(self, job_id: str) -> None:
        """Ask a running job to stop between steps; the executor marks it `cancelled`."""

    def check_fits(self, spec: TrainSpec,
                   placement: Optional[dict[str, Any]] = None) -> Optional[str]:
        """None when some node could hold the job (now or once free) under its placement
        constraints (`lorapool.types.JobPlacement` fields), else the refusal reason, e.g.
        "needs 9.1 GiB; largest free node has 7.6 GiB (rtx-3070-desk12)"."""

    # Optional (the API asks with getattr): for a job `check_fits` accepted, a line for its
    # events where it runs other than on one card (split over several GPUs of one node).
    #   def submit_note(self, spec, placement=None) -> Optional[str]

    def nodes(self) -> list[Node]:
        """Every known node, for GET /v1/nodes."""
