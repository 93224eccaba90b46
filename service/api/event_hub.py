"""`EventHub`: in-process publish/subscribe by topic, from any thread to asyncio followers.

Why: an SSE follower used to ask the database every half second whether anything was new;
200 followers of one job kept the thread pool busy and slowed every other request. Now the
store announces each committed job event and status change (`Store.add_listener`) on the
writer's thread — an API request or the scheduler's background thread — and the hub hands it
to every subscriber of that topic. A follower costs nothing while nothing happens.

- Topics are plain strings. Job streams use "job:<job id>" (items: `EventRecord`,
  `JobStatusChange`); the dashboard can subscribe to any topic the same way.
- One hand-off per event loop per item (`loop.call_soon_threadsafe`), which then fans out to
  that loop's subscribers: a publisher never blocks and never touches a follower's queue
  from a foreign thread.
- Each subscription has a bounded queue. A follower that falls `maxsize` items behind is
  marked dropped (its queue is cleared and `dropped` set); its stream then ends with a clear
  message and the client reconnects with Last-Event-ID to catch up from the database.
- Per process: it hears the writes of this process only. `lorapool serve` runs the API and
  the scheduler in one process over one `Store`, so that is every write. A deployment where
  several processes write the same database sets LORAPOOL_EVENTS_FALLBACK_POLL (see
  routes_jobs) so followers also look at the database at that long interval.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Any, Optional

log = logging.getLogger("lorapool.api")

DEFAULT_QUEUE_SIZE = 1000


class Subscription:
    """One follower's view of a topic: `get()` the next item, in publish order."""

    def __init__(self, hub: "EventHub", topic: str, loop: asyncio.AbstractEventLoop,
                 maxsize: int) -> None:
        self.hub = hub
        self.topic = topic
        self.loop = loop
        self.maxsize = maxsize
        self.dropped = False  # fell `maxsize` items behind: the follower must end
        self.dropped_event = asyncio.Event()
        self._items: deque[Any] = deque()
        self._ready = asyncio.Event()
        self._closed = False

    def _deliver(self, item: Any) -> None:
        """On the subscription's loop: queue `item`, or drop the follower when full."""
        if self._closed or self.dropped:
            return
        if len(self._items) >= self.maxsize:
            self.dropped = True
            self._items.clear()  # what it missed is in the database; free the memory now
            self.dropped_event.set()
        else:
            self._items.append(item)
        self._ready.set()

    async def get(self, timeout: Optional[float] = None) -> Any:
        """The next item; raises TimeoutError after `timeout` seconds with none, and
        `SlowConsumer` once the subscription was dropped."""
        while not self._items:
            if self.dropped:
                raise SlowConsumer(self.maxsize)
            self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), timeout)
        if self.dropped:
            raise SlowConsumer(self.maxsize)
        return self._items.popleft()

    def pending(self) -> int:
        return len(self._items)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.hub._remove(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SlowConsumer(Exception):
    """The follower fell too far behind and was dropped."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(f"slow consumer: more than {maxsize} events waited for this "
                         "follower; reconnect with Last-Event-ID to catch up")


class EventHub:
    """See the module docstring. `publish` from any thread; `subscribe` inside a running loop."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self._lock = threading.Lock()
        # topic → loop → that loop's subscriptions (a tuple, replaced on change, so publish
        # can hand it over without copying under the lock each time).
        self._topics: dict[str, dict[asyncio.AbstractEventLoop, tuple[Subscription, ...]]] = {}
        self.published = 0  # items handed to at least one loop (for tests and benches)

    def subscribe(self, topic: str, maxsize: Optional[int] = None) -> Subscription:
        loop = asyncio.get_running_loop()
        sub = Subscription(self, topic, loop, maxsize or self.queue_size)
        with self._lock:
            by_loop = self._topics.setdefault(topic, {})
            by_loop[loop] = (*by_loop.get(loop, ()), sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        with self._lock:
            by_loop = self._topics.get(sub.topic)
            if not by_loop:
                return
            rest = tuple(s for s in by_loop.get(sub.loop, ()) if s is not sub)
            if rest:
                by_loop[sub.loop] = rest
            else:
                by_loop.pop(sub.loop, None)
            if not by_loop:
                del self._topics[sub.topic]

    def subscribers(self, topic: str) -> int:
        with self._lock:
            return sum(len(subs) for subs in self._topics.get(topic, {}).values())

    def topics(self) -> list[str]:
        with self._lock:
            return list(self._topics)

    def publish(self, topic: str, item: Any) -> None:
        """Hand `item` to every subscriber of `topic`; never blocks, any thread."""
        with self._lock:
            by_loop = self._topics.get(topic)
            targets = list(by_loop.items()) if by_loop else []
        for loop, subs in targets:
            try:
                loop.call_soon_threadsafe(_fan_out, subs, item)
                self.published += 1
            except RuntimeError:  # that loop is closed: its subscribers are gone with it
                for sub in subs:
                    sub._closed = True
                    self._remove(sub)


def _fan_out(subs: tuple[Subscription, ...], item: Any) -> None:
    for sub in subs:
        sub._deliver(item)
