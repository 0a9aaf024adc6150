"""Per-slot limits: sizes, workspace usage, and the watchdog over real node servers
(runtime none and bwrap): a breach ends the offending command with `limit_exceeded`,
the slot goes on working, and its neighbour never notices."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.errors import SpecError
from hpc_sandbox.server.limits import SlotLimits, disk_usage
from hpc_sandbox.spec import parse_size_mb

from helpers import pids_matching, requires_bwrap, start_server, wait_until

RUNTIMES = ["none", pytest.param("bwrap", marks=requires_bwrap)]


@pytest.mark.parametrize("text, mib", [("512M", 512), ("1G", 1024), ("2048", 2048), (2048, 2048), ("1.5g", 1536),
                                       ("512MiB", 512), ("1GB", 1024), ("800K", 1), ("1T", 1 << 20), (" 64m ", 64)])
def test_sizes_are_mib(text, mib):
    assert parse_size_mb(text) == mib


@pytest.mark.parametrize("text", ["", "0", "0M", "-1G", "12Q", "1e3", "M", True])
def test_bad_sizes_are_refused_with_the_value(text):
    with pytest.raises(SpecError, match="slot_memory"):
        parse_size_mb(text, "slot_memory")


def test_no_limits_means_none():
    assert not SlotLimits().any and SlotLimits(max_procs=10).any


def test_disk_usage_counts_blocks_once_and_follows_no_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(4 << 20))
    workspace = tmp_path / "ws"
    (workspace / "d").mkdir(parents=True)
    (workspace / "d" / "f").write_bytes(os.urandom(1 << 20))
    os.link(workspace / "d" / "f", workspace / "hardlink")
    (workspace / "link").symlink_to(outside)
    used, entries, cut = disk_usage(workspace, 1000)
    assert (1 << 20) <= used < (2 << 20) and entries == 4 and not cut
    used, _, cut = disk_usage(workspace, 2)
    assert cut


def _server(state_dir: Path, runtime: str, *flags: str):
    return start_server(state_dir, job_id=f"lim-{runtime}-{flags[0][7:]}", slots=2, runtime=runtime,
                        extra=list(flags))


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_over_the_memory_limit_the_command_is_killed_and_the_neighbour_keeps_answering(state_dir, runtime):
    server = _server(state_dir, runtime, "--slot-memory", "512M")
    try:
        async with NodeClient(server.endpoint) as client:
            hog, neighbour = await client.acquire("hog"), await client.acquire("neighbour")
            running = asyncio.ensure_future(client.execute(
                hog.slot, hog.lease, "bash",
                {"command": 'python3 -c "b = bytearray(600<<20); import time; time.sleep(5)"'}, timeout=60))
            answered = 0
            while not running.done():
                echo = await client.execute(neighbour.slot, neighbour.lease, "bash", {"command": "echo ok"},
                                            timeout=30)
                assert echo.ok and echo.result["stdout"] == "ok\n"
                answered += 1
                await asyncio.sleep(0.05)
            answer = await running
            assert not answer.ok and answer.error_kind == "limit_exceeded", answer
            assert answer.error_message.startswith("memory limit: the slot used ")
            assert "its limit is 512 MiB; the command was killed" in answer.error_message
            used = int(answer.error_message.split("used ")[1].split()[0])
            assert 512 < used <= 700
            assert answered >= 1
            again = await client.execute(hog.slot, hog.lease, "bash", {"command": "echo ok"})
            assert again.ok and again.result["stdout"] == "ok\n"
            assert server.proc.poll() is None
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_over_the_process_limit_every_command_of_the_slot_is_killed(state_dir, runtime):
    marker = f"hpcsbx-procs-{os.getpid()}-{runtime}"
    server = _server(state_dir, runtime, "--slot-procs", "64")
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("forks")
            answer = await client.execute(
                granted.slot, granted.lease, "bash",
                {"command": f"for i in $(seq 300); do (exec -a {marker} sleep 30) & done; wait"}, timeout=60)
            assert not answer.ok and answer.error_kind == "limit_exceeded", answer
            assert answer.error_message.startswith("process limit: the slot ran ")
            assert "its limit is 64; its commands were killed" in answer.error_message
            assert int(answer.error_message.split("ran ")[1].split()[0]) > 64
            assert await asyncio.to_thread(wait_until, lambda: not pids_matching(marker), 10)
            again = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo ok"})
            assert again.ok and again.result["stdout"] == "ok\n"
    finally:
        server.stop()
        for pid in pids_matching(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_over_the_disk_limit_the_writer_is_killed_and_the_slot_stays_usable(state_dir, runtime):
    server = _server(state_dir, runtime, "--slot-disk", "20M")
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("writer")
            # 50 MiB in 1 MiB steps: the workspace is measured every 2 s, so a writer is
            # caught while it writes (a burst faster than that is caught by the next command).
            writer = "for i in $(seq 50); do head -c 1048576 /dev/urandom >> big; sleep 0.1; done"
            answer = await client.execute(granted.slot, granted.lease, "bash", {"command": writer}, timeout=60)
            assert not answer.ok and answer.error_kind == "limit_exceeded", answer
            # Runtime none counts the slot's TMPDIR (beside the workspace) too.
            where = "workspace (with its TMPDIR)" if runtime == "none" else "workspace"
            assert answer.error_message.startswith(f"disk limit: the slot's {where} holds ")
            assert "its limit is 20 MiB; its commands were killed" in answer.error_message
            held = int(answer.error_message.split("holds ")[1].split()[0])
            assert 20 < held < 50
            # Still over the limit, but not growing: the slot may run commands (and clean up).
            again = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo ok; sleep 2.5"})
            assert again.ok and again.result["stdout"] == "ok\n"
            assert (await client.execute(granted.slot, granted.lease, "bash", {"command": "rm big"})).ok
    finally:
        assert server.stop() == 0


def test_without_limits_there_is_no_watchdog(tmp_path):
    from hpc_sandbox.server.slots import SlotTable

    assert SlotTable(None, tmp_path, 1).watchdog is None  # type: ignore[arg-type]
    assert SlotTable(None, tmp_path, 1, limits=SlotLimits(disk_mb=1)).watchdog is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_daemon_that_left_the_agents_tree_still_counts_for_its_slot(state_dir, runtime):
    marker = f"hpcsbx-daemon-{os.getpid()}-{runtime}"
    server = _server(state_dir, runtime, "--slot-memory", "256M")
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("daemon")
            # Double fork, new session: re-parented to init (or a subreaper) under runtime
            # none, found by its call tag; under bwrap it stays in the slot's pid namespace.
            daemon = (f"(setsid bash -c 'exec -a {marker} python3 -c \"b = bytearray(400<<20); "
                      f"import time; time.sleep(60)\"' >/dev/null 2>&1 &)")
            assert (await client.execute(granted.slot, granted.lease, "bash", {"command": daemon})).ok
            assert await asyncio.to_thread(wait_until, lambda: not pids_matching(marker), 15), \
                "the daemon over the memory limit was not killed"
            described = (await client.slots()).slots[granted.slot]
            assert described["last_error"].startswith("memory limit: the slot used ")
            again = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo ok"})
            assert again.ok and again.result["stdout"] == "ok\n"
    finally:
        server.stop()
        for pid in pids_matching(marker):
            os.kill(pid, signal.SIGKILL)
