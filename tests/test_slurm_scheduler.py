"""The Slurm scheduler's status polling against stand-in squeue/sacct commands.

The live cluster (tests/test_slurm_e2e.py) cannot be made to lack `--json`, run without
accounting *and* with it, or hang: these stand-ins print what real Slurm prints in those
cases (squeue 22.05's plain format, sacct's "accounting storage is disabled") and log
every call, so the good-citizen rules can be checked: one squeue per poll for all jobs,
sacct once for a job that left the queue, a timeout on every command.
"""
from __future__ import annotations

import json
import sys
import time

import pytest

from hpc_sandbox.errors import SchedulerError
from hpc_sandbox.jobfolder import JobFolder, JobInfo
from hpc_sandbox.jobstate import JobState
from hpc_sandbox.schedulers import batch, get_scheduler
from hpc_sandbox.schedulers.slurm import SlurmScheduler

from helpers import stand_in, stand_in_calls


def info(*scheduler_ids: str, job_id: str = "job-a", servers: int = 1) -> JobInfo:
    return JobInfo(job_id=job_id, scheduler="slurm", submitted_at=0.0, servers=servers, slots_per_server=1,
                   runtime="none", scheduler_ids=tuple(scheduler_ids))


def squeue_json(*jobs: dict) -> str:
    """squeue --json as Slurm 22.05 prints it (OpenAPI v0.0.38: job_state is a string)."""
    return json.dumps({"meta": {"plugin": {"type": "openapi/v0.0.38"}}, "errors": [], "jobs": list(jobs)})


def logging_tool(bin_dir, name: str, body: str) -> None:
    stand_in(bin_dir, name, f'echo "{name} $*" >> {bin_dir}/calls.log\n{body}')


def test_one_squeue_call_per_poll_covers_every_job(bin_dir, tmp_path):
    listing = tmp_path / "squeue.json"
    listing.write_text(squeue_json(
        {"job_id": 11, "array_job_id": 0, "job_state": "RUNNING", "state_reason": "None"},
        {"job_id": 12, "array_job_id": 0, "job_state": "PENDING", "state_reason": "Resources"},
        {"job_id": 14, "array_job_id": 13, "job_state": "RUNNING", "state_reason": "None"},
        {"job_id": 15, "array_job_id": 13, "job_state": "PENDING", "state_reason": "Priority"}))
    logging_tool(bin_dir, "squeue", f'[ "$*" = "--json" ] && exec cat {listing}\nexit 2')
    jobs = [info("11", job_id="a"), info("12", job_id="b"), info("13", job_id="c", servers=2)]
    status = SlurmScheduler(tmp_path).status(jobs)
    assert status["a"].state is JobState.RUNNING
    assert (status["b"].state, status["b"].reason) == (JobState.PENDING, "1 of 1 tasks pending (Resources)")
    assert (status["c"].state, status["c"].reason) == (JobState.RUNNING, "1 of 2 tasks running")
    assert stand_in_calls(bin_dir) == ["squeue --json"]


@pytest.mark.parametrize("json_failure", [
    "squeue: unrecognized option '--json'",  # Slurm before 21.08
    "squeue: error: No serializer plugin found for mime type application/json",  # built without its JSON plugin
])
def test_without_a_usable_json_output_the_plain_format_is_read(bin_dir, tmp_path, json_failure, monkeypatch):
    monkeypatch.setattr(SlurmScheduler, "_plain_only", False)  # what this test learns is undone after it
    logging_tool(bin_dir, "squeue", f'''if [ "$1" = "--json" ]; then echo "{json_failure}" >&2; exit 1; fi
        printf '%s\\n' '21|21|RUNNING|None|2026-12-02T05:43:32' '30|30_0|RUNNING|None|2026-12-02T05:43:40' \\
            '30|30_[1-3]|PENDING|JobArrayTaskLimit|N/A'
        ''')
    for _ in range(2):  # a fresh scheduler each time, as the pool's watcher makes them
        status = get_scheduler("slurm", tmp_path).status([info("21", job_id="a"), info("30", job_id="b", servers=2)])
        assert status["a"].state is JobState.RUNNING
        assert status["b"].reason == "1 of 2 tasks running"
    # --json is tried once; after that the plain format is used directly.
    assert stand_in_calls(bin_dir) == ["squeue --json", "squeue -h -t all -o %F|%i|%T|%r|%S",
                                       "squeue -h -t all -o %F|%i|%T|%r|%S"]


def test_a_job_that_left_the_queue_is_looked_up_once_in_sacct(bin_dir, tmp_path):
    logging_tool(bin_dir, "squeue", f"echo '{squeue_json()}'")
    logging_tool(bin_dir, "sacct", "printf '%s\\n' '41|CANCELLED by 0' '42_0|TIMEOUT' '42_1|COMPLETED'")
    status = SlurmScheduler(tmp_path).status([info("41", job_id="a"), info("42", job_id="b", servers=2)])
    assert (status["a"].state, status["a"].reason) == (JobState.CANCELLED, "CANCELLED (from sacct)")
    assert status["b"].state is JobState.TIMEOUT
    assert stand_in_calls(bin_dir) == ["squeue --json", "sacct -n -P -X -o JobID,State -j 41,42"]


def test_with_accounting_off_a_job_that_left_the_queue_is_done_and_says_so(bin_dir, tmp_path):
    logging_tool(bin_dir, "squeue", f"echo '{squeue_json()}'")
    logging_tool(bin_dir, "sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1")
    status = SlurmScheduler(tmp_path).status([info("51")])["job-a"]
    assert status.state is JobState.DONE and "accounting is off" in status.reason


def test_a_hung_squeue_is_an_error_within_the_command_timeout(bin_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "COMMAND_TIMEOUT", 1.0)
    logging_tool(bin_dir, "squeue", "exec sleep 60")
    started = time.monotonic()
    with pytest.raises(SchedulerError, match=r"squeue --json did not answer within 1s"):
        SlurmScheduler(tmp_path).status([info("61")])
    assert time.monotonic() - started < 10
    assert stand_in_calls(bin_dir) == ["squeue --json"]  # not asked again another way


def test_controller_down_is_one_line_quoting_slurm(bin_dir, tmp_path):
    message = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"
    logging_tool(bin_dir, "squeue", f"echo '{message}' >&2; exit 1")
    with pytest.raises(SchedulerError) as caught:
        SlurmScheduler(tmp_path).status([info("71")])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_array_over_the_clusters_max_array_size_is_submitted_in_parts(bin_dir, tmp_path):
    from hpc_sandbox.spec import SandboxSpec

    logging_tool(bin_dir, "scontrol", "printf '%s\\n' 'MaxArraySize            = 3' 'MaxJobCount             = 10000'")
    logging_tool(bin_dir, "sbatch", 'echo $(( 100 + $(wc -l < "$(dirname "$0")/calls.log") ))')
    spec = SandboxSpec(scheduler="slurm", array=5, slots=1, state_dir=tmp_path)
    job = SlurmScheduler(tmp_path).submit(spec, JobFolder(tmp_path, "job-x"))
    scripts = sorted((tmp_path / "jobs" / "job-x" / "submit").glob("*.sbatch"))
    assert [c.split()[0] for c in stand_in_calls(bin_dir)] == ["scontrol", "sbatch", "sbatch"]
    assert len(job.scheduler_ids) == 2 and len(scripts) == 2
    arrays = [line for script in scripts for line in script.read_text().splitlines()
              if line.startswith("#SBATCH --array")]
    assert arrays == ["#SBATCH --array=0-2", "#SBATCH --array=0-1"]  # 5 tasks, at most 3 per array


# --- the optional pyslurm path, through a pyslurm double -----------------------------------
# No pyslurm release builds against this cluster's Slurm 22.05, so a double stands in for
# the module: what it returns has the shape of pyslurm 23.02+'s Jobs.load() (a mapping of
# Job objects with id, array_id, state and state_reason).


class PyslurmDouble:
    """A stand-in for the pyslurm module (not the real one: see above)."""

    def __init__(self, version: str, jobs: list[dict], fail: bool = False) -> None:
        self.__version__ = version
        self.loads = 0
        outer = self

        class Jobs:
            @staticmethod
            def load():
                outer.loads += 1
                if fail:
                    raise RuntimeError("Slurm backup controller in standby mode")
                return {j["id"]: type("Job", (), j)() for j in jobs}

        self.Jobs = Jobs


@pytest.fixture
def pyslurm_double(monkeypatch):
    from hpc_sandbox.schedulers import slurm_pyslurm

    def install(double: PyslurmDouble) -> PyslurmDouble:
        monkeypatch.setitem(sys.modules, "pyslurm", double)
        slurm_pyslurm.matching_pyslurm.cache_clear()
        return double
    yield install
    slurm_pyslurm.matching_pyslurm.cache_clear()  # later tests look again, without the double


def test_a_pyslurm_built_for_this_slurm_replaces_squeue(bin_dir, tmp_path, pyslurm_double):
    logging_tool(bin_dir, "sinfo", "echo 'slurm 23.02.7'")
    logging_tool(bin_dir, "squeue", "exit 3")
    double = pyslurm_double(PyslurmDouble("23.2.2", [
        {"id": 81, "array_id": None, "state": "RUNNING", "state_reason": "None"},
        {"id": 83, "array_id": 82, "state": "PENDING", "state_reason": "Resources"}]))
    scheduler = SlurmScheduler(tmp_path)
    for _ in range(2):
        status = scheduler.status([info("81", job_id="a"), info("82", job_id="b", servers=2)])
        assert status["a"].state is JobState.RUNNING
        assert (status["b"].state, status["b"].reason) == (JobState.PENDING, "1 of 2 tasks pending (Resources)")
    assert double.loads == 2 and stand_in_calls(bin_dir) == ["sinfo --version"]  # asked once


@pytest.mark.parametrize("version, fail", [("22.5.0", False), ("23.2.2", True)])
def test_a_mismatched_or_failing_pyslurm_leaves_it_to_squeue(bin_dir, tmp_path, pyslurm_double, version, fail):
    logging_tool(bin_dir, "sinfo", "echo 'slurm 23.02.7'")
    logging_tool(bin_dir, "squeue", f"echo '{squeue_json({'job_id': 91, 'job_state': 'RUNNING'})}'")
    pyslurm_double(PyslurmDouble(version, [], fail=fail))
    assert SlurmScheduler(tmp_path).status([info("91")])["job-a"].state is JobState.RUNNING
    assert "squeue --json" in stand_in_calls(bin_dir)
