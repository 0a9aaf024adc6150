"""PBS (`hpc_sandbox/schedulers/pbs.py`): live on Slurm's Torque wrappers, and on recorded
output of real Torque and PBS Pro servers (tests/data/pbs/README.md names the sources).

Live tests run `qsub`/`qstat`/`qdel` from Debian's slurm-wlm-torque 22.05 on the project's
single-node cluster (slurm/), and skip with the reason when it is not running (fail under
HPC_SANDBOX_REQUIRE_SLURM=1). What those wrappers can and cannot do, as seen here:

- plain jobs: yes. `qsub` prints the bare Slurm job id (`450`).
- arrays (`#PBS -t 0-1`): the wrapper submits them (sbatch --array), but the tasks do not
  get Torque's `PBS_ARRAYID`, only `SLURM_ARRAY_TASK_ID`; the Torque template falls back to
  it (`--port-index "${PBS_ARRAYID:-$SLURM_ARRAY_TASK_ID}"`), so arrays run. The wrapper's
  `qstat -f` lists each task as its own Slurm job (`Job Id: 452`), without the array id:
  hpc-sandbox names the job by its unique key on the wrapper (`-N`) to find them.
- several nodes: no. The cluster has one node, and slurm-wlm-torque has no `pbsdsh`
  (which the multi-node template runs).
- PBS Pro syntax (`-l select=`, `-J`): not understood (see FACTS); not tested live.
- `qdel` ends a job as scancel does (SIGTERM first: a trap in the script sees it), and
  exits 1 without a word for a job that has already ended.
"""
from __future__ import annotations

import asyncio
import copy
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hpc_sandbox import connect
from hpc_sandbox.errors import NoCapacity, SchedulerError
from hpc_sandbox.jobfolder import JobFolder, JobInfo
from hpc_sandbox.jobstate import JobState
from hpc_sandbox.schedulers import get_scheduler
from hpc_sandbox.schedulers import pbs
from hpc_sandbox.schedulers.pbs import (PbsScheduler, array_key, group_tasks, parse_qstat_json, parse_qstat_text,
                                        parse_qsub_output, pbs_state)
from hpc_sandbox.spec import SandboxSpec

from helpers import pids_matching, wait_until
from helpers import stand_in as _tool, stand_in_calls as calls
from slurm_fixtures import cancel_while_a_command_runs

DATA = Path(__file__).resolve().parent / "data" / "pbs"
RUNTIME = "bwrap" if shutil.which("bwrap") else "none"
PORTS = "22100-22163"


def records(name: str) -> dict[str, dict]:
    text = (DATA / name).read_text()
    return dict(parse_qstat_json(text) if name.endswith(".json") else parse_qstat_text(text))


def info(*scheduler_ids: str, job_id: str = "hpc-sandbox-abc123", servers: int = 1) -> JobInfo:
    return JobInfo(job_id=job_id, scheduler="pbs", submitted_at=0.0, servers=servers, slots_per_server=1,
                   runtime="none", scheduler_ids=tuple(scheduler_ids))


# --- job ids -------------------------------------------------------------------------------


@pytest.mark.parametrize("printed, expected", [
    ("450\n", "450"),  # Slurm's wrapper
    ("1.pbs\n", "1.pbs"),  # PBS Pro
    ("10[].Nile-extn\n", "10[].Nile-extn"),  # PBS Pro array (openpbs-array-listings.txt)
    ("68350.mycluster\n", "68350.mycluster"),  # Torque
    ("qsub: note: your default project is used\n123.server.example.org\n", "123.server.example.org"),
])
def test_parse_job_id(printed, expected):
    assert PbsScheduler(Path("/tmp")).parse_job_id(printed) == expected


@pytest.mark.parametrize("printed", ["", "qsub: Unknown queue\n", "Job submitted\n"])
def test_parse_job_id_refuses_what_is_not_an_id(printed):
    with pytest.raises(SchedulerError, match="qsub printed"):
        parse_qsub_output(printed)


def test_subjobs_parents_and_servers_share_one_key():
    listing = (DATA / "openpbs-array-listings.txt").read_text().splitlines()
    ids = [line.split()[0] for line in listing if "djoko " in line or "Nile-extn " in line]
    assert "9[10].djoko" in ids and "10[].Nile-extn" in ids
    assert {array_key(i) for i in ids if i.startswith("9[")} == {"9.djoko"}
    assert array_key("10[].Nile-extn") == "10.Nile-extn"
    # qsub may print the full server name where qstat prints the short one; old Torque
    # numbered subjobs 123-4.
    assert array_key("123[].pbs01.cluster.org") == array_key("123[4].pbs01") == array_key("123-4.pbs01")
    assert array_key("450") == "450"


# --- state mapping -------------------------------------------------------------------------


@pytest.mark.parametrize("letter, state", [
    ("Q", JobState.PENDING), ("H", JobState.PENDING), ("W", JobState.PENDING), ("T", JobState.PENDING),
    ("S", JobState.PENDING), ("R", JobState.RUNNING), ("B", JobState.RUNNING), ("E", JobState.COMPLETING),
    ("M", JobState.UNKNOWN), ("Z", JobState.UNKNOWN),
])
def test_live_states(letter, state):
    assert pbs_state({"job_state": letter})[0] is state


@pytest.mark.parametrize("attrs, state, words", [
    ({"job_state": "F", "Exit_status": 0}, JobState.DONE, "F, Exit_status=0"),
    ({"job_state": "X", "Exit_status": 3}, JobState.FAILED, "X, Exit_status=3"),
    ({"job_state": "F", "Exit_status": -29}, JobState.TIMEOUT, "JOB_EXEC_KILL_WALLTIME"),
    ({"job_state": "F", "Exit_status": -27}, JobState.FAILED, "JOB_EXEC_KILL_MEM"),
    ({"job_state": "F", "Exit_status": -99}, JobState.FAILED, "a PBS execution error"),
    ({"job_state": "F", "Exit_status": 271}, JobState.CANCELLED, "killed by SIGTERM"),
    ({"job_state": "F", "Exit_status": 267}, JobState.FAILED, "killed by SIGSEGV"),
    ({"job_state": "C", "exit_status": "1"}, JobState.FAILED, "C, Exit_status=1"),  # Torque's spelling
    ({"job_state": "C"}, JobState.DONE, "C, no exit status"),  # Slurm's wrapper
    ({"job_state": "F", "substate": 91}, JobState.CANCELLED, "no exit status"),
])
def test_ended_states_keep_the_schedulers_words(attrs, state, words):
    got, reason = pbs_state(attrs)
    assert got is state and words in reason, reason


def test_pending_reason_is_the_servers_comment():
    attrs = {"job_state": "Q", "comment": "Not Running: Node is in an ineligible state: offline"}
    assert pbs_state(attrs) == (JobState.PENDING, "Not Running: Node is in an ineligible state: offline")
    assert pbs_state({"job_state": "H"}) == (JobState.PENDING, "held")


# --- recorded PBS Pro JSON -------------------------------------------------------------------


def test_pbspro_json_recorded_states():
    jobs = records("pbspro-23.06-qstat-f-F-json-x-all.json")
    assert pbs_state(jobs["1006.pbs"]) == (JobState.RUNNING, "")
    state, reason = pbs_state(jobs["1004.pbs"])
    assert state is JobState.DONE
    assert reason == "F, Exit_status=0; Job run at Thu Jun 19 at 10:36 on (pbs:ncpus=1) and finished"
    assert pbs_state(records("pbspro-23.06-qstat-f-F-json-x-running.json")["1.pbs"])[0] is JobState.RUNNING


def _array_json(subjobs: dict[int, dict]) -> str:
    """PBS Pro's `qstat -f -F json -t` for array 7[].pbs, built from the recorded job (no
    recording of subjob JSON was found; see tests/data/pbs/README.md): the parent in
    state B and one copy of the recorded job per subjob, with the subjob's own attributes."""
    data = json.loads((DATA / "pbspro-23.06-qstat-f-F-json-x-running.json").read_text())
    job = data["Jobs"].pop("1.pbs")
    data["Jobs"]["7[].pbs"] = {**copy.deepcopy(job), "job_state": "B", "array": "True",
                               "array_indices_submitted": f"0-{len(subjobs) - 1}"}
    for index, attrs in subjobs.items():
        sub = {**copy.deepcopy(job), "array_id": "7[].pbs", "array_index": index, **attrs}
        data["Jobs"][f"7[{index}].pbs"] = sub
    return json.dumps(data, indent=4)


def test_pbspro_array_subjobs_are_one_job():
    text = _array_json({0: {"job_state": "R"}, 1: {"job_state": "X", "Exit_status": 0},
                        2: {"job_state": "Q", "comment": "Not Running: Insufficient amount of resource: ncpus"}})
    by_key, _ = group_tasks(parse_qstat_json(text))
    assert list(by_key) == ["7.pbs"]
    assert sorted(t.state.value for t in by_key["7.pbs"]) == ["done", "pending", "running"]  # the parent is not a task


def test_an_array_parent_alone_stands_for_its_array():
    data = json.loads(_array_json({}))
    by_key, _ = group_tasks(parse_qstat_json(json.dumps(data)))
    assert by_key == {"7.pbs": [(JobState.RUNNING, "array begun", None)]}


# --- recorded Torque text ----------------------------------------------------------------------


def test_torque_text_recorded_states_and_wrapped_values():
    jobs = records("torque-qstat-f-ichec.txt")
    assert list(jobs) == ["549159", "555716", "556491", "546437", "547637", "543984"]
    assert [pbs_state(a)[0].value for a in jobs.values()] == [
        "pending", "running", "running", "cancelled", "pending", "cancelled"]
    assert pbs_state(jobs["546437"])[1] == "C, Exit_status=271; killed by SIGTERM (qdel, or a limit)"
    # Tab-led lines continue a value; the unindented lines of a sched_hint too.
    assert jobs["549159"]["Error_Path"] == "host.domain:/some/path/to/sth/ASSP-1R-p/more/down/the/path/ASSP-1R.e549159"
    assert jobs["543984"]["exec_host"].endswith("+r1i6n17/0-23+r1i7n4/0-23")
    assert "Unable to copy file 543984.ER" in jobs["543984"]["sched_hint"]
    assert jobs["543984"]["etime"] == "Wed Jun 17 09:16:05 2015"  # the block goes on after it


def test_slurm_wrapper_text_recorded_here():
    running = records("slurm-torque-wrapper-qstat-f-running.txt")
    assert {k: pbs_state(a)[0].value for k, a in running.items()} == {
        "450": "running", "452": "running", "451": "running", "453": "pending"}
    by_key, by_name = group_tasks(parse_qstat_text((DATA / "slurm-torque-wrapper-qstat-f-running.txt").read_text()))
    assert by_key["451"] == [(JobState.RUNNING, "", None)]  # only one task of the array carries its id
    assert len(by_name["rec-array-20917a"]) == 2  # both do carry its name
    ended = records("slurm-torque-wrapper-qstat-f-ended.txt")
    assert {pbs_state(a) for a in ended.values()} == {(JobState.DONE, "C, no exit status")}


# --- query, submit and cancel against stand-in commands (recorded output) ---------------------


def test_pbspro_query_is_one_qstat_call_per_poll(bin_dir, tmp_path):
    listing = tmp_path / "listing.json"
    listing.write_text(_array_json({0: {"job_state": "R"}, 1: {"job_state": "R"}}))
    _tool(bin_dir, "qstat", f'echo "qstat $*" >> {bin_dir}/calls.log\n'
                            f'[ "$*" = "-f -F json -t" ] && exec cat {listing}\nexit 2\n')
    scheduler = PbsScheduler(tmp_path)
    job = info("7[].pbs", servers=2)
    for _ in range(3):
        status = scheduler.status([job])[job.job_id]
        assert status.state is JobState.RUNNING and status.reason == "2 of 2 tasks running"
    assert calls(bin_dir) == ["qstat -f -F json -t"] * 3


def test_pbspro_finished_job_is_looked_up_in_history(bin_dir, tmp_path):
    history = DATA / "pbspro-23.06-qstat-f-F-json-x-all.json"
    _tool(bin_dir, "qstat", f"""echo "qstat $*" >> {bin_dir}/calls.log
        case "$*" in
          "-f -F json -t") echo '{{"timestamp":1,"pbs_version":"23.06.06","pbs_server":"pbs"}}';;
          "-x -f -F json -t 1004.pbs 999.pbs") cat {history}; echo "qstat: Unknown Job Id 999.pbs" >&2; exit 153;;
          "-x -f -F json -t 1004.pbs") cat {history};;
          *) exit 2;;
        esac
        """)
    scheduler = PbsScheduler(tmp_path)
    done = info("1004.pbs", job_id="a-1")
    status = scheduler.status([done])["a-1"]
    assert status.state is JobState.DONE and "Exit_status=0" in status.reason
    assert calls(bin_dir) == ["qstat -f -F json -t", "qstat -x -f -F json -t 1004.pbs"]
    # A purged job: qstat -x fails for it, and its end is unknown, and said so.
    statuses = scheduler.status([done, info("999.pbs", job_id="b-2")])
    assert statuses["b-2"].state is JobState.DONE and "end state is unknown" in statuses["b-2"].reason


def test_torque_text_form_is_found_once_and_kept(bin_dir, tmp_path):
    sample = DATA / "torque-qstat-f-ichec.txt"
    _tool(bin_dir, "qstat", f'echo "qstat $*" >> {bin_dir}/calls.log\n'
                            f'[ "$*" = "-f -t" ] && exec cat {sample}\n'
                            'echo "qstat: invalid option -- \'F\'" >&2\necho "usage: qstat [-f] ..." >&2\nexit 2\n')
    scheduler = PbsScheduler(tmp_path)
    jobs = [info("555716", job_id="run"), info("546437", job_id="gone"), info("549159", job_id="held")]
    first = scheduler.status(jobs)
    assert {k: v.state.value for k, v in first.items()} == {"run": "running", "gone": "cancelled", "held": "pending"}
    PbsScheduler(tmp_path).status(jobs)  # a new scheduler object, as every CLI call makes
    assert calls(bin_dir) == ["qstat -f -F json -t", "qstat -f -t", "qstat -f -t"]


def test_an_empty_listing_from_the_slurm_wrapper_is_no_jobs(bin_dir, tmp_path):
    # slurm-wlm-torque's qstat exits 153 without a word when it lists nothing.
    _tool(bin_dir, "qstat", '[ "$*" = "-f" ] && exit 153\necho "Unknown option: F" >&2\nexit 2\n')
    status = PbsScheduler(tmp_path).status([info("450", job_id="j")])["j"]
    assert status.state is JobState.DONE and "left qstat" in status.reason


def test_qstat_failure_is_one_line_quoting_the_server(bin_dir, tmp_path):
    _tool(bin_dir, "qstat", """echo "Connection refused" >&2
        echo "qstat: cannot connect to server pbs01 (errno=111)" >&2
        exit 1
        """)
    with pytest.raises(SchedulerError) as caught:
        PbsScheduler(tmp_path).status([info("1.pbs01")])
    assert "cannot connect to server pbs01" in str(caught.value) and "\n" not in str(caught.value)


def test_invalid_json_falls_back_to_text(bin_dir, tmp_path):
    # openpbs/openpbs#2541: some jobs' environments make qstat -F json print invalid JSON.
    sample = DATA / "torque-qstat-f-ichec.txt"
    bad = '{"Jobs": {"1.pbs": {"x": "\\q"}}}'  # \q is no JSON escape
    _tool(bin_dir, "qstat", f"""[ "$*" = "-f -F json -t" ] && {{ echo '{bad}'; exit 0; }}
        [ "$*" = "-f -t" ] && exec cat {sample}
        exit 2
        """)
    assert PbsScheduler(tmp_path).status([info("555716")])["hpc-sandbox-abc123"].state is JobState.RUNNING


def test_submit_passes_join_and_log_folder_to_a_real_pbs(bin_dir, tmp_path):
    _tool(bin_dir, "qsub", f'echo "qsub $*" >> {bin_dir}/calls.log\necho "7[].pbs"\n')
    spec = SandboxSpec(scheduler="pbs", dialect="pbspro", array=2, slots=1, state_dir=tmp_path)
    (tmp_path / "jobs" / "k-1").mkdir(parents=True)
    job = PbsScheduler(tmp_path).submit(spec, JobFolder(tmp_path, "k-1"))
    assert job.scheduler_ids == ("7[].pbs",)
    logs, script = tmp_path / "jobs" / "k-1" / "logs", tmp_path / "jobs" / "k-1" / "submit" / "k-1.pbs"
    assert calls(bin_dir) == [f"qsub -j oe -o {logs}/ {script}"]
    assert "#PBS -J 0-1" in script.read_text()


def test_qsub_errors_are_one_line(bin_dir, tmp_path):
    # What slurm-wlm-torque's qsub prints on stdout when sbatch refuses (recorded here).
    _tool(bin_dir, "qsub", """cat <<'EOF'
        There was an error running the Slurm sbatch command.
        The command was:
        '/usr/bin/sbatch -o /tmp/x-%j.out -p nope t.pbs 2>&1'
        and the output was:
        'sbatch: error: invalid partition specified: nope
         sbatch: error: Batch job submission failed: Invalid partition name specified
        '
        EOF
        exit 1
        """)
    spec = SandboxSpec(scheduler="pbs", slots=1, state_dir=tmp_path)
    (tmp_path / "jobs" / "k-2").mkdir(parents=True)
    with pytest.raises(SchedulerError) as caught:
        PbsScheduler(tmp_path).submit(spec, JobFolder(tmp_path, "k-2"))
    assert str(caught.value) == ("qsub k-2.pbs failed (exit 1): sbatch: error: invalid partition specified: nope; "
                                 "sbatch: error: Batch job submission failed: Invalid partition name specified")


def test_cancel_of_a_job_that_already_ended_is_no_error(bin_dir, tmp_path):
    sample = DATA / "torque-qstat-f-ichec.txt"
    _tool(bin_dir, "qdel", 'echo "qdel: Request invalid for state of job $1" >&2\nexit 170\n')
    _tool(bin_dir, "qstat", f'[ "$*" = "-f -t" ] && exec cat {sample}\nexit 2\n')
    PbsScheduler(tmp_path).cancel(info("546437"))  # C: already over
    with pytest.raises(SchedulerError, match="Request invalid for state of job"):
        PbsScheduler(tmp_path).cancel(info("555716"))  # R: still running, so the failure stands


# --- live, on Slurm's Torque wrappers ----------------------------------------------------------


@pytest.fixture
def torque(slurm_cluster):
    """The cluster's Torque wrappers; the live tests below run `cli` (conftest.py) on them."""
    if shutil.which("qsub") is None:
        pytest.fail("qsub is missing although Slurm runs: install slurm-wlm-torque (slurm/install.sh does)")


def submit(cli, *args: str) -> dict:
    result = cli("submit", "--scheduler", "pbs", "--dialect", "torque", "--partition", "debug", "--walltime",
                 "00:10:00", "--runtime", RUNTIME, "--port-range", PORTS, "--wait", "--wait-timeout", "60", "--json",
                 *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def qstat_state(slurm_id: str) -> str:
    out = subprocess.run(["qstat", "-f", slurm_id], capture_output=True, text=True, timeout=15).stdout
    return next((line.split("=")[1].strip() for line in out.splitlines() if "job_state" in line), "")


@pytest.mark.usefixtures("torque")
def test_torque_job_end_to_end(cli, state_dir):
    job = submit(cli, "--nodes", "1", "--slots", "2")
    job_id, (slurm_id,) = job["job_id"], job["scheduler_ids"]
    assert slurm_id.isdigit()  # the wrapper prints the bare Slurm id
    folder = state_dir / "jobs" / job_id
    assert (folder / "submit" / f"{job_id}.pbs").is_file()
    assert (folder / "logs" / f"pbs-{slurm_id}.out").is_file()  # qsub -o, not the wrapper's own file

    status = json.loads(cli("status", job_id, "--json").stdout)[0]
    assert status["scheduler"] == "pbs" and status["state"] == "running", status
    assert [s["reachable"] for s in status["servers"]] == [True] and status["free"] == 2

    ran = cli("exec", "--job", job_id, "--", "echo from-slot; exit 3")
    assert ran.returncode == 3 and ran.stdout.strip() == "from-slot", ran

    async def scenario():
        async with connect.from_state_dir(state_dir, [job_id], acquire_timeout=10) as pool:
            slots = [await pool.acquire(trajectory_id=f"t{i}") for i in range(2)]
            started = time.monotonic()
            results = await pool.execute_batch(
                [(s, "bash", {"command": f"echo {i} > mine; sleep 1; cat mine; ls"}) for i, s in enumerate(slots)])
            assert time.monotonic() - started < 1.9  # both slots ran at once
            assert [r.stdout.split() for r in results] == [["0", "mine"], ["1", "mine"]]

            await cancel_while_a_command_runs(pool, slots, lambda: cli("cancel", job_id), settle=0.5)

    asyncio.run(scenario())
    assert not folder.exists()
    assert wait_until(lambda: qstat_state(slurm_id) == "C", 15), qstat_state(slurm_id)
    assert wait_until(lambda: not pids_matching(job_id), 20), "node servers outlived qdel"


@pytest.mark.usefixtures("torque")
def test_torque_array_on_the_wrapper(cli, state_dir, tmp_path):
    job = submit(cli, "--array", "2", "--slots", "2")
    job_id, (slurm_id,) = job["job_id"], job["scheduler_ids"]
    assert "#PBS -t 0-1" in (state_dir / "jobs" / job_id / "submit" / f"{job_id}.pbs").read_text()
    status = json.loads(cli("status", job_id, "--json").stdout)[0]
    assert status["state"] == "running" and status["reason"] == "2 of 2 tasks running", status
    assert status["free"] == 4 and len(status["servers"]) == 2

    async def scenario():
        async with connect.from_state_dir(state_dir, [job_id], acquire_timeout=10) as pool:
            slots = [await pool.acquire(trajectory_id=f"t{i}") for i in range(4)]
            assert len({s.endpoint.url for s in slots}) == 2  # one node server per array task
            writes = await pool.execute_batch(
                [(s, "bash", {"command": f"echo {i} > mine; sleep 0.5; cat mine; ls"}) for i, s in enumerate(slots)])
            # Each slot reads back its own file and sees no other slot's.
            assert [w.stdout.split() for w in writes] == [[str(i), "mine"] for i in range(4)]
            cancelled = await asyncio.to_thread(cli, "cancel", job_id)
            assert cancelled.returncode == 0, cancelled.stderr
            with pytest.raises(NoCapacity):
                await pool.acquire(timeout=1)
            after = await pool.execute(slots[1], "bash", {"command": "true"})
            assert after.error_kind == "job_ended"

    asyncio.run(scenario())
    assert wait_until(lambda: not pids_matching(job_id), 20), "array tasks outlived qdel"
    assert wait_until(lambda: qstat_state(slurm_id) == "C", 15)


def test_the_wrappers_qstat_is_read_as_text(slurm_cluster, state_dir):
    scheduler = get_scheduler("pbs", state_dir)
    assert scheduler.status([info("1", job_id="nothing-here")])["nothing-here"].state.ended
    assert pbs._FORM[shutil.which("qstat")] == "text"


@pytest.mark.usefixtures("torque")
def test_qsub_refusal_quotes_sbatch(cli):
    result = cli("submit", "--scheduler", "pbs", "--partition", "no-such-queue", "--slots", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "qsub" in line]
    assert len(errors) == 1 and "invalid partition specified: no-such-queue" in errors[0], result.stderr
