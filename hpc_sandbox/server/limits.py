"""Per-slot limits (memory, processes, workspace disk) and the watchdog that keeps them.

HPC nodes rarely delegate cgroups to their users, so the baseline is a watchdog in the
node server: twice a second it walks /proc, finds each busy slot's processes, and
kills what breaks a limit; every two seconds it measures the workspaces of slots that
may have written. It is a watchdog, not a fence: a slot can overshoot for up to one
interval (a fast burst of writes can finish between two measurements). The kernel
fences what it can per runtime (see runtime.py): a bwrap slot's /tmp and /dev/shm are
tmpfs capped at its memory limit, and its tasks are capped (RLIMIT_NPROC in its own
user namespace) well above its process limit, so a fork bomb stops short of the node's
pid space while the watchdog kills it.

A slot's processes are the process the runtime spawned and everything below it. No
process can leave that tree: under bwrap and Apptainer the slot's pid namespace keeps
orphans under its init, and under runtime none the agent is the slot's subreaper
(agent.py), so a daemon that double-forks and calls setsid is re-parented to the agent.
Processes are read from /proc/PID/stat, which every process shows whatever its owner
and whatever it hides (a non-dumpable process closes its environ, not its stat). Where
a slot has a cgroup (cgroups.py: its pids.max is the kernel's fence, whoever runs the
server, root included), its members are what its cgroup.procs lists: a round then reads
the slot's processes, at most the fence, not every process of the node, and stays quick
while a fork bomb fills the node.

Memory is the resident set of the slot's commands, process counts are the slot's
commands: the agent and the runtime's own processes (its "infrastructure", taken
when the agent starts) are left out of both, so a limit is what commands get.
Resident sets are summed per process, so pages that processes share (after a fork)
count once for each: the measure can overstate a slot's memory, never understate it.
RLIMITs are not used for memory: none is per slot.

Every kill is recorded (Kill: the slot, when, the message, and the call tags of the
processes it killed, read from their environment) before its first signal, so that
the server can fail exactly the calls it cut short (SlotTable._breach_of): a session's
shell or a call's own shell may well go on and end with 0 after the kill.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..agent import DIR_FLAGS, MAX_WALK_DEPTH, ToolError, walk_folder
from .cgroups import SlotCgroup
from .procfs import Proc, call_tag, children_of, kill_group, read_processes, scan_processes, signal_pid, subtree

log = logging.getLogger(__name__)

MIB = 1 << 20

WATCH_INTERVAL = 0.5  # seconds between process scans
DISK_EVERY = 4  # scans per workspace measurement (2 s)
# Work per workspace measurement. A workspace with more entries than DISK_SLOT_ENTRIES
# breaks the disk limit (a count cut short is never taken for the total: a slot must
# not hide its size behind many entries); a round measures no more than
# DISK_ROUND_ENTRIES over all slots, and a slot the round's budget cuts short is
# measured whole in a later round (the first claim on the budget rotates).
DISK_SLOT_ENTRIES = 1_000_000
DISK_ROUND_ENTRIES = 1_000_000
# While a workspace is over its limit, growing it by more than this kills the slot's
# commands again; staying put (or shrinking it, say with rm) does not.
DISK_GROWTH_SLACK = 1 * MIB
# How long a kill of all of a slot's commands goes on killing what they forked meanwhile.
KILL_ROUNDS_SECONDS = 1.0
# Kills remembered for the calls they ended (over all slots), and the processes of one
# killed process group whose call tags are read (a group is mostly one call's).
REMEMBERED_KILLS = 256
TAGS_READ_PER_KILL = 64


@dataclass(frozen=True)
class SlotLimits:
    memory_mb: int | None = None  # MiB of resident memory of the slot's commands
    max_procs: int | None = None  # processes of the slot's commands
    disk_mb: int | None = None  # MiB of workspace usage (blocks allocated)

    @property
    def any(self) -> bool:
        return any(value is not None for value in (self.memory_mb, self.max_procs, self.disk_mb))


# --- workspace usage --------------------------------------------------------------------

class DiskUsage(NamedTuple):
    bytes: int  # allocated under the workspace (hard links once)
    entries: int  # entries walked
    incomplete: str | None = None  # why the walk stopped short, when it did: then `bytes` is a part


def disk_usage(path: Path, max_entries: int) -> DiskUsage:
    """What the workspace at `path` holds, walked with the agent's own walk
    (agent.walk_folder): folders entered through descriptors with O_NOFOLLOW, so a
    symlink swapped in by the slot is never followed out of the workspace."""
    try:
        top = os.open(path, DIR_FLAGS)
    except OSError:
        return DiskUsage(0, 0)
    total = seen = 0
    inodes: set[tuple[int, int]] = set()
    too_deep: list[str] = []
    unreadable: list[str] = []
    try:
        with contextlib.closing(walk_folder(top, "", True, too_deep, unreadable)) as entries:
            for _, _, _, st in entries:
                seen += 1
                if seen > max_entries:
                    return DiskUsage(total, seen, f"holds more than {max_entries} entries")
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if (st.st_dev, st.st_ino) in inodes:
                        continue
                    inodes.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    except ToolError as exc:
        return DiskUsage(total, seen, f"could not be read whole ({exc.message})")
    finally:
        os.close(top)
    if unreadable:
        return DiskUsage(total, seen, f"has a folder the node server cannot read ({unreadable[0]})")
    if too_deep:
        return DiskUsage(total, seen, f"has folders nested deeper than {MAX_WALK_DEPTH}")
    return DiskUsage(total, seen)


# --- the watchdog ----------------------------------------------------------------------


@dataclass(frozen=True)
class SlotView:
    """What the watchdog needs of one slot, taken on the event loop."""

    index: int
    pid: int  # the process the runtime spawned (bwrap, apptainer, or the agent itself)
    infra: frozenset[int]  # the agent's and the runtime's own processes
    workspace: Path
    measure_disk: bool
    # A TMPDIR of the slot's own on the node's disk (runtime none): slot_disk counts it
    # with the workspace. A container's /tmp is its own tmpfs, capped apart.
    tmpdir: Path | None = None
    cgroup: SlotCgroup | None = None  # where the slot's processes are listed, when it has one


@dataclass(frozen=True)
class Finding:
    """One slot, as one round found it."""

    index: int
    processes: int  # the slot's commands' processes (0: nothing runs in it)
    breach: str | None = None  # the message, when a limit was broken and the slot's commands killed
    disk_measured: bool = False


@dataclass(frozen=True)
class Kill:
    """One kill of the watchdog's, recorded before its first signal is sent: a call
    whose process it killed ends after that, and finds it at once (see Watchdog.kills)."""

    index: int  # the slot
    at: float  # time.monotonic()
    message: str
    # The call tags (agent.CALL_ENV) of the killed processes that had one readable;
    # None when every command of the slot was killed (a process or disk breach).
    calls: frozenset[str] | None


@dataclass
class _DiskState:
    floor: int  # the least usage seen since the last kill while over the limit


@dataclass
class Watchdog:
    """Measures slots against their limits and kills what breaks them.

    `check` is synchronous and does its own blocking reads: the server runs it on a
    worker thread, never on the event loop."""

    limits: SlotLimits
    _disk: dict[int, _DiskState] = field(default_factory=dict)
    _disk_turn: int = 0
    # Appended on the watchdog's thread, read on the event loop: under the lock.
    _kills: collections.deque = field(default_factory=lambda: collections.deque(maxlen=REMEMBERED_KILLS))
    _kills_lock: threading.Lock = field(default_factory=threading.Lock)

    def kills(self, index: int) -> list[Kill]:
        """The kills remembered for slot `index`, oldest first."""
        with self._kills_lock:
            return [kill for kill in self._kills if kill.index == index]

    def _record(self, index: int, message: str, calls: frozenset[str] | None) -> str:
        with self._kills_lock:
            self._kills.append(Kill(index, time.monotonic(), message, calls))
        return message

    def infrastructure(self, pid: int) -> frozenset[int]:
        """The processes of a freshly started agent's tree (before any command runs)."""
        procs = scan_processes()
        if pid not in procs:
            return frozenset({pid})
        return frozenset(subtree(pid, children_of(procs)))

    def check(self, views: list[SlotView], disk_round: bool) -> list[Finding]:
        whole_node = any(view.cgroup is None for view in views)
        procs = scan_processes() if whole_node else {}
        children = children_of(procs)
        members = [_members(view, procs, children) for view in views]

        findings: list[Finding | None] = [None] * len(views)
        disk_budget = DISK_ROUND_ENTRIES
        order = list(range(len(views)))
        if disk_round and order:  # the budget's first claim rotates between slots
            self._disk_turn = (self._disk_turn + 1) % len(order)
            order = order[self._disk_turn:] + order[:self._disk_turn]
        for position in order:
            view = views[position]
            mine = members[position]
            # Commands run in sessions of their own, never in the agent's group; should one be
            # there anyway, only it is killed, not its group (that would kill the agent).
            spared = {procs[pid].pgid for pid in view.infra if pid in procs} | {os.getpgrp()}
            breach, measured = None, False
            try:
                breach = self._check_processes(view, spared, mine) or self._check_memory(view, spared, mine)
                if breach is None and disk_round and view.measure_disk and self.limits.disk_mb and disk_budget > 0:
                    breach, used, measured = self._check_disk(view, spared, mine, disk_budget)
                    disk_budget -= used
            except Exception as exc:  # one slot's surprise must not lose the others' findings
                log.error("limit watchdog: slot %d: %s: %s", view.index, type(exc).__name__, exc)
            findings[position] = Finding(view.index, len(mine), breach, disk_measured=measured)
        return findings  # type: ignore[return-value]  # one per view, in the order of views

    def _check_processes(self, view: SlotView, spared: set[int], mine: list[Proc]) -> str | None:
        limit = self.limits.max_procs
        if limit is None or len(mine) <= limit:
            return None
        message = self._record(view.index, f"process limit: the slot ran {len(mine)} processes, its limit is "
                               f"{limit}; its commands were killed", None)
        self._kill_all(view, spared, mine)
        return message

    def _check_memory(self, view: SlotView, spared: set[int], mine: list[Proc]) -> str | None:
        limit = self.limits.memory_mb
        if limit is None or not mine:
            return None
        used = sum(proc.rss for proc in mine)
        if used <= limit * MIB:
            return None
        largest = max(mine, key=lambda proc: proc.rss)
        doomed = [largest] + ([proc for proc in mine if proc.pgid == largest.pgid and proc is not largest]
                              if largest.pgid not in spared and largest.pgid > 1 else [])
        calls = frozenset(tag for proc in doomed[:TAGS_READ_PER_KILL] if (tag := call_tag(proc.pid)))
        # Rounded up: a slot just over 512 MiB must not read "used 512 MiB, its limit is 512".
        message = self._record(view.index, f"memory limit: the slot used {-(-used // MIB)} MiB, its limit is "
                               f"{limit} MiB; the command was killed", calls)
        self._kill_group(spared, largest)
        return message

    def _check_disk(self, view: SlotView, spared: set[int], mine: list[Proc],
                    budget: int) -> tuple[str | None, int, bool]:
        """(breach, entries walked, whether the workspace was measured whole)."""
        limit = self.limits.disk_mb
        assert limit is not None
        cap = DISK_SLOT_ENTRIES
        used, entries, incomplete = disk_usage(view.workspace, min(cap, budget))
        if view.tmpdir is not None and not incomplete:
            extra = disk_usage(view.tmpdir, min(cap, budget) - entries)
            used, entries, incomplete = used + extra.bytes, entries + extra.entries, extra.incomplete
        if incomplete and entries > budget and budget < cap:
            return None, entries, False  # the round's budget ran out: measured whole in a later round
        if incomplete:
            # A count cut short is never taken for the total: a slot must not hide its size
            # behind many entries, deep folders or a folder it made unreadable.
            why = f"{incomplete}, the most the disk limit counts" if entries > cap else incomplete
        elif used > limit * MIB:
            why = f"holds {used // MIB} MiB"
        else:
            self._disk.pop(view.index, None)
            return None, entries, True
        state = self._disk.get(view.index)
        if state is not None and used <= state.floor + DISK_GROWTH_SLACK:
            # Still over, but not growing: leave the slot usable, so that it can clean up.
            state.floor = min(state.floor, used)
            return None, entries, True
        self._disk[view.index] = _DiskState(floor=used)
        # A burst of writes can end between two measurements: then there is nothing to kill.
        outcome = "its commands were killed" if mine else "nothing was running; commands that grow it are killed"
        where = "workspace (with its TMPDIR)" if view.tmpdir is not None else "workspace"
        message = self._record(view.index, f"disk limit: the slot's {where} {why}, its limit is {limit} MiB; "
                               f"{outcome}", None)
        self._kill_all(view, spared, mine)
        return message, entries, True

    def _kill_group(self, spared: set[int], proc: Proc) -> None:
        if proc.pgid in spared or proc.pgid <= 1:
            signal_pid(proc.pid)
        else:
            kill_group(proc.pgid)
            signal_pid(proc.pid)  # it may have left its group since the scan

    def _kill_all(self, view: SlotView, spared: set[int], mine: list[Proc]) -> None:
        """Kill every command of the slot, and again what they forked meanwhile (a fork
        bomb's stragglers, a shell retrying a failed fork), until none is left or
        KILL_ROUNDS_SECONDS have passed."""
        deadline = time.monotonic() + KILL_ROUNDS_SECONDS
        killed: set[int] = set()  # dead, perhaps not reaped yet: not looked at again
        while mine:
            killed.update(proc.pid for proc in mine)
            for proc in mine:
                signal_pid(proc.pid, signal.SIGSTOP)  # a fork bomb stops forking while it is being killed
            for pgid in {proc.pgid for proc in mine} - spared:
                if pgid > 1:
                    kill_group(pgid)
            for proc in mine:
                signal_pid(proc.pid)
            if time.monotonic() > deadline:
                return
            procs = {} if view.cgroup else scan_processes()
            if view.cgroup is None and view.pid not in procs:
                return
            mine = [proc for proc in _members(view, procs, children_of(procs)) if proc.pid not in killed]


def _members(view: SlotView, procs: dict[int, Proc], children: dict[int, list[int]]) -> list[Proc]:
    """The slot's commands' processes: its cgroup's (read into `procs`, the agent's own
    included, which `spared` looks up), else its tree's in `procs`."""
    if view.cgroup is not None:
        listed = read_processes(view.cgroup.pids())
        procs.update(listed)
        return [proc for pid, proc in listed.items() if pid not in view.infra]
    if view.pid not in procs:
        return []
    return [procs[pid] for pid in subtree(view.pid, children) if pid not in view.infra]
