"""Thin faces of hpc-sandbox for code written against other interfaces.

    atropos.py   HpcSandboxBackend (alias ToolBackend): the `ToolBackend` shape that
                 Atropos-style RL environments call (start, stop, acquire, release,
                 execute_batch, read/list/archive artifacts, get_status), over SlotPool
    tmux.py      its `tmux` tool: real tmux in a slot, or an agent session without one
    profiles.py  its profiles' pools, given or over jobs submitted for them
    artifacts.py its artifact helpers: the agent's read_file, list_files, archive as dicts

Every real behaviour lives in the pool and the slot agent; a face only maps names and
shapes. Importing this package loads nothing beyond what `hpc_sandbox.pool` loads.
"""
from __future__ import annotations

from .atropos import ArtifactError, ArtifactListing, BackendSlot, ExecutionResult, HpcSandboxBackend, ToolBackend

__all__ = ["ArtifactError", "ArtifactListing", "BackendSlot", "ExecutionResult", "HpcSandboxBackend", "ToolBackend"]
