"""SWE-ReX, the comparison point: installed from PyPI into its own virtual
environment, its `swerex-remote` servers started on loopback.

API (swe-rex 1.4.0, swerex/server.py): `swerex-remote --host H --port P --auth-token T`
runs a FastAPI app under uvicorn; `POST /execute` with header `X-API-Key: T` and body
`{"command": "true", "shell": true}` runs `subprocess.run(command, shell=True, ...)`
(so `/bin/sh -c true`) inside the async handler, which blocks the event loop: one
server serves one request at a time. `GET /is_alive` answers `{"is_alive": true}`.
"""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from _common import Children, free_ports

log = logging.getLogger("bench.swerex")

DEFAULT_VERSION = "1.4.0"
HOST = "127.0.0.1"
PORT_RANGE = (9400, 9699)


def ensure_venv(venv: Path, version: str = DEFAULT_VERSION) -> Path:
    """The `swerex-remote` executable of a venv holding swe-rex==version (made if needed)."""
    exe = venv / "bin" / "swerex-remote"
    if exe.exists():
        found = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout.strip()
        if found == version:
            return exe
        log.info("SWE-ReX venv %s holds swe-rex %r, want %s: reinstalling", venv, found, version)
    print(f"installing swe-rex=={version} into {venv} (once) ...", flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"swe-rex=={version}"], check=True)
    if not exe.exists():
        raise RuntimeError(f"swe-rex installed but {exe} is missing")
    return exe


class SwerexServers:
    """N `swerex-remote` processes on loopback, each on its own free port."""

    def __init__(self, children: Children, exe: Path, token: str, log_dir: Path) -> None:
        self.children = children
        self.exe = exe
        self.token = token
        self.log_dir = log_dir
        self.urls: list[str] = []
        self.procs: list[subprocess.Popen] = []

    async def start(self, count: int, session: aiohttp.ClientSession, timeout: float = 120.0) -> None:
        pending = []
        for i, port in enumerate(free_ports(count, PORT_RANGE, HOST)):
            log_file = self.log_dir / f"swerex-{i}.log"
            proc = self.children.spawn(f"swerex-remote #{i}", [str(self.exe), "--host", HOST, "--port", str(port),
                                                                "--auth-token", self.token], log_file=log_file)
            self.procs.append(proc)
            url = f"http://{HOST}:{port}"
            self.urls.append(url)
            pending.append((proc, url, log_file))
        deadline = time.monotonic() + timeout
        for proc, url, log_file in pending:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"swerex-remote at {url} exited with {proc.returncode}:\n{Children.tail(log_file)}")
                try:
                    async with session.get(url + "/is_alive", headers={"X-API-Key": self.token},
                                           timeout=aiohttp.ClientTimeout(total=2)) as response:
                        if response.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"swerex-remote at {url} not ready within {timeout:.0f}s:\n{Children.tail(log_file)}")
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            self.children.stop(proc)
        self.procs.clear()
        self.urls.clear()


# The request bodies. SHELL_TRUE is the documented use (`shell: true`): SWE-ReX runs it
# as `/bin/sh -c true`, and /bin/sh is dash on Debian, cheaper to start than bash.
# BASH_TRUE runs exactly the process the node server runs (`bash -c true`).
SHELL_TRUE = {"command": "true", "shell": True}
BASH_TRUE = {"command": ["bash", "-c", "true"], "shell": False}


def execute_op(session: aiohttp.ClientSession, url: str, token: str, body: dict = SHELL_TRUE):
    """An operation for the load generator: one `POST /execute`, 1 if exit code 0."""
    endpoint = url + "/execute"
    headers = {"X-API-Key": token}

    async def op() -> int:
        async with session.post(endpoint, json=body, headers=headers) as response:
            answer = await response.json()
            if response.status != 200:
                raise RuntimeError(f"SWE-ReX {response.status}: {str(answer)[:200]}")
            return 1 if answer.get("exit_code") == 0 else 0

    return op
