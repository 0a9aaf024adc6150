"""The wire protocol from the client's side: what happens when whatever answers on a
node server's port does not speak it (a stale record, a port taken over, a broken
proxy). Each answer is checked; nonsense is a clear `server_gone`, never a KeyError."""
from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from hpc_sandbox.client import TRANSPORT_ERRORS, NodeClient
from hpc_sandbox.errors import JobEnded, ServerGone
from hpc_sandbox.jobfolder import JobFolder, ServerRecord
from hpc_sandbox.models import Endpoint, Slot
from hpc_sandbox.pool import NodeServerSource, SlotPool
from hpc_sandbox.protocol import Call, CallAnswer, batch_answers


class FakeNodeServer:
    """An HTTP server on loopback that answers every route with what a test gives it."""

    def __init__(self, answer) -> None:
        self.answer = answer  # (method, path, body) -> JSON-able
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> "FakeNodeServer":
        async def handle(request: web.Request) -> web.Response:
            body = await request.json() if request.body_exists else None
            return web.json_response(self.answer(request.method, request.path, body))

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(url=f"http://127.0.0.1:{self.port}", token="t" * 20, job_id="fake", name="fake")


def test_batch_answers_are_matched_by_exec_id_and_a_missing_one_is_that_calls_error():
    calls = [Call(0, "l", f"e{i}", "bash", {"command": f"echo {i}"}) for i in range(3)]
    # Out of order and one short: position must not pin one call's result on another.
    wire = {"results": [CallAnswer.success(calls[2], {"stdout": "2\n"}).to_json(),
                        CallAnswer.success(calls[0], {"stdout": "0\n"}).to_json()]}
    answers = batch_answers(wire, calls)
    assert [a.exec_id for a in answers] == ["e0", "e1", "e2"]
    assert answers[0].result == {"stdout": "0\n"} and answers[2].result == {"stdout": "2\n"}
    assert (answers[1].ok, answers[1].error_kind) == (False, "server_gone")


@pytest.mark.parametrize("nonsense", [{}, [], {"slot": "0", "lease": "x", "ttl": 1}, {"slot": 0, "lease": "", "ttl": 1}])
async def test_an_acquire_answered_with_nonsense_is_server_gone(nonsense):
    async with FakeNodeServer(lambda *_: nonsense) as fake:
        async with NodeClient(fake.endpoint) as client:
            with pytest.raises(ServerGone, match="not answering as a node server would"):
                await client.acquire("t")


async def test_every_answer_is_checked_not_only_acquire():
    async with FakeNodeServer(lambda *_: {"ok": "yes"}) as fake:
        async with NodeClient(fake.endpoint) as client:
            for call in (client.slots(), client.health(), client.execute(0, "l", "bash", {"command": "true"}),
                         client.batch([Call(0, "l", "e", "bash", {})])):
                with pytest.raises(ServerGone):
                    await call


async def test_execute_batch_gives_a_missing_answer_its_own_error_and_keeps_the_others():
    def answer(method, path, body):
        # Answers only the first call of the batch.
        first = body["calls"][0]
        return {"results": [{"slot": first["slot"], "exec_id": first["exec_id"], "tool": "bash", "ok": True,
                             "result": {"exit_code": 0, "stdout": "first\n", "stderr": ""}}]}

    async with FakeNodeServer(answer) as fake:
        pool = SlotPool([NodeServerSource.from_endpoints([fake.endpoint])])
        async with pool:
            a = Slot(fake.endpoint, 0, "la")
            b = Slot(fake.endpoint, 1, "lb")
            results = await pool.execute_batch([(a, "bash", {"command": "echo first"}),
                                                (b, "bash", {"command": "echo second"})])
    assert len(results) == 2
    assert results[0].success and results[0].stdout == "first\n"
    assert not results[1].success and results[1].error_kind == "server_gone" and results[1].slot == b.id


async def test_cli_exec_against_nonsense_exits_125_with_a_clear_line(state_dir):
    async with FakeNodeServer(lambda *_: {}) as fake:
        folder = JobFolder(state_dir, "fake")
        folder.create_token()
        folder.write_record(ServerRecord(job_id="fake", host="127.0.0.1", port=fake.port, slots=1, pid=os.getpid(),
                                         hostname="fakehost", runtime="none", started_at=time.time()))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hpc_sandbox", "exec", "--state-dir", str(state_dir), "--job", "fake",
            "--acquire-timeout", "1", "--", "true",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 125, text
    assert "KeyError" not in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if line.strip()]) == 1, text
    assert "not answering as a node server would" in text


async def test_file_transfers_and_reset_give_up_when_the_job_ends(tmp_path):
    """download, upload (and the trees) and reset are guarded like execute: a job the
    scheduler ended is a job_ended result (reset: a JobEnded error) at once, not a wait
    on a dead node."""

    class EndedJob(NodeServerSource):
        def __init__(self) -> None:
            super().__init__(lambda: [], name="ended")
            self.ended = asyncio.get_running_loop().create_future()
            self.ended.set_result("cancelled")

        def job_ended(self, job_id):
            return self.ended

        async def why_gone(self, job_id):
            return "job j ended (cancelled)"

    pool = SlotPool([EndedJob()])
    slot = Slot(endpoint=Endpoint(url="http://127.0.0.1:9", token="t", job_id="j", name="n"), index=0, lease="l")
    source = tmp_path / "up.txt"
    source.write_text("x")
    for call in (pool.download(slot, "a.txt", tmp_path / "a.txt"), pool.upload(slot, source, "a.txt"),
                 pool.upload_tree(slot, tmp_path, "t"), pool.download_tree(slot, "t", tmp_path / "t")):
        result = await asyncio.wait_for(call, 10)
        assert not result.success and result.error_kind == JobEnded.kind and "cancelled" in result.error
    with pytest.raises(JobEnded, match="cancelled"):
        await asyncio.wait_for(pool.reset(slot), 10)


def _ssl_failure() -> Exception:
    return aiohttp.ClientConnectorSSLError(SimpleNamespace(host="h", port=1, ssl=True), ssl.SSLError("bad cert"))


@pytest.mark.parametrize("failure, kind, repeatable, says", [
    (_ssl_failure, "server_gone", False, "does not hold the job's certificate"),
    (lambda: aiohttp.ConnectionTimeoutError("connect"), "server_gone", False, "no connection within"),
    (lambda: aiohttp.SocketTimeoutError("read"), "timeout", False, "LATE"),
    (lambda: asyncio.TimeoutError(), "timeout", False, "LATE"),
    (lambda: aiohttp.ServerDisconnectedError(), "server_gone", True, "BROKE: ServerDisconnectedError"),
    (lambda: aiohttp.ClientOSError(104, "reset"), "server_gone", True, "BROKE: ClientOSError"),
    # Not a ClientOSError: it escaped the client as a bare aiohttp error before there was one mapping.
    (lambda: aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
     "server_gone", True, "BROKE: ClientConnectionResetError"),
    (lambda: aiohttp.ClientPayloadError("cut"), "server_gone", True, "BROKE: ClientPayloadError"),
])
def test_every_transport_failure_is_read_in_one_place(failure, kind, repeatable, says):
    exc = failure()
    assert isinstance(exc, TRANSPORT_ERRORS)  # caught by every request's `except`
    client = NodeClient(Endpoint(url="https://127.0.0.1:1", token="t" * 20, job_id="j", name="n"))
    error, again = client._transport_error(exc, broke="BROKE", late="LATE")
    assert (error.kind, again) == (kind, repeatable) and says in str(error), str(error)
