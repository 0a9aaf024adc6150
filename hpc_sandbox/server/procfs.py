"""Processes of the node, read from /proc and killed: the node server's one place for both.

The watchdog (limits.py) and the end of a stuck agent (agent_process.py) use these; the
agent has its own, inside the slot, in agent.py (it imports nothing of the package's).
A slot's processes are a tree: the process its runtime spawned and everything below it
(see limits.py for why nothing can leave that tree), or, where the slot has a cgroup
(cgroups.py), what its cgroup.procs lists.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from typing import NamedTuple

from ..agent import CALL_ENV

PAGE = os.sysconf("SC_PAGE_SIZE")
_CALL_ENTRY = f"{CALL_ENV}=".encode()


class Proc(NamedTuple):  # a tuple: made for every process twice a second
    pid: int
    ppid: int
    pgid: int
    rss: int  # bytes


def scan_processes() -> dict[int, Proc]:
    """Every process of the node (in this pid namespace), from /proc/PID/stat.

    Every process's, not only the server user's: a slot's process may be a setuid
    program's, and ownership is not how a slot's processes are told apart (its tree is)."""
    try:
        entries = os.scandir("/proc")
    except OSError:
        return {}
    with entries:
        return read_processes(int(entry.name) for entry in entries if entry.name.isdigit())


def read_processes(pids: Iterable[int]) -> dict[int, Proc]:
    """The processes `pids` that are still there (a slot's, from its cgroup: a read per
    process of the slot, not per process of the node)."""
    procs: dict[int, Proc] = {}
    for pid in pids:
        try:
            fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            try:
                raw = os.read(fd, 4096)
            finally:
                os.close(fd)
        except OSError:  # gone meanwhile
            continue
        # comm may hold spaces and parentheses: the fields start after the last ')'.
        fields = raw[raw.rfind(b")") + 2:].split(None, 22)
        try:
            procs[pid] = Proc(pid, int(fields[1]), int(fields[2]), int(fields[21]) * PAGE)
        except (IndexError, ValueError):
            continue
    return procs


def children_of(procs: dict[int, Proc]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    return children


def subtree(root: int, children: dict[int, list[int]]) -> list[int]:
    """`root` and its descendants."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def signal_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def kill_tree(root: int) -> int:
    """SIGKILL `root` and its descendants, with their process groups (what was forked
    since the scan is mostly in those). For an agent that no longer answers: nobody
    else will end its commands."""
    procs = scan_processes()
    doomed = set(subtree(root, children_of(procs))) if root in procs else {root}
    groups = {procs[pid].pgid for pid in doomed if pid in procs}
    for pid in doomed:
        signal_pid(pid, signal.SIGSTOP)  # no more forks while the rest is being killed
    for pgid in groups - {os.getpgrp()}:
        if pgid > 1:
            kill_group(pgid)
    for pid in doomed:
        signal_pid(pid)
    return len(doomed)


def call_tag(pid: int) -> str | None:
    """The call tag (agent.CALL_ENV) in a process's environment, as it was at its exec;
    None when it has none or it cannot be read (gone, another user's, non-dumpable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environ = handle.read(1 << 20)
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(_CALL_ENTRY):
            return entry[len(_CALL_ENTRY):].decode("utf-8", "replace")
    return None


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed on this node since boot,
    the node's or a cgroup's (/proc/vmstat `oom_kill`, Linux 4.13+); None if unknown."""
    try:
        with open("/proc/vmstat", "rb") as handle:
            for line in handle:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
