"""SlotPool over real node servers: acquire/release, batches, sharing, failures."""
from __future__ import annotations

import asyncio
import signal
import time

import pytest

from hpc_sandbox import NodeServerSource, SlotPool, SyncSlotPool, connect
from hpc_sandbox.errors import NoCapacity


@pytest.fixture
def two_servers(server_factory):
    return [server_factory(job_id="pooljob", slots=2), server_factory(job_id="pooljob", slots=2)]


async def test_pool_hands_out_every_slot_once_then_waits_then_gives_up(state_dir, two_servers):
    async with connect.from_state_dir(state_dir, ["pooljob"]) as pool:
        slots = [await pool.acquire(trajectory_id=f"t{i}") for i in range(4)]
        assert len({s.id for s in slots}) == 4
        assert {s.endpoint.url for s in slots} == {s.url for s in two_servers}
        started = time.monotonic()
        with pytest.raises(NoCapacity, match="4 slots on 2 node servers"):
            await pool.acquire(timeout=0.5)
        assert time.monotonic() - started < 5
        waiter = asyncio.ensure_future(pool.acquire(trajectory_id="late", timeout=10))
        await asyncio.sleep(0.3)
        await pool.release(slots[0])
        assert (await waiter).endpoint.url == slots[0].endpoint.url


async def test_execute_returns_typed_results(state_dir, two_servers):
    async with connect.from_state_dir(state_dir, ["pooljob"]) as pool:
        async with pool.slot(trajectory_id="t") as slot:
            ok = await pool.execute(slot, "bash", {"command": "echo hi"}, timeout=10)
            assert (ok.success, ok.stdout, ok.exit_code, ok.slot, ok.location) == (True, "hi\n", 0, slot.id, "local")
            failed = await pool.execute(slot, "bash", {"command": "exit 4"})
            assert (failed.success, failed.exit_code) == (False, 4)
            slow = await pool.execute(slot, "bash", {"command": "sleep 5"}, timeout=0.3)
            assert (slow.success, slow.timed_out, slow.error_kind) == (False, True, "timeout")
            written = await pool.execute(slot, "write_file", {"path": "x.py", "content": "print(2)"})
            assert written.success and written.data["size"] == 8
            bad = await pool.execute(slot, "read_file", {"path": "/etc/shadow"})
            assert (bad.success, bad.error_kind) == (False, "path")


async def test_execute_batch_keeps_call_order_across_servers(state_dir, two_servers):
    async with connect.from_state_dir(state_dir, ["pooljob"]) as pool:
        slots = [await pool.acquire() for _ in range(4)]
        calls = [(slots[i % 4], "bash", {"command": f"sleep 0.{4 - i % 4}; echo {i}"}) for i in range(8)]
        results = await pool.execute_batch(calls)
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
        assert [r.slot for r in results] == [slots[i % 4].id for i in range(8)]


async def test_two_pools_sharing_a_job_never_share_a_slot(state_dir, two_servers):
    async with connect.from_state_dir(state_dir, ["pooljob"]) as a, \
            connect.from_state_dir(state_dir, ["pooljob"]) as b:
        got = await asyncio.gather(*(pool.acquire(timeout=5) for pool in (a, b, a, b)))
        assert len({s.id for s in got}) == 4
        with pytest.raises(NoCapacity):
            await b.acquire(timeout=0.3)


async def test_a_dead_node_server_is_an_error_result_not_a_hang(state_dir, server_factory):
    server = server_factory(job_id="dies", slots=1)
    async with connect.from_state_dir(state_dir, ["dies"]) as pool:
        slot = await pool.acquire()
        running = asyncio.ensure_future(pool.execute(slot, "bash", {"command": "sleep 60"}, timeout=120))
        await asyncio.sleep(0.5)
        server.proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        result = await asyncio.wait_for(running, 15)
        assert result.success is False and result.error_kind == "server_gone"
        assert time.monotonic() - started < 10
        after = await pool.execute(slot, "bash", {"command": "true"})
        assert after.error_kind == "server_gone" and "unreachable" in after.error
        await pool.release(slot)  # releasing on a dead server is not an error


def test_sync_facade_for_scripts(state_dir, two_servers):
    with SyncSlotPool(connect.from_state_dir(state_dir, ["pooljob"])) as pool:
        slot = pool.acquire(trajectory_id="script")
        assert pool.execute(slot, "bash", {"command": "echo sync"}).stdout == "sync\n"
        assert [r.stdout for r in pool.execute_batch([(slot, "bash", {"command": "echo b"})])] == ["b\n"]
        pool.release(slot)


async def test_explicit_endpoints_source(two_servers):
    pool = SlotPool([NodeServerSource.from_endpoints([two_servers[0].endpoint])])
    async with pool:
        slot = await pool.acquire()
        assert slot.endpoint.url == two_servers[0].url
        capacity = await pool.capacity()
        assert (capacity[0].servers, capacity[0].slots, capacity[0].free) == (1, 2, 1)


async def test_from_config_uses_the_profiles_state_dir(two_servers, state_dir, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"profiles:\n  mine:\n    state_dir: {state_dir}\n")
    async with connect.from_config(profile="mine", config_file=config) as pool:
        async with pool.slot(trajectory_id="t") as slot:
            assert slot.endpoint.url in {s.url for s in two_servers}


async def test_no_jobs_says_how_to_start_one(state_dir):
    async with connect.from_state_dir(state_dir) as pool:
        with pytest.raises(NoCapacity, match="hpc-sandbox submit"):
            await pool.acquire(timeout=0.2)


async def test_a_job_still_queued_is_named_as_capacity_to_come(state_dir):
    import time

    from hpc_sandbox.jobfolder import JobFolder, JobInfo

    folder = JobFolder(state_dir, "queued")
    folder.create_token()  # submitted, no node server ready yet: no records
    folder.write_info(JobInfo(job_id="queued", scheduler="slurm", submitted_at=time.time(), servers=3,
                              slots_per_server=2, runtime="none", scheduler_ids=("999999",)))
    from hpc_sandbox.pool import ClusterSource
    from hpc_sandbox.jobstate import JobState, JobStatus

    # What squeue says of a job waiting for nodes (a pool checks its jobs when it starts).
    def queued(infos):
        return {i.job_id: JobStatus(i.job_id, JobState.PENDING, "Resources") for i in infos}

    async with SlotPool([ClusterSource(state_dir, job_states=queued)]) as pool:
        with pytest.raises(NoCapacity, match="3 more node servers of submitted jobs are queued or starting"):
            await pool.acquire(timeout=0.2)
        assert (await pool.capacity())[0].waiting_servers == 3


def test_local_scheduler_does_not_mistake_a_recycled_pid_for_its_server():
    import subprocess
    import time

    from hpc_sandbox.jobfolder import JobInfo
    from hpc_sandbox.schedulers.local import _alive

    # A session leader whose command line names hpc_sandbox, like a local node server.
    proc = subprocess.Popen(["bash", "-c", "exec -a hpc_sandbox-stand-in sleep 30"], start_new_session=True)
    try:
        def job(submitted_at: float) -> JobInfo:
            return JobInfo(job_id="j", scheduler="local", submitted_at=submitted_at, servers=1, slots_per_server=1,
                           runtime="none", scheduler_ids=(str(proc.pid),))
        time.sleep(0.1)
        assert _alive(proc.pid, job(time.time()))
        # The same pid on a job submitted an hour ago: the process is younger than the job.
        assert not _alive(proc.pid, job(time.time() - 3600))
    finally:
        proc.kill()
        proc.wait()
    assert not _alive(proc.pid, job(time.time()))


async def test_calls_failing_together_when_their_job_ends_all_say_job_ended():
    """Several calls on one job break at once (a node died); the first status check marks
    the job ended while the others are still asking: each must still get JobEnded, and
    no task may be left with a pending cancellation."""
    from hpc_sandbox.errors import JobEnded, ServerGone
    from hpc_sandbox.models import Endpoint, Slot
    from hpc_sandbox.pool import NodeServerSource

    class DyingJob(NodeServerSource):
        def __init__(self) -> None:
            super().__init__(lambda: [], name="dying")
            self.ended = asyncio.get_running_loop().create_future()

        def job_ended(self, job_id):
            return self.ended

        async def why_gone(self, job_id):
            self.asked = getattr(self, "asked", 0) + 1
            await asyncio.sleep(0.05 * self.asked)  # the scheduler takes a moment to answer
            if not self.ended.done():
                self.ended.set_result("node failure")
            return "job j ended (failed: node failure)"

    async def breaks() -> None:
        await asyncio.sleep(0.01)
        raise ServerGone("connection refused")

    pool = SlotPool([DyingJob()])
    slot = Slot(endpoint=Endpoint(url="http://127.0.0.1:9", token="t", job_id="j", name="n"), index=0, lease="l")

    async def one() -> tuple[str, int]:
        try:
            await pool._guarded(slot, breaks())
        except JobEnded as exc:
            return str(exc), asyncio.current_task().cancelling()
        return "no error", 0

    results = await asyncio.gather(*(one() for _ in range(3)))
    assert results == [("job j ended (failed: node failure)", 0)] * 3


def test_a_pool_in_python_finds_the_jobs_of_the_state_dir_the_cli_uses(monkeypatch, tmp_path):
    monkeypatch.setenv("HPC_SANDBOX_STATE_DIR", str(tmp_path / "elsewhere"))
    [source] = connect.from_state_dir().sources
    assert source.state_dir == tmp_path / "elsewhere"
