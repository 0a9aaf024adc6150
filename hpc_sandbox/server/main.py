"""Running one node server: bind a port from the declared range, start the slots,
announce readiness, and leave cleanly on SIGTERM/SIGINT.

What the server holds while it runs (the workspace root, the slot table with its agents
and watchdog) is set up and torn down in pairs through aiohttp's `cleanup_ctx`; the
ready record is the last thing made and the first undone (`_announced`)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import signal
import socket
import ssl
import stat
import struct
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from ..errors import ConfigError, HpcSandboxError
from ..jobfolder import JobFolder, ServerRecord, read_private, read_token
from ..tls import server_context
from ..runtime import RuntimeOptions, make_runtime
from .app import ServerLimits, make_app
from . import cgroups
from .limits import SlotLimits
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
    # The job's certificate and key (default: in its job folder); plain HTTP only when
    # asked for by name, for trusted single-user machines.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_http: bool = False
    slot_limits: SlotLimits = field(default_factory=SlotLimits)  # memory, processes, disk of each slot


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


def workspace_base() -> Path:
    """This user's folder for every node server's workspaces on this node. Workspaces
    are scratch: node-local, never the shared filesystem of the state dir."""
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / f"hpc-sandbox-{os.getuid()}"


def default_workspace_root(job_id: str, host: str, port: int) -> Path:
    return workspace_base() / f"{job_id}-{host}-{port}"


def make_private_dir(path: Path) -> None:
    """Create `path` 0700, or take it if it already is a folder of ours that nobody else
    can write. In a shared /tmp another user can make the folder first (to read or swap
    what our slots write): such a folder is refused, with the reason, never used."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"workspace folder {path} is a symlink; refusing it (remove it, or set TMPDIR)")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"workspace folder {path} exists and is not a folder (remove it, or set TMPDIR)")
    if st.st_uid != os.getuid():
        raise ConfigError(f"workspace folder {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): "
                          "another user made it first; refusing it (ask them to remove it, or set TMPDIR)")
    if st.st_mode & 0o022:
        raise ConfigError(f"workspace folder {path} is writable by others (mode {oct(st.st_mode & 0o777)}); "
                          "refusing it: its contents may not be yours (remove it, or set TMPDIR)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours and nobody else's to write: only too readable


def _tls(options: ServeOptions) -> ssl.SSLContext | None:
    if options.insecure_http:
        log.warning("serving plain HTTP (--insecure-http): the token travels unencrypted and clients cannot tell "
                    "this server from another on its port; for trusted single-user machines only")
        return None
    folder = JobFolder(options.state_dir, options.job_id)
    cert, key = options.tls_cert or folder.tls_cert, options.tls_key or folder.tls_key
    if not cert.exists():
        raise ConfigError(f"no TLS certificate at {cert}: jobs submitted with hpc-sandbox get one (tls: true); "
                          "pass --tls-cert/--tls-key, or --insecure-http on a trusted single-user machine")
    read_private(key, "TLS key")  # refuses a key that others could read
    try:
        return server_context(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from None


def _prepare_workspace_root(root: Path, ours: bool) -> None:
    """Make the slots' workspace root (0700, ours). A root of our own naming may hold
    what a server of the same job, host and port left when it was killed (SIGKILL, a
    node's OOM killer): its slots' files must not reach this server's slots."""
    if not ours:
        make_private_dir(root)  # one the caller named: used as it is
        return
    make_private_dir(workspace_base())
    make_private_dir(root)
    leftovers = list(root.iterdir())
    if leftovers:
        log.warning("removing %d entries left in %s by a server that did not stop cleanly", len(leftovers), root)
        for entry in leftovers:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# What the node server holds while it runs, each setup beside its teardown. aiohttp enters
# them in order in runner.setup() and leaves them in reverse in runner.cleanup(), after
# the HTTP side has closed, also when a later setup fails.


def _workspaces(root: Path, ours: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def workspaces(app: web.Application) -> AsyncIterator[None]:
        _prepare_workspace_root(root, ours)
        yield
        shutil.rmtree(root, ignore_errors=True)  # workspaces are scratch: nothing outlives the server

    return workspaces


def _slots(table: SlotTable) -> Callable[[web.Application], AsyncIterator[None]]:
    async def slots(app: web.Application) -> AsyncIterator[None]:
        await table.start()  # every slot's agent (and the limit watchdog); stops them all if one fails
        yield
        await table.stop()  # at a SIGTERM, already done by _announced: then a no-op

    return slots


@contextlib.asynccontextmanager
async def _announced(folder: JobFolder, record: ServerRecord, table: SlotTable) -> AsyncIterator[Path]:
    """The rendezvous: the ready record is written once the server answers, and at stop,
    in this order, no new work is taken, the record goes (no client picks this server
    any more) and running commands are killed while the HTTP side still answers, so
    every call in flight gets its answer before the connections close."""
    path = folder.write_record(record)
    try:
        yield path
    finally:
        table.accepting = False
        path.unlink(missing_ok=True)
        await table.stop()


async def serve(options: ServeOptions) -> int:
    token = read_token(options.token_file)
    tls = _tls(options)
    host = listen_address(options)
    sock = bind_in_range(host, options.port_range, options.port_index)
    try:
        port = sock.getsockname()[1]
        ours = options.workspace_root is None  # of our own naming: leftovers in it are cleared
        workspace_root = options.workspace_root or default_workspace_root(options.job_id, host, port)
        # No slot may see the state dir, the token, the certificate's key, or any other
        # workspace of this user on this node (its neighbours', other servers').
        secrets = (options.token_file, options.tls_key, options.tls_cert)
        hidden = (options.state_dir.expanduser(), *(p for p in secrets if p is not None), workspace_base(),
                  workspace_root)
        runtime = make_runtime(dataclasses.replace(options.runtime, hidden_paths=hidden))
        description = runtime.check()
    except BaseException:
        sock.close()
        raise
    if options.runtime.kind == "none":
        log.warning("runtime none: slots run as plain processes of this user with no isolation; "
                    "use it for trusted local work only")
    table = SlotTable(runtime, workspace_root, options.slots, max_concurrent=options.limits.max_concurrent,
                      limits=options.slot_limits, cgroups=cgroups.claim())
    app = make_app(table, token, options.limits)
    app.cleanup_ctx.extend([_workspaces(workspace_root, ours), _slots(table)])
    log.info("starting %d slots (%s) in %s", options.slots, description, workspace_root)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await runner.setup()
        await web.SockSite(runner, sock, shutdown_timeout=2.0, ssl_context=tls).start()
        record = ServerRecord(job_id=options.job_id, host=host, port=port, slots=options.slots, pid=os.getpid(),
                              hostname=socket.gethostname(), runtime=options.runtime.kind,
                              started_at=time.time(), task_index=options.port_index, tls=tls is not None)
        async with _announced(JobFolder(options.state_dir, options.job_id), record, table) as record_file:
            log.info("ready: %s with %d slots, job %s (record %s)", record.url, options.slots, options.job_id,
                     record_file)
            await stop.wait()
            log.info("stopping: no new work, killing running commands")
    finally:
        await runner.cleanup()
        sock.close()
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
