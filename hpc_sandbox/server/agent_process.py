"""One slot's agent process, seen from the node server: spawn, call, stop."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from ..agent import MAX_CHUNK_BYTES, is_ready
from ..errors import ErrorKind, RuntimeUnavailable
from .cgroups import SlotCgroup
from .procfs import kill_tree

log = logging.getLogger(__name__)

# A whole answer is one line: two capped output streams (1 MiB each by default,
# JSON-escaped) or a base64 archive must fit.
MAX_ANSWER_LINE = 512 << 20
STOP_GRACE_SECONDS = 3.0
# The agent answers a command by its timeout plus its kill grace (1 s) and pipe drain
# (0.2 s). One that has not answered by the call's timeout plus this is stuck (stopped,
# blocked in a syscall, wedged by a bug), and nothing it holds will ever be answered.
STUCK_GRACE_SECONDS = 5.0


# Where a streaming call's output chunks go as the agent sends them: (stream name,
# the raw bytes, whole UTF-8 characters where the output is UTF-8). Called on the
# reader of the agent's stdout, so it must never wait: the agent's channel keeps
# flowing whoever reads the stream.
OutputSink = Callable[[str, bytes], None]


class AgentDied(RuntimeUnavailable):
    """The agent process ended (or could not start) while calls were in flight. A
    RuntimeUnavailable to whoever starts the server, but a call it ends is answered
    with a kind of its own: the slot still works (its agent is restarted)."""

    kind = ErrorKind.AGENT_DIED


class AgentStuck(AgentDied):
    """The agent did not answer a call within the call's timeout and a grace."""

    kind = ErrorKind.AGENT_STUCK


class AgentError(Exception):
    """The agent answered with an error (bad path, unknown tool, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind | str = ErrorKind.read(kind)
        self.message = message


class AgentProcess:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: str, name: str) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.sinks: dict[str, OutputSink] = {}  # request id -> where its output chunks go
        self.ids = itertools.count(1)
        self.stopping = False
        self.exited = asyncio.Event()
        self.stderr_tail: list[str] = []
        self._tasks: list[asyncio.Task] = []
        # The agent's and the runtime's own processes, when a limit watchdog wants them.
        self.infra: frozenset[int] | None = None
        self.stuck: str | None = None  # why it was given up on
        # The slot's cgroup, when it has one (the agent was spawned into it): then that,
        # not the agent's tree, is what a kill of its processes empties.
        self.cgroup: SlotCgroup | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set()

    async def start(self, timeout: float) -> None:
        """Spawn the agent and wait for its ready line."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=self.cwd, env=self.env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            limit=MAX_ANSWER_LINE,
            start_new_session=True,  # a Ctrl-C at the server's terminal is the server's to handle
        )
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending["__ready__"] = ready
        self._tasks = [asyncio.create_task(self._read_answers()), asyncio.create_task(self._read_stderr())]
        try:
            answer = await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError:
            await self.stop()
            raise AgentDied(f"{self.name}: agent did not start within {timeout:.0f}s{self._stderr_hint()}") from None

    def _stderr_hint(self) -> str:
        return f" (its stderr: {' | '.join(self.stderr_tail[-3:])})" if self.stderr_tail else ""

    async def _read_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        async for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self.stderr_tail = (self.stderr_tail + [line])[-20:]
                log.info("%s: %s", self.name, line)

    async def _read_answers(self) -> None:
        assert self.proc and self.proc.stdout
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                try:
                    answer = json.loads(line)
                except ValueError:
                    log.warning("%s: unreadable answer line dropped", self.name)
                    continue
                request_id = answer.get("id")
                if "chunk" in answer:  # a streaming call's output, ahead of its answer
                    await self._chunk(answer)
                    continue
                if is_ready(answer):
                    request_id = "__ready__"
                future = self.pending.pop(request_id, None) if request_id is not None else None
                if future is not None and not future.done():
                    future.set_result(answer)
                elif request_id is None:
                    log.warning("%s: agent error without request id: %s", self.name, answer.get("error"))
        except (ValueError, asyncio.LimitOverrunError) as exc:
            log.error("%s: answer stream broken (%s); stopping the agent", self.name, exc)
        finally:
            code = await self._reap()
            self.exited.set()
            reason = f"{self.name}: agent exited (code {code}){self._stderr_hint()}"
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(AgentStuck(self.stuck) if self.stuck else AgentDied(reason))
            self.pending.clear()
            if not self.stopping:
                log.warning("%s", reason)

    async def _chunk(self, header: dict[str, Any]) -> None:
        """Read the raw bytes a chunk header announces and hand them to the call's
        sink (none once the call has ended: dropped). Raises ValueError on a header
        that cannot be followed: the channel is out of step for good."""
        assert self.proc and self.proc.stdout
        stream, size, request_id = header.get("chunk"), header.get("size"), header.get("id")
        if stream not in ("stdout", "stderr") or not isinstance(size, int) or not 0 <= size <= MAX_CHUNK_BYTES:
            raise ValueError(f"malformed output chunk header {str(header)[:200]}")
        try:
            data = await self.proc.stdout.readexactly(size)
        except asyncio.IncompleteReadError:
            raise ValueError("the agent's output ended inside a chunk") from None
        sink = self.sinks.get(request_id) if isinstance(request_id, str) else None
        if sink is None:
            return
        try:
            sink(stream, data)
        except Exception:  # a bug in a sink must not stop the agent's answers being read
            log.exception("%s: output sink failed", self.name)

    async def _reap(self) -> int | None:
        assert self.proc
        if self.proc.returncode is None:
            try:
                return await asyncio.wait_for(self.proc.wait(), STOP_GRACE_SECONDS)
            except asyncio.TimeoutError:
                self._kill()
                return await self.proc.wait()
        return self.proc.returncode

    def _kill(self) -> None:
        if self.proc and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    async def call(self, tool: str, args: dict[str, Any], timeout: float | None,
                   output: OutputSink | None = None) -> dict[str, Any]:
        """Run one tool call; return the agent's result or raise AgentError/AgentDied
        (AgentStuck when no answer came within `timeout` + STUCK_GRACE_SECONDS).
        With `output`, the agent streams the call's output to it as it comes."""
        if not self.alive or self.proc is None or self.proc.stdin is None:
            raise AgentDied(f"{self.name}: agent is not running")
        request_id = str(next(self.ids))
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        message = {"id": request_id, "tool": tool, "args": args}
        if timeout:
            message["timeout"] = timeout
        if output is not None:
            message["stream"] = True
            self.sinks[request_id] = output
        stdin = self.proc.stdin
        try:
            stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
            if timeout and stdin.transport.get_write_buffer_size():
                # The pipe is full, so the agent is not reading (or a large request is
                # on its way): wait for room no longer than an answer would be waited for.
                await asyncio.wait_for(stdin.drain(), timeout + STUCK_GRACE_SECONDS)
            else:
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.pending.pop(request_id, None)
            self.sinks.pop(request_id, None)
            raise AgentDied(f"{self.name}: agent is gone ({exc})") from None
        except asyncio.TimeoutError:
            self._give_up(request_id, timeout or 0.0)
        # One timer per call, cancelled on the answer: the backstop costs the hot path
        # nothing more.
        backstop = (asyncio.get_running_loop().call_later(timeout + STUCK_GRACE_SECONDS, self._give_up,
                                                          request_id, timeout) if timeout else None)
        try:
            answer = await future
        except asyncio.CancelledError:
            # The caller gave up (client went away, server stopping): stop the command too.
            self.pending.pop(request_id, None)
            if tool == "bash" and self.alive:
                asyncio.ensure_future(self._cancel_quietly(request_id))
            raise
        finally:
            if backstop is not None:
                backstop.cancel()
            self.sinks.pop(request_id, None)
        if answer.get("ok"):
            return answer.get("result") or {}
        error = answer.get("error") or {}
        raise AgentError(error.get("kind", ErrorKind.ERROR), error.get("message", "unknown agent error"))

    def _give_up(self, request_id: str, timeout: float) -> None:
        future = self.pending.pop(request_id, None)
        if future is None or future.done():
            return
        self.stuck = (f"{self.name}: the agent did not answer within {timeout + STUCK_GRACE_SECONDS:.0f}s "
                      f"(the call's timeout of {timeout:g}s plus {STUCK_GRACE_SECONDS:g}s)")
        log.error("%s", self.stuck)
        future.set_exception(AgentStuck(self.stuck))

    async def _cancel_quietly(self, target: str) -> None:
        try:
            await self.call("cancel", {"target": target}, None)
        except (AgentDied, AgentError):
            pass

    async def stop(self) -> None:
        """Close stdin (the agent kills its commands and exits), then make sure. An
        agent given up on as stuck is killed at once: it would not hear its stdin close."""
        self.stopping = True
        if self.proc is None:
            return
        if self.proc.stdin and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        if not self.stuck:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), STOP_GRACE_SECONDS)
        if not self.exited.is_set():
            # It did not end its commands: nobody else will. They sit in sessions of
            # their own, some perhaps (runtime none) outside its tree.
            if self.cgroup is not None:
                await asyncio.to_thread(self.cgroup.kill)
            elif self.proc.returncode is None:
                await asyncio.to_thread(kill_tree, self.proc.pid)
            self._kill()
            await self.exited.wait()
        for task in self._tasks:
            if not task.done():
                task.cancel()
