"""The shared slot API: one queue of waiting callers, sources behind one protocol.

    waiters.py    the FIFO queue of callers waiting for a slot
    sources.py    where slots come from: node servers, the jobs of a state dir (Source)
    slotpool.py   SlotPool: acquire, execute, release; launch() for jobs it owns
    sync.py       SyncSlotPool, the same for scripts that are not async

Importing it loads neither the templates (jinja2) nor the schedulers: job states reach
a ClusterSource as a function (`jobs.job_states`).
"""
from __future__ import annotations

from .slotpool import SlotPool, ToolCall
from .sources import Capacity, ClusterSource, NodeServerSource, Source
from .sync import SyncSlotPool
from .waiters import WaitQueue

__all__ = ["Capacity", "ClusterSource", "NodeServerSource", "SlotPool", "Source", "SyncSlotPool", "ToolCall",
           "WaitQueue"]
