"""The pool's one queue: acquire calls waiting for a slot, first come, first served.

Sources do not hand a slot to a particular caller: every grant goes to the oldest
caller still waiting (`offer`), so the order of service follows the order of arrival
whichever node server frees a slot first. A caller that gives up (timeout, cancel)
leaves its place; a grant that finds nobody waiting is returned by its source.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import time

from ..models import Slot


class Waiter:
    __slots__ = ("future", "trajectory_id", "profile", "arrived")

    def __init__(self, future: asyncio.Future, trajectory_id: str | None, profile: str) -> None:
        self.future = future
        self.trajectory_id = trajectory_id
        self.profile = profile
        self.arrived = time.monotonic()


class WaitQueue:
    def __init__(self) -> None:
        self._queue: collections.deque[Waiter] = collections.deque()
        self._live = 0
        self.granted = 0  # slots handed to callers through this queue, for the record

    def join(self, trajectory_id: str | None, profile: str) -> Waiter:
        waiter = Waiter(asyncio.get_running_loop().create_future(), trajectory_id, profile)
        self._queue.append(waiter)
        self._live += 1
        return waiter

    def leave(self, waiter: Waiter) -> None:
        """A caller gives up its place (timeout, cancel). Counted at once: a source
        deciding how many requests to send must not count it a moment longer."""
        if not waiter.future.done():
            waiter.future.cancel()
            self._live -= 1
        if len(self._queue) > 64 and len(self._queue) > 2 * self._live:
            # Many gave up (timeouts under load): drop their places, or every offer and
            # label would walk them.
            self._queue = collections.deque(w for w in self._queue if not w.future.done())

    def close(self, error: BaseException) -> None:
        """The pool stops: every caller still waiting gets `error`, at once."""
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(error)
        self._live = 0

    @property
    def waiting(self) -> int:
        """Callers still waiting (given up ones are not counted)."""
        return self._live

    def oldest_label(self) -> str | None:
        """The trajectory id of the oldest caller still waiting (to label a request)."""
        for waiter in self._queue:
            if not waiter.future.done():
                return waiter.trajectory_id
        return None

    def past(self, cutoff: float) -> tuple[int, float | None]:
        """How many callers still waiting came at or before `cutoff` (monotonic time),
        and when the next one came (None: nobody else waits). Walks only those."""
        count = 0
        for waiter in self._queue:
            if waiter.future.done():
                continue
            if waiter.arrived > cutoff:
                return count, waiter.arrived
            count += 1
        return count, None

    def offer(self, slot: Slot, source: object) -> Waiter | None:
        """Hand `slot` (from `source`) to the oldest caller still waiting, and say who
        that was; None when nobody waits. The caller's future gets (slot, source)."""
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.future.done():
                waiter.future.set_result((dataclasses.replace(slot, trajectory_id=waiter.trajectory_id), source))
                self._live -= 1
                self.granted += 1
                return waiter
        return None
