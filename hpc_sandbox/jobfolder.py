"""The state directory: every job's folder and every cloud pool's, on disk, where a
person can look.

This module is the one place that knows the layout. Every other module asks a
`JobFolder` or a `CloudFolder` for a path; none spells one. Under the state directory
(default `~/.hpc-sandbox`, which on a cluster must sit on a filesystem the login and
compute nodes share):

    STATE_DIR/jobs/JOB/                  the job folder (0700)
        token                            the job's bearer token (0600, made at submit)
        tls.crt, tls.key                 the job's own certificate and key (0600, made at
                                         submit): node servers serve HTTPS with them and
                                         clients trust nothing else (see tls.py)
        job.json                         what was submitted: scheduler, its ids, sizes
        servers/HOST-PORT.json           one ready record per node server (rendezvous)
        logs/                            node server logs (local: server-N.log; Slurm:
                                         slurm-%A_%a.out; PBS: the scheduler's names)
        submit/                          the exact scripts handed to sbatch/qsub
        submit/scheduler-ids             the scheduler's own job ids, one per line
        slot-env.json                    a cloud sandbox's node server only: the variables its
                                         slots get, {NAME: VALUE} (0600; see burst/entry.py)
    STATE_DIR/logs/JOB/                  a removed (cancelled) job's logs/, kept for the
                                         last KEPT_JOB_LOGS jobs (0700): `hpc-sandbox logs`
    STATE_DIR/cloud/POOL/                one pool's cloud overflow (0700)
        token                            the pool's token (0600; reaches its sandboxes as a
                                         Modal Secret)
        pool-HOST-PID-START.json         one per process running the pool: who, its cloud
                                         profile, its sandboxes (id, url, slots, state,
                                         created, ended) and what they have cost so far

What lives elsewhere: slot workspaces are node-local scratch (`$TMPDIR/hpc-sandbox-UID/`,
see `server/main.py`), never on the shared filesystem.

A node server that is ready writes its record atomically (temp file + rename), so a
reader never sees half a record; the pool and `hpc-sandbox status` read the folder. A
cloud pool rewrites its state file whenever a sandbox changes state and every few seconds
while sandboxes run, so `hpc-sandbox status` shows cloud slots and cost without asking
Modal. Two processes running the same pool (same user, host, state dir and cloud profile)
each keep their own state file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError, HpcSandboxError, JobNotFound

log = logging.getLogger(__name__)

STATE_DIR_ENV = "HPC_SANDBOX_STATE_DIR"
# Removing a job folder (cancel) moves its logs to STATE_DIR/logs/JOB/; the logs of
# this many jobs, the most recently removed, are kept there (older ones are deleted).
KEPT_JOB_LOGS = 10


def default_state_dir() -> Path:
    return Path("~/.hpc-sandbox").expanduser()


def users_state_dir() -> Path:
    """The state dir a user means when naming none: $HPC_SANDBOX_STATE_DIR, as the CLI
    reads it, else ~/.hpc-sandbox (for Python code, so that it finds the CLI's jobs)."""
    named = os.environ.get(STATE_DIR_ENV)
    return Path(named).expanduser() if named else default_state_dir()


def jobs_root(state_dir: Path) -> Path:
    return Path(state_dir) / "jobs"


def logs_root(state_dir: Path) -> Path:
    """Where the logs of removed jobs are kept, one folder per job."""
    return Path(state_dir).expanduser() / "logs"


def job_logs(state_dir: Path, job_id: str) -> list[Path]:
    """A job's log files, sorted: in its folder while it has one, else those kept after
    it was removed; [] when there are none."""
    for folder in (JobFolder(state_dir, job_id).logs, logs_root(state_dir) / job_id):
        if folder.is_dir():
            return sorted(p for p in folder.iterdir() if p.is_file())
    return []


def _keep_logs(logs: Path, state_dir: Path, job_id: str) -> None:
    """Move a job's logs/ to STATE_DIR/logs/JOB/ (a rename: a scheduler still writing
    to a log keeps writing into the moved file), then delete all but the KEPT_JOB_LOGS
    most recently kept."""
    if not logs.is_dir() or not any(logs.iterdir()):
        return
    root = logs_root(state_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    kept = root / job_id
    shutil.rmtree(kept, ignore_errors=True)  # a job id used again: its latest logs win
    try:
        os.replace(logs, kept)
    except OSError:  # another filesystem (a state dir put together by hand)
        shutil.move(str(logs), str(kept))
    os.utime(kept)  # kept in the order jobs are removed
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in folders[KEPT_JOB_LOGS:]:
        shutil.rmtree(old, ignore_errors=True)


def cloud_root(state_dir: Path) -> Path:
    return Path(state_dir).expanduser() / "cloud"


def list_jobs(state_dir: Path) -> list[str]:
    """The job ids with a folder under the state dir (hidden names are in-progress temp folders)."""
    folder = jobs_root(state_dir)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class ServerRecord:
    """A ready node server, as it announces itself in servers/."""

    job_id: str
    host: str
    port: int
    slots: int
    pid: int
    hostname: str
    runtime: str
    started_at: float
    task_index: int = 0
    tls: bool = False  # serves HTTPS with the job's certificate (False: a plain-HTTP opt-out)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    @property
    def name(self) -> str:
        return f"{self.hostname}:{self.port}"

    def process_gone(self) -> bool:
        """True when the record is certainly stale: its server ran on this very host and
        its process is gone (a server killed with SIGKILL cannot remove its record). A
        pid now held by another user counts as gone: our server runs as us."""
        if self.hostname != socket.gethostname() or self.pid <= 0:
            return False  # another node's process (or one a scheduler's API named): only a request can tell
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return True
        return False


@dataclass(frozen=True)
class JobInfo:
    """What `submit` recorded about a job (job.json), for status, cancel and the pool."""

    job_id: str
    scheduler: str
    submitted_at: float
    servers: int
    slots_per_server: int
    runtime: str
    scheduler_ids: tuple[str, ...] = ()  # the scheduler's own ids (Slurm job ids, local pids)
    image: str | None = None
    # What a scheduler needs to find the job again (Nomad: agent address, namespace,
    # region, static port); never a secret.
    scheduler_options: dict[str, str] = field(default_factory=dict)

    @property
    def location(self) -> str:
        # A job's scheduler is one of spec.SCHEDULERS; cloud sandboxes are no job (their
        # pool keeps a cloud folder, below), so a job is local or on a cluster.
        return "local" if self.scheduler == "local" else "cluster"


def write_json_atomic(path: Path, data: dict, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Credentials:
    """What a client needs to talk to a job's node servers: the bearer token, and the
    certificate to pin (None for a job submitted with the plain-HTTP opt-out)."""

    token: str = field(repr=False)
    cert: str | None = field(default=None, repr=False)


def read_private(path: Path, what: str) -> str:
    """Read a secret file, refusing one that others could read or that is not ours."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"{what} {path} has mode {oct(st.st_mode & 0o777)}; it must be 0600 (chmod 600 {path})")
    if st.st_uid != os.getuid():
        raise ConfigError(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    return path.read_text(encoding="utf-8")


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a secret file (a token, a key): mode 0600 from its first byte, never through
    a symlink, and never seen half-written where a reader could look.

    By default the file must not exist yet (O_EXCL): a new job's token, key and
    certificate are made before the job is submitted, so nobody reads them early, and a
    job id that collides with an existing folder fails instead of taking that job's
    token. With `replace`, the file is written under a temporary name beside it and
    renamed over the old one: a reader sees the old file or the new, whole.
    """
    target = path
    if replace:
        target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        if replace:
            os.replace(target, path)
    except BaseException:
        if replace:
            target.unlink(missing_ok=True)
        raise


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_token(path: Path) -> str:
    """Read a token file, refusing one that others could read."""
    token = read_private(Path(path), "token file").strip()
    if len(token) < 16:
        raise ConfigError(f"token file {path} holds no usable token (under 16 characters)")
    return token


@dataclass(frozen=True)
class JobFolder:
    """One job's folder: its paths, and reading and writing what is kept there."""

    state_dir: Path
    job_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())

    # --- paths ---------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return jobs_root(self.state_dir) / self.job_id

    @property
    def token(self) -> Path:
        return self.path / "token"

    @property
    def tls_cert(self) -> Path:
        return self.path / "tls.crt"

    @property
    def tls_key(self) -> Path:
        return self.path / "tls.key"

    @property
    def job_json(self) -> Path:
        return self.path / "job.json"

    @property
    def servers(self) -> Path:
        return self.path / "servers"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def submit_dir(self) -> Path:
        return self.path / "submit"

    @property
    def scheduler_ids_file(self) -> Path:
        return self.submit_dir / "scheduler-ids"

    def server_log(self, index: int) -> Path:
        """The log of a node server the local scheduler started."""
        return self.logs / f"server-{index}.log"

    @property
    def slot_env(self) -> Path:
        """A cloud sandbox's variables for its slots (written by burst/entry.py)."""
        return self.path / "slot-env.json"

    def record_path(self, hostname: str, port: int) -> Path:
        return self.servers / f"{hostname}-{port}.json"

    def exists(self) -> bool:
        return self.path.is_dir()

    # --- the token and the certificate ---------------------------------------------

    def create_token(self, token: str | None = None) -> Path:
        """Make the folder (0700) and its token file (created 0600: never readable by
        others): `token` (a cloud sandbox's node server is handed its pool's), else a new one."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        write_private(self.token, ((token or new_token()) + "\n").encode())
        return self.token

    def create_credentials(self, tls: bool = True) -> None:
        """The token and, unless opted out, the job's own TLS key pair (see tls.py)."""
        self.create_token()
        if tls:
            from .tls import make_self_signed  # needs `cryptography`: only where jobs are submitted

            cert, key = make_self_signed(f"hpc-sandbox {self.job_id}")
            write_private(self.tls_key, key)
            write_private(self.tls_cert, cert)

    def read_token(self) -> str:
        if not self.exists():
            raise JobNotFound(f"no job {self.job_id!r} in {jobs_root(self.state_dir)}")
        return read_token(self.token)

    def credentials(self) -> Credentials:
        """The token, and the certificate to pin when the job has one."""
        token = self.read_token()
        cert = read_private(self.tls_cert, "certificate") if self.tls_cert.exists() else None
        return Credentials(token, cert)

    # --- job.json ------------------------------------------------------------------

    def write_info(self, info: JobInfo) -> None:
        data = asdict(info)
        data["scheduler_ids"] = list(info.scheduler_ids)
        write_json_atomic(self.job_json, data)

    def read_info(self) -> JobInfo:
        try:
            data = json.loads(self.job_json.read_text(encoding="utf-8"))
            data["scheduler_ids"] = tuple(data.get("scheduler_ids") or ())
            # Keys a newer hpc-sandbox wrote (a login node and a compute node may differ
            # in version) are left out, not a reason to lose the job.
            known = {f.name for f in dataclasses.fields(JobInfo)}
            return JobInfo(**{key: value for key, value in data.items() if key in known})
        except FileNotFoundError:
            raise JobNotFound(f"no job {self.job_id!r} in {jobs_root(self.state_dir)}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.job_json} is unreadable: {exc}") from None

    def write_scheduler_ids(self, ids: list[str]) -> None:
        self.submit_dir.mkdir(parents=True, exist_ok=True)
        self.scheduler_ids_file.write_text("\n".join(ids) + "\n")

    # --- ready records -------------------------------------------------------------

    def write_record(self, record: ServerRecord) -> Path:
        path = self.record_path(record.hostname, record.port)
        write_json_atomic(path, asdict(record))
        return path

    def read_records(self) -> list[ServerRecord]:
        records = []
        for path in sorted(self.servers.glob("*.json")):
            try:
                records.append(ServerRecord(**json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError) as exc:
                # A record from a newer or broken server must not hide the others.
                log.warning("ignoring unreadable server record %s: %s", path, exc)
        return records

    # --- logs ----------------------------------------------------------------------

    def log_tail(self, lines: int = 1) -> str:
        """The last meaningful line(s) of the job's node server logs: usually the reason."""
        found: list[str] = []
        for path in sorted(self.logs.glob("*")):
            try:
                text = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            except OSError:
                continue
            # The node server's own one-line error ("Error: ...") says more than the
            # scheduler's note that a task exited.
            errors = ([ln for ln in text if ln.startswith("Error:")]
                      or [ln for ln in text if "error" in ln.lower()] or text)
            found += [f"{path.name}: {ln}" for ln in errors[-lines:]]
        return "; ".join(found[-3:])

    def remove(self) -> None:
        """Delete the folder; its logs are kept (see KEPT_JOB_LOGS)."""
        try:
            _keep_logs(self.logs, self.state_dir, self.job_id)
        except OSError as exc:  # the job's end must not fail for its logs
            log.warning("could not keep the logs of job %s: %s", self.job_id, exc)
        shutil.rmtree(self.path, ignore_errors=True)


# --- a cloud pool's folder ------------------------------------------------------------


@dataclass
class SandboxEntry:
    """One cloud sandbox as its pool knows it (a state file's `sandboxes`)."""

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
    """What one process running a cloud pool writes to its state file."""

    pool_id: str
    profile: str
    owner: str  # the process: burst.owner.Owner, as text
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
    """One cloud pool's folder: its token and its processes' state files."""

    state_dir: Path
    pool_id: str

    @property
    def path(self) -> Path:
        return cloud_root(self.state_dir) / self.pool_id

    @property
    def token(self) -> Path:
        return self.path / "token"

    def state_file(self, owner: str) -> Path:
        return self.path / f"pool-{owner.replace(':', '-').replace('/', '-')}.json"

    def state_files(self) -> list[Path]:
        return sorted(self.path.glob("pool-*.json"))

    def make_token(self, reuse: bool) -> str:
        """The pool's token: the one kept from an earlier run (to adopt its sandboxes),
        or a new one, replacing it."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if reuse and self.token.exists():
            return read_private(self.token, "pool token").strip()
        token = new_token()
        write_private(self.token, (token + "\n").encode(), replace=True)
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
    """The cloud pools with a state file under the state dir."""
    root = cloud_root(state_dir)
    if not root.is_dir():
        return []
    return [CloudFolder(state_dir, p.name) for p in sorted(root.iterdir()) if any(p.glob("pool-*.json"))]
