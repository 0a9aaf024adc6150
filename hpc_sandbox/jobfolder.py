"""The job folder: everything about one job, on disk, where a person can look.

This module is the one place that knows the layout. Every other module asks a
`JobFolder` for a path; none spells one. Under the state directory (default
`~/.hpc-sandbox`, which on a cluster must sit on a filesystem the login and compute
nodes share):

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

What lives elsewhere: slot workspaces are node-local scratch (`$TMPDIR/hpc-sandbox-UID/`,
see `server/main.py`), never on the shared filesystem.

A node server that is ready writes its record atomically (temp file + rename), so a
reader never sees half a record; the pool and `hpc-sandbox status` read the folder.
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

from .errors import ConfigError, JobNotFound

log = logging.getLogger(__name__)

STATE_DIR_ENV = "HPC_SANDBOX_STATE_DIR"


def default_state_dir() -> Path:
    return Path("~/.hpc-sandbox").expanduser()


def users_state_dir() -> Path:
    """The state dir a user means when naming none: $HPC_SANDBOX_STATE_DIR, as the CLI
    reads it, else ~/.hpc-sandbox (for Python code, so that it finds the CLI's jobs)."""
    named = os.environ.get(STATE_DIR_ENV)
    return Path(named).expanduser() if named else default_state_dir()


def jobs_root(state_dir: Path) -> Path:
    return Path(state_dir) / "jobs"


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


def _write_private(path: Path, data: bytes) -> None:
    """Create a file 0600 from the start (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


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

    def record_path(self, hostname: str, port: int) -> Path:
        return self.servers / f"{hostname}-{port}.json"

    def exists(self) -> bool:
        return self.path.is_dir()

    # --- the token and the certificate ---------------------------------------------

    def create_token(self) -> Path:
        """Make the folder (0700) and its token file (created 0600: never readable by others)."""
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        _write_private(self.token, (secrets.token_urlsafe(32) + "\n").encode())
        return self.token

    def create_credentials(self, tls: bool = True) -> None:
        """The token and, unless opted out, the job's own TLS key pair (see tls.py)."""
        self.create_token()
        if tls:
            from .tls import make_self_signed  # needs `cryptography`: only where jobs are submitted

            cert, key = make_self_signed(f"hpc-sandbox {self.job_id}")
            _write_private(self.tls_key, key)
            _write_private(self.tls_cert, cert)

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
        shutil.rmtree(self.path, ignore_errors=True)
