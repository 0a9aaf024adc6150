"""Owner: the one process that runs a cloud pool (host, pid and start time), as its
sandboxes are tagged and its state file is named, and whether that process still lives.

The pool's folder itself (token, state files) is jobfolder.CloudFolder's: one module
spells every path under the state directory.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def process_start_time(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22): with
    the pid, it names one process, not whichever later reuses its number."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Owner:
    """The process that runs a pool: host, pid and start time, as tagged on its sandboxes."""

    host: str
    pid: int
    started: str

    @classmethod
    def me(cls) -> "Owner":
        return cls(socket.gethostname().split(".")[0], os.getpid(), process_start_time(os.getpid()) or "0")

    @classmethod
    def parse(cls, text: str) -> "Owner | None":
        host, _, rest = text.partition(":")
        pid, _, started = rest.partition(":")
        return cls(host, int(pid), started) if host and pid.isdigit() and started else None

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.started}"

    def alive(self) -> bool | None:
        """True/False on this host; None (cannot tell) for a process on another host."""
        if self.host != socket.gethostname().split(".")[0]:
            return None
        return process_start_time(self.pid) == self.started
