"""Pinned TLS between clients and a job's node servers, and the folders a server owns.

The threat: a co-tenant on the node listens on a dead node server's port (its ready
record lingers after a SIGKILL) and waits for the job's token. A client must prove it
talks to the job's own server, by the job's own certificate, before the token leaves it.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.errors import ServerGone
from hpc_sandbox.jobfolder import JobFolder, JobInfo
from hpc_sandbox.tls import make_self_signed

from helpers import requires_bwrap, start_server


class Listener:
    """A co-tenant's process on a port: records every byte it is sent, answers `{}`
    (over TLS with a certificate of its own when `tls`, as a cleverer impostor would)."""

    def __init__(self, port: int, tls: bool, workdir: Path) -> None:
        self.port, self.received = port, bytearray()
        self.context: ssl.SSLContext | None = None
        if tls:
            cert, key = make_self_signed("impostor")
            (workdir / "imp.crt").write_bytes(cert)
            (workdir / "imp.key").write_bytes(key)
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(workdir / "imp.crt", workdir / "imp.key")

    async def __aenter__(self) -> "Listener":
        self.connections = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                if self.context is not None:
                    await writer.start_tls(self.context)  # fails when the client rejects our certificate
                while data := await reader.read(65536):
                    self.received += data
                    # Answer at once, whatever came: a plain listener's reply breaks a TLS client's handshake.
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 2\r\n\r\n{}")
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


def _as_submitted(server) -> None:
    """Give a server started by hand the job.json that `submit` writes, so that
    `status` and `exec` list its job."""
    JobFolder(server.state_dir, server.job_id).write_info(JobInfo(
        job_id=server.job_id, scheduler="local", submitted_at=time.time() - 5, servers=1, slots_per_server=1,
        runtime="none", scheduler_ids=(str(server.proc.pid),)))


def _kill_and_fake_another_node(server) -> Path:
    """SIGKILL the server (its record stays), and make the record look as if it came
    from another node, so that clients cannot rule it out by pid and must connect."""
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    [record] = JobFolder(server.state_dir, server.job_id).servers.glob("*.json")
    data = json.loads(record.read_text())
    data["hostname"] = "another-node"
    record.write_text(json.dumps(data))
    return record


@pytest.mark.parametrize("impostor_tls", [False, True], ids=["plain-listener", "tls-listener"])
async def test_the_token_never_reaches_whatever_listens_on_a_dead_servers_port(state_dir, tmp_path, impostor_tls):
    server = start_server(state_dir, job_id="victim", slots=1)
    token = server.token
    _as_submitted(server)
    _kill_and_fake_another_node(server)
    async with Listener(server.record.port, impostor_tls, tmp_path) as listener:
        env = {**os.environ, "HPC_SANDBOX_STATE_DIR": str(state_dir)}
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hpc_sandbox", "status", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        status_out, _ = await asyncio.wait_for(status.communicate(), 60)
        run = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hpc_sandbox", "exec", "--acquire-timeout", "2", "--", "true", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, exec_err = await asyncio.wait_for(run.communicate(), 60)
    assert listener.connections, "nothing connected: the test proves nothing"
    assert token.encode() not in listener.received
    assert b"Authorization" not in listener.received
    assert "unreachable" in status_out.decode() or "gone" in status_out.decode()
    assert run.returncode == 125 and "does not hold the job's certificate" in exec_err.decode(), exec_err.decode()


async def test_a_record_of_a_dead_server_on_this_host_is_named_stale_without_connecting(state_dir):
    server = start_server(state_dir, job_id="dead", slots=1)
    _as_submitted(server)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(10)
    out = subprocess.run([sys.executable, "-m", "hpc_sandbox", "status", "--state-dir", str(state_dir), "dead"],
                         capture_output=True, text=True, timeout=60)
    assert f"stale record: its node server (pid {server.proc.pid} on this host) has exited" in out.stdout


async def test_a_plain_http_record_of_a_job_with_a_certificate_gets_no_token(state_dir, tmp_path):
    server = start_server(state_dir, job_id="downgrade", slots=1)
    endpoint = server.endpoint
    server.stop()
    downgraded = endpoint.__class__(**{**endpoint.__dict__, "url": endpoint.url.replace("https://", "http://")})
    with pytest.raises(ServerGone, match="refusing to send the job's token unencrypted"):
        async with NodeClient(downgraded) as client:
            await client.slots()


def test_a_server_without_its_certificate_refuses_to_start_unless_told_plain_http(state_dir):
    JobFolder(state_dir, "nocert").create_token()
    with pytest.raises(RuntimeError, match="no TLS certificate at .*--insecure-http"):
        start_server(state_dir, job_id="nocert", make_token=False)
    plain = start_server(state_dir, job_id="nocert", make_token=False, extra=["--insecure-http"])
    try:
        assert plain.url.startswith("http://") and "plain HTTP" in plain.log.read_text()
    finally:
        plain.stop()


def test_a_key_others_can_read_is_refused(state_dir):
    folder = JobFolder(state_dir, "loosekey")
    folder.create_credentials()
    folder.tls_key.chmod(0o644)
    with pytest.raises(RuntimeError, match="TLS key .* must be 0600"):
        start_server(state_dir, job_id="loosekey", make_token=False)


async def test_tls_end_to_end_with_the_pinned_certificate(server):
    assert server.url.startswith("https://")
    async with NodeClient(server.endpoint) as client:
        granted = await client.acquire("t")
        answer = await client.execute(granted.slot, granted.lease, "bash", {"command": "echo over tls"})
        assert answer.result["stdout"] == "over tls\n"
    other_cert, _ = make_self_signed("another job")
    wrong = server.endpoint.__class__(**{**server.endpoint.__dict__, "cert": other_cert.decode()})
    with pytest.raises(ServerGone, match="does not hold the job's certificate"):
        async with NodeClient(wrong) as client:
            await client.slots()


# --- the workspace folders a server creates -------------------------------------------------


@pytest.fixture
def tmpdir_outside_tmp():
    """A TMPDIR outside /tmp (bwrap gives slots a private /tmp, which would hide the
    very thing these tests look for)."""
    path = Path(tempfile.mkdtemp(prefix="hpcsbx-tmpdir-", dir="/var/tmp"))
    path.chmod(0o1777)  # like /tmp: anyone may create in it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a folder owned by another user")
def test_a_workspace_base_made_first_by_another_user_is_refused(state_dir, tmpdir_outside_tmp):
    base = tmpdir_outside_tmp / f"hpc-sandbox-{os.getuid()}"
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    os.chown(base, 65534, 65534)  # `nobody` got there first
    with pytest.raises(RuntimeError, match=f"workspace folder {base} belongs to uid 65534, not to you"):
        start_server(state_dir, job_id="hijack", env={"TMPDIR": str(tmpdir_outside_tmp)})


@pytest.mark.parametrize("kind", ["symlink", "writable-by-others"])
def test_a_workspace_base_that_others_could_swap_is_refused(state_dir, tmpdir_outside_tmp, tmp_path, kind):
    base = tmpdir_outside_tmp / f"hpc-sandbox-{os.getuid()}"
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        base.symlink_to(tmp_path / "elsewhere")
        expected = "is a symlink"
    else:
        base.mkdir()
        base.chmod(0o777)
        expected = "is writable by others"
    with pytest.raises(RuntimeError, match=expected):
        start_server(state_dir, job_id="swap", env={"TMPDIR": str(tmpdir_outside_tmp)})


def test_the_workspace_base_is_made_0700(state_dir, tmpdir_outside_tmp):
    server = start_server(state_dir, job_id="mode", env={"TMPDIR": str(tmpdir_outside_tmp)})
    try:
        base = tmpdir_outside_tmp / f"hpc-sandbox-{os.getuid()}"
        assert base.stat().st_mode & 0o777 == 0o700
        [root] = base.iterdir()
        assert root.stat().st_mode & 0o777 == 0o700
    finally:
        server.stop()


@requires_bwrap
async def test_a_slot_sees_no_other_node_servers_workspaces(state_dir, tmpdir_outside_tmp):
    env = {"TMPDIR": str(tmpdir_outside_tmp)}
    one = start_server(state_dir, job_id="one", slots=1, runtime="bwrap", env=env)
    two = start_server(state_dir, job_id="two", slots=1, runtime="bwrap", env=env)
    base = tmpdir_outside_tmp / f"hpc-sandbox-{os.getuid()}"
    try:
        async with NodeClient(two.endpoint) as client:
            granted = await client.acquire("t")
            await client.execute(granted.slot, granted.lease, "write_file", {"path": "secret.txt", "content": "S2"})
        [two_root] = [p for p in base.iterdir() if p.name.startswith("two-")]
        async with NodeClient(one.endpoint) as client:
            granted = await client.acquire("t")
            answer = await client.execute(
                granted.slot, granted.lease, "bash",
                {"command": f"ls -A {base} 2>/dev/null | wc -l; "
                            f"cat {two_root}/slot-0/workspace/secret.txt 2>/dev/null || echo unreadable"})
        assert answer.result["stdout"] == "0\nunreadable\n", answer.result
    finally:
        one.stop()
        two.stop()
