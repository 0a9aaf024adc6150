"""Faults inside the node server: an agent that cannot be restarted, background work
that fails, transfers under the concurrency limit. The server answers each with a
clear error of its own and stays up."""
from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.errors import LimitExceeded

from helpers import start_server


@pytest.fixture
def breakable_python(tmp_path):
    """An interpreter for the slot agent that refuses to start once `broken` exists:
    the agent's first start works, every restart after that fails."""
    flag = tmp_path / "broken"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f"#!/bin/sh\n[ -e {flag} ] && {{ echo 'agent refused to start' >&2; exit 3; }}\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper, flag


async def _state(client: NodeClient, slot: int) -> dict:
    return (await client.slots()).slots[slot]


async def test_release_when_the_agent_cannot_restart_frees_the_lease_and_marks_the_slot_broken(
        state_dir, breakable_python):
    wrapper, flag = breakable_python
    server = start_server(state_dir, job_id="brk", slots=1, extra=["--python", str(wrapper)])
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("t")
            answer = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo $PPID"})
            flag.touch()
            os.kill(int(answer.result["stdout"]), signal.SIGKILL)  # the agent dies: only a new one can serve
            await client.release(granted.slot, granted.lease)  # was: HTTP 500 with a traceback
            deadline = time.monotonic() + 10
            while (state := await _state(client, granted.slot))["state"] in ("restarting", "resetting"):
                assert time.monotonic() < deadline, state  # the agent's watcher may still be trying
                await asyncio.sleep(0.1)
            assert state["state"] == "broken" and "could not be restarted" in state["last_error"]
            assert (await client.health()).ready
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()


async def test_a_reset_that_fails_after_lease_expiry_is_logged_with_its_reason(state_dir, breakable_python):
    wrapper, flag = breakable_python
    server = start_server(state_dir, job_id="exp", slots=1, extra=["--python", str(wrapper)])
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("t", ttl=1)
            answer = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo $PPID"})
            flag.touch()
            # A frozen agent cannot reset the slot in place: the expiry's reset must replace
            # it, and the replacement cannot start.
            os.kill(int(answer.result["stdout"]), signal.SIGSTOP)
            deadline = time.monotonic() + 30
            while (await _state(client, granted.slot))["state"] != "broken":
                assert time.monotonic() < deadline, "the expired lease's slot never settled"
                await asyncio.sleep(0.2)
    finally:
        server.stop()
    log = server.log.read_text()
    assert "agent refused to start" in log
    assert "never retrieved" not in log and "Traceback" not in log


async def test_file_transfers_count_against_the_concurrency_limit(state_dir, tmp_path):
    server = start_server(state_dir, job_id="lim", slots=2, extra=["--max-concurrent", "1"])
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(1 << 20))
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow_body():
        yield b"x" * 1024
        started.set()
        await release.wait()
        yield b"y" * 1024

    try:
        async with NodeClient(server.endpoint) as client:
            a, b = await client.acquire("a"), await client.acquire("b")
            url = f"{server.url}/v1/slots/{a.slot}/files/slow.bin"
            headers = {"Authorization": f"Bearer {server.token}", "X-Lease": a.lease}
            upload = asyncio.ensure_future(client.session.put(url, data=slow_body(), headers=headers, ssl=server.ssl))
            await asyncio.wait_for(started.wait(), 10)
            await asyncio.sleep(0.3)  # the server is inside the upload now
            with pytest.raises(LimitExceeded):
                await client.execute(b.slot, b.lease, "bash", {"command": "true"})
            release.set()
            response = await upload
            assert response.status == 200
            response.release()
            answer = await client.execute(b.slot, b.lease, "bash", {"command": "echo ok"})
            assert answer.result["stdout"] == "ok\n"
    finally:
        server.stop()


async def test_a_server_started_where_a_killed_one_ran_gives_its_slots_empty_workspaces(state_dir):
    first = start_server(state_dir, job_id="reborn", slots=1)
    port = first.record.port
    async with NodeClient(first.endpoint) as client:
        grant = await client.acquire("writer")
        wrote = await client.execute(grant.slot, grant.lease, "bash", {"command": "echo secret > left.txt"})
        assert wrote.ok
    first.proc.send_signal(signal.SIGKILL)  # no clean stop: its workspaces stay on disk
    first.proc.wait(10)
    (state_dir / "jobs" / "reborn" / "servers" / f"{first.record.hostname}-{port}.json").unlink(missing_ok=True)
    second = start_server(state_dir, job_id="reborn", slots=1, extra=["--port-range", f"{port}-{port}"])
    try:
        assert second.record.port == port  # the same job, host and port: the same workspace root
        async with NodeClient(second.endpoint) as client:
            grant = await client.acquire("reader")
            seen = await client.execute(grant.slot, grant.lease, "bash", {"command": "ls -A"})
            assert seen.ok and seen.result["stdout"] == "", seen.result
        assert "did not stop cleanly" in second.log.read_text()
    finally:
        second.stop()
