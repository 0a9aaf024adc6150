"""Test helpers: real node servers and real agents as subprocesses, on loopback."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpc_sandbox.client import endpoint_of
from hpc_sandbox.models import Endpoint
from hpc_sandbox.jobfolder import JobFolder, ServerRecord

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / "hpc_sandbox" / "agent.py"
SHIMS = Path(__file__).resolve().parent / "shims"

requires_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                    reason="bubblewrap (bwrap) is not installed; `apt-get install bubblewrap`")


def free_port_range(size: int = 32) -> str:
    """A port range unlikely to collide with another test's (pytest-xdist safe enough)."""
    base = 20000 + (os.getpid() % 400) * 100
    return f"{base}-{base + size - 1}"


@dataclass
class RunningServer:
    proc: subprocess.Popen
    state_dir: Path
    job_id: str
    record: ServerRecord
    log: Path

    @property
    def token(self) -> str:
        return JobFolder(self.state_dir, self.job_id).read_token()

    @property
    def url(self) -> str:
        return self.record.url

    @property
    def endpoint(self) -> Endpoint:
        return endpoint_of(self.record, JobFolder(self.state_dir, self.job_id).credentials(), "local")

    @property
    def ssl(self):
        """What a raw aiohttp request to this server passes as ssl= (the pinned certificate)."""
        from hpc_sandbox.tls import pinned_context

        return pinned_context(self.endpoint.cert) if self.endpoint.cert else False

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_server(state_dir: Path, job_id: str = "job", slots: int = 2, runtime: str = "none",
                 extra: list[str] | None = None, env: dict[str, str] | None = None, timeout: float = 30.0,
                 make_token: bool = True) -> RunningServer:
    folder = JobFolder(state_dir, job_id)
    if make_token and not folder.token.exists():
        # The token and the job's TLS certificate, as submit makes them (a token only for
        # a server asked to serve plain HTTP).
        folder.create_credentials(tls="--insecure-http" not in (extra or []))
    log = state_dir / f"{job_id}-server-{time.monotonic_ns()}.log"
    argv = [sys.executable, "-m", "hpc_sandbox", "-v", "serve", "--job-id", job_id, "--state-dir", str(state_dir),
            "--host", "127.0.0.1", "--slots", str(slots), "--runtime", runtime,
            "--port-range", free_port_range(), *(extra or [])]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [r for r in folder.read_records() if r.pid == proc.pid]
        if mine:
            return RunningServer(proc, state_dir, job_id, mine[0], log)
        if proc.poll() is not None:
            raise RuntimeError(f"node server exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"node server not ready in {timeout}s: {log.read_text()}")


class AgentDriver:
    """Speaks the agent's JSON-lines protocol to a real agent process."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.counter = 0
        self.pending: dict[str, asyncio.Future] = {}
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, workspace: Path, *extra: str) -> "AgentDriver":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(AGENT), "--workspace", str(workspace), *extra,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 28)
        driver = cls(proc)
        ready = asyncio.get_running_loop().create_future()
        driver.pending["None"] = ready
        assert (await asyncio.wait_for(ready, 10))["result"]["ready"]
        return driver

    async def _read(self) -> None:
        assert self.proc.stdout
        async for line in self.proc.stdout:
            answer = json.loads(line)
            future = self.pending.pop(str(answer.get("id")), None)
            if future and not future.done():
                future.set_result(answer)

    async def raw(self, line: bytes, answer_id: str = "None") -> dict:
        future = asyncio.get_running_loop().create_future()
        self.pending[answer_id] = future
        assert self.proc.stdin
        self.proc.stdin.write(line)
        return await asyncio.wait_for(future, 30)

    async def call(self, tool: str, timeout: float | None = None, **args) -> dict:
        self.counter += 1
        request_id = str(self.counter)
        message = {"id": request_id, "tool": tool, "args": args}
        if timeout is not None:
            message["timeout"] = timeout
        return await self.raw(json.dumps(message).encode() + b"\n", request_id)

    async def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        await asyncio.wait_for(self.proc.wait(), 10)
        self.reader.cancel()


def pids_matching(marker: str) -> list[int]:
    """Pids of processes whose command line contains `marker` (to prove none survive)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if marker in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z" and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def stand_in(folder: Path, name: str, body: str) -> Path:
    """A stand-in scheduler command (an executable bash script) that prints recorded
    output; lines after the first may be indented by 8 spaces."""
    path = folder / name
    path.write_text("#!/bin/bash\n" + "\n".join(line.removeprefix(" " * 8) for line in body.split("\n")))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def stand_in_calls(bin_dir: Path) -> list[str]:
    """What the stand-ins logged to bin_dir/calls.log, one line per call."""
    log_file = bin_dir / "calls.log"
    return log_file.read_text().splitlines() if log_file.exists() else []
