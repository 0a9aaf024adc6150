#!/usr/bin/env python3
"""The slot agent: one long-lived process inside a slot's container.

It is bind-mounted as this single file into any image, so it uses the standard
library only, runs on any python3 >= 3.8, and imports nothing from hpc_sandbox.

Protocol (newline-framed JSON; json.dumps never emits a raw newline):
  in  (stdin):  {"id": "r1", "tool": "bash", "args": {"command": "ls"}, "timeout": 30}
  out (stdout): {"id": "r1", "ok": true, "result": {...}}
                {"id": "r1", "ok": false, "error": {"kind": "path", "message": "..."}}
Requests are served concurrently; answers come back in completion order, matched
by id. Stdout carries nothing but answers: diagnostics go to stderr.

Tools: bash, read_file, write_file, list_files, archive, cancel, ping.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import sys
import subprocess
import tarfile
import tempfile
import threading
import time

DEFAULT_OUTPUT_CAP = 1 << 20  # per stream, bytes
DEFAULT_READ_LIMIT = 8 << 20
DEFAULT_ARCHIVE_CAP = 64 << 20
KILL_GRACE_SECONDS = 1.0
# After the command's own process exits, background children may still hold its
# pipes open (`server &`); we stop waiting for their output after this long.
PIPE_DRAIN_SECONDS = 0.2
MAX_REQUEST_LINE = 512 << 20
# Ceilings on what a caller may ask for: every answer is one JSON line the node
# server holds in memory, so no request may make it arbitrarily large.
MAX_OUTPUT_CAP = 16 << 20  # per stream
MAX_READ_LIMIT = 64 << 20
MAX_ARCHIVE_CAP = 128 << 20
MAX_LIST_ENTRIES = 100000


def _bounded_int(args, key, default, ceiling):
    """args[key] as an int in [0, ceiling], `default` when absent; else a bad_request."""
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ToolError("bad_request", "%s must be an integer >= 0" % key)
    if ceiling is not None and value > ceiling:
        raise ToolError("bad_request", "%s must be at most %d" % (key, ceiling))
    return value or default


class ToolError(Exception):
    """A request that cannot be served; becomes {"ok": false, "error": ...}."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


# --- paths -------------------------------------------------------------------------


def resolve_in_workspace(workspace: str, path: str) -> str:
    """Return the real path of `path` if it lies inside `workspace`, else raise.

    Relative paths are taken from the workspace; symlinks are resolved first, so a
    link that leads out is refused just like `..` or an absolute path outside.
    """
    if not isinstance(path, str) or path == "":
        raise ToolError("bad_request", "path must be a non-empty string")
    if "\x00" in path:
        raise ToolError("bad_request", "path contains a NUL byte")
    root = os.path.realpath(workspace)
    candidate = path if os.path.isabs(path) else os.path.join(root, path)
    real = os.path.realpath(candidate)
    if real != root and not real.startswith(root + os.sep):
        raise ToolError("path", "%s: outside the workspace" % path)
    return real


def _relative(workspace: str, real: str) -> str:
    rel = os.path.relpath(real, os.path.realpath(workspace))
    return "." if rel == "." else rel


# --- output capture ----------------------------------------------------------------


class CappedBuffer:
    """Keeps the first and the last bytes of a stream, up to `cap` in all.

    The error that matters is usually at the end of a long log, so a capped stream
    keeps its head and its tail and counts what was dropped between them.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(0, cap)
        self.head_cap = self.cap // 2
        self.tail_cap = self.cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            excess = len(self.tail) - self.tail_cap
            if excess > 0:
                del self.tail[:excess]

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> str:
        if self.dropped:
            marker = "\n[... hpc-sandbox: %d bytes dropped ...]\n" % self.dropped
            return (
                bytes(self.head).decode("utf-8", "replace")
                + marker
                + bytes(self.tail).decode("utf-8", "replace")
            )
        return bytes(self.head + self.tail).decode("utf-8", "replace")


class _Spawned:
    """A `bash -c` child read without asyncio's subprocess layer.

    asyncio's Process.wait() also waits for the child's pipes to close, so a
    command that leaves a background job holding stdout (`server &`) would look
    as if it never ended. Here the exit is watched on a pidfd (a thread on
    pythons/kernels without one) and the pipes are drained separately.
    """

    def __init__(self, loop, argv, cwd, env, out, err):
        self.loop = loop
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,  # own process group: a timeout kills all of it
        )
        self.exited = loop.create_future()
        self.streams_done = loop.create_future()
        self.open_streams = 0
        for pipe, sink in ((self.proc.stdout, out), (self.proc.stderr, err)):
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self.open_streams += 1
            loop.add_reader(fd, self._on_readable, pipe, sink)
        self._watch_exit()

    @property
    def pid(self):
        return self.proc.pid

    def _watch_exit(self):
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self.pidfd = pidfd_open(self.proc.pid)
            except OSError:
                self.pidfd = None
            if self.pidfd is not None:
                self.loop.add_reader(self.pidfd, self._on_exit)
                return
        threading.Thread(target=self._wait_in_thread, daemon=True).start()

    def _on_exit(self):
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self._set_exited(self.proc.wait())

    def _wait_in_thread(self):
        code = self.proc.wait()
        self.loop.call_soon_threadsafe(self._set_exited, code)

    def _set_exited(self, code):
        if not self.exited.done():
            self.exited.set_result(code)

    def _on_readable(self, pipe, sink):
        try:
            chunk = os.read(pipe.fileno(), 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            sink.feed(chunk)
            return
        self._close_stream(pipe)

    def _close_stream(self, pipe):
        if pipe.closed:
            return
        self.loop.remove_reader(pipe.fileno())
        pipe.close()
        self.open_streams -= 1
        if self.open_streams == 0 and not self.streams_done.done():
            self.streams_done.set_result(None)

    def close_streams(self):
        """Stop reading (a background job may hold the pipes open for hours)."""
        for pipe in (self.proc.stdout, self.proc.stderr):
            self._close_stream(pipe)


async def _done_within(loop, future, seconds):
    """Wait until `future` is done or `seconds` pass (None: no limit); never cancels it.

    The hot path of every command: one plain future and one timer, where
    wait_for(shield(...)) would add a task and two more futures.
    """
    if future.done():
        return True
    waiter = loop.create_future()

    def wake(_=None):
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(seconds, wake) if seconds is not None else None
    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


CALL_ENV = "HPC_SANDBOX_CALL"


def _kill_tagged(tag: str, exact: bool) -> int:
    """SIGKILL every process whose environment carries CALL_ENV=tag (or tag...).

    A command can leave its process group (`setsid`, a daemonising server), so
    killing the group is not enough. Every command starts with a tag in its
    environment, which its descendants inherit; /proc/PID/environ still shows it
    after they leave the group. (A process that re-executes itself with a cleared
    environment escapes this; the container's pid namespace still ends it at reset.)
    """
    needle = ("%s=%s" % (CALL_ENV, tag)).encode()
    me = os.getpid()
    killed = 0
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return 0
    for pid in pids:
        if pid == me:
            continue
        try:
            with open("/proc/%d/environ" % pid, "rb") as handle:
                entries = handle.read().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        if any(entry == needle or (not exact and entry.startswith(needle)) for entry in entries):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


# --- the agent ---------------------------------------------------------------------


class Agent:
    def __init__(self, workspace: str, output_cap: int) -> None:
        self.workspace = os.path.realpath(workspace)
        self.output_cap = output_cap
        self.running = {}  # request id -> (process group id, call tag) of a running bash command
        # Groups that may still hold background jobs (`server &`) of finished commands.
        # Linux does not reuse a pid while a group of that id has members, so killing
        # these at shutdown cannot hit a stranger's group that is still alive.
        self.lingering = set()
        self.tasks = set()
        self.out = sys.stdout.buffer
        # Tags every command's environment (see _kill_tagged): this agent's, then the call's.
        self.tag = "%d.%s" % (os.getpid(), os.urandom(4).hex())
        self.calls_started = 0
        # Looked up once: a command's environment starts from the agent's own, and
        # naming bash by its path spares every spawn a search along PATH.
        self.base_env = dict(os.environ)
        self.bash = shutil.which("bash") or "bash"

    # I/O ----------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n")
        self.out.flush()

    async def serve(self) -> None:
        loop = asyncio.get_event_loop()
        reader = asyncio.StreamReader(limit=MAX_REQUEST_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # a line over the limit: the stream cannot be resynced
                self.send({"id": None, "ok": False, "error": {"kind": "bad_request", "message": "request too large"}})
                break
            if not line:
                break
            if not line.strip():
                continue
            task = loop.create_task(self.handle_line(line))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        # stdin closed: the server is gone or is stopping us. Leave nothing behind.
        self.kill_all()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=KILL_GRACE_SECONDS + 1)

    def kill_all(self) -> None:
        for pgid in {pgid for pgid, _ in self.running.values()} | self.lingering:
            _kill_group(pgid, signal.SIGKILL)
        _kill_tagged(self.tag + ".", exact=False)

    async def handle_line(self, line: bytes) -> None:
        request_id = None
        try:
            try:
                request = json.loads(line)
            except ValueError as exc:
                raise ToolError("bad_request", "malformed JSON: %s" % exc)
            if not isinstance(request, dict):
                raise ToolError("bad_request", "a request must be a JSON object")
            request_id = request.get("id")
            tool = request.get("tool")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ToolError("bad_request", "args must be an object")
            handler = TOOLS.get(tool)
            if handler is None:
                raise ToolError("unknown_tool", "unknown tool %r (known: %s)" % (tool, ", ".join(sorted(TOOLS))))
            result = await handler(self, request_id, args, request.get("timeout"))
            self.send({"id": request_id, "ok": True, "result": result})
        except ToolError as exc:
            self.send({"id": request_id, "ok": False, "error": {"kind": exc.kind, "message": exc.message}})
        except Exception as exc:  # a bug or an OS error must not take the agent down
            kind = "not_found" if isinstance(exc, FileNotFoundError) else "io"
            if isinstance(exc, IsADirectoryError):
                kind = "is_directory"
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.send({"id": request_id, "ok": False, "error": {"kind": kind, "message": detail}})

    # tools --------------------------------------------------------------------------

    async def tool_bash(self, request_id, args, timeout):
        command = args.get("command")
        if not isinstance(command, str):
            raise ToolError("bad_request", "bash needs a string 'command'")
        extra_env = args.get("env") or {}
        if not isinstance(extra_env, dict):
            raise ToolError("bad_request", "env must be an object of strings")
        env = dict(self.base_env)
        env.update({str(k): str(v) for k, v in extra_env.items()})
        self.calls_started += 1
        call_tag = "%s.%d" % (self.tag, self.calls_started)
        env[CALL_ENV] = call_tag
        cwd = resolve_in_workspace(self.workspace, args["cwd"]) if args.get("cwd") else self.workspace
        cap = _bounded_int(args, "output_cap", self.output_cap, MAX_OUTPUT_CAP)
        timeout = float(timeout) if timeout else None

        started = time.monotonic()
        out, err = CappedBuffer(cap), CappedBuffer(cap)
        loop = asyncio.get_event_loop()
        child = _Spawned(loop, [self.bash, "-c", command], cwd, env, out, err)
        self.running[request_id] = (child.pid, call_tag)
        timed_out = False
        try:
            if not await _done_within(loop, child.exited, timeout):
                timed_out = True
                _kill_group(child.pid, signal.SIGTERM)
                if not await _done_within(loop, child.exited, KILL_GRACE_SECONDS):
                    _kill_group(child.pid, signal.SIGKILL)
                _kill_tagged(call_tag, exact=True)
            code = await child.exited
            await _done_within(loop, child.streams_done, PIPE_DRAIN_SECONDS)
        finally:
            self.running.pop(request_id, None)
            if not child.exited.done():  # cancelled: leave nothing behind
                _kill_group(child.pid, signal.SIGKILL)
                _kill_tagged(call_tag, exact=True)
            child.close_streams()
            if _group_alive(child.pid):
                self.lingering.add(child.pid)
        return {
            "exit_code": code if code is not None and code >= 0 else None,
            "signal": -code if code is not None and code < 0 else None,
            "timed_out": timed_out,
            "duration": round(time.monotonic() - started, 6),
            "stdout": out.text(),
            "stderr": err.text(),
            "stdout_dropped": out.dropped,
            "stderr_dropped": err.dropped,
        }

    async def tool_read_file(self, request_id, args, timeout):
        real = resolve_in_workspace(self.workspace, args.get("path"))
        encoding = args.get("encoding", "text")
        if encoding not in ("text", "base64"):
            raise ToolError("bad_request", "encoding must be 'text' or 'base64'")
        offset = _bounded_int(args, "offset", 0, None)
        limit = _bounded_int(args, "limit", DEFAULT_READ_LIMIT, MAX_READ_LIMIT)
        with open(real, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            handle.seek(offset)
            data = handle.read(limit)
            digest = None
            if args.get("sha256"):
                handle.seek(0)
                hasher = hashlib.sha256()
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
                digest = hasher.hexdigest()
        result = {
            "path": _relative(self.workspace, real),
            "size": size,
            "offset": offset,
            "bytes_read": len(data),
            "eof": offset + len(data) >= size,
            "encoding": encoding,
        }
        if encoding == "base64":
            result["content"] = base64.b64encode(data).decode("ascii")
        else:
            try:
                result["content"] = data.decode("utf-8")
            except UnicodeDecodeError:  # binary data asked for as text: say so, don't fail
                result["content"] = data.decode("utf-8", "replace")
                result["lossy"] = True
        if digest:
            result["sha256"] = digest
        return result

    async def tool_write_file(self, request_id, args, timeout):
        real = resolve_in_workspace(self.workspace, args.get("path"))
        if real == self.workspace or os.path.isdir(real):
            raise ToolError("is_directory", "%s: is a directory" % args.get("path"))
        content = args.get("content", "")
        if not isinstance(content, str):
            raise ToolError("bad_request", "content must be a string")
        encoding = args.get("encoding", "text")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError:
                raise ToolError("bad_request", "content is not valid base64")
        elif encoding == "text":
            data = content.encode("utf-8")
        else:
            raise ToolError("bad_request", "encoding must be 'text' or 'base64'")
        mode = args.get("mode")
        if isinstance(mode, str):
            mode = int(mode, 8)
        parent = os.path.dirname(real)
        os.makedirs(parent, exist_ok=True)
        # The parent may have been created through a symlink made meanwhile: check again.
        resolve_in_workspace(self.workspace, parent)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".hpc-sandbox-write-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            if mode is not None:
                os.chmod(tmp, mode)
            elif os.path.exists(real):
                os.chmod(tmp, stat.S_IMODE(os.stat(real).st_mode))
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, real)  # atomic: readers see the old file or the new one
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return {"path": _relative(self.workspace, real), "size": len(data)}

    async def tool_list_files(self, request_id, args, timeout):
        real = resolve_in_workspace(self.workspace, args.get("path") or ".")
        recursive = bool(args.get("recursive"))
        max_entries = _bounded_int(args, "max_entries", 10000, MAX_LIST_ENTRIES)
        if not os.path.isdir(real):
            raise ToolError("not_a_directory", "%s: not a directory" % args.get("path"))
        entries = []
        truncated = False
        for dirpath, dirnames, filenames in os.walk(real):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                if len(entries) >= max_entries:
                    truncated = True
                    break
                full = os.path.join(dirpath, name)
                st = os.lstat(full)
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
                entries.append({"path": _relative(self.workspace, full), "type": kind, "size": st.st_size, "mtime": st.st_mtime})
            if truncated or not recursive:
                break
        return {"entries": entries, "truncated": truncated}

    async def tool_archive(self, request_id, args, timeout):
        real = resolve_in_workspace(self.workspace, args.get("path") or ".")
        cap = _bounded_int(args, "max_bytes", DEFAULT_ARCHIVE_CAP, MAX_ARCHIVE_CAP)
        sink = _CappedBytesIO(cap)
        try:
            with tarfile.open(fileobj=sink, mode="w:gz") as tar:
                tar.add(real, arcname=os.path.basename(real) if real != self.workspace else ".")
        except _TooLarge:
            raise ToolError("too_large", "archive of %s exceeds %d bytes" % (args.get("path") or ".", cap))
        data = sink.getvalue()
        return {
            "content": base64.b64encode(data).decode("ascii"),
            "encoding": "base64",
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    async def tool_cancel(self, request_id, args, timeout):
        running = self.running.get(args.get("target"))
        if running is not None:
            pgid, call_tag = running
            _kill_group(pgid, signal.SIGKILL)
            _kill_tagged(call_tag, exact=True)
        return {"cancelled": running is not None}

    async def tool_ping(self, request_id, args, timeout):
        return {"pid": os.getpid(), "workspace": self.workspace, "python": sys.version.split()[0]}


class _TooLarge(Exception):
    pass


class _CappedBytesIO(io.BytesIO):
    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def write(self, data) -> int:
        if self.tell() + len(data) > self.cap:
            raise _TooLarge()
        return super().write(data)


TOOLS = {
    "bash": Agent.tool_bash,
    "read_file": Agent.tool_read_file,
    "write_file": Agent.tool_write_file,
    "list_files": Agent.tool_list_files,
    "archive": Agent.tool_archive,
    "cancel": Agent.tool_cancel,
    "ping": Agent.tool_ping,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="hpc-sandbox slot agent (speaks JSON lines on stdin/stdout)")
    parser.add_argument("--workspace", required=True, help="the slot's workspace directory")
    parser.add_argument("--output-cap", type=int, default=DEFAULT_OUTPUT_CAP, help="bytes kept per output stream")
    options = parser.parse_args(argv)
    if not os.path.isdir(options.workspace):
        sys.stderr.write("hpc-sandbox agent: workspace %s is not a directory\n" % options.workspace)
        return 2
    agent = Agent(options.workspace, options.output_cap)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # A batch scheduler's cancel or walltime signal reaches every process of the job,
    # us included. The node server is the one to stop us (it closes our stdin), so
    # that a running call can still be answered with what happened. A handler, not
    # SIG_IGN: commands we start must still die of SIGTERM.
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    # The ready line lets the server know the runtime started us (not just the container tool).
    agent.send({"id": None, "ok": True, "result": {"ready": True, "pid": os.getpid()}})
    try:
        loop.run_until_complete(agent.serve())
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
