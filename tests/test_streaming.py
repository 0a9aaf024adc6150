"""Streamed output over real node servers: events as the command prints, in order, the
same result as a plain call, a slow reader that cannot grow the server's memory,
refusals and timeouts as for a plain call, the pool's iterator and the CLI."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from hpc_sandbox import NodeServerSource, SlotPool, SyncSlotPool, connect
from hpc_sandbox.client import NodeClient, new_exec_id
from hpc_sandbox.errors import AuthError, BadRequest, LeaseLost, LimitExceeded, NotFound
from hpc_sandbox.models import ExecEvent
from hpc_sandbox.protocol import STREAM_CONTENT_TYPE, StreamEvent

from helpers import free_port_range


@pytest.fixture
async def client(server):
    async with NodeClient(server.endpoint) as c:
        yield c


async def _collect(events) -> list:
    return [event async for event in events]


def _text(events: list, kind: str) -> str:
    return "".join(event.data for event in events if event.event == kind)


def _same_result(streamed: dict, plain: dict) -> None:
    """Everything but the duration (two runs never take the same time) and the call tag
    (every command has its own)."""
    own = ("duration", "call")
    assert {k: v for k, v in streamed.items() if k not in own} == {k: v for k, v in plain.items() if k not in own}


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def test_output_arrives_as_it_is_printed_before_the_command_ends(client, tmp_path):
    marker = tmp_path / "finished"  # runtime none: the command can write here
    granted = await client.acquire("t")
    command = f"for i in 1 2 3; do echo line $i; sleep 1; done; touch {marker}"
    seen: list[tuple[StreamEvent, bool]] = []
    async for event in client.stream(granted.slot, granted.lease, "bash", {"command": command}, timeout=30):
        seen.append((event, marker.exists()))
    events = [event for event, _ in seen]
    # The first line came while the command still ran: its marker (its last act) was not there yet.
    assert events[0].event == "stdout" and events[0].data == "line 1\n" and seen[0][1] is False
    # One event per line (a second apart, far beyond the agent's coalescing), in order, the result last.
    assert [e.data for e in events[:-1]] == ["line 1\n", "line 2\n", "line 3\n"]
    last = events[-1]
    assert last.event == "result" and last.answer is not None and last.answer.ok and seen[-1][1] is True
    assert last.answer.result["stdout"] == "line 1\nline 2\nline 3\n" and last.answer.result["exit_code"] == 0
    assert last.dropped_bytes == 0


async def test_stdout_and_stderr_keep_their_order_and_the_result_is_a_plain_calls(client):
    granted = await client.acquire("t")
    command = ("for i in 1 2 3; do echo out$i; sleep 0.2; echo err$i >&2; sleep 0.2; done; "
               # a character cut between two writes, and a byte that is no UTF-8 at all
               "printf '\\xc3'; sleep 0.2; printf '\\xa9\\n'; printf 'bad \\xff\\n' >&2; exit 5")
    events = await _collect(client.stream(granted.slot, granted.lease, "bash", {"command": command}, timeout=30))
    outputs = [(e.event, e.data) for e in events[:-1]]
    assert outputs[:6] == [("stdout", "out1\n"), ("stderr", "err1\n"), ("stdout", "out2\n"), ("stderr", "err2\n"),
                           ("stdout", "out3\n"), ("stderr", "err3\n")]
    assert _text(events, "stdout") == "out1\nout2\nout3\n\u00e9\n"  # never half a character in a chunk
    assert _text(events, "stderr") == "err1\nerr2\nerr3\nbad \ufffd\n"
    plain = await client.execute(granted.slot, granted.lease, "bash", {"command": command}, timeout=30)
    assert events[-1].answer is not None
    _same_result(events[-1].answer.result, plain.result)
    assert events[-1].answer.result["exit_code"] == 5


async def test_a_chatty_command_costs_a_few_events_not_one_per_line(client):
    granted = await client.acquire("t")
    command = "for i in $(seq 1 50000); do echo $i; done"  # ~290 KB in 50,000 writes
    events = await _collect(client.stream(granted.slot, granted.lease, "bash", {"command": command}, timeout=60))
    expected = "".join(f"{i}\n" for i in range(1, 50001))
    assert _text(events, "stdout") == expected == events[-1].answer.result["stdout"]
    # At most one event per 50 ms or per 64 KiB: a bash loop this long takes well under 10 s.
    assert len(events) < 200, len(events)


async def test_a_slow_reader_of_1_gib_leaves_the_server_memory_bounded(client, server, tmp_path):
    """1 GiB of output read at a crawl, then not at all while the command finishes, then
    drained: the server holds at most its per-call buffer, drops the rest and says how
    much, and the result is still exact. The agent's channel never waits for the reader:
    the command runs to its end and another call on the slot is answered meanwhile."""
    size = 1 << 30
    marker = tmp_path / "written"
    granted = await client.acquire("t")
    await client.execute(granted.slot, granted.lease, "bash", {"command": "true"})  # the agent is warm
    baseline = _memory_kib(server.proc.pid, "VmRSS")
    command = f"yes | head -c {size}; touch {marker}; exit 3"
    events = client.stream(granted.slot, granted.lease, "bash", {"command": command}, timeout=120)
    shown = 0
    first = []
    async for event in events:
        assert event.event == "stdout"
        shown += len(event.data)
        first.append(event)
        if shown >= 4 << 20:  # a few MB, a little at a time
            break
        await asyncio.sleep(0.01)
    # Not reading at all now (the iterator is held, not closed) until the command has written it all.
    started = time.monotonic()
    while not marker.exists():
        assert time.monotonic() - started < 90, "the command did not finish while its reader stalled"
        await asyncio.sleep(0.2)
    other = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo meanwhile"}, timeout=10)
    assert other.result["stdout"] == "meanwhile\n"
    rest = await _collect(events)  # drain
    peak = _memory_kib(server.proc.pid, "VmHWM")
    result = rest[-1]
    assert result.event == "result" and result.answer is not None and result.answer.ok
    assert result.answer.result["exit_code"] == 3
    assert result.answer.result["stdout_dropped"] == size - (1 << 20)  # the default cap: 1 MiB kept of each stream
    shown += sum(len(event.data) for event in rest[:-1])
    assert result.dropped_bytes > size // 2 and shown + result.dropped_bytes == size
    assert any(event.skipped for event in first + rest[:-1])  # where output is missing, the next chunk says so
    grown = (peak - baseline) / 1024
    print(f"server RSS: baseline {baseline / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB (+{grown:.0f} MiB); "
          f"{result.dropped_bytes} bytes dropped, {shown} shown")
    assert grown < 200, f"the server grew by {grown:.0f} MiB"


async def test_refusals_before_the_stream_are_plain_json_errors(server, client, server_factory):
    granted = await client.acquire("t")

    async def raw(path: str, body: dict, headers: dict) -> tuple[int, str, dict]:
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + path, json=body, headers=headers, ssl=server.ssl) as response:
                return response.status, response.content_type, await response.json()

    body = {"exec_id": "e1", "tool": "bash", "args": {"command": "echo no"}, "stream": True}
    auth = {"Authorization": f"Bearer {server.token}"}
    # What a granted one looks like on the wire: NDJSON, an output event, then the result.
    async with aiohttp.ClientSession() as session:
        async with session.post(server.url + f"/v1/slots/{granted.slot}/exec", json={**body, "exec_id": "e0"},
                                headers={**auth, "X-Lease": granted.lease}, ssl=server.ssl) as response:
            assert (response.status, response.content_type) == (200, STREAM_CONTENT_TYPE)
            lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert lines[0] == {"event": "stdout", "data": "no\n"}
    assert lines[1]["event"] == "result" and lines[1]["dropped_bytes"] == 0 and lines[1]["answer"]["ok"] is True
    assert lines[1]["answer"]["result"]["stdout"] == "no\n" and len(lines) == 2
    assert await raw("/v1/slots/0/exec", body, {}) == (
        401, "application/json", {"error": {"kind": "auth", "message": "missing or wrong bearer token"}})
    status, kind, answer = await raw(f"/v1/slots/{granted.slot}/exec", body, {**auth, "X-Lease": "not-the-lease"})
    assert (status, kind, answer["error"]["kind"]) == (409, "application/json", "lease_lost")
    status, _, answer = await raw("/v1/slots/7/exec", body, {**auth, "X-Lease": granted.lease})
    assert (status, answer["error"]["kind"]) == (404, "not_found")
    status, _, answer = await raw("/v1/batch", {"calls": [{**body, "slot": granted.slot, "lease": granted.lease}]},
                                  auth)
    assert (status, answer["error"]["kind"]) == (400, "bad_request")

    # The client raises what a plain execute raises.
    with pytest.raises(LeaseLost):
        await _collect(client.stream(granted.slot, "not-the-lease", "bash", {"command": "true"}))
    with pytest.raises(NotFound):
        await _collect(client.stream(7, granted.lease, "bash", {"command": "true"}))
    with pytest.raises(BadRequest, match="unknown tool"):
        await _collect(client.stream(granted.slot, granted.lease, "no_such_tool", {}))
    wrong = NodeClient(server.endpoint.__class__(**{**server.endpoint.__dict__, "token": "wrong-token-wrong"}))
    async with wrong:
        with pytest.raises(AuthError):
            await _collect(wrong.stream(granted.slot, granted.lease, "bash", {"command": "true"}))

    # max_concurrent counts a streamed call like any other.
    limited = server_factory(job_id="limited", extra=["--max-concurrent", "1"])
    async with NodeClient(limited.endpoint) as other:
        mine = await other.acquire("t")
        running = other.stream(mine.slot, mine.lease, "bash", {"command": "echo on; sleep 1"}, timeout=10)
        assert (await running.__anext__()).data == "on\n"
        with pytest.raises(LimitExceeded, match="limit of 1"):
            await _collect(other.stream(mine.slot, mine.lease, "bash", {"command": "true"}))
        assert (await _collect(running))[-1].answer.ok

    # A tool's own error, once the call runs, is the result event's (as it is a plain answer's).
    events = await _collect(client.stream(granted.slot, granted.lease, "read_file", {"path": "../x"}))
    assert len(events) == 1 and events[0].answer is not None and events[0].answer.error_kind == "path"


async def test_a_streamed_call_that_times_out_ends_with_a_timed_out_result(client):
    granted = await client.acquire("t")
    events = await _collect(client.stream(granted.slot, granted.lease, "bash",
                                          {"command": "echo started; sleep 30"}, timeout=1))
    assert [(e.event, e.data) for e in events[:-1]] == [("stdout", "started\n")]
    result = events[-1].answer
    assert result is not None and result.ok and result.result["timed_out"] is True
    assert result.result["stdout"] == "started\n"


async def test_a_repeated_exec_id_gets_the_first_result_and_a_reader_that_hangs_up_loses_nothing(client):
    granted = await client.acquire("t")
    exec_id = new_exec_id()
    events = client.stream(granted.slot, granted.lease, "bash", {"command": "echo a; sleep 1; echo b; exit 4"},
                           timeout=30, exec_id=exec_id)
    assert (await events.__anext__()).data == "a\n"
    await events.aclose()  # hangs up: the call runs on, its answer kept under its exec id
    again = await client.execute(granted.slot, granted.lease, "bash", {"command": "not run again"}, timeout=30,
                                 exec_id=exec_id)
    assert (again.result["stdout"], again.result["exit_code"]) == ("a\nb\n", 4)
    replay = await _collect(client.stream(granted.slot, granted.lease, "bash", {"command": "not run again"},
                                          exec_id=exec_id))
    assert len(replay) == 1 and replay[0].answer == again  # no output: it ran before, once


async def test_pool_stream_yields_typed_events_ending_in_the_tool_result(state_dir, server_factory, tmp_path):
    server_factory(job_id="streams", slots=1)
    async with connect.from_state_dir(state_dir, ["streams"]) as pool:
        async with pool.slot(trajectory_id="t") as slot:
            command = "echo one; echo two >&2; exit 2"
            events = [event async for event in pool.stream(slot, "bash", {"command": command}, timeout=30)]
            assert all(isinstance(event, ExecEvent) for event in events)
            assert [(e.kind, e.data) for e in events[:-1]] == [("stdout", "one\n"), ("stderr", "two\n")]
            last = events[-1]
            assert last.kind == "result" and last.result is not None and last.dropped_bytes == 0
            plain = await pool.execute(slot, "bash", {"command": command}, timeout=30)
            assert (last.result.exit_code, last.result.stdout, last.result.stderr, last.result.success,
                    last.result.slot) == (plain.exit_code, plain.stdout, plain.stderr, False, slot.id) == (
                        2, "one\n", "two\n", False, slot.id)

            # In a session: streamed as it comes, and the session's state carries over as ever.
            marker = tmp_path / "session-done"
            session = [event async for event in pool.stream(
                slot, "bash", {"session": "s", "command": f"mkdir -p sub; cd sub; echo in $PWD; sleep 1; "
                                                           f"touch {marker}"}, timeout=30)]
            assert session[0].kind == "stdout" and session[0].data.startswith("in ") and session[-1].result.success
            after = await pool.execute(slot, "bash", {"session": "s", "command": "pwd"}, timeout=10)
            assert after.stdout.strip().endswith("/sub")

            # Tools without output just give their result.
            wrote = [event async for event in pool.stream(slot, "write_file", {"path": "f.txt", "content": "x"})]
            assert len(wrote) == 1 and wrote[0].result.success and wrote[0].result.data["size"] == 1


async def test_pool_stream_ends_at_once_when_the_job_ends_and_on_a_dead_server(state_dir, server_factory):
    """Never a hang: a job the scheduler ended (its node server still up) ends the stream
    with job_ended; a node server that dies mid-stream with server_gone."""
    live = server_factory(job_id="ending", slots=1)

    class EndingJob(NodeServerSource):
        def __init__(self) -> None:
            super().__init__(lambda: [live.endpoint], name="ending", location="local")
            self.ended = asyncio.get_running_loop().create_future()

        def job_ended(self, job_id):
            return self.ended

        async def why_gone(self, job_id):
            return "job ending ended (cancelled)" if self.ended.done() else None

    source = EndingJob()
    async with SlotPool([source]) as pool:
        slot = await pool.acquire()
        events = pool.stream(slot, "bash", {"command": "echo up; sleep 60"}, timeout=120)
        assert (await events.__anext__()).data == "up\n"
        asyncio.get_running_loop().call_later(0.3, source.ended.set_result, "cancelled")
        started = time.monotonic()
        last = await events.__anext__()  # in this very task, which the job's end cancels while it waits
        assert time.monotonic() - started < 10
        assert last.kind == "result" and last.result.error_kind == "job_ended" and "cancelled" in last.result.error
        assert asyncio.current_task().cancelling() == 0  # that cancel was handled inside the stream
        with pytest.raises(StopAsyncIteration):
            await events.__anext__()
        await asyncio.sleep(0.05)  # and no cancel is left pending for what this task does next
        # Once ended, a new stream on it ends at once.
        again = [event async for event in pool.stream(slot, "bash", {"command": "true"})]
        assert len(again) == 1 and again[0].result.error_kind == "job_ended"

    dying = server_factory(job_id="dies", slots=1)
    async with connect.from_state_dir(state_dir, ["dies"]) as pool:
        slot = await pool.acquire()
        events = pool.stream(slot, "bash", {"command": "echo up; sleep 60"}, timeout=120)
        assert (await events.__anext__()).data == "up\n"
        dying.proc.send_signal(signal.SIGKILL)
        rest = await asyncio.wait_for(_collect(events), 15)
        assert len(rest) == 1 and rest[0].result.error_kind == "server_gone", rest
        await pool.release(slot)


def test_the_sync_facade_streams_too(state_dir, server_factory):
    server_factory(job_id="syncstream", slots=1)
    with SyncSlotPool(connect.from_state_dir(state_dir, ["syncstream"])) as pool:
        with pool.slot(trajectory_id="script") as slot:
            events = list(pool.stream(slot, "bash", {"command": "echo a; sleep 0.3; echo b"}, timeout=30))
            early = pool.stream(slot, "bash", {"command": "echo x; sleep 0.3; echo y"}, timeout=30)
            assert next(early).data == "x\n"
            early.close()  # leaving early hangs up cleanly
            assert pool.execute(slot, "bash", {"command": "echo still"}).stdout == "still\n"
    assert [(e.kind, e.data) for e in events[:-1]] == [("stdout", "a\n"), ("stdout", "b\n")]
    assert events[-1].result is not None and events[-1].result.success


@pytest.fixture
def one_slot_job(cli):
    submitted = cli("submit", "--slots", "1", "--wait", "--json", "--port-range", free_port_range())
    assert submitted.returncode == 0, submitted.stderr
    return json.loads(submitted.stdout)["job_id"]


def test_cli_exec_streams_and_keeps_its_exit_codes(cli, one_slot_job, state_dir, tmp_path):
    streamed = cli("exec", "--stream", "--", "for i in 1 2 3; do echo $i; sleep 0.5; done")
    assert (streamed.returncode, streamed.stdout) == (0, "1\n2\n3\n"), streamed.stderr
    failed = cli("exec", "--stream", "--", "echo out; echo err >&2; exit 7")
    assert (failed.returncode, failed.stdout, failed.stderr) == (7, "out\n", "err\n")
    slow = cli("exec", "--stream", "--timeout", "0.5", "--", "echo begun; sleep 30")
    assert (slow.returncode, slow.stdout) == (124, "begun\n") and "timed out" in slow.stderr
    killed = cli("exec", "--stream", "--", "kill -TERM $$")
    assert killed.returncode == 128 + signal.SIGTERM
    whole = cli("exec", "--no-stream", "--", "echo a; exit 3")
    assert (whole.returncode, whole.stdout) == (3, "a\n")

    # As it comes: the first line is out while the command still runs.
    marker = tmp_path / "cli-finished"
    proc = subprocess.Popen([sys.executable, "-m", "hpc_sandbox", "exec", "--stream", "--",
                             f"echo first; sleep 2; touch {marker}; echo last"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "HPC_SANDBOX_STATE_DIR": str(state_dir)})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "first\n"
        assert not marker.exists()
        assert proc.stdout.read() == "last\n" and proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
