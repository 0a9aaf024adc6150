"""JobStatus.expected_start: the scheduler's estimate of when a pending job starts, which
the pool reads to decide whether waiting for the cluster beats bursting to the cloud.

Parser tests read stand-in outputs written for these tests (shapes as Slurm 22.05 and
23.02+ and PBS Pro print them; the Slurm 22.05 values are those this project's cluster
printed); the live test makes the real single-node cluster (slurm/) estimate a start:
it fills the node with a time-limited job, submits one more that must wait, and reads
`status()` until Slurm's backfill pass has estimated it (every bf_interval=5 s there).
"""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

import pytest

from hpc_sandbox import jobs
from hpc_sandbox.jobfolder import JobInfo
from hpc_sandbox.jobstate import JobState, JobStatus
from hpc_sandbox.schedulers.batch import Task, combine
from hpc_sandbox.schedulers.pbs import (PbsScheduler, estimated_start, group_tasks, parse_qstat_json,
                                        parse_qstat_text, pbs_time)
from hpc_sandbox.schedulers.slurm import (SQUEUE_PLAIN_FORMAT, SlurmScheduler, json_time, parse_squeue_json,
                                          parse_squeue_plain, plain_time)

from helpers import stand_in, stand_in_calls
from slurm_fixtures import SlurmCluster, cancel, sbatch  # the slurm_cluster fixture comes from conftest

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent / "data" / "pbs"
# Times as this project's cluster printed them: submitted 1796190227, estimated to start
# at 1796190526 (`%S` 2026-12-02T05:48:46 on a UTC machine), the blocker ran from 1796190226.
SUBMIT, ESTIMATE, STARTED = 1796190227, 1796190526, 1796190226


def local(text: str) -> float:
    """Unix seconds of a local wall-clock time, as squeue and qstat print them."""
    return datetime.fromisoformat(text).timestamp()


def info(*scheduler_ids: str, job_id: str = "job-a", servers: int = 1, scheduler: str = "slurm") -> JobInfo:
    return JobInfo(job_id=job_id, scheduler=scheduler, submitted_at=0.0, servers=servers, slots_per_server=1,
                   runtime="none", scheduler_ids=tuple(scheduler_ids))


# --- the field -------------------------------------------------------------------------------


def test_expected_start_defaults_to_none_so_existing_constructors_stay_valid():
    assert JobStatus("a", JobState.PENDING).expected_start is None
    assert JobStatus("a", JobState.PENDING, "Resources", 1.0).expected_start == 1.0


def test_combine_takes_the_earliest_estimate_among_pending_tasks_only():
    tasks = [Task(JobState.PENDING, "Priority", 300.0), Task(JobState.PENDING, "Resources", 200.0),
             Task(JobState.PENDING, "JobHeldUser"),
             Task(JobState.DONE, "", 100.0)]  # an ended task's time is no estimate
    assert combine("j", tasks, 4).expected_start == 200.0
    # Partly running: the job is running, and its pending rest is expected at 250.
    running = combine("j", [Task(JobState.RUNNING, ""), Task(JobState.PENDING, "Resources", 250.0)], 2)
    assert (running.state, running.expected_start) == (JobState.RUNNING, 250.0)
    assert combine("j", [Task(JobState.RUNNING, "", 99.0)], 1).expected_start is None
    assert combine("j", [Task(JobState.CANCELLED, "")], 1).expected_start is None
    # (state, reason) pairs, as scheduler modules built them before, are tasks without an estimate.
    assert combine("j", [(JobState.PENDING, "Resources")], 1) == JobStatus("j", JobState.PENDING,
                                                                           "1 of 1 tasks pending (Resources)")


# --- Slurm: squeue --json ------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (ESTIMATE, float(ESTIMATE)),  # 22.05: a plain integer
    (0, None),  # 22.05: unset
    ({"set": True, "infinite": False, "number": ESTIMATE}, float(ESTIMATE)),  # 23.02+
    ({"set": False, "infinite": False, "number": 0}, None),
    ({"set": True, "infinite": True, "number": 0}, None),
    ({"set": True, "infinite": False, "number": 0}, None),
    (None, None),
    ("soon", None),
    (0xFFFFFFFE, None),  # NO_VAL
])
def test_json_time(value, expected):
    assert json_time(value) == expected


def squeue_22_05(*jobs: dict) -> str:
    """squeue --json as Slurm 22.05.8 prints it here (OpenAPI v0.0.38), the fields read."""
    return json.dumps({"meta": {"plugin": {"type": "openapi/v0.0.38"},
                                "Slurm": {"version": {"major": 22, "micro": 8, "minor": 5}, "release": "22.05.8"}},
                       "errors": [], "jobs": list(jobs)})


def squeue_23_02(*jobs: dict) -> str:
    """squeue --json in the shape of Slurm 23.02 and later: states as flag lists, numbers
    as {"set", "infinite", "number"}."""
    return json.dumps({"meta": {"slurm": {"release": "23.02.7"}}, "errors": [], "jobs": list(jobs)})


def test_squeue_22_05_json_pending_jobs_carry_slurms_estimate():
    text = squeue_22_05(
        # The blocker's tasks run: their start_time is when they started, not an estimate.
        {"job_id": 581, "array_job_id": 580, "job_state": "RUNNING", "state_reason": "None", "start_time": STARTED},
        {"job_id": 588, "array_job_id": 0, "job_state": "PENDING", "state_reason": "Resources",
         "start_time": ESTIMATE},
        {"job_id": 589, "array_job_id": 589, "job_state": "PENDING", "state_reason": "None", "start_time": 0},
        {"job_id": 590, "array_job_id": 0, "job_state": "PENDING", "state_reason": "JobHeldUser", "start_time": 0},
        {"job_id": 552, "array_job_id": 0, "job_state": "CANCELLED", "state_reason": "None", "start_time": STARTED})
    tasks = parse_squeue_json(text)
    assert tasks["580"] == [Task(JobState.RUNNING, "", None)]
    assert tasks["588"] == [Task(JobState.PENDING, "Resources", float(ESTIMATE))]
    assert tasks["589"][0].expected_start is None  # not estimated yet: backfill has not run since its submission
    assert tasks["590"][0].expected_start is None
    assert tasks["552"][0].expected_start is None


def test_squeue_23_02_json_pending_jobs_carry_slurms_estimate():
    def number(n: int) -> dict:
        return {"set": True, "infinite": False, "number": n}

    text = squeue_23_02(
        {"job_id": 700, "array_job_id": number(700), "job_state": ["PENDING"], "state_reason": "Priority",
         "start_time": number(ESTIMATE + 60)},
        {"job_id": 701, "array_job_id": number(700), "job_state": ["PENDING"], "state_reason": "Resources",
         "start_time": number(ESTIMATE)},
        {"job_id": 702, "array_job_id": number(700), "job_state": ["RUNNING"], "state_reason": "None",
         "start_time": number(STARTED)},
        {"job_id": 710, "array_job_id": number(0), "job_state": ["PENDING"], "state_reason": "Resources",
         "start_time": {"set": False, "infinite": False, "number": 0}},
        {"job_id": 711, "array_job_id": {"set": False, "infinite": False, "number": 0},
         "job_state": ["PENDING", "REQUEUED"], "state_reason": "BeginTime", "start_time": number(ESTIMATE + 600)},
        {"job_id": 712, "array_job_id": number(0), "job_state": ["SUSPENDED"], "state_reason": "None",
         "start_time": number(STARTED)})
    tasks = parse_squeue_json(text)
    assert sorted(t.expected_start or 0 for t in tasks["700"]) == [0, ESTIMATE, ESTIMATE + 60]
    assert combine("x", tasks["700"], 3).expected_start == ESTIMATE  # the earliest pending task
    assert tasks["710"][0].expected_start is None
    assert tasks["711"][0].expected_start == ESTIMATE + 600  # a --begin job: Slurm's start is its begin time
    assert tasks["712"] == [Task(JobState.PENDING, "", None)]  # suspended: pending to us, but it had started


# --- Slurm: squeue's plain format -----------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2026-12-02T05:48:46", local("2026-12-02T05:48:46")),
    (" 2026-12-02T10:00:00 ", local("2026-12-02T10:00:00")),
    ("N/A", None), ("Unknown", None), ("None", None), ("", None),
    ("Tomorr 10:00", None),  # SLURM_TIME_FORMAT=relative, which the query overrides
])
def test_plain_time(text, expected):
    assert plain_time(text) == expected


def test_squeue_plain_start_column_counts_for_pending_lines_only():
    text = "\n".join([
        "580|581|RUNNING|None|2026-12-02T05:43:32",
        "588|588|PENDING|Resources|2026-12-02T05:48:46",
        "589|589_[0-2]|PENDING|Priority|2026-12-02T05:54:00",
        "590|590|PENDING|JobHeldUser|N/A",
        "591|591|PENDING|BeginTime|2026-12-02T05:54:07",
        "552|552|CANCELLED|None|2026-12-02T05:33:15",
    ])
    tasks = parse_squeue_plain(text)
    assert tasks["580"] == [Task(JobState.RUNNING, "", None)]
    assert tasks["588"] == [Task(JobState.PENDING, "Resources", local("2026-12-02T05:48:46"))]
    assert tasks["589"][0].expected_start == local("2026-12-02T05:54:00")
    assert tasks["590"][0].expected_start is None
    assert tasks["552"][0].expected_start is None


def test_squeue_plain_lines_without_the_start_column_are_still_read():
    """The format before %S was added (`%F|%i|%T|%r`), as recorded test listings hold it."""
    tasks = parse_squeue_plain("21|21|RUNNING|None\n30|30_[1-3]|PENDING|JobArrayTaskLimit\n")
    assert tasks == {"21": [Task(JobState.RUNNING, "")], "30": [Task(JobState.PENDING, "JobArrayTaskLimit")]}


def logging_tool(bin_dir: Path, name: str, body: str) -> None:
    stand_in(bin_dir, name, f'echo "{name} $* [SLURM_TIME_FORMAT=$SLURM_TIME_FORMAT]" >> {bin_dir}/calls.log\n{body}')


@pytest.mark.parametrize("listing", [
    squeue_22_05({"job_id": 12, "array_job_id": 0, "job_state": "PENDING", "state_reason": "Resources",
                  "start_time": ESTIMATE}),
    squeue_23_02({"job_id": 12, "array_job_id": {"set": True, "infinite": False, "number": 0},
                  "job_state": ["PENDING"], "state_reason": "Resources",
                  "start_time": {"set": True, "infinite": False, "number": ESTIMATE}}),
], ids=["22.05", "23.02"])
def test_status_and_job_states_pass_the_estimate_on(bin_dir, tmp_path, listing, monkeypatch):
    monkeypatch.setattr(SlurmScheduler, "_plain_only", False)
    (tmp_path / "squeue.json").write_text(listing)
    logging_tool(bin_dir, "squeue", f'[ "$*" = "--json" ] && exec cat {tmp_path}/squeue.json\nexit 2')
    status = SlurmScheduler(tmp_path).status([info("12")])["job-a"]
    assert status == JobStatus("job-a", JobState.PENDING, "1 of 1 tasks pending (Resources)", float(ESTIMATE))
    # What the pool reads: jobs.job_states, one status call per scheduler, unchanged.
    assert jobs.job_states(tmp_path, [info("12")]) == {"job-a": status}


def test_the_plain_query_asks_for_the_start_column_in_slurms_standard_time_format(bin_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(SlurmScheduler, "_plain_only", True)
    monkeypatch.setenv("SLURM_TIME_FORMAT", "relative")  # a user's shell setting must not change what is read
    logging_tool(bin_dir, "squeue", '''[ "$SLURM_TIME_FORMAT" = standard ] || exit 3
        printf '%s\\n' '40|40_0|RUNNING|None|2026-12-02T05:43:32' '40|40_[1-2]|PENDING|Resources|2026-12-02T06:00:00'
        ''')
    status = SlurmScheduler(tmp_path).status([info("40", servers=3)])["job-a"]
    assert (status.state, status.expected_start) == (JobState.RUNNING, local("2026-12-02T06:00:00"))
    assert stand_in_calls(bin_dir) == [f"squeue -h -t all -o {SQUEUE_PLAIN_FORMAT} [SLURM_TIME_FORMAT=standard]"]


# --- PBS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("Wed Dec  2 10:00:00 2026", local("2026-12-02T10:00:00")),  # ctime: the day padded by a space
    ("Thu Dec 10 09:05:07 2026", local("2026-12-10T09:05:07")),
    ("Wed Dec 2 10:00:00 2026", local("2026-12-02T10:00:00")),
    (1796205600, 1796205600.0),  # epoch, as some -F json versions print it
    ("1796205600", 1796205600.0),
    (0, None), ("", None), ("soon", None), ("Wed Feb 31 10:00:00 2026", None), (True, None),
])
def test_pbs_time(value, expected):
    assert pbs_time(value) == expected


# PBS Pro `qstat -f -t` text, written for these tests in its format (four-space indented
# attributes, `estimated.*` as dotted names); not a recording.
PBSPRO_TEXT = """\
Job Id: 1005.pbs
    Job_Name = waiter
    Job_Owner = fireuser@pbs
    job_state = Q
    queue = workq
    server = pbs
    ctime = Wed Dec  2 09:50:00 2026
    Resource_List.ncpus = 1
    comment = Not Running: Insufficient amount of resource: ncpus
    estimated.exec_vnode = (pbs:ncpus=1)
    estimated.start_time = Wed Dec  2 10:00:00 2026
    substate = 10

Job Id: 1006.pbs
    Job_Name = runner
    job_state = R
    estimated.start_time = Wed Dec  2 09:00:00 2026
    stime = Wed Dec  2 09:00:00 2026

Job Id: 1007.pbs
    Job_Name = unestimated
    job_state = Q
    comment = Not Running: Insufficient amount of resource: ncpus
"""


def test_pbspro_text_estimated_start_time():
    by_key, _ = group_tasks(parse_qstat_text(PBSPRO_TEXT))
    assert by_key["1005.pbs"] == [Task(JobState.PENDING, "Not Running: Insufficient amount of resource: ncpus",
                                       local("2026-12-02T10:00:00"))]
    assert by_key["1006.pbs"][0].expected_start is None  # running: a leftover estimate is not one
    assert by_key["1007.pbs"][0].expected_start is None


def pbspro_json(jobs: dict[str, dict]) -> str:
    """`qstat -f -F json -t` in PBS Pro's shape (resources nested as Resource_List is in
    the 23.06 recording), written for these tests."""
    return json.dumps({"timestamp": 1796200000, "pbs_version": "23.06.06", "pbs_server": "pbs", "Jobs": jobs})


def test_pbspro_json_estimated_start_time_nested_flat_string_or_epoch():
    text = pbspro_json({
        "1.pbs": {"job_state": "Q", "estimated": {"exec_vnode": "(pbs:ncpus=1)",
                                                  "start_time": "Wed Dec  2 10:00:00 2026"}},
        "2.pbs": {"job_state": "Q", "estimated": {"start_time": 1796205600}},
        "3.pbs": {"job_state": "Q", "estimated.start_time": "Wed Dec  2 11:00:00 2026"},
        "4.pbs": {"job_state": "H", "comment": "held"},
        "5.pbs": {"job_state": "S", "estimated": {"start_time": 1796205600}},  # suspended: had started
    })
    by_key, _ = group_tasks(parse_qstat_json(text))
    assert {key: tasks[0].expected_start for key, tasks in by_key.items()} == {
        "1.pbs": local("2026-12-02T10:00:00"), "2.pbs": 1796205600.0, "3.pbs": local("2026-12-02T11:00:00"),
        "4.pbs": None, "5.pbs": None}


def test_pbspro_array_subjobs_queued_without_an_estimate_take_their_parents():
    text = pbspro_json({
        "7[].pbs": {"job_state": "B", "array": "True", "estimated": {"start_time": 1796205600}},
        "7[0].pbs": {"job_state": "R", "array_id": "7[].pbs"},
        "7[1].pbs": {"job_state": "Q", "array_id": "7[].pbs"},
        "7[2].pbs": {"job_state": "Q", "array_id": "7[].pbs", "estimated": {"start_time": 1796209200}},
    })
    by_key, _ = group_tasks(parse_qstat_json(text))
    assert [t.expected_start for t in by_key["7.pbs"]] == [None, 1796205600.0, 1796209200.0]
    status = combine("x", by_key["7.pbs"], 3)
    assert (status.state, status.expected_start) == (JobState.RUNNING, 1796205600.0)


def test_torque_and_slurm_wrapper_text_give_no_estimate():
    """Recorded Torque output has `start_time` (when a job did start), never an estimate."""
    for name in ("torque-qstat-f-ichec.txt", "slurm-torque-wrapper-qstat-f-running.txt"):
        by_key, _ = group_tasks(parse_qstat_text((DATA / name).read_text()))
        assert all(t.expected_start is None for tasks in by_key.values() for t in tasks), name


def test_pbs_status_passes_the_estimate_on(bin_dir, tmp_path):
    listing = tmp_path / "listing.json"
    listing.write_text(pbspro_json({"1005.pbs": {"job_state": "Q", "comment": "Not Running: busy",
                                                 "estimated": {"start_time": "Wed Dec  2 10:00:00 2026"}}}))
    stand_in(bin_dir, "qstat", f'[ "$*" = "-f -F json -t" ] && exec cat {listing}\nexit 2')
    status = PbsScheduler(tmp_path).status([info("1005.pbs", scheduler="pbs")])["job-a"]
    assert (status.state, status.expected_start) == (JobState.PENDING, local("2026-12-02T10:00:00"))
    assert estimated_start({"estimated.start_time": "Wed Dec  2 10:00:00 2026"}) == status.expected_start


# --- live: the real single-node cluster ---------------------------------------------------------


@pytest.mark.timeout(120)
def test_live_slurm_estimates_when_a_job_behind_a_full_node_starts(slurm_cluster: SlurmCluster, tmp_path,
                                                                   monkeypatch):
    """The partition shares each CPU among `jobs_per_cpu` jobs (OverSubscribe=FORCE), so
    `--exclusive` does not hold the node: an array of `jobs_per_cpu` tasks each taking
    every CPU does. With a 5-minute limit on it, backfill expects the waiting job to
    start when that limit ends, and says so within a pass or two (bf_interval=5)."""
    limit_minutes = 5
    blocker = sbatch(["--array", f"0-{slurm_cluster.jobs_per_cpu - 1}", "-c", str(slurm_cluster.cpus),
                      "--time", str(limit_minutes), "-o", "/dev/null", "-J", "hold-node", "--wrap", "sleep 300"])
    waiter: str | None = None
    try:
        waiter = sbatch(["-c", "1", "--time", "1", "-o", "/dev/null", "-J", "wait-behind", "--wrap", "true"])
        submitted = time.time()
        job = info(waiter)
        monkeypatch.setattr(SlurmScheduler, "_plain_only", False)  # squeue --json first
        deadline = time.monotonic() + 60
        while True:
            status = SlurmScheduler(tmp_path).status([job])["job-a"]
            assert status.state is JobState.PENDING, status
            if status.expected_start is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        log.info("estimate after %.1f s: %s", time.time() - submitted, status)
        assert status.expected_start is not None, f"Slurm gave no start estimate within 60 s: {status}"
        now = time.time()
        assert now < status.expected_start <= now + limit_minutes * 60 + 30, (status, now)
        # The plain format says the same, to the second; and jobs.job_states passes it on.
        monkeypatch.setattr(SlurmScheduler, "_plain_only", True)
        plain = SlurmScheduler(tmp_path).status([job])["job-a"]
        assert (plain.state, plain.expected_start) == (JobState.PENDING, status.expected_start)
        assert jobs.job_states(tmp_path, [job])["job-a"].expected_start == status.expected_start
        # The blocker's tasks all run (unless other jobs share the node): no estimate,
        # though Slurm's start_time for them is set (when they started).
        tasks = slurm_cluster.jobs_per_cpu
        running = SlurmScheduler(tmp_path).status([info(blocker, servers=tasks)])["job-a"]
        if running.reason == f"{tasks} of {tasks} tasks running":
            assert running.expected_start is None, running
    finally:
        cancel(blocker)
        if waiter is not None:
            cancel(waiter)
