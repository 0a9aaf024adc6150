"""hpc-sandbox: sandbox slots for code-executing agents on HPC clusters."""
__version__ = "0.1.0"

from .models import Endpoint, Slot, ToolResult  # noqa: E402
from .pool import NodeServerSource, SlotPool, SyncSlotPool  # noqa: E402

__all__ = ["Endpoint", "NodeServerSource", "Slot", "SlotPool", "SyncSlotPool", "ToolResult", "__version__"]
