"""Running one node server: bind a port from the declared range, start the slots,
announce readiness, and leave cleanly on SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..errors import ConfigError, HpcSandboxError
from ..jobfolder import JobFolder, ServerRecord, read_token
from ..runtime import RuntimeOptions, make_runtime
from .app import ServerLimits, make_app
from .slots import SlotTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    job_id: str
    slots: int
    token_file: Path
    state_dir: Path
    runtime: RuntimeOptions
    port_range: tuple[int, int]
    port_index: int = 0
    host: str | None = None
    interface: str | None = None
    workspace_root: Path | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)


def interface_address(name: str) -> str:
    """The IPv4 address of a network interface (SIOCGIFADDR), e.g. the cluster fabric's."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            raise ConfigError(f"interface {name!r} has no IPv4 address (see `ip -4 addr`)") from None
    return socket.inet_ntoa(packed[20:24])


def listen_address(options: ServeOptions) -> str:
    if options.host:
        return options.host
    if options.interface:
        return interface_address(options.interface)
    # The address this node's own name resolves to: reachable by the login node,
    # and not every interface of a machine shared with other users.
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        raise ConfigError(f"hostname {socket.gethostname()!r} does not resolve; pass --host or --interface") from None


def bind_in_range(host: str, port_range: tuple[int, int], index: int) -> socket.socket:
    """Bind the first free port of the range, starting from the task's own offset."""
    lo, hi = port_range
    size = hi - lo + 1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for step in range(size):
        port = lo + (index + step) % size
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        sock.listen(1024)
        sock.setblocking(False)
        return sock
    raise ConfigError(f"no free port in {lo}-{hi} on {host}: all {size} are taken (widen --port-range)")


def default_workspace_root(job_id: str, host: str, port: int) -> Path:
    # Workspaces are scratch: node-local, never the shared filesystem of the state dir.
    base = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / f"hpc-sandbox-{os.getuid()}"
    return base / f"{job_id}-{host}-{port}"


async def serve(options: ServeOptions) -> int:
    token = read_token(options.token_file)
    host = listen_address(options)
    sock = bind_in_range(host, options.port_range, options.port_index)
    port = sock.getsockname()[1]
    workspace_root = options.workspace_root or default_workspace_root(options.job_id, host, port)
    # No slot may see the state dir, the token or its neighbours' workspaces.
    hidden = (options.state_dir.expanduser(), options.token_file, workspace_root)
    runtime = make_runtime(dataclasses.replace(options.runtime, hidden_paths=hidden))
    try:
        description = runtime.check()
    except BaseException:
        sock.close()
        raise
    if options.runtime.kind == "none":
        log.warning("runtime none: slots run as plain processes of this user with no isolation; "
                    "use it for trusted local work only")
    workspace_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(workspace_root, 0o700)
    table = SlotTable(runtime, workspace_root, options.slots, max_concurrent=options.limits.max_concurrent)
    log.info("starting %d slots (%s) in %s", options.slots, description, workspace_root)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    record_file: Path | None = None
    runner: web.AppRunner | None = None
    try:
        await table.start()
        runner = web.AppRunner(make_app(table, token, options.limits), access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock, shutdown_timeout=2.0).start()
        record = ServerRecord(job_id=options.job_id, host=host, port=port, slots=options.slots, pid=os.getpid(),
                              hostname=socket.gethostname(), runtime=options.runtime.kind,
                              started_at=time.time(), task_index=options.port_index)
        record_file = JobFolder(options.state_dir, options.job_id).write_record(record)
        log.info("ready: %s with %d slots, job %s (record %s)", record.url, options.slots, options.job_id, record_file)
        await stop.wait()
        log.info("stopping: no new work, killing running commands")
    finally:
        table.accepting = False
        if record_file is not None:
            record_file.unlink(missing_ok=True)
        await table.stop()
        if runner is not None:
            await runner.cleanup()
        sock.close()
        shutil.rmtree(workspace_root, ignore_errors=True)
    log.info("stopped")
    return 0


def run(options: ServeOptions) -> int:
    try:
        return asyncio.run(serve(options))
    except HpcSandboxError:
        raise
    except OSError as exc:
        raise ConfigError(f"node server failed: {exc}") from exc


__all__ = ["ServeOptions", "run", "serve"]
