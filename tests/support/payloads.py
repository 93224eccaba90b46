"""Watch what the scheduler sends to the nodes of a cluster test, and send it as usual."""

from __future__ import annotations

from typing import Any, Callable


def record_payloads() -> tuple[list[Any], Callable[[], None]]:
    """(the list every payload built from now on is appended to, a function that stops it).

    Wraps `RayExecutor._build_payload`, so that a test can assert on what travelled to a node
    (a node's paths never name the head's, a split's devices, ...) without changing it."""
    from lorapool.service.pool import scheduler as sched

    sent: list[Any] = []
    real_build = sched.RayExecutor._build_payload

    def recording_build(self: Any, job: Any, placement: Any) -> Any:
        payload, step = real_build(self, job, placement)
        sent.append(payload)
        return payload, step

    def restore() -> None:
        sched.RayExecutor._build_payload = real_build

    sched.RayExecutor._build_payload = recording_build
    return sent, restore
