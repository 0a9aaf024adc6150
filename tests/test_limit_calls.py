"""Which call a limit breach failed (issue 19 item 3), over real node servers (runtime
none and bwrap): a kill of part of a call (a session's foreground command, a process
the call moved into a session of its own) is that call's `limit_exceeded` even though
the call itself ended well; a kill of another process (a background process, an earlier
session command's job) fails no unrelated call."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpc_sandbox.client import NodeClient

from helpers import requires_bwrap, start_server

RUNTIMES = ["none", pytest.param("bwrap", marks=requires_bwrap)]
# 400 MiB held for a while: over a 256 MiB limit, caught by a watchdog round (0.5 s).
HOG = 'python3 -c "b = bytearray(400<<20); import time; time.sleep(4)"'


def _server(state_dir: Path, runtime: str, name: str):
    return start_server(state_dir, job_id=f"calls-{runtime}-{name}", slots=1, runtime=runtime,
                        extra=["--slot-memory", "256M"])


def _over_memory(answer) -> bool:
    return (not answer.ok and answer.error_kind == "limit_exceeded"
            and answer.error_message.startswith("memory limit: the slot used "))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_session_command_killed_over_memory_fails_its_call_though_the_shell_went_on(state_dir, runtime):
    server = _server(state_dir, runtime, "session")
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("session")
            answer = await client.execute(granted.slot, granted.lease, "bash",
                                          {"command": f"{HOG}; echo survived", "session": "s"}, timeout=60)
            assert _over_memory(answer), answer
            # The session is still there, and its next command runs as usual.
            again = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo ok", "session": "s"})
            assert again.ok and again.result["stdout"] == "ok\n" and again.result["exit_code"] == 0
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_plain_call_whose_own_process_left_its_group_fails_when_that_process_is_killed(state_dir, runtime):
    server = _server(state_dir, runtime, "plain")
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("plain")
            # setsid -w: the hog runs in a process group of its own, the call's shell waits
            # for it and goes on after its death.
            answer = await client.execute(granted.slot, granted.lease, "bash",
                                          {"command": f"setsid -w {HOG}; echo survived"}, timeout=60)
            assert _over_memory(answer), answer
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_breach_that_killed_another_process_fails_no_unrelated_call(state_dir, runtime):
    server = _server(state_dir, runtime, "unrelated")
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("unrelated")
            slot, lease = granted.slot, granted.lease
            # A background process over the limit while a plain call runs...
            started = await client.execute(slot, lease, "bash", {"command": HOG, "background": True})
            assert started.ok, started
            plain = await client.execute(slot, lease, "bash", {"command": "sleep 3; echo fine"}, timeout=60)
            assert plain.ok and plain.result["stdout"] == "fine\n", plain
            # ...and a job an earlier session command left running, while a later one runs.
            assert (await client.execute(slot, lease, "bash", {"command": f"{HOG} &", "session": "s"})).ok
            later = await client.execute(slot, lease, "bash", {"command": "sleep 3; echo fine", "session": "s"},
                                         timeout=60)
            assert later.ok and later.result["stdout"] == "fine\n", later
            assert (await client.slots()).slots[slot]["last_error"].startswith("memory limit: ")
    finally:
        assert server.stop() == 0
