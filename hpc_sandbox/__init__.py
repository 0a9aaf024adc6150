"""hpc-sandbox: sandbox slots for code-executing agents on HPC clusters."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The slot API is imported on first use, so that `render` and `python -m
# hpc_sandbox.jobspec` do not pay for aiohttp (and do not import the package twice).
_LAZY = {
    "Endpoint": "models", "Slot": "models", "ToolResult": "models",
    "NodeServerSource": "pool", "ClusterSource": "pool", "SlotPool": "pool", "SyncSlotPool": "pool",
    "ToolCall": "pool", "Job": "jobs", "ExecEvent": "models", "PoolReport": "pool.slotpool",
    "HpcSandboxBackend": "compat.atropos",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hpc_sandbox' has no attribute {name!r}")
