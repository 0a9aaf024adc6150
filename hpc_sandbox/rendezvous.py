"""Rendezvous: how node servers announce themselves and how clients find them.

A node server that is ready writes one small JSON record into its job's folder
under the state directory; the pool and the CLI read that folder. Records are
written atomically (temp file + rename) so a reader never sees half a record, and
the folder layout is plain enough to inspect by hand:

    STATE_DIR/jobs/JOB/token            the job's bearer token (0600)
    STATE_DIR/jobs/JOB/job.json         what was submitted (scheduler, ids, spec)
    STATE_DIR/jobs/JOB/servers/*.json   one record per ready node server
    STATE_DIR/jobs/JOB/logs/            node server logs
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import ConfigError, JobNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerRecord:
    job_id: str
    host: str
    port: int
    slots: int
    pid: int
    hostname: str
    runtime: str
    started_at: float
    task_index: int = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def name(self) -> str:
        return f"{self.hostname}:{self.port}"


def job_dir(state_dir: Path, job_id: str) -> Path:
    return Path(state_dir) / "jobs" / job_id


def token_path(state_dir: Path, job_id: str) -> Path:
    return job_dir(state_dir, job_id) / "token"


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


def record_path(state_dir: Path, record: ServerRecord) -> Path:
    return job_dir(state_dir, record.job_id) / "servers" / f"{record.hostname}-{record.port}.json"


def write_record(state_dir: Path, record: ServerRecord) -> Path:
    path = record_path(state_dir, record)
    write_json_atomic(path, asdict(record))
    return path


def read_records(state_dir: Path, job_id: str) -> list[ServerRecord]:
    folder = job_dir(state_dir, job_id) / "servers"
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(ServerRecord(**json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError) as exc:
            # A record from a newer or broken server must not hide the others.
            log.warning("ignoring unreadable server record %s: %s", path, exc)
    return records


def list_jobs(state_dir: Path) -> list[str]:
    folder = Path(state_dir) / "jobs"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def create_token(state_dir: Path, job_id: str) -> Path:
    """Make the job's token file (0600, created with that mode: never readable by others)."""
    path = token_path(state_dir, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path


def read_token(path: Path) -> str:
    """Read a token file, refusing one that others could read."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"token file {path} does not exist") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"token file {path} has mode {oct(st.st_mode & 0o777)}; it must be 0600 (chmod 600 {path})")
    if st.st_uid != os.getuid():
        raise ConfigError(f"token file {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ConfigError(f"token file {path} holds no usable token (under 16 characters)")
    return token


def job_token(state_dir: Path, job_id: str) -> str:
    path = token_path(state_dir, job_id)
    if not job_dir(state_dir, job_id).is_dir():
        raise JobNotFound(f"no job {job_id!r} in {Path(state_dir) / 'jobs'}")
    return read_token(path)


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

    @property
    def location(self) -> str:
        return "local" if self.scheduler == "local" else "cloud" if self.scheduler == "modal" else "cluster"


def write_job_info(state_dir: Path, info: JobInfo) -> None:
    data = asdict(info)
    data["scheduler_ids"] = list(info.scheduler_ids)
    write_json_atomic(job_dir(state_dir, info.job_id) / "job.json", data)


def read_job_info(state_dir: Path, job_id: str) -> JobInfo:
    path = job_dir(state_dir, job_id) / "job.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        data["scheduler_ids"] = tuple(data.get("scheduler_ids") or ())
        return JobInfo(**data)
    except FileNotFoundError:
        raise JobNotFound(f"no job {job_id!r} in {Path(state_dir) / 'jobs'}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is unreadable: {exc}") from None
