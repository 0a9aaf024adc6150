"""A cgroup per slot, where the node lets this server make them: the kernel's fence on a
slot's processes (`pids.max`) and the record of which processes are the slot's.

Found once, at server start (`claim`), in this order:
  1. cgroup v2 with the pids controller: the server's own cgroup ("0::/path" in
     /proc/self/cgroup, under the cgroup2 mount), if this user may write it (root, or
     delegated: systemd `Delegate=yes`, a job cgroup made for the user).
  2. cgroup v1's pids hierarchy: /sys/fs/cgroup/pids/<own path>, if writable (root).
  3. cgroup v2 without the pids controller: membership and `cgroup.kill`, no fence.
Nothing writable: no cgroups, and the limit watchdog alone keeps the slot's limits.

Layout: <own>/hpc-sandbox.<server pid>/slot-<index>. The pid keeps two servers of one
node apart; a folder whose server is gone is removed at the next start when it is empty
(see _sweep). v2's "no internal processes" rule: controllers can be handed down from a
cgroup only while no process sits in it, so a v2 server whose own cgroup must still give
`pids` to its children first moves itself into a leaf of its own (<base>/server).

A slot's agent enters its cgroup before it can fork: it is spawned through `/bin/sh`,
which writes itself into the slot's cgroup.procs and then execs the runtime's command
(`enter_argv`). Nothing of the slot runs outside it for a moment, and the server needs
no preexec_fn (unsafe in a process with threads, as this server is).
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "hpc-sandbox."  # every folder this code makes starts so (the sweep touches no other)
# The spawn: the shell moves itself ("0": the writing process) into the cgroup, then
# becomes the runtime's command; if the move fails, nothing starts (the error is on stderr).
_ENTER = 'echo 0 > "$1/cgroup.procs" && shift && exec "$@"'
KILL_SECONDS = 5.0  # how long a kill waits for the cgroup to empty
_POLL = 0.01


@dataclass(frozen=True)
class Hierarchy:
    """Where a cgroup can be made: a writable cgroup (the server's own) and what it has."""

    own: Path  # the server's own cgroup, as a folder
    version: int  # 1 or 2
    pids: bool  # whether a child gets pids.max


def _mounts(mountinfo: str) -> list[tuple[str, str, str, str]]:
    """(mount point, root inside the hierarchy, fs type, super options) of every mount."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3:
            # Octal escapes (\040 for a space) in mount points: cgroup mounts have none.
            found.append((fields[4], fields[3], tail[0], tail[2]))
    return found


def _under(mount: str, mount_root: str, path: str) -> Path | None:
    """The folder of cgroup `path` (as /proc/self/cgroup names it) under a mount of the
    hierarchy whose root is `mount_root` (not "/" inside a container's cgroup namespace)."""
    rel = os.path.relpath(path, mount_root) if mount_root != "/" else path.lstrip("/")
    if rel.startswith(".."):
        return None
    return Path(mount) / rel if rel not in ("", ".") else Path(mount)


def _writable(folder: Path) -> bool:
    # The folder (to make children) and its cgroup.procs (to move a process from it
    # into a child: v2 asks write access to the common ancestor's cgroup.procs).
    return (folder / "cgroup.procs").is_file() and os.access(folder, os.W_OK) and \
        os.access(folder / "cgroup.procs", os.W_OK)


def find(mountinfo: str, own_cgroups: str) -> list[Hierarchy]:
    """The hierarchies where this process may make cgroups, best first (see the module
    docstring), from the text of /proc/self/mountinfo and /proc/self/cgroup."""
    v2_path, v1_pids = None, None
    for line in own_cgroups.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            v2_path = path
        elif "pids" in controllers.split(","):
            v1_pids = path
    found: list[Hierarchy] = []
    for mount, root, fstype, options in _mounts(mountinfo):
        if fstype == "cgroup2" and v2_path is not None:
            own = _under(mount, root, v2_path)
            if own is not None and _writable(own):
                controllers = _read(own / "cgroup.controllers").split()
                found.append(Hierarchy(own, 2, "pids" in controllers))
        elif fstype == "cgroup" and "pids" in options.split(",") and v1_pids is not None:
            own = _under(mount, root, v1_pids)
            if own is not None and _writable(own):
                found.append(Hierarchy(own, 1, True))
    # v2 with pids, then v1 pids (a fence), then v2 without (membership and kill only).
    return sorted(found, key=lambda h: (not h.pids, h.version != 2))


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SlotCgroup:
    """One slot's cgroup: its agent is started inside, and everything in it is the slot's."""

    def __init__(self, path: Path, fence: int | None, version: int) -> None:
        self.path = path
        self.fence = fence  # pids.max, when the hierarchy has the pids controller
        self.version = version

    def make(self) -> None:
        self.path.mkdir(mode=0o755, exist_ok=True)
        if self.fence is not None:
            _write(self.path / "pids.max", str(self.fence))

    def enter_argv(self, argv: list[str]) -> list[str]:
        """`argv`, spawned so that it runs in this cgroup from its first instruction."""
        return ["/bin/sh", "-c", _ENTER, "sh", str(self.path), *argv]

    def pids(self) -> list[int]:
        """The processes in the cgroup (in the server's pid namespace). A process cannot
        leave it without write access to the cgroup files, which no slot has (a bwrap
        slot sees /sys read-only; under runtime none, a root server's slot could)."""
        try:
            return [int(pid) for pid in _read(self.path / "cgroup.procs").split()]
        except ValueError:
            return []

    def kill(self, timeout: float = KILL_SECONDS) -> int:
        """SIGKILL everything in the cgroup and wait until it is empty; how many were
        signalled (v2's cgroup.kill does not say: 0 there)."""
        if not self.path.is_dir():
            return 0
        killed = 0
        deadline = time.monotonic() + timeout
        if (self.path / "cgroup.kill").exists():  # v2, Linux >= 5.14: one write, the kernel does the rest
            with contextlib.suppress(OSError):
                _write(self.path / "cgroup.kill", "1")
        elif self.fence is not None:
            # No fork can succeed from here on (pids.max may be set below pids.current):
            # the kill rounds catch everything, as a freeze would.
            with contextlib.suppress(OSError):
                _write(self.path / "pids.max", "0")
        try:
            while (pids := self.pids()) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGSTOP)  # without a fence: no forks while the rest is killed
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                        killed += 1
                time.sleep(_POLL)
        finally:
            if self.fence is not None and self.path.is_dir():
                with contextlib.suppress(OSError):
                    _write(self.path / "pids.max", str(self.fence))
        if self.pids():
            log.error("cgroup %s: processes left after %.0fs of killing: %s", self.path, timeout, self.pids()[:10])
        return killed

    def remove(self) -> None:
        """Kill what is in it, then remove it."""
        self.kill()
        _rmdir(self.path)


def _rmdir(path: Path) -> None:
    # A process killed a moment ago may still be leaving the cgroup (EBUSY for a while).
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(_POLL)
    log.warning("cgroup %s could not be removed", path)


class CgroupPlace:
    """This server's folder of slot cgroups (<own>/hpc-sandbox.<pid>)."""

    def __init__(self, base: Path, hierarchy: Hierarchy) -> None:
        self.base = base
        self.hierarchy = hierarchy

    def slot(self, index: int, procs: int | None) -> SlotCgroup:
        """The cgroup of slot `index` (made by SlotCgroup.make), fenced at `procs` tasks."""
        fence = procs if self.hierarchy.pids and procs is not None else None
        return SlotCgroup(self.base / f"slot-{index}", fence, self.hierarchy.version)

    def close(self) -> None:
        """Remove every slot cgroup (killing what is left in them) and the server's folder.
        A server that moved itself into <base>/server leaves that one: it is still in it."""
        for child in sorted(self.base.glob("slot-*")):
            if child.is_dir():
                SlotCgroup(child, None, self.hierarchy.version).remove()
        if not (self.base / "server").is_dir():
            _rmdir(self.base)


def claim(mountinfo: Path = Path("/proc/self/mountinfo"), own_cgroups: Path = Path("/proc/self/cgroup")) \
        -> CgroupPlace | None:
    """Make this server's folder of slot cgroups in the best writable hierarchy (logged
    at INFO, once); None where there is none (or every attempt failed)."""
    try:
        hierarchies = find(mountinfo.read_text(), own_cgroups.read_text())
    except OSError as exc:
        log.info("cgroups: not used (cannot read %s)", exc)
        return None
    for hierarchy in hierarchies:
        try:
            place = _make_place(hierarchy)
        except OSError as exc:
            log.info("cgroups: cannot use %s (v%d): %s", hierarchy.own, hierarchy.version, exc)
            continue
        fence = "pids.max per slot" if place.hierarchy.pids else "no pids controller: no fence"
        log.info("cgroups: one per slot under %s (v%d, %s)", place.base, hierarchy.version, fence)
        return place
    log.info("cgroups: none writable here (no delegation); slot limits are kept by the watchdog alone")
    return None


def _make_place(hierarchy: Hierarchy) -> CgroupPlace:
    _sweep(hierarchy.own)
    base = hierarchy.own / f"{PREFIX}{os.getpid()}"
    try:
        base.mkdir(mode=0o755)
    except FileExistsError:  # a server of the same pid in another pid namespace
        base = hierarchy.own / f"{PREFIX}{os.getpid()}.{secrets.token_hex(3)}"
        base.mkdir(mode=0o755)
    try:
        if hierarchy.version == 2 and hierarchy.pids:
            hierarchy = _hand_down_pids(hierarchy, base)
    except BaseException:
        _rmdir(base)
        raise
    return CgroupPlace(base, hierarchy)


def _hand_down_pids(hierarchy: Hierarchy, base: Path) -> Hierarchy:
    """Enable `pids` for the slot cgroups (own -> base -> slot-N). If the server's own
    cgroup holds processes (this server), it moves into <base>/server first; if that is
    not enough (other processes share the cgroup), the slots go without a fence."""
    own_control = hierarchy.own / "cgroup.subtree_control"
    try:
        if "pids" not in _read(own_control).split():
            try:
                _write(own_control, "+pids")
            except OSError:
                leaf = base / "server"
                leaf.mkdir(mode=0o755)
                _write(leaf / "cgroup.procs", "0")  # the whole server, every thread
                _write(own_control, "+pids")
        _write(base / "cgroup.subtree_control", "+pids")
    except OSError as exc:
        log.info("cgroups: cannot hand the pids controller down from %s (%s): slots get no pids.max",
                 hierarchy.own, exc)
        return Hierarchy(hierarchy.own, 2, False)
    return hierarchy


def _sweep(own: Path) -> None:
    """Remove the empty folders that servers now gone left here (a SIGKILLed server
    never removes its own): only ours by name (and owner), only empty ones."""
    try:
        entries = list(own.iterdir())
    except OSError:
        return
    for folder in entries:
        if not folder.name.startswith(PREFIX) or not folder.is_dir():
            continue
        try:
            pid = int(folder.name[len(PREFIX):].split(".")[0])
            owner = folder.stat().st_uid
        except (ValueError, OSError):
            continue
        if owner != os.getuid() or _pid_alive(pid):
            continue
        children = [child for child in folder.iterdir() if child.is_dir()]
        if any(_read(child / "cgroup.procs").strip() for child in children) or _read(folder / "cgroup.procs").strip():
            log.info("cgroups: %s (of a server gone) still holds processes; left alone", folder)
            continue
        for child in children:
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            folder.rmdir()
            log.info("cgroups: removed %s, left by a server that is gone", folder)
