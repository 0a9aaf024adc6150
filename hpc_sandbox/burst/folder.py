"""CloudFolder: what one pool's cloud overflow keeps on disk, where a person can look.

    STATE_DIR/cloud/POOL_ID/
        token                 the pool's token, 0600 (reaches sandboxes as a Modal Secret)
        pool-HOST-PID.json    one per process running the pool: who (host, pid), its
                              profile, its sandboxes (id, url, slots, state, created,
                              ended) and what they have cost so far

The state file is rewritten whenever a sandbox changes state and every few seconds while
sandboxes run: `hpc-sandbox status` reads it, so a person sees cloud slots and cost
beside the cluster's without asking Modal. Two processes running the same pool (same
user, host, state dir and cloud profile) each keep their own file.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import HpcSandboxError
from ..jobfolder import read_private, write_json_atomic


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


@dataclass
class SandboxEntry:
    """One sandbox as the pool knows it (pool.json's `sandboxes`)."""

    id: str
    name: str
    slots: int
    state: str  # creating, ready, dead, stopped
    created: float  # Unix time
    url: str | None = None
    ended: float | None = None
    reason: str | None = None

    def seconds(self, now: float) -> float:
        return max(0.0, (self.ended or now) - self.created)


@dataclass
class PoolState:
    pool_id: str
    profile: str
    owner: str
    started: float
    cost_per_hour: float | None = None
    sandboxes: list[SandboxEntry] = field(default_factory=list)
    runtime: str = "none"  # how the slots of one sandbox are kept apart
    stopped: float | None = None  # when the pool stopped (and stopped its sandboxes)
    updated: float = 0.0

    def sandbox_seconds(self, now: float) -> float:
        return sum(s.seconds(now) for s in self.sandboxes)

    def cost(self, now: float) -> float | None:
        return None if self.cost_per_hour is None else self.sandbox_seconds(now) / 3600 * self.cost_per_hour


@dataclass(frozen=True)
class CloudFolder:
    state_dir: Path
    pool_id: str

    @property
    def path(self) -> Path:
        return Path(self.state_dir).expanduser() / "cloud" / self.pool_id

    @property
    def token(self) -> Path:
        return self.path / "token"

    def state_file(self, owner: str) -> Path:
        return self.path / f"pool-{owner.replace(':', '-').replace('/', '-')}.json"

    def state_files(self) -> list[Path]:
        return sorted(self.path.glob("pool-*.json"))

    def make_token(self, reuse: bool) -> str:
        """The pool's token: the one kept from an earlier run (to adopt its sandboxes),
        or a new one."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if reuse and self.token.exists():
            return read_private(self.token, "pool token").strip()
        token = secrets.token_urlsafe(32)
        temporary = self.token.with_suffix(".new")
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        os.replace(temporary, self.token)
        return token

    def write(self, state: PoolState) -> None:
        write_json_atomic(self.state_file(state.owner), asdict(state))

    def read(self, path: Path) -> PoolState:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["sandboxes"] = [SandboxEntry(**entry) for entry in data.get("sandboxes", [])]
            return PoolState(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise HpcSandboxError(f"cannot read {path}: {exc}") from None


def list_pools(state_dir: Path) -> list[CloudFolder]:
    root = Path(state_dir).expanduser() / "cloud"
    if not root.is_dir():
        return []
    return [CloudFolder(state_dir, p.name) for p in sorted(root.iterdir()) if any(p.glob("pool-*.json"))]
