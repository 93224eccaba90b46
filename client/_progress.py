"""The progress bar of `jobs.wait(progress=True)`: step / total steps, latest loss, status.

rich is imported only when a bar is actually shown, so `import lorapool` stays light.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from .types import FineTuningJob


class JobProgress:
    """Context manager; `update(job, loss)` redraws. Does nothing when `enabled` is False."""

    def __init__(self, enabled: bool, console: Any = None) -> None:
        self.enabled = enabled
        self._console = console
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "JobProgress":
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        # stderr: stdout stays clean for what a script wants to capture (ids, JSON).
        console = self._console or Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[loss]}"), TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("waiting", total=None, loss="", eta="")
        return self

    def update(self, job: FineTuningJob, loss: Optional[float] = None) -> None:
        if self._progress is None:
            return
        fields: dict[str, Any] = {"description": f"{job.id} [bold]{job.status}[/]"}
        if job.total_steps:
            fields["total"] = job.total_steps
        if job.step is not None:
            fields["completed"] = job.step
        if loss is not None:
            fields["loss"] = f"loss {loss:.4f}"
        # The server's estimate from measured step times (OpenAI's `estimated_finish`).
        left = job.estimated_finish - time.time() if job.estimated_finish else None
        fields["eta"] = f"ETA {left:.0f} s" if left is not None and left >= 0 else ""
        self._progress.update(self._task, **fields)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
