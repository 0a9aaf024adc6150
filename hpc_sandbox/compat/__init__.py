"""Thin faces of hpc-sandbox for code written against other interfaces.

    atropos.py          HpcSandboxBackend (alias ToolBackend): the Atropos `ToolBackend`
                        (../shared/ATROPOS_TOOLBACKEND.md) over SlotPool
    atropos_types.py    its Slot, ExecutionResult (to_tool_result) and result conventions
    atropos_files.py    its read_file/write_file words and artifact dicts
    atropos_profiles.py its per-profile settings (ModalSandboxConfig fields) as SandboxSpec overrides
    profiles.py         a face's profiles' pools, given or over jobs submitted for them
    artifacts.py        the agent's read_file, list_files, archive as Python values
    tmux.py             the `tmux` tool: real tmux in a slot, or an agent session without one

Every real behaviour lives in the pool and the slot agent; a face only maps names and
shapes. Importing this package loads nothing beyond what `hpc_sandbox.pool` loads.
"""
from __future__ import annotations

from .artifacts import ArtifactError
from .atropos import (AcquireTimeout, CompatToolResult, ExecutionResult, HpcSandboxBackend, Slot, SlotState,
                      ToolBackend)

__all__ = ["AcquireTimeout", "ArtifactError", "CompatToolResult", "ExecutionResult", "HpcSandboxBackend", "Slot",
           "SlotState", "ToolBackend"]
