"""A slot's life beyond one call: an agent that stops answering is given up on and
replaced, and ending a lease ends the slot's processes (real node servers, runtime
none and bwrap)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.server.agent_process import STUCK_GRACE_SECONDS
from hpc_sandbox.server.slots import SlotTable

from helpers import pids_matching, requires_bwrap, start_server, wait_until

RUNTIMES = ["none", pytest.param("bwrap", marks=requires_bwrap)]


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [child for child, parent in parents.items() if parent == pid]
        found += kids
        todo += kids
    return found


def agent_pid(server_pid: int) -> int:
    """The host pid of the python process running a one-slot server's agent (under
    bwrap, below bwrap's own processes, whose argv names agent.py too)."""
    agents = []
    for pid in _descendants(server_pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(arg.endswith(b"agent.py") for arg in argv) and not argv[0].endswith(b"bwrap"):
                agents.append(pid)
    assert len(agents) == 1, agents
    return agents[0]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


ECHO = ("bash", {"command": "echo hi"})
# Over a pipe's 64 KiB: the request itself cannot be written to an agent that does not read.
BIG_WRITE = ("write_file", {"path": "big.txt", "content": "x" * (1 << 20)})


@pytest.mark.parametrize("runtime, call", [("none", ECHO), pytest.param("bwrap", ECHO, marks=requires_bwrap),
                                           ("none", BIG_WRITE)], ids=["none", "bwrap", "none-pipe-full"])
async def test_a_stuck_agent_is_given_up_on_and_replaced_keeping_the_workspace(state_dir, runtime, call):
    server = start_server(state_dir, job_id=f"stuck-{runtime}", slots=1, runtime=runtime)
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("t")
            slot, lease = granted.slot, granted.lease
            assert (await client.execute(slot, lease, "write_file", {"path": "kept.txt", "content": "x"})).ok
            stuck = agent_pid(server.proc.pid)
            os.kill(stuck, signal.SIGSTOP)  # deterministic stand-in for an agent blocked in a syscall
            try:
                started = time.monotonic()
                answer = await asyncio.wait_for(
                    client.execute(slot, lease, *call, timeout=1), 40)
                took = time.monotonic() - started
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stuck, signal.SIGCONT)
            assert not answer.ok and answer.error_kind == "agent_stuck", answer
            assert "did not answer within" in answer.error_message and "restarted" in answer.error_message
            assert took < 1 + STUCK_GRACE_SECONDS + 10
            after = await client.execute(slot, lease, "bash", {"command": "cat kept.txt"})
            assert after.ok and after.result["stdout"] == "x"
            assert wait_until(lambda: not alive(stuck), 5)
            described = (await client.slots()).slots[slot]
            assert described["state"] == "leased" and described["restarts"] == 1
            assert "did not answer" in described["last_error"]
    finally:
        assert server.stop() == 0


def test_a_call_keeps_its_lease_alive_only_until_its_agent_is_given_up_on(tmp_path):
    table = SlotTable(runtime=None, workspace_root=tmp_path, slots=1)  # type: ignore[arg-type]
    slot = table.slots[0]
    slot.state, slot.ttl = "leased", 10.0
    with table.running(slot, 1.0):
        now = slot.last_used = time.monotonic()
        assert slot.expires_in(now + 1 + STUCK_GRACE_SECONDS - 0.5) == 10.0
        assert slot.expires_in(now + 60) == 0.0
    with table.running(slot):  # a file transfer: alive while its connection is
        assert slot.expires_in(time.monotonic() + 3600) == 10.0


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_release_keeping_the_workspace_still_ends_the_slots_processes(state_dir, runtime):
    marker = f"hpcsbx-bg-{os.getpid()}-{runtime}"
    server = start_server(state_dir, job_id=f"keep-{runtime}", slots=1, runtime=runtime)
    try:
        async with NodeClient(server.endpoint) as client:
            first = await client.acquire("A")
            writer = f"nohup sh -c 'while :; do date >> log; sleep 0.2; done' {marker} >/dev/null 2>&1 &"
            assert (await client.execute(first.slot, first.lease, "bash", {"command": writer})).ok
            assert await asyncio.to_thread(wait_until, lambda: bool(pids_matching(marker)), 5)

            async def log_size(grant=None) -> int:
                grant = grant or second
                listing = await client.execute(grant.slot, grant.lease, "list_files", {})
                return {entry["path"]: entry["size"] for entry in listing.result["entries"]}.get("log", 0)

            # The writer has written (on a loaded machine its first `date` can come after a
            # release that follows at once, and an empty log proves nothing).
            deadline = time.monotonic() + 10
            while await log_size(first) == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await client.release(first.slot, first.lease, reset_workspace=False)

            second = await client.acquire("B")
            assert second.slot == first.slot

            assert await asyncio.to_thread(wait_until, lambda: not pids_matching(marker), 5), \
                "holder A's background writer survived the release"
            size = await log_size()
            await asyncio.sleep(1.0)
            assert size > 0 and await log_size() == size
    finally:
        server.stop()
        for pid in pids_matching(marker):
            os.kill(pid, signal.SIGKILL)


@requires_bwrap
async def test_a_handover_in_place_ends_even_a_process_that_hid_from_its_agent(state_dir):
    """A slot changes hands without a new agent (its own `reset`), but in a pid namespace
    of its own every process the agent can see is the slot's: one that left its group
    *and* cleared its environment (no group, no tag to find it by) still ends."""
    marker = f"hpcsbx-hidden-{os.getpid()}"
    server = start_server(state_dir, job_id="hidden", slots=1, runtime="bwrap")
    try:
        async with NodeClient(server.endpoint) as client:
            first = await client.acquire("A")
            started = await client.execute(first.slot, first.lease, "bash", {
                "command": f"setsid env -i /bin/bash -c 'exec -a {marker} sleep 300' </dev/null >/dev/null 2>&1 & "
                           "echo $PPID"})
            agent_before = started.result["stdout"].strip()
            assert wait_until(lambda: pids_matching(marker), 5)
            await client.release(first.slot, first.lease, reset_workspace=False)
            assert wait_until(lambda: not pids_matching(marker), 5), "the hidden process outlived the handover"
            second = await client.acquire("B")
            again = await client.execute(second.slot, second.lease, "bash", {"command": "echo $PPID"})
            assert again.result["stdout"].strip() == agent_before  # the same agent: no restart was needed
    finally:
        server.stop()
