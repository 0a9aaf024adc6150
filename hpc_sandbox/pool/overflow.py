"""The overflow policy: when a waiting caller goes to the cloud.

A caller takes a cluster slot when one frees up. It waits for the cluster up to
`burst_after` seconds from its arrival; past that, the cloud source is told to serve
it, and sandboxes are started for the callers that no cloud slot (free, or in a
sandbox being made) covers: ceil(callers / slots_per_sandbox), within max_cloud_slots.

Queue-aware: when the cluster has no node server up and none of its queued ones is
expected (by the scheduler's estimate) to start within `burst_after`, nothing will
free up in time, so callers go to the cloud at once. A queued node server with no
estimate counts as coming within `burst_after`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from .sources import Source
from .waiters import WaitQueue

log = logging.getLogger(__name__)

MIN_INTERVAL = 0.02  # seconds between two decisions, however often callers arrive
MAX_INTERVAL = 1.0  # the longest the policy sleeps while callers wait (the cluster's outlook changes)


class CloudSource(Source, Protocol):
    """A source that makes its capacity on demand (burst/modal.py's ModalSource)."""

    wanted: int  # waiting callers it should serve now

    def provision(self, slots: int) -> int: ...
    def slots_coming(self) -> int: ...
    def slots_total(self) -> int: ...
    @property
    def off(self) -> str | None: ...
    def usage(self) -> Any: ...  # sandboxes and their seconds (jobfolder.PoolState)


class Overflow:
    def __init__(self, cloud: CloudSource, cluster: Sequence[Source], queue: WaitQueue, burst_after: float) -> None:
        self.cloud = cloud
        self.cluster = list(cluster)
        self.queue = queue
        self.burst_after = burst_after
        self.bursts = 0  # decisions that started sandboxes, for the record
        self._event = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """A caller joined the queue: decide now (it may burst at once)."""
        self._event.set()

    def burst_delay(self) -> float:
        """How long a caller waits for the cluster: burst_after, or 0 when nothing in
        the cluster is up or expected to start within burst_after."""
        now = time.time()
        for source in self.cluster:
            outlook = source.outlook()
            if outlook.slots:
                return self.burst_after  # busy slots free up at times nobody can tell
            if any(start is None or start - now <= self.burst_after for start in outlook.pending):
                return self.burst_after
        return 0.0

    def decide(self) -> float | None:
        """Tell the cloud how many callers to serve and start what they need; returns
        when the next caller passes its deadline (monotonic), None if nobody waits."""
        delay = self.burst_delay()
        now = time.monotonic()
        past, next_arrival = self.queue.past(now - delay)
        self.cloud.wanted = past
        if past:
            self.cloud.wake()
            short = past - self.cloud.slots_coming()
            if short > 0 and self.cloud.provision(short):
                self.bursts += 1
        return None if next_arrival is None else next_arrival + delay

    async def _run(self) -> None:
        while True:
            self._event.clear()
            try:
                due = self.decide()
            except Exception:  # a bug here must not stop the policy; callers still get cluster slots
                log.exception("overflow policy failed")
                due = None
            timeout = MAX_INTERVAL if due is None else min(MAX_INTERVAL, max(0.0, due - time.monotonic()))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
            await asyncio.sleep(MIN_INTERVAL)
