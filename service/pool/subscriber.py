"""`StoreSubscriber`: hear the store's committed events on a worker thread of one's own.

`Store.add_listener` calls its listeners on the writer's thread (the scheduler's, an API
request's), which must never wait on a slow consumer (a tracker writing files, a network call).
A subscriber's listener only puts the item on a bounded queue; a daemon worker takes it from
there. When the queue is full the item is dropped and counted (a stalled consumer loses
metrics, the scheduler never stalls).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Optional

log = logging.getLogger("lorapool.subscriber")

_STOP = object()


class StoreSubscriber:
    """Subclasses implement `handle(topic, item)`; `start(store)` / `stop()` wire it up."""

    name = "subscriber"

    def __init__(self, maxsize: int = 10_000) -> None:
        self.queue: "queue.Queue[Any]" = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self.store: Any = None
        self._thread: Optional[threading.Thread] = None

    # -- the writer's side (must not block) ----------------------------------------------------
    def listener(self, topic: str, item: Any) -> None:
        try:
            self.queue.put_nowait((topic, item, time.time()))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("%s: queue full, %d items dropped", self.name, self.dropped)

    # -- the worker's side --------------------------------------------------------------------
    def handle(self, topic: str, item: Any, at: float) -> None:
        """One committed item; `at`: when it was committed (unix seconds)."""
        raise NotImplementedError

    def close(self) -> None:
        """Called on the worker thread once the queue is drained at stop()."""

    def _run(self) -> None:
        while True:
            got = self.queue.get()
            try:
                if got is _STOP:
                    self.close()
                    return
                self.handle(*got)
            except Exception:  # one bad item must not end the worker
                log.exception("%s failed on an item", self.name)
            finally:
                self.queue.task_done()

    def start(self, store: Any) -> "StoreSubscriber":
        self.store = store
        self._thread = threading.Thread(target=self._run, name=f"lorapool-{self.name}",
                                        daemon=True)
        self._thread.start()
        store.add_listener(self.listener)
        return self

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every item queued so far is handled (tests, shutdown); False on timeout."""
        done = threading.Event()

        def waiter() -> None:
            self.queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self.store.remove_listener(self.listener)
        self.queue.put(_STOP)  # blocks only while the queue is full: the worker is emptying it
        self._thread.join(timeout)
        self._thread = None
