"""The node server over real HTTP: auth, leases, exec ids, batches, limits, files, signals."""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import signal
import stat
import time
from pathlib import Path

import aiohttp
import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.errors import AuthError, BadRequest, LeaseLost, LimitExceeded, NoFreeSlot, NotFound, PathRefused
from hpc_sandbox.jobfolder import JobFolder
from hpc_sandbox.protocol import Call

from helpers import pids_matching, start_server, wait_until


@pytest.fixture
async def client(server):
    async with NodeClient(server.endpoint) as c:
        yield c


async def _raw(server, method: str, path: str, token: str | None = "", **kwargs):
    headers = kwargs.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token or server.token}"
    async with aiohttp.ClientSession() as session:
        async with session.request(method, server.url + path, headers=headers, ssl=server.ssl, **kwargs) as response:
            return response.status, await response.json()


async def test_health_needs_no_token_and_says_only_ready_and_slots(server):
    assert await _raw(server, "GET", "/v1/health", token=None) == (200, {"ready": True, "slots": 2})


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token"])
async def test_missing_or_wrong_token_gets_401_and_nothing_else(server, token):
    for method, path in (("GET", "/v1/slots"), ("POST", "/v1/slots/acquire"), ("POST", "/v1/slots/0/exec")):
        status, body = await _raw(server, method, path, token=token)
        assert status == 401 and body == {"error": {"kind": "auth", "message": "missing or wrong bearer token"}}


async def test_token_never_reaches_a_slot_or_the_log(server, client):
    granted = await client.acquire("t")
    answer = await client.execute(granted.slot, granted.lease, "bash",
                                  {"command": "env; cat /proc/$PPID/cmdline | tr '\\0' ' '"})
    assert server.token not in answer.result["stdout"]
    await client.release(granted.slot, granted.lease)
    assert server.token not in server.log.read_text()


async def test_acquire_gives_distinct_slots_then_refuses(client):
    first = await client.acquire("a")
    second = await client.acquire("b")
    assert {first.slot, second.slot} == {0, 1}
    with pytest.raises(NoFreeSlot):
        await client.acquire("c")
    await client.release(first.slot, first.lease)
    assert (await client.acquire("c")).slot == first.slot


async def test_calls_need_the_current_lease(client):
    granted = await client.acquire("t")
    with pytest.raises(LeaseLost):
        await client.execute(granted.slot, "someone-elses-lease", "bash", {"command": "true"})
    await client.release(granted.slot, granted.lease)
    with pytest.raises(LeaseLost):  # a released lease is stale
        await client.execute(granted.slot, granted.lease, "bash", {"command": "true"})


async def test_unused_lease_expires_and_the_slot_comes_back_clean(client):
    granted = await client.acquire("abandoned", ttl=1)
    await client.execute(granted.slot, granted.lease, "write_file", {"path": "left.txt", "content": "x"})

    async def freed() -> bool:
        slots = (await client.slots()).slots
        return slots[granted.slot]["state"] == "free"

    deadline = time.monotonic() + 10
    while not await freed():
        assert time.monotonic() < deadline, "expired lease was not freed"
        await asyncio.sleep(0.2)
    with pytest.raises(LeaseLost):
        await client.execute(granted.slot, granted.lease, "bash", {"command": "true"})
    again = await client.acquire("next", ttl=60)
    listing = await client.execute(again.slot, again.lease, "list_files", {})
    assert listing.result["entries"] == []


async def test_a_running_command_keeps_its_lease_alive(client):
    granted = await client.acquire("long", ttl=1)
    answer = await client.execute(granted.slot, granted.lease, "bash", {"command": "sleep 2.5; echo done"})
    assert answer.result["stdout"] == "done\n"
    await client.renew(granted.slot, granted.lease)  # still ours right after


async def test_repeated_exec_id_returns_the_first_result_and_runs_once(client):
    granted = await client.acquire("t")
    call = dict(slot=granted.slot, lease=granted.lease, tool="bash",
                args={"command": "echo run >> count; wc -l < count"}, exec_id="same-id")
    first, second = await asyncio.gather(client.execute(**call), client.execute(**call))
    third = await client.execute(**call)
    assert first == second == third
    assert first.result["stdout"].strip() == "1"
    count = await client.execute(granted.slot, granted.lease, "read_file", {"path": "count"})
    assert count.result["content"] == "run\n"


async def test_batch_runs_calls_on_several_slots_in_one_request(client):
    a, b = await client.acquire("a"), await client.acquire("b")
    results = await client.batch([
        Call(a.slot, a.lease, "1", "bash", {"command": "sleep 0.3; echo a"}),
        Call(b.slot, b.lease, "2", "bash", {"command": "echo b"}),
        Call(b.slot, "stale", "3", "bash", {"command": "echo c"}),
    ])
    assert [r.result["stdout"] for r in results[:2]] == ["a\n", "b\n"]
    assert results[2].ok is False and results[2].error_kind == "lease_lost"


async def test_bad_inputs_get_4xx_with_a_message_and_the_server_stays_up(server, client):
    granted = await client.acquire("t")
    lease = {"X-Lease": granted.lease}
    slot = granted.slot
    cases = [
        ("POST", f"/v1/slots/{slot}/exec", {"data": b"{not json", "headers": dict(lease)}, 400, "bad_request"),
        ("POST", f"/v1/slots/{slot}/exec", {"json": {"exec_id": "x", "tool": "format_disk", "args": {}},
                                             "headers": dict(lease)}, 400, "bad_request"),
        ("POST", f"/v1/slots/{slot}/exec", {"json": {"exec_id": "x", "tool": "bash", "args": {}, "timeout": -1},
                                             "headers": dict(lease)}, 400, "bad_request"),
        ("POST", "/v1/slots/99/exec", {"json": {"exec_id": "x", "tool": "bash", "args": {}}}, 404, "not_found"),
        ("POST", "/v1/slots/abc/exec", {"json": {}}, 404, "not_found"),
        ("POST", "/v1/batch", {"json": {"calls": []}}, 400, "bad_request"),
        ("POST", "/v1/slots/acquire", {"json": {"ttl": "forever"}}, 400, "bad_request"),
        # Unicode digits pass str.isdigit(); 5,000 digits pass it too and then break int().
        ("POST", "/v1/slots/%C2%B2/exec", {"json": {}}, 404, "not_found"),
        ("POST", f"/v1/slots/{'9' * 5000}/exec", {"json": {}}, 404, "not_found"),
        # json.loads raises RecursionError, not ValueError, on deep nesting.
        ("POST", "/v1/slots/acquire", {"data": b"[" * 200000 + b"]" * 200000}, 400, "bad_request"),
        ("POST", f"/v1/slots/{slot}/release", {"json": {"reset_workspace": "no"}, "headers": dict(lease)},
         400, "bad_request"),
    ]
    for method, path, kwargs, status, kind in cases:
        got_status, body = await _raw(server, method, path, **kwargs)
        assert (got_status, body["error"]["kind"]) == (status, kind), (path, body)
        assert body["error"]["message"]
    answer = await client.execute(slot, granted.lease, "bash", {"command": "echo alive"})
    assert answer.result["stdout"] == "alive\n"
    assert server.proc.poll() is None


async def test_tool_errors_come_back_as_results(client):
    granted = await client.acquire("t")
    answer = await client.execute(granted.slot, granted.lease, "read_file", {"path": "../../etc/passwd"})
    assert answer.ok is False and answer.error_kind == "path"


async def test_oversized_body_gets_413(server_factory):
    small = server_factory(job_id="small", extra=["--max-body", "4096"])
    async with NodeClient(small.endpoint) as client:
        granted = await client.acquire("t")
        with pytest.raises(LimitExceeded, match="4096"):
            await client.execute(granted.slot, granted.lease, "write_file", {"path": "f", "content": "x" * 10000})
        assert (await client.execute(granted.slot, granted.lease, "bash", {"command": "echo ok"})).ok


async def test_concurrency_limit_gets_429(server_factory):
    limited = server_factory(job_id="limited", extra=["--max-concurrent", "1"])
    async with NodeClient(limited.endpoint) as client:
        granted = await client.acquire("t")
        slow = asyncio.ensure_future(client.execute(granted.slot, granted.lease, "bash", {"command": "sleep 1"}))
        await asyncio.sleep(0.3)
        with pytest.raises(LimitExceeded, match="limit of 1"):
            await client.execute(granted.slot, granted.lease, "bash", {"command": "true"})
        assert (await slow).ok


async def test_files_stream_in_and_out(client, tmp_path):
    granted = await client.acquire("t")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(3 << 20) * 4)  # 12 MiB, over any single-buffer path
    assert await client.upload(granted.slot, granted.lease, source, "data/big.bin") == source.stat().st_size
    digest = await client.execute(granted.slot, granted.lease, "read_file",
                                  {"path": "data/big.bin", "sha256": True, "limit": 1, "encoding": "base64"})
    assert digest.result["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "back.bin"
    assert await client.download(granted.slot, granted.lease, "/workspace/data/big.bin", dest) == source.stat().st_size
    assert dest.read_bytes() == source.read_bytes()


async def test_concurrent_uploads_into_a_new_folder_all_land(client, tmp_path):
    """Eight uploads at once under folders none of them found: each makes what it needs,
    and one that finds a folder made meanwhile by another goes on (it said 'File exists')."""
    granted = await client.acquire("t")
    source = tmp_path / "f"
    source.write_bytes(b"x")
    for round_ in range(20):
        sizes = await asyncio.gather(*(client.upload(granted.slot, granted.lease, source,
                                                     f"r{round_}/a/b/c/d/f{k}") for k in range(8)))
        assert sizes == [1] * 8
    listing = await client.execute(granted.slot, granted.lease, "bash", {"command": "ls r19/a/b/c/d | wc -l"})
    assert listing.result["stdout"] == "8\n"


async def test_file_transfer_never_follows_symlinks_or_dotdot(client, tmp_path):
    granted = await client.acquire("t")
    slot, lease = granted.slot, granted.lease
    await client.execute(slot, lease, "bash", {"command": "ln -s /etc/hostname host; mkdir d; ln -s /etc linkdir"})
    with pytest.raises(BadRequest, match="symlink"):
        await client.download(slot, lease, "host", tmp_path / "x")
    with pytest.raises(BadRequest):
        await client.download(slot, lease, "linkdir/hostname", tmp_path / "x")
    with pytest.raises(BadRequest, match="outside"):
        await client.download(slot, lease, "/etc/hostname", tmp_path / "x")
    with pytest.raises(NotFound):
        await client.download(slot, lease, "d/missing", tmp_path / "x")
    source = tmp_path / "payload"
    source.write_text("owned")
    with pytest.raises(BadRequest):
        await client.upload(slot, lease, source, "linkdir/evil")
    assert not Path("/etc/evil").exists()


async def test_a_bad_path_is_refused_with_one_kind_by_a_tool_and_a_file_endpoint(client, tmp_path):
    granted = await client.acquire("t")
    slot, lease = granted.slot, granted.lease
    await client.execute(slot, lease, "bash", {"command": "ln -s /etc/hostname host; ln -s /etc linkdir"})
    for path in ("host", "linkdir/hostname", "a/../b"):
        answer = await client.execute(slot, lease, "read_file", {"path": path})
        with pytest.raises(PathRefused) as refused:
            await client.download(slot, lease, path, tmp_path / "x")
        assert answer.error_kind == refused.value.kind == "path", (path, answer)


async def test_an_agent_that_dies_is_restarted_and_reported(client):
    granted = await client.acquire("t")
    slot, lease = granted.slot, granted.lease
    agent_pid = int((await client.execute(slot, lease, "bash", {"command": "echo $PPID"})).result["stdout"])
    os.kill(agent_pid, signal.SIGKILL)

    async def restarted() -> bool:
        return (await client.slots()).slots[slot]["restarts"] == 1

    deadline = time.monotonic() + 10
    while not await restarted():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    described = (await client.slots()).slots[slot]
    assert described["state"] == "leased" and "restarted" in described["last_error"]
    answer = await client.execute(slot, lease, "bash", {"command": "echo $PPID"})
    assert answer.ok and int(answer.result["stdout"]) != agent_pid


async def test_reset_wipes_the_workspace_and_kills_commands(client):
    marker = f"hpcsbx-reset-{os.getpid()}"
    granted = await client.acquire("t")
    slot, lease = granted.slot, granted.lease
    await client.execute(slot, lease, "write_file", {"path": "f", "content": "x"})
    running = asyncio.ensure_future(client.execute(slot, lease, "bash", {"command": f"exec -a {marker} sleep 60"}))
    assert await asyncio.to_thread(wait_until, lambda: bool(pids_matching(marker)), 5)
    await client.reset(slot, lease)
    answer = await asyncio.wait_for(running, 10)
    # Killed mid-run: either the agent reported the kill or died with it; never a normal exit.
    assert (answer.ok and answer.result["signal"] == 9) or answer.error_kind == "agent_died"
    assert not pids_matching(marker)
    assert (await client.execute(slot, lease, "list_files", {})).result["entries"] == []


def test_a_call_without_a_timeout_gets_the_servers_default():
    from hpc_sandbox.server.app import Api, ServerLimits

    api = Api(table=None, limits=ServerLimits(default_timeout=7.0))  # type: ignore[arg-type]
    call = api._call({"exec_id": "e1", "tool": "bash", "args": {"command": "sleep 1"}}, 0, "lease")
    assert call.timeout == 7.0
    assert api._call({"exec_id": "e2", "tool": "bash", "timeout": 2}, 0, "lease").timeout == 2.0


def test_sigterm_kills_running_work_removes_the_record_and_exits_0(state_dir):
    marker = f"hpcsbx-term-{os.getpid()}"
    server = start_server(state_dir, job_id="term")

    async def start_long_command() -> None:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("t")
            asyncio.ensure_future(client.execute(granted.slot, granted.lease, "bash",
                                                 {"command": f"exec -a {marker} sleep 60"}))
            await asyncio.sleep(0.5)

    asyncio.run(start_long_command())
    assert pids_matching(marker)
    workspace_root = Path(f"/tmp/hpc-sandbox-{os.getuid()}/term-127.0.0.1-{server.record.port}")
    assert workspace_root.is_dir()
    assert server.stop() == 0
    assert JobFolder(state_dir, "term").read_records() == []
    assert wait_until(lambda: not pids_matching(marker), 5)
    assert not workspace_root.exists()


async def test_a_call_in_flight_at_sigterm_gets_its_answer_before_the_connections_close(state_dir):
    """The running command is killed while the HTTP side still answers: the caller gets
    `server_stopping`, not a dropped connection (and not only after the HTTP shutdown timeout)."""
    server = start_server(state_dir, job_id="drain")
    async with NodeClient(server.endpoint) as client:
        granted = await client.acquire("t")
        running = asyncio.ensure_future(client.execute(granted.slot, granted.lease, "bash", {"command": "sleep 60"}))
        await asyncio.sleep(0.5)
        stopped = asyncio.get_running_loop().run_in_executor(None, server.stop)
        answer = await asyncio.wait_for(running, 10)
        assert (answer.ok, answer.error_kind) == (False, "server_stopping")
        assert await stopped == 0


def test_token_file_readable_by_others_is_refused(state_dir):
    path = JobFolder(state_dir, "loose").create_token()
    path.chmod(0o644)
    with pytest.raises(RuntimeError, match="must be 0600"):
        start_server(state_dir, job_id="loose", make_token=False)


def test_token_file_is_created_0600(state_dir):
    assert stat.S_IMODE(JobFolder(state_dir, "j").create_token().stat().st_mode) == 0o600


def test_exhausted_port_range_names_the_range(state_dir):
    first = start_server(state_dir, job_id="p1", extra=["--port-range", "23456-23456"])
    try:
        with pytest.raises(RuntimeError, match="no free port in 23456-23456"):
            start_server(state_dir, job_id="p2", extra=["--port-range", "23456-23456"])
    finally:
        first.stop()


async def test_auth_error_type_on_client(server):
    bad = NodeClient(dataclasses.replace(server.endpoint, token="x" * 20))
    with pytest.raises(AuthError):
        await bad.slots()
    await bad.close()


async def test_a_lost_answer_is_retried_with_the_same_exec_id_and_runs_once(server_factory):
    """A proxy between client and server drops the connection carrying the first exec
    answer: the client sees a broken connection, retries with the same execution id,
    and gets the first result; the command ran once. (Plain HTTP, so that the proxy can
    see which answer it drops.)"""
    from hpc_sandbox.models import Endpoint

    server = server_factory(job_id="plain", extra=["--insecure-http"])
    upstream = server.url.removeprefix("http://").split(":")
    dropped = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(upstream[0], int(upstream[1]))
        saw_exec = False

        async def forward_requests() -> None:
            nonlocal saw_exec
            while data := await reader.read(65536):
                saw_exec = saw_exec or b"/exec HTTP" in data
                up_writer.write(data)
                await up_writer.drain()

        to_server = asyncio.ensure_future(forward_requests())
        try:
            while data := await up_reader.read(65536):
                if saw_exec and not dropped:
                    dropped.append(data)  # the first exec answer never reaches the client
                    break
                writer.write(data)
                await writer.drain()
        finally:
            to_server.cancel()
            writer.close()
            up_writer.close()

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    endpoint = Endpoint(url=f"http://127.0.0.1:{port}", token=server.token, job_id=server.job_id, name="proxied")
    try:
        async with NodeClient(endpoint) as client:
            granted = await client.acquire("t")
            answer = await client.execute(granted.slot, granted.lease, "bash",
                                          {"command": "echo run >> runs.txt; wc -l < runs.txt"}, exec_id="retry-1")
            assert dropped, "the proxy did not drop an answer: the test proves nothing"
            assert answer.ok and answer.result["stdout"] == "1\n"
            runs = await client.execute(granted.slot, granted.lease, "read_file", {"path": "runs.txt"})
            assert runs.result["content"] == "run\n"
    finally:
        proxy.close()
        await proxy.wait_closed()
