"""The head's background loops (scheduler, merge/evaluation tasks, federations) share one shape:
a daemon thread that wakes every `poll_interval` seconds, or at once when `wake()` is called,
runs one `tick()`, and outlives any one failed tick. `BackgroundLoop` is that shape."""

from __future__ import annotations

import logging
import threading
from typing import Optional


class BackgroundLoop:
    """Subclasses set `thread_name`, implement `tick()`, and may override `on_start()`."""

    thread_name = "lorapool-loop"

    def __init__(self, poll_interval: float = 0.5) -> None:
        self.poll_interval = poll_interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._log = logging.getLogger(f"lorapool.{self.thread_name.removeprefix('lorapool-')}")

    def on_start(self) -> None:
        """Runs once in the caller's thread before the loop starts (recovery after a restart)."""

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self.on_start()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Something changed: tick soon (non-blocking)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.poll_interval)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad tick
                self._log.exception("%s tick failed", self.thread_name)
