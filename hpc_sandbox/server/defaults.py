"""Safe defaults a node server decides on its node, where the facts are.

A jobspec cannot know how much memory the node it lands on has; the node server can.
Without a memory limit, one runaway command can grow until the kernel's OOM killer
picks a victim on the node (another slot, the node server, another user's job), so a
slot gets a default limit: its share of DEFAULT_MEMORY_SHARE of what the server may
use, the node's MemTotal or, when smaller, the memory limit of the cgroup the server
runs in (a Slurm job's allocation, a Modal sandbox's memory). The rest is headroom for
the node server, the agents and the page cache. A profile's `slot_memory` (a size, or
`none` for no limit) overrides it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
# Of the memory the server may use, the part its slots' commands share between them.
DEFAULT_MEMORY_SHARE = 0.8
# Never a default smaller than this (a node with more slots than memory): a limit that
# kills `pip install` is worse than none; say so in the log instead.
MIN_DEFAULT_SLOT_MB = 256
# A cgroup "limit" this large is no limit (cgroup v1 writes 2^63 rounded to a page).
_UNLIMITED = 1 << 60


@dataclass(frozen=True)
class SlotMemoryDefault:
    """The default per-slot memory limit and where it came from (for the log)."""

    mb: int
    available_mb: int  # what the server may use: MemTotal, or its cgroup's limit
    source: str  # "MemTotal" or the cgroup file it was read from
    slots: int

    def describe(self) -> str:
        return (f"slot memory limit {self.mb} MiB per slot by default ({DEFAULT_MEMORY_SHARE:.0%} of "
                f"{self.available_mb} MiB ({self.source}) over {self.slots} slots; "
                "slot_memory in the profile or --slot-memory SIZE|none changes it)")


def slot_memory_default(slots: int) -> SlotMemoryDefault | None:
    """The default limit for `slots` slots on this node; None when its memory is unknown."""
    available = available_memory()
    if available is None:
        return None
    available_bytes, source = available
    share = int(available_bytes * DEFAULT_MEMORY_SHARE / max(1, slots)) // MIB
    return SlotMemoryDefault(max(MIN_DEFAULT_SLOT_MB, share), available_bytes // MIB, source, slots)


def available_memory() -> tuple[int, str] | None:
    """(bytes, where that came from): the node's MemTotal, or the memory limit of this
    process's cgroup where one is set and smaller."""
    found: list[tuple[int, str]] = []
    total = _meminfo_total()
    if total:
        found.append((total, "MemTotal"))
    for path in _cgroup_limit_files():
        limit = _read_int(path)
        if limit is not None and 0 < limit < _UNLIMITED:
            found.append((limit, str(path)))
    return min(found) if found else None


def _meminfo_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit_files(root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """The memory limit files of this process's cgroup (v2 memory.max, v1
    memory.limit_in_bytes), at its path under the mount and at the mount's top (a
    container's cgroup namespace shows its own cgroup as the root)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    files: list[Path] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.lstrip("/")
        if hierarchy == "0" and not controllers:  # v2
            files += [root / relative / "memory.max", root / "memory.max"]
        elif "memory" in controllers.split(","):  # v1
            files += [root / "memory" / relative / "memory.limit_in_bytes", root / "memory" / "memory.limit_in_bytes"]
    return [path for path in dict.fromkeys(files) if path.is_file()]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # "max": no limit
        return None
