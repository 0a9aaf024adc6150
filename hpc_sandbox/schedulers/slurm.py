"""Slurm through its CLI: `sbatch --parsable`, `squeue --json`, `scancel`.

One `squeue` call per poll covers every watched job (Slurm 22.05's `--json` lists
all jobs anyway and ignores `--jobs`). A job that has left squeue is looked up once
in `sacct`, which many small clusters run without (then its end state is unknown,
and said so). Pending jobs carry the start time Slurm expects for them (`start_time`,
which the backfill scheduler fills in; what `squeue --start` shows). Where pyslurm is
installed and built for the cluster's Slurm release, job states come from it instead
of squeue (slurm_pyslurm.py; that path reads no start estimate).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from datetime import datetime

from ..errors import SchedulerError
from ..jobfolder import JobInfo
from ..spec import SandboxSpec
from ..jobstate import JobState
from . import slurm_pyslurm
from .batch import BatchScheduler, Task, run_command

log = logging.getLogger(__name__)

STATES = {
    "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING, "STOPPED": JobState.PENDING, "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING, "SIGNALING": JobState.RUNNING, "STAGE_OUT": JobState.COMPLETING,
    "COMPLETING": JobState.COMPLETING, "COMPLETED": JobState.DONE,
    "FAILED": JobState.FAILED, "BOOT_FAIL": JobState.FAILED, "NODE_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED, "DEADLINE": JobState.FAILED, "SPECIAL_EXIT": JobState.FAILED,
    "REVOKED": JobState.CANCELLED, "CANCELLED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT, "PREEMPTED": JobState.PREEMPTED,
}


def slurm_state(raw: object) -> tuple[JobState, str]:
    """Map squeue's state (a string before 23.02, a list of flags after) to ours."""
    names = raw if isinstance(raw, list) else str(raw).split()
    base = str(names[0]).upper().split("+")[0] if names else ""
    if base.startswith("CANCELLED"):  # sacct says "CANCELLED by 1000"
        base = "CANCELLED"
    return STATES.get(base, JobState.UNKNOWN), base


def _detail(state: JobState, slurm_name: str, reason: str) -> str:
    """Slurm's own words worth showing: why a job waits, or how it ended."""
    reason = "" if reason in ("None", "(null)") else reason
    if state.ended:
        return f"{slurm_name}: {reason}" if reason else slurm_name
    return reason


# Slurm's "no value" markers for 32-bit fields (NO_VAL, INFINITE): not a time.
_NOT_A_TIME = 0xFFFFFFFE


def json_time(value: object) -> float | None:
    """A time field of `squeue --json` as Unix seconds, or None where Slurm has none.

    Slurm 22.05 (OpenAPI v0.0.38) prints a plain integer, 0 when unset; 23.02 and later
    print {"set": bool, "infinite": bool, "number": N}.
    """
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 < value < _NOT_A_TIME else None


def plain_time(text: str) -> float | None:
    """squeue's `%S` as Unix seconds: `2026-12-02T10:00:00` is local time (the format
    SLURM_TIME_FORMAT=standard gives); `N/A`, `Unknown` and anything else is None."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def _expected(slurm_name: str, start: float | None) -> float | None:
    """A start time that is an estimate: only a PENDING job's. For any other state
    (running, suspended, configuring, ended) Slurm's start_time is when it did start."""
    return start if slurm_name == "PENDING" else None


def parse_squeue_json(text: str) -> dict[str, list[Task]]:
    """Task states keyed by the id sbatch printed (the array's id for array tasks)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SchedulerError(f"squeue --json printed something that is not JSON: {exc}") from None
    tasks: dict[str, list[Task]] = {}
    for job in data.get("jobs", []):
        state, name = slurm_state(job.get("job_state"))
        expected = _expected(name, json_time(job.get("start_time")))
        name = _detail(state, name, job.get("state_reason") or "")
        array_id = job.get("array_job_id")
        if isinstance(array_id, dict):  # newer data_parser: {"set": true, "number": N}
            array_id = array_id.get("number") if array_id.get("set") else 0
        key = str(array_id) if array_id else str(job.get("job_id"))
        tasks.setdefault(key, []).append(Task(state, name, expected))
    return tasks


# Array job id, job id, state, reason, start time (expected, for a pending job).
SQUEUE_PLAIN_FORMAT = "%F|%i|%T|%r|%S"
# %S follows SLURM_TIME_FORMAT, which a user may have set to "relative" or any strftime
# format in their shell; "standard" is the ISO-like form plain_time reads.
SQUEUE_PLAIN_ENV = {"SLURM_TIME_FORMAT": "standard"}


def parse_squeue_plain(text: str) -> dict[str, list[Task]]:
    """`squeue -h -t all -o '%F|%i|%T|%r|%S'` lines: array job id, job id, state, reason,
    start time. Lines without the start time (the earlier `%F|%i|%T|%r`) are read too."""
    tasks: dict[str, list[Task]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4:
            continue
        array_id, job_id, raw_state, reason = parts[:4]
        state, name = slurm_state(raw_state)
        expected = _expected(name, plain_time(parts[4])) if len(parts) > 4 else None
        key = array_id or job_id.split("_")[0]  # %F is the job's own id when it is not an array
        name = _detail(state, name, reason)
        tasks.setdefault(key, []).append(Task(state, name, expected))
    return tasks


def parse_sacct(text: str) -> dict[str, list[Task]]:
    """`sacct -n -P -X -o JobID,State` lines (array tasks as 123_4)."""
    tasks: dict[str, list[Task]] = {}
    for line in text.splitlines():
        job_id, _, raw_state = line.strip().partition("|")
        if job_id:
            state, name = slurm_state(raw_state)
            tasks.setdefault(job_id.split("_")[0], []).append(Task(state, f"{name} (from sacct)"))
    return tasks


class SlurmScheduler(BatchScheduler):
    name = "slurm"
    submit_command = ("sbatch", "--parsable")
    cancel_command = ("scancel",)
    _plain_only = False  # set once squeue --json has failed and the plain format has worked

    def with_cluster_limits(self, spec: SandboxSpec) -> SandboxSpec:
        if not spec.array or spec.max_array_size is not None:
            return spec
        try:
            config = run_command(["scontrol", "show", "config"], what="scontrol show config")
        except SchedulerError as exc:
            log.info("cannot read MaxArraySize (%s); assuming Slurm's default", exc)
            return spec
        match = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
        if not match:
            return spec
        log.info("this cluster's MaxArraySize is %s", match.group(1))
        return spec.replace(max_array_size=int(match.group(1)))

    def parse_job_id(self, stdout: str) -> str:
        # --parsable prints "id" or "id;cluster"
        job_id = stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SchedulerError(f"sbatch --parsable printed {stdout.strip()!r}, not a job id")
        return job_id

    def query(self, jobs: Sequence[JobInfo]) -> dict[str, list[Task]]:
        tasks = self._query_pyslurm()
        if tasks is None:
            tasks = self._query_squeue()
        missing = [i for job in jobs for i in job.scheduler_ids if i not in tasks]
        if missing:
            tasks.update(self._from_sacct(missing))
        for scheduler_id in missing:
            tasks.setdefault(scheduler_id, [Task(JobState.DONE, "left the queue; its end state is unknown "
                                                                  "(Slurm accounting is off)")])
        return tasks

    def _query_pyslurm(self) -> dict[str, list[Task]] | None:
        pyslurm = slurm_pyslurm.matching_pyslurm()
        if pyslurm is None:
            return None
        try:
            found = slurm_pyslurm.job_states(pyslurm)
        except SchedulerError as exc:
            log.warning("%s; asking squeue instead", exc)
            return None
        tasks: dict[str, list[Task]] = {}
        for key, raw_state, reason in found:
            state, name = slurm_state(raw_state)
            # slurm_pyslurm.job_states reads no start time: no estimate on this path.
            tasks.setdefault(key, []).append(Task(state, _detail(state, name, reason)))
        return tasks

    def _query_squeue(self) -> dict[str, list[Task]]:
        if self._plain_only:
            tasks = self._query_plain()
        else:
            try:
                tasks = parse_squeue_json(run_command(["squeue", "--json"], what="squeue --json"))
            except SchedulerError as exc:
                if exc.timed_out:
                    raise  # a hung controller: asking again another way would only wait twice as long
                # Slurm before 21.08 has no --json, and a build without its JSON
                # plugin fails on it: the plain format says what we need.
                log.info("squeue --json is not usable here (%s); using squeue's plain format", exc)
                tasks = self._query_plain()
                # On the class: schedulers are made afresh for each status call, and the
                # cluster's squeue does not change under a running process.
                type(self)._plain_only = True
        return tasks

    def _query_plain(self) -> dict[str, list[Task]]:
        return parse_squeue_plain(run_command(["squeue", "-h", "-t", "all", "-o", SQUEUE_PLAIN_FORMAT],
                                              env=SQUEUE_PLAIN_ENV))

    def _from_sacct(self, ids: list[str]) -> dict[str, list[Task]]:
        try:
            out = run_command(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)],
                              what="sacct")
        except SchedulerError as exc:
            log.debug("sacct unavailable: %s", exc)  # accounting off is normal on small clusters
            return {}
        return parse_sacct(out)
