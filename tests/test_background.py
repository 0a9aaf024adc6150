"""Background processes: `bash` with `background: true`, and the `process` tool.

Real agents (AgentDriver) and a real node server: start, output since an offset, the
capped log (head and tail), signal, wait with a timeout, list, and the end of every
background process at reset, release and agent exit, even one that did `setsid`.
"""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from pathlib import Path

import pytest

from hpc_sandbox import NodeServerSource, SlotPool
from hpc_sandbox import agent as agent_module

from helpers import AgentDriver, pids_matching, start_server, wait_until


@pytest.fixture
async def agent(tmp_path: Path):
    driver = await AgentDriver.start(tmp_path)
    yield driver
    await driver.close()


async def start(agent: AgentDriver, command: str, **args) -> dict:
    answer = await agent.call("bash", command=command, background=True, **args)
    assert answer["ok"], answer
    return answer["result"]


async def process(agent: AgentDriver, action: str, **args) -> dict:
    answer = await agent.call("process", action=action, **args)
    return answer["result"] if answer["ok"] else answer


def gone(marker: str, timeout: float = 5) -> bool:
    return wait_until(lambda: not pids_matching(marker), timeout=timeout)


async def test_start_returns_a_handle_at_once_and_output_is_read_since_an_offset(agent, tmp_path):
    started = time.monotonic()
    result = await start(agent, "echo one; sleep 0.4; echo two >&2; sleep 0.4; echo three; exit 5")
    assert time.monotonic() - started < 1
    assert result["background"] is True and result["handle"].startswith("bg-") and result["pid"] > 0
    handle = result["handle"]
    await asyncio.sleep(0.2)
    first = await process(agent, "output", handle=handle)
    assert (first["output"], first["offset"], first["next_offset"], first["running"]) == ("one\n", 0, 4, True)
    still = await process(agent, "wait", handle=handle, timeout=0.2)
    assert still["running"] is True and still["exit_code"] is None
    done = await process(agent, "wait", handle=handle, timeout=10)
    assert (done["running"], done["exit_code"], done["signal"]) == (False, 5, None)
    rest = await process(agent, "output", handle=handle, offset=first["next_offset"])
    assert rest["output"] == "two\nthree\n"  # stdout and stderr in one log, in order
    assert (rest["offset"], rest["next_offset"], rest["total"], rest["dropped"]) == (4, 14, 14, 0)
    assert (await process(agent, "output", handle=handle, offset=14))["output"] == ""
    # The log lives outside the workspace: the slot's files are its own.
    assert list(tmp_path.iterdir()) == []


async def test_signal_by_name_or_number_reaches_the_whole_group(agent):
    marker = f"hpcsbx-bgsig-{os.getpid()}"
    result = await start(agent, f"(exec -a {marker} sleep 30) & exec -a {marker} sleep 30")
    assert await asyncio.to_thread(wait_until, lambda: len(pids_matching(marker)) == 2, 5)
    sent = await process(agent, "signal", handle=result["handle"], signal="TERM")
    assert sent["sent"] is True
    ended = await process(agent, "wait", handle=result["handle"], timeout=5)
    assert (ended["running"], ended["exit_code"], ended["signal"]) == (False, None, signal.SIGTERM)
    assert await asyncio.to_thread(gone, marker)
    assert (await process(agent, "signal", handle=result["handle"], signal=9))["sent"] is False
    other = await start(agent, "trap 'echo got INT; exit 3' INT; while :; do sleep 0.05; done")
    await asyncio.sleep(0.2)
    assert (await process(agent, "signal", handle=other["handle"], signal="SIGINT"))["sent"] is True
    assert (await process(agent, "wait", handle=other["handle"], timeout=5))["exit_code"] == 3
    bad = await process(agent, "signal", handle=other["handle"], signal="NOPE")
    assert bad["ok"] is False and bad["error"]["kind"] == "bad_request"


async def test_kill_reaches_what_left_the_group(agent):
    marker = f"hpcsbx-bgkill-{os.getpid()}"
    result = await start(agent, f"setsid bash -c 'exec -a {marker} sleep 30' & sleep 30")
    assert await asyncio.to_thread(wait_until, lambda: bool(pids_matching(marker)), 5)
    await process(agent, "signal", handle=result["handle"], signal="KILL")
    assert await asyncio.to_thread(gone, marker)


async def test_the_log_keeps_head_and_tail_within_its_cap(agent):
    result = await start(agent, "echo START; seq 1 100000; echo END", output_cap=1000)
    await process(agent, "wait", handle=result["handle"], timeout=10)
    head = await process(agent, "output", handle=result["handle"])
    assert head["output"].startswith("START\n1\n2\n") and head["next_offset"] == 500
    tail = await process(agent, "output", handle=result["handle"], offset=head["next_offset"])
    total = tail["total"]
    assert total == len("START\n") + sum(len(str(i)) + 1 for i in range(1, 100001)) + len("END\n")
    assert tail["dropped"] == total - 1000 and tail["offset"] == total - 500
    assert tail["output"].endswith("99999\n100000\nEND\n") and tail["next_offset"] == total
    # Any offset can be asked for; limit cuts the answer.
    middle = await process(agent, "output", handle=result["handle"], offset=total - 10, limit=4)
    assert (middle["output"], middle["next_offset"]) == ("0000", total - 6)  # of "100000\nEND\n"


async def test_text_reads_never_split_a_character_and_base64_is_exact(agent):
    result = await start(agent, "printf 'h\\xc3\\xa9llo'; sleep 30")
    await asyncio.sleep(0.3)
    cut = await process(agent, "output", handle=result["handle"], limit=2)
    assert (cut["output"], cut["next_offset"]) == ("h", 1)  # the second byte starts an é
    rest = await process(agent, "output", handle=result["handle"], offset=1)
    assert rest["output"] == "éllo"
    raw = await process(agent, "output", handle=result["handle"], limit=2, encoding="base64")
    assert base64.b64decode(raw["output"]) == b"h\xc3" and raw["next_offset"] == 2
    await process(agent, "signal", handle=result["handle"], signal="KILL")


async def test_cwd_env_and_list(agent, tmp_path):
    (tmp_path / "sub").mkdir()
    first = await start(agent, "pwd; echo $WHO", cwd="sub", env={"WHO": "me"})
    second = await start(agent, "sleep 30")
    await process(agent, "wait", handle=first["handle"], timeout=5)
    assert (await process(agent, "output", handle=first["handle"]))["output"] == f"{tmp_path}/sub\nme\n"
    listed = {p["handle"]: p for p in (await process(agent, "list"))["processes"]}
    assert set(listed) == {first["handle"], second["handle"]}
    assert listed[first["handle"]]["running"] is False and listed[first["handle"]]["exit_code"] == 0
    assert listed[second["handle"]]["running"] is True and listed[second["handle"]]["command"] == "sleep 30"
    await process(agent, "signal", handle=second["handle"], signal="KILL")


async def test_reset_ends_every_background_process_and_forgets_them(agent):
    marker = f"hpcsbx-bgreset-{os.getpid()}"
    result = await start(agent, f"exec -a {marker} sleep 30")
    await start(agent, f"setsid bash -c 'exec -a {marker} sleep 30' & (exec -a {marker} sleep 30) & wait")
    # Three sleeps and the `bash -c` whose command line names the marker too.
    assert await asyncio.to_thread(wait_until, lambda: len(pids_matching(marker)) == 4, 5)
    assert (await agent.call("reset"))["ok"]
    assert await asyncio.to_thread(gone, marker), "a background process outlived the reset"
    assert (await process(agent, "list"))["processes"] == []
    missing = await process(agent, "output", handle=result["handle"])
    assert missing["ok"] is False and missing["error"]["kind"] == "not_found"
    # Handles are never reused: one from before the reset cannot name a new process.
    assert (await start(agent, "true"))["handle"] != result["handle"]


async def test_the_agents_exit_ends_background_processes(tmp_path):
    marker = f"hpcsbx-bgexit-{os.getpid()}"
    driver = await AgentDriver.start(tmp_path)
    await start(driver, f"setsid -f bash -c 'exec -a {marker} sleep 30'; exec -a {marker} sleep 30")
    assert await asyncio.to_thread(wait_until, lambda: len(pids_matching(marker)) == 2, 5)
    await driver.close()
    assert await asyncio.to_thread(gone, marker)


async def test_handles_have_a_limit_and_finished_ones_make_room(agent):
    handles = [(await start(agent, "true"))["handle"] for _ in range(agent_module.MAX_BACKGROUND)]
    await asyncio.gather(*(process(agent, "wait", handle=h, timeout=10) for h in handles))
    newest = await start(agent, "sleep 30")  # the oldest finished one goes
    listed = [p["handle"] for p in (await process(agent, "list"))["processes"]]
    assert handles[0] not in listed and newest["handle"] in listed
    assert len(listed) == agent_module.MAX_BACKGROUND
    await agent.call("reset")
    for _ in range(agent_module.MAX_BACKGROUND):
        await start(agent, "sleep 30")
    refused = await agent.call("bash", command="true", background=True)
    assert refused["ok"] is False and refused["error"]["kind"] == "too_many"


@pytest.mark.parametrize("args, kind", [
    ({"action": "output", "handle": "bg-999"}, "not_found"),
    ({"action": "wait"}, "not_found"),
    ({"action": "fly"}, "bad_request"),
    ({"action": "output", "handle": "h", "offset": -1}, "not_found"),
])
async def test_bad_process_requests(agent, args, kind):
    answer = await agent.call("process", **args)
    assert answer["ok"] is False and answer["error"]["kind"] == kind, answer


async def test_bad_output_arguments_for_a_real_handle(agent):
    handle = (await start(agent, "true"))["handle"]
    for args in ({"offset": -1}, {"limit": agent_module.MAX_OUTPUT_CAP + 1}, {"encoding": "hex"}):
        answer = await agent.call("process", action="output", handle=handle, **args)
        assert answer["error"]["kind"] == "bad_request", args
    negative = await agent.raw(b'{"id": "w", "tool": "process", "args": {"action": "wait", "handle": "%s", '
                               b'"timeout": -1}}\n' % handle.encode(), "w")
    assert negative["error"]["kind"] == "bad_request"


async def test_background_processes_through_the_node_server(state_dir):
    marker = f"hpcsbx-bgsrv-{os.getpid()}"
    server = start_server(state_dir, job_id="background", slots=1)
    try:
        async with SlotPool([NodeServerSource.from_endpoints([server.endpoint])]) as pool:
            slot = await pool.acquire(trajectory_id="t1")
            started = await pool.execute(slot, "bash", {"command": "for i in 1 2 3; do echo $i; sleep 0.1; done",
                                                        "background": True})
            assert started.success and started.exit_code is None and started.data["handle"].startswith("bg-")
            handle = started.data["handle"]
            waited = await pool.execute(slot, "process", {"action": "wait", "handle": handle, "timeout": 10})
            assert waited.success and waited.data["exit_code"] == 0
            output = await pool.execute(slot, "process", {"action": "output", "handle": handle})
            assert output.data["output"] == "1\n2\n3\n"
            # A wait is bounded by the call's own timeout too.
            sleeper = await pool.execute(slot, "bash", {"command": "sleep 30", "background": True})
            began = time.monotonic()
            short = await pool.execute(slot, "process", {"action": "wait", "handle": sleeper.data["handle"],
                                                         "timeout": 60}, timeout=0.5)
            assert short.success and short.data["running"] is True and time.monotonic() - began < 3
            await pool.execute(slot, "process", {"action": "signal", "handle": sleeper.data["handle"]})
            began = time.monotonic()
            report = await pool.execute(slot, "process", {"action": "wait", "handle": sleeper.data["handle"]})
            assert report.success and report.data["signal"] == signal.SIGTERM
            assert time.monotonic() - began < 0.4  # a report of a signal is not a command killed under the call
            await pool.execute(slot, "bash", {"command": f"setsid bash -c 'exec -a {marker} sleep 30' & "
                                                         f"exec -a {marker} sleep 30", "background": True})
            assert await asyncio.to_thread(wait_until, lambda: len(pids_matching(marker)) == 2, 5)
            await pool.release(slot, reset_workspace=False)
            assert await asyncio.to_thread(gone, marker), "a background process outlived its slot's release"
            again = await pool.acquire(trajectory_id="t2")
            listed = await pool.execute(again, "process", {"action": "list"})
            assert listed.data["processes"] == []
            await pool.release(again)
    finally:
        server.stop()
        for pid in pids_matching(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("cap", [0, 1, 7, 64])
def test_output_log_keeps_exactly_its_head_and_latest_bytes(tmp_path, cap):
    import random

    rng = random.Random(cap)
    log = agent_module._OutputLog(str(tmp_path / "log"), cap)
    stream = b""
    for _ in range(200):
        chunk = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 3, 17, 100))))
        log.feed(chunk)
        stream += chunk
        head, ring = cap // 2, cap - cap // 2
        kept_from = min(len(stream), max(head, len(stream) - ring))
        for offset in (0, rng.randrange(len(stream) + 2)):
            start, data = log.read(offset, 1 << 20)
            if offset < min(head, len(stream)):
                assert start == offset
                assert data == stream[offset:head if kept_from > head else len(stream)]
            else:
                assert start == max(min(offset, len(stream)), kept_from)
                assert data == stream[start:]
    log.close()
    assert not (tmp_path / "log").exists()
