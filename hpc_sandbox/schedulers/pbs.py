"""PBS (Torque and PBS Pro) through its CLI: `qsub`, `qstat`, `qdel`.

One `qstat` call per poll covers every watched job. The first poll finds which form
the server answers, and that form is kept for the rest of the process:

1. `qstat -f -F json -t`: PBS Pro / OpenPBS (JSON since 14.1; `-t` lists array subjobs);
2. `qstat -f -t`: Torque's full text format, array subjobs expanded;
3. `qstat -f`: the same text without `-t` (Slurm's Torque wrappers, which have neither
   `-F` nor `-t`, are recognised and asked this way from the start).

PBS Pro drops finished jobs from `qstat` unless asked for history (`-x`); a job that has
left it is looked up with `qstat -x` (where the server keeps job history) before it
is declared ended with an unknown end state, as slurm.py does with sacct. Torque keeps
finished jobs listed in state C for `keep_completed` seconds, with their exit_status.

Pending PBS Pro jobs carry the start time its scheduler estimates for them
(`estimated.start_time`, set when its scheduler computes one: for the top jobs it
backfills around, or for every queued job where the site sets `est_start_time_freq`).
Torque and Slurm's wrappers print no estimate: there it is None.

Job ids: Torque and PBS Pro print `123.server` (arrays `123[].server`, subjobs
`123[4].server`, older Torque `123-4.server`); Slurm's wrapper prints the bare Slurm id.
Every task is filed under its array's key: sequence number plus short server name.
Slurm's wrapper lists each array task under its own Slurm id, with nothing naming the
array; there the job is submitted under its unique hpc-sandbox key (`qsub -N`) and its
tasks are found by that name.
"""
from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from ..errors import SchedulerError
from ..jobspec import RenderedJobspec
from ..jobfolder import JobFolder, JobInfo
from ..spec import SandboxSpec
from ..jobstate import JobState
from .batch import BatchScheduler, Task, run_command

log = logging.getLogger(__name__)

Verdict = tuple[JobState, str]  # a job's state and the scheduler's words for it
Record = tuple[str, dict]  # (job id as qstat prints it, its attributes)

QSTAT_FORMS: dict[str, tuple[str, ...]] = {
    "json": ("qstat", "-f", "-F", "json", "-t"),
    "text-t": ("qstat", "-f", "-t"),
    "text": ("qstat", "-f"),
}
# The form that worked, per qstat executable (new Scheduler objects are made per call).
_FORM: dict[str, str] = {}

# job_state letters (PBS Pro and Torque) that say the job is alive, and what they mean.
LIVE_STATES: dict[str, tuple[JobState, str]] = {
    "Q": (JobState.PENDING, "queued"),
    "H": (JobState.PENDING, "held"),
    "W": (JobState.PENDING, "waiting for its start time"),
    "T": (JobState.PENDING, "being moved"),
    "S": (JobState.PENDING, "suspended"),
    "U": (JobState.PENDING, "suspended (workstation busy)"),
    "R": (JobState.RUNNING, ""),
    "B": (JobState.RUNNING, "array begun"),
    "E": (JobState.COMPLETING, "exiting"),
    "M": (JobState.UNKNOWN, "moved to another server"),
}
# Ended: X (PBS Pro subjob finished), F (PBS Pro finished, job history), C (Torque completed).
ENDED_STATES = frozenset("XFC")
# Waiting and never started: only these have a start that is still a forecast (S and U
# are suspended, having run).
NOT_STARTED_STATES = frozenset("QHWT")
# Negative Exit_status values: PBS's own codes for jobs that did not run to their end
# (JOB_EXEC_* in openpbs src/include/job.h). Torque shares -1 to -7.
EXEC_CODES = {
    -1: "JOB_EXEC_FAIL1: exec failed before files, no retry",
    -2: "JOB_EXEC_FAIL2: exec failed after files, no retry",
    -3: "JOB_EXEC_RETRY: exec failed, will retry",
    -4: "JOB_EXEC_INITABT: aborted on MOM initialization",
    -5: "JOB_EXEC_INITRST: aborted on MOM init, checkpoint, no migrate",
    -6: "JOB_EXEC_INITRMG: aborted on MOM init, checkpoint, migrate",
    -7: "JOB_EXEC_BADRESRT: restart failed",
    -10: "JOB_EXEC_FAILUID: invalid uid/gid for the job",
    -11: "JOB_EXEC_RERUN: rerun",
    -12: "JOB_EXEC_CHKP: checkpointed and killed",
    -13: "JOB_EXEC_FAIL_PASSWORD: bad password",
    -14: "JOB_EXEC_RERUN_SIS_FAIL: rerun after a sister MOM failed",
    -15: "JOB_EXEC_QUERST: requeued for restart from checkpoint",
    -16: "JOB_EXEC_FAILHOOK_RERUN: a hook rejected it, requeued",
    -17: "JOB_EXEC_FAILHOOK_DELETE: a hook rejected it, deleted",
    -18: "JOB_EXEC_HOOK_RERUN: a hook requeued it",
    -19: "JOB_EXEC_HOOK_DELETE: a hook deleted it",
    -20: "JOB_EXEC_RERUN_MS_FAIL: lost the mother superior",
    -21: "JOB_EXEC_FAIL_SECURITY: security breach in the PBS directory",
    -22: "JOB_EXEC_HOOKERROR: a hook failed or timed out",
    -23: "JOB_EXEC_FAIL_KRB5: no Kerberos credentials",
    -24: "JOB_EXEC_KILL_NCPUS_BURST: killed for exceeding ncpus (burst)",
    -25: "JOB_EXEC_KILL_NCPUS_SUM: killed for exceeding ncpus (sum)",
    -26: "JOB_EXEC_KILL_VMEM: killed for exceeding vmem",
    -27: "JOB_EXEC_KILL_MEM: killed for exceeding mem",
    -28: "JOB_EXEC_KILL_CPUT: killed for exceeding cput",
    -29: "JOB_EXEC_KILL_WALLTIME: killed for exceeding walltime",
    -30: "JOB_EXEC_JOINJOB: join job error",
    -31: "JOB_EXEC_KILL_HPMEM: killed for exceeding hpmem",
    -32: "JOB_EXEC_RERUN_ZOMBIE_JOB: the MOM lost the job",
}
SIGNALS = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}

_JOB_ID = re.compile(r"^(?P<seq>\d+)(?:\[(?P<index>[^\]]*)\]|-(?P<dash>\d+))?(?P<server>\.[^\s@]+)?(?:@\S+)?$")
_ATTRIBUTE = re.compile(r"^(?P<indent>\s+)(?P<name>[A-Za-z_][\w.]*) = ?(?P<value>.*)$")


# --- job ids ------------------------------------------------------------------------------


def array_key(job_id: str) -> str:
    """What identifies a job or array across qsub, qstat and subjobs: `123.server`.

    `123[].srv.example.org`, `123[4].srv`, `123-4.srv` and `123.srv` all give `123.srv`
    (qsub may print the server's full name where qstat prints its short one).
    """
    match = _JOB_ID.match(job_id.strip())
    if not match:
        return job_id.strip()
    server = (match["server"] or "").lstrip(".").split(".")[0]
    return f"{match['seq']}.{server}" if server else match["seq"]


def is_array_parent(job_id: str) -> bool:
    """`123[].server`: the array itself, listed beside its subjobs by PBS Pro's `qstat -t`."""
    match = _JOB_ID.match(job_id.strip())
    return bool(match and match["index"] == "")


def parse_qsub_output(stdout: str) -> str:
    """The job id qsub printed: the last non-empty line (a site may print notices first)."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    job_id = lines[-1] if lines else ""
    if not _JOB_ID.fullmatch(job_id):
        raise SchedulerError(f"qsub printed {stdout.strip()[-200:]!r}, not a job id")
    return job_id


# --- states -------------------------------------------------------------------------------


def _get(attrs: dict, name: str) -> object:
    """An attribute whatever its case (PBS Pro writes Exit_status, Torque exit_status)."""
    if name in attrs:
        return attrs[name]
    lower = name.lower()
    return next((v for k, v in attrs.items() if k.lower() == lower), None)


def _letter(attrs: dict) -> str:
    """The job_state letter (Q, R, ...), upper case; "" when qstat gave none."""
    return str(_get(attrs, "job_state") or "").strip().upper()[:1]


def pbs_state(attrs: dict) -> Verdict:
    """Our state for one job or subjob, and the scheduler's own words for why."""
    letter = _letter(attrs)
    comment = str(_get(attrs, "comment") or "").strip()
    if letter in LIVE_STATES:
        state, meaning = LIVE_STATES[letter]
        if state is JobState.RUNNING:
            return state, meaning  # "Job run at ... on (node)" says nothing a user needs
        return state, comment or meaning
    if letter in ENDED_STATES:
        return _ended(letter, attrs, comment)
    return JobState.UNKNOWN, f"job_state {letter or '?'}" + (f": {comment}" if comment else "")


def _ended(letter: str, attrs: dict, comment: str) -> Verdict:
    raw = _get(attrs, "Exit_status")
    try:
        code = int(str(raw).strip()) if raw is not None else None
    except ValueError:
        code = None
    details: list[str] = []
    if code is None:
        # PBS Pro substate 91: terminated (deleted) before it ran; 93: failed.
        substate = str(_get(attrs, "substate") or "")
        state = {"91": JobState.CANCELLED, "93": JobState.FAILED}.get(substate, JobState.DONE)
        head = f"{letter}, no exit status"
    else:
        head = f"{letter}, Exit_status={code}"
        if code == 0:
            state = JobState.DONE
        elif code == -29:
            state = JobState.TIMEOUT
            details.append(EXEC_CODES[code])
        elif code < 0:
            state = JobState.FAILED
            details.append(EXEC_CODES.get(code, "a PBS execution error (JOB_EXEC_*)"))
        elif code > 256:
            signal = code - 256
            state = JobState.CANCELLED if signal in (9, 15) else JobState.FAILED
            details.append(f"killed by {SIGNALS.get(signal, f'signal {signal}')}"
                           + (" (qdel, or a limit)" if signal in (9, 15) else ""))
        else:
            state = JobState.FAILED
    if comment:
        details.append(comment)
    return state, "; ".join([head, *details])


# --- expected start --------------------------------------------------------------------------

_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
# ctime(3) as PBS prints times: "Wed Dec  2 10:00:00 2026" (the day of month padded by
# a space). Read by hand rather than with strptime, whose %a/%b follow the locale.
_CTIME = re.compile(r"^(?:[A-Za-z]{3}\s+)?(?P<month>[A-Za-z]{3})\s+(?P<day>\d{1,2})\s+"
                    r"(?P<hour>\d{1,2}):(?P<minute>\d{2}):(?P<second>\d{2})\s+(?P<year>\d{4})$")


def pbs_time(value: object) -> float | None:
    """A PBS time as Unix seconds: an epoch number (some `-F json` versions) or a ctime
    string in the server's local time (`qstat -f`, other JSON versions); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    text = str(value or "").strip()
    if text.isdigit():
        return float(text) if int(text) > 0 else None
    match = _CTIME.match(text)
    month = _MONTHS.get(match["month"].title()) if match else None
    if match is None or month is None:
        return None
    try:
        return datetime(int(match["year"]), month, int(match["day"]), int(match["hour"]),
                        int(match["minute"]), int(match["second"])).timestamp()
    except ValueError:  # "Feb 31": not a date
        return None


def estimated_start(attrs: dict) -> float | None:
    """PBS Pro's `estimated.start_time`, whatever way qstat printed it: a dotted name in
    the text form, a nested {"estimated": {"start_time": ...}} in JSON (as it nests
    Resource_List); None where the server has computed none (and always on Torque)."""
    nested = _get(attrs, "estimated")
    value = _get(nested, "start_time") if isinstance(nested, dict) else None
    if value is None:
        value = _get(attrs, "estimated.start_time")
    return pbs_time(value) if value is not None else None


# --- qstat output -------------------------------------------------------------------------


def parse_qstat_json(text: str) -> list[Record]:
    """`qstat -f -F json` (PBS Pro): {"Jobs": {"123.server": {"job_state": "R", ...}}}."""
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise SchedulerError(f"qstat -F json printed something that is not JSON: {exc}") from None
    jobs = data.get("Jobs") or {}
    return [(job_id, attrs) for job_id, attrs in jobs.items() if isinstance(attrs, dict)]


def parse_qstat_text(text: str) -> list[Record]:
    """`qstat -f` text: `Job Id: ...` blocks of `name = value` lines.

    Torque and PBS Pro indent attributes by four spaces and wrap long values onto lines
    that start with a tab; Slurm's wrapper indents attributes by a tab and never wraps.
    The first attribute of a block says which indentation marks attributes; any other
    line continues the value before it.
    """
    records: list[Record] = []
    attrs: dict[str, str] = {}
    indent: str | None = None
    last: str | None = None
    for line in text.splitlines():
        if line.startswith("Job Id:"):
            attrs, indent, last = {}, None, None
            records.append((line.split(":", 1)[1].strip(), attrs))
            continue
        if not records or not line.strip():
            continue
        match = _ATTRIBUTE.match(line)
        if match and indent is None:
            indent = match["indent"]
        if match and match["indent"] == indent:
            last = match["name"]
            attrs[last] = match["value"].strip()
        elif last is not None:
            attrs[last] += line[1:] if line.startswith("\t") else line.strip()
    return records


def group_tasks(records: Iterable[Record]) -> tuple[dict[str, list[Task]], dict[str, list[Task]]]:
    """Tasks by array key, and by Job_Name.

    With subjobs listed (`-t`) the array parent is left out: it would count the array
    twice. A parent listed alone (no `-t`, or all its subjobs queued and not expanded)
    stands for its whole array.

    Tasks not yet started carry PBS Pro's estimated start; queued subjobs listed without
    one take their array parent's, which is the estimate for the array's next subjob.
    """
    records = list(records)
    # A begun (B) or queued array parent is estimated for its queued rest: its estimate
    # is when the array's next subjob starts.
    parent_estimates = {array_key(job_id): estimated_start(attrs) for job_id, attrs in records
                        if is_array_parent(job_id) and (_letter(attrs) in NOT_STARTED_STATES or _letter(attrs) == "B")}
    by_key: dict[str, list[Task]] = {}
    parents: dict[str, Task] = {}
    by_name: dict[str, list[Task]] = {}
    for job_id, attrs in records:
        key = array_key(job_id)
        estimate = None
        if _letter(attrs) in NOT_STARTED_STATES:
            estimate = estimated_start(attrs) or parent_estimates.get(key)
        task = Task(*pbs_state(attrs), estimate)
        if is_array_parent(job_id):
            parents[key] = task
        else:
            by_key.setdefault(key, []).append(task)
            name = str(_get(attrs, "Job_Name") or "")
            if name:
                by_name.setdefault(name, []).append(task)
    for key, task in parents.items():
        by_key.setdefault(key, [task])
    return by_key, by_name


# --- Slurm's Torque wrappers ------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _is_slurm_wrapper(path: str | None) -> bool:
    if path is None:
        return False
    try:
        with open(path, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return False
    return head.startswith(b"#!") and (b"sbatch" in head or b"use Slurm" in head)


def slurm_torque_wrapper(command: str = "qsub") -> bool:
    """Is this command one of Slurm's Torque wrappers (slurm-wlm-torque: Perl scripts on
    Slurm's API)? Real Torque and PBS Pro commands are compiled programs."""
    return _is_slurm_wrapper(shutil.which(command))


def _one_line(message: str) -> str:
    """Slurm's qsub wrapper reports sbatch's failure over several lines on stdout; keep
    the label and sbatch's own error lines."""
    label, sep, rest = message.partition("and the output was:")
    if sep:
        label = label.split("):", 1)[0] + ")"
        said = [ln.strip().strip("'").strip() for ln in rest.splitlines()]
        said = [ln for ln in said if ln]
        errors = [ln for ln in said if "error" in ln.lower()] or said
        message = f"{label}: {'; '.join(errors)}"
    return " ".join(message.split())


# --- the scheduler --------------------------------------------------------------------------


class PbsScheduler(BatchScheduler):
    name = "pbs"
    submit_command = ("qsub",)
    cancel_command = ("qdel",)

    def submit(self, spec: SandboxSpec, folder: JobFolder) -> JobInfo:
        try:
            return super().submit(spec, folder)
        except SchedulerError as exc:
            raise SchedulerError(_one_line(str(exc)), timed_out=exc.timed_out, returncode=exc.returncode,
                                 said=exc.said) from None

    def submit_argv(self, folder: JobFolder, script: Path, part: RenderedJobspec) -> list[str]:
        """`qsub -j oe -o LOGS ...`: output joined and kept in the job folder, where
        `hpc-sandbox submit --wait` reads a node server's error.

        The script says the same (`#PBS -j oe`, `#PBS -o LOGS/`), which Torque and PBS Pro
        honour; repeating it here also holds when a site template drops those lines.
        Slurm's wrapper ignores both directives and always passes its own `-o`/`-e`, and
        sbatch cannot write into a folder: there the file is named `pbs-%j.out` (Slurm's
        pattern, one per task) and `-N` is the job's unique key, because the wrapper's
        qstat lists each array task under its own Slurm id: the name is what ties them
        to the array.
        """
        if slurm_torque_wrapper():
            return ["qsub", "-j", "oe", "-o", str(folder.logs / "pbs-%j.out"), "-N", folder.job_id, str(script)]
        return ["qsub", "-j", "oe", "-o", f"{folder.logs}/", str(script)]

    def parse_job_id(self, stdout: str) -> str:
        return parse_qsub_output(stdout)

    def cancel(self, job: JobInfo, purge: bool = False) -> None:
        """qdel; a job that has already ended is not an error (qdel says so, or the Slurm
        wrapper exits 1 without a word): only a job still alive after a failed qdel is."""
        try:
            super().cancel(job)
        except SchedulerError:
            status = self.status([job])[job.job_id]
            if not status.state.ended:
                raise
            log.info("qdel: job %s had already ended (%s)", job.job_id, status.reason)

    # --- state --------------------------------------------------------------------------

    def query(self, jobs: Sequence[JobInfo]) -> dict[str, list[Task]]:
        form, records = self._qstat()
        by_key, by_name = group_tasks(records)
        tasks: dict[str, list[Task]] = {}
        missing: list[str] = []
        for job in jobs:
            named = by_name.get(job.job_id)
            if named and job.scheduler_ids:
                # Slurm's wrapper: the tasks carry the job's unique key as name (submit_argv).
                tasks[job.scheduler_ids[0]] = named
                tasks.update({sid: [] for sid in job.scheduler_ids[1:]})
                continue
            for scheduler_id in job.scheduler_ids:
                found = by_key.get(array_key(scheduler_id))
                if found is None:
                    missing.append(scheduler_id)
                else:
                    tasks[scheduler_id] = found
        if missing and form == "json":
            history = self._from_history(missing)
            for scheduler_id in missing:
                if array_key(scheduler_id) in history:
                    tasks[scheduler_id] = history[array_key(scheduler_id)]
        for scheduler_id in missing:
            tasks.setdefault(scheduler_id, [Task(JobState.DONE, "left qstat; its end state is unknown "
                                                                 "(the server keeps no job history for it)")])
        return tasks

    def _qstat(self) -> tuple[str, list[Record]]:
        """One qstat call (after the first poll of a process has found the form that works)."""
        where = shutil.which("qstat") or "qstat"
        known = _FORM.get(where)
        if known:
            forms = [known]
        else:  # Slurm's wrapper knows neither -F nor -t: no need to ask it
            forms = ["text"] if slurm_torque_wrapper("qstat") else list(QSTAT_FORMS)
        error: SchedulerError | None = None
        while forms:
            form = forms.pop(0)
            argv = QSTAT_FORMS[form]
            try:
                out = run_command(argv, what=" ".join(argv))
            except SchedulerError as exc:
                if exc.returncode == 153 and not exc.said:
                    out = ""  # Slurm's wrapper when it lists no job at all: exit 153 (PBSE_UNKJOBID), silent
                elif known:
                    raise  # this form worked before: what qstat says now is the answer
                else:
                    error = exc
                    continue
            try:
                records = parse_qstat_json(out) if form == "json" else parse_qstat_text(out)
            except SchedulerError as exc:
                # A known OpenPBS bug prints invalid JSON for some jobs' environments
                # (openpbs/openpbs#2541); the text form has no such problem.
                log.warning("%s; reading qstat -f -t from now on", exc)
                error, known = exc, None
                forms = ["text-t", "text"]
                continue
            if _FORM.get(where) != form:
                log.debug("qstat answers %s", " ".join(argv))
                _FORM[where] = form
            return form, records
        assert error is not None
        raise error

    def _from_history(self, ids: list[str]) -> dict[str, list[Task]]:
        """Finished PBS Pro jobs, from the server's job history (off on some servers)."""
        try:
            out = run_command(["qstat", "-x", "-f", "-F", "json", "-t", *ids], what="qstat -x")
            return group_tasks(parse_qstat_json(out))[0]
        except SchedulerError as exc:
            log.debug("no job history for %s: %s", ", ".join(ids), exc)
            return {}
