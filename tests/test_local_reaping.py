"""The local scheduler's node servers are children of whoever submitted them: once
cancelled (launch's exit, the Atropos face's stop(purge=True)), none may stay behind
as a zombie of that process (issue 19, item 4)."""
from __future__ import annotations

import os
import signal
from pathlib import Path

from hpc_sandbox import connect
from hpc_sandbox.compat.atropos import HpcSandboxBackend
from hpc_sandbox.jobfolder import list_jobs
from hpc_sandbox.jobs import job_states

from helpers import free_port_range, wait_until


def zombie_children() -> set[int]:
    """Pids of this process's children that have exited and were never waited for."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z" and int(fields[1]) == os.getpid():
            found.add(int(entry.name))
    return found


async def test_launch_leaves_no_zombie_node_server(state_dir, no_user_config):
    async with connect.launch(scheduler="local", slots=1, nodes=2, state_dir=state_dir, config_file=None,
                              port_range=free_port_range(), wait_timeout=60, acquire_timeout=30) as pool:
        [job] = pool.jobs
        async with pool.slot("t") as slot:
            assert (await pool.execute(slot, "bash", {"command": "echo up"}, timeout=30)).stdout == "up\n"
    servers = {int(pid) for pid in job.scheduler_ids}
    assert len(servers) == 2 and list_jobs(state_dir) == []
    # Reaped by the cancel itself: nothing else in this process waits for them.
    assert not servers & zombie_children()


async def test_atropos_stop_purge_leaves_no_zombie_node_server(state_dir, no_user_config):
    backend = HpcSandboxBackend(scheduler="local", slots=1, state_dir=state_dir, port_range=free_port_range(),
                                wait_timeout=60, acquire_timeout=30)
    await backend.start()
    [job] = backend.jobs
    await backend.stop(purge=True)
    servers = {int(pid) for pid in job.scheduler_ids}
    assert not servers & zombie_children()


async def test_a_node_server_that_exits_by_itself_is_reaped_when_its_job_status_is_read(state_dir, no_user_config):
    async with connect.launch(scheduler="local", slots=1, state_dir=state_dir, config_file=None,
                              port_range=free_port_range(), wait_timeout=60, acquire_timeout=30) as pool:
        [job] = pool.jobs
        [pid] = [int(p) for p in job.scheduler_ids]
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: pid in zombie_children(), 10)
        assert job_states(state_dir, [job.info])[job.id].state.ended

        def reaped_by_a_status_read() -> bool:
            # A killed process shows as a zombie before its last threads are gone, and
            # only then can it be waited for: a read or two later.
            job_states(state_dir, [job.info])
            return pid not in zombie_children()

        assert wait_until(reaped_by_a_status_read, 5)
