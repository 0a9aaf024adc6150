"""The shared slot API: one queue of waiting callers, sources behind one protocol.

    waiters.py    the FIFO queue of callers waiting for a slot
    sources.py    where slots come from: node servers, the jobs of a state dir (Source)
    overflow.py   when a waiting caller goes to the cloud source (CloudSource)
    slotpool.py   SlotPool(sources, overflow=...): acquire, execute, release
    sync.py       SyncSlotPool, the same for scripts that are not async
    trees.py      folders in and out of a slot as one tar archive (the caller's side)

Importing it loads no scheduler, template, config or cloud SDK: job states reach a
ClusterSource as a function, and `hpc_sandbox.connect` puts pools together from a
state dir, a profile or a job it submits.
"""
from __future__ import annotations

from .overflow import CloudSource
from .slotpool import SlotPool, ToolCall
from .sources import Capacity, ClusterSource, NodeServerSource, Source
from .sync import SyncSlotPool
from .waiters import WaitQueue

__all__ = ["Capacity", "CloudSource", "ClusterSource", "NodeServerSource", "SlotPool", "Source", "SyncSlotPool", "ToolCall",
           "WaitQueue"]
