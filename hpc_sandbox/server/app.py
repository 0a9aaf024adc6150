"""The node server's HTTP API. Handlers are thin: they validate at the edge (the
typed shapes of `protocol.py`, which also lists the routes) and hand plain typed
objects to the SlotTable. Errors are answered as `{"error": {"kind", "message"}}`
with the status `protocol.ERRORS` gives; the server stays up whatever it is sent.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import protocol
from ..agent import MAX_TREE_BYTES, MAX_TREE_ENTRIES, ToolError
from ..errors import AuthError, BadRequest, ClientError, ErrorKind, LimitExceeded
from ..protocol import (DEFAULT_EXEC_TIMEOUT, AcquireRequest, Call, CallAnswer, ReleaseRequest, RenewRequest,
                        StreamEvent)
from .files import AtomicUpload, open_for_read, refused
from .trees import TreeProducer, open_tree
from .slots import Slot, SlotTable

log = logging.getLogger(__name__)

MAX_BATCH_CALLS = 1024
CHUNK = 256 * 1024
# A streamed call's events go to its reader in writes of at most about this much.
STREAM_WRITE = 256 * 1024


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 64 << 20
    max_upload_bytes: int = 16 << 30
    max_concurrent: int = 256
    max_timeout: float = 24 * 3600.0
    default_timeout: float = DEFAULT_EXEC_TIMEOUT  # for a call that names none


def error_response(kind: ErrorKind, message: str, status: int) -> web.Response:
    return web.json_response(protocol.error_body(kind, message), status=status)


def make_app(table: SlotTable, token: str, limits: ServerLimits) -> web.Application:
    expected = protocol.bearer(token).encode()

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path != protocol.HEALTH:
            given = request.headers.get(protocol.AUTH_HEADER, "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(AuthError.kind, "missing or wrong bearer token",
                                      protocol.status_of(AuthError.kind))
        try:
            return await handler(request)
        except ClientError as exc:
            return error_response(exc.kind, str(exc), protocol.status_for(exc))
        except web.HTTPRequestEntityTooLarge:
            return error_response(LimitExceeded.kind,
                                  f"request body over the server's limit of {limits.max_body_bytes} bytes",
                                  protocol.BODY_TOO_LARGE)
        except web.HTTPException as exc:
            return error_response(ErrorKind.HTTP, exc.reason or str(exc), exc.status)
        except OSError as exc:  # a full disk, a permission problem in the workspace
            return error_response(ErrorKind.IO, f"{exc.strerror or exc}", protocol.status_of(ErrorKind.IO))

    api = Api(table, limits)
    app = web.Application(middlewares=[guard], client_max_size=limits.max_body_bytes)
    slot = f"{protocol.SLOTS}/{{index}}"
    app.add_routes([
        web.get(protocol.HEALTH, api.health),
        web.get(protocol.SLOTS, api.list_slots),
        web.post(protocol.ACQUIRE, api.acquire),
        web.post(f"{slot}/release", api.release),
        web.post(f"{slot}/renew", api.renew),
        web.post(f"{slot}/reset", api.reset),
        web.post(f"{slot}/exec", api.exec_one),
        web.post(protocol.BATCH, api.batch),
        web.get(f"{slot}/files/{{path:.+}}", api.download),
        web.put(f"{slot}/files/{{path:.+}}", api.upload),
        web.get(f"{slot}/{protocol.TREE}", api.download_tree),
    ])
    return app


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json(loads=json.loads)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise BadRequest("malformed JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


class Api:
    def __init__(self, table: SlotTable, limits: ServerLimits) -> None:
        self.table = table
        self.limits = limits

    def _leased(self, request: web.Request) -> Slot:
        return self.table.leased(protocol.parse_slot_index(request.match_info["index"]),
                                 request.headers.get(protocol.LEASE_HEADER))

    def _call(self, body: object, slot: int | None = None, lease: str | None = None) -> Call:
        return Call.from_json(body, max_timeout=self.limits.max_timeout, default_timeout=self.limits.default_timeout,
                              slot=slot, lease=lease)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(protocol.Health(self.table.accepting, len(self.table.slots)).to_json())

    async def list_slots(self, request: web.Request) -> web.Response:
        answer = protocol.SlotsAnswer(self.table.describe(), self.table.counts(), self.table.in_flight)
        return web.json_response(answer.to_json())

    async def acquire(self, request: web.Request) -> web.Response:
        asked = AcquireRequest.from_json(await _json_body(request))

        def still_there() -> bool:  # a client that hung up while waiting gets nothing
            transport = request.transport
            return transport is not None and not transport.is_closing()

        grant = await self.table.acquire(asked, still_there)
        log.info("slot %d leased to %s", grant.slot, asked.trajectory_id or "(no trajectory)")
        return web.json_response(grant.to_json())

    async def release(self, request: web.Request) -> web.Response:
        slot = self._leased(request)
        asked = ReleaseRequest.from_json(await _json_body(request))
        await self.table.release(slot, reset=asked.reset_workspace)
        return web.json_response({"slot": slot.index, "released": True})

    async def renew(self, request: web.Request) -> web.Response:
        slot = self._leased(request)
        asked = RenewRequest.from_json(await _json_body(request))
        if asked.rename:
            self.table.rename(slot, asked.trajectory_id)
        return web.json_response({"slot": slot.index, "ttl": slot.ttl})

    async def reset(self, request: web.Request) -> web.Response:
        slot = self._leased(request)
        await self.table.reset(slot)
        return web.json_response({"slot": slot.index, "reset": True})

    async def exec_one(self, request: web.Request) -> web.StreamResponse:
        index = protocol.parse_slot_index(request.match_info["index"])
        call = self._call(await _json_body(request), index, request.headers.get(protocol.LEASE_HEADER))
        if call.stream:
            return await self._exec_streamed(request, call)
        return web.json_response((await self.table.execute(call)).to_json())

    async def _exec_streamed(self, request: web.Request, call: Call) -> web.StreamResponse:
        """A call whose output goes to its reader as it comes (see protocol: StreamEvent).

        The call runs in a task of its own that never waits for the reader: its chunks
        go into a bounded buffer that this handler drains into the response at the
        reader's pace; what does not fit is dropped and counted. So a slow reader costs
        the server at most STREAM_BUFFER_BYTES, and never holds up the agent's channel
        (which every call of the slot shares) nor the command."""
        buffer = _EventBuffer(protocol.STREAM_BUFFER_BYTES)
        admitted: asyncio.Future = asyncio.get_running_loop().create_future()

        def admit() -> None:
            if not admitted.done():
                admitted.set_result(None)

        run = asyncio.ensure_future(self.table.execute(call, buffer.offer, admit))
        run.add_done_callback(lambda _: buffer.finish())
        try:
            await asyncio.wait({run, admitted}, return_when=asyncio.FIRST_COMPLETED)
            if not admitted.done():
                # Refused before it ran (lease, tool, limits): the usual JSON error.
                return web.json_response(run.result().to_json())
            response = web.StreamResponse(headers={"Content-Type": protocol.STREAM_CONTENT_TYPE})
            try:
                await response.prepare(request)
                while (data := await buffer.take(STREAM_WRITE)) is not None:
                    await response.write(data)
                await response.write(StreamEvent.result(_answer_of(run, call), buffer.dropped).to_line())
                await response.write_eof()
            except ConnectionError as exc:
                # The reader went away. As with a plain exec whose client hung up, the call
                # runs to its end and its answer stays under its exec id for a retry.
                log.info("slot %d: reader of streamed call %s went away (%s)", call.slot, call.exec_id, exc)
                buffer.close()
                await asyncio.wait({run})
            return response
        finally:
            if not run.done():  # the handler itself was cancelled (the server is stopping)
                run.cancel()

    async def batch(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        raw_calls = body.get("calls")
        if not isinstance(raw_calls, list) or not raw_calls:
            raise BadRequest("'calls' must be a non-empty list")
        if len(raw_calls) > MAX_BATCH_CALLS:
            raise LimitExceeded(f"a batch holds at most {MAX_BATCH_CALLS} calls, got {len(raw_calls)}")
        calls = [self._call(raw) for raw in raw_calls]
        if any(call.stream for call in calls):
            raise BadRequest("a call of a batch cannot stream its output: stream it as a single exec")
        answers = await asyncio.gather(*(self._batch_one(call) for call in calls))
        return web.json_response({"results": [answer.to_json() for answer in answers]})

    async def _batch_one(self, call: Call) -> CallAnswer:
        # One bad call (stale lease, unknown slot) is that call's error, not the batch's.
        try:
            return await self.table.execute(call)
        except ClientError as exc:
            return CallAnswer.failure(call, exc.kind, str(exc))

    async def download(self, request: web.Request) -> web.StreamResponse:
        slot = self._leased(request)
        with self.table.running(slot):  # counts against max_concurrent; keeps the lease alive
            fd, size = await asyncio.to_thread(open_for_read, str(slot.workspace), request.match_info["path"])
            try:
                response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
                response.content_length = size
                await response.prepare(request)
                while True:
                    chunk = await asyncio.to_thread(os.read, fd, CHUNK)
                    if not chunk:
                        break
                    await response.write(chunk)
                await response.write_eof()
                return response
            finally:
                os.close(fd)

    async def upload(self, request: web.Request) -> web.Response:
        slot = self._leased(request)
        if request.content_length is not None and request.content_length > self.limits.max_upload_bytes:
            raise LimitExceeded(f"upload of {request.content_length} bytes is over the limit of {self.limits.max_upload_bytes}")
        mode = protocol.parse_mode_header(request.headers.get(protocol.MODE_HEADER))
        with self.table.running(slot):
            upload = await asyncio.to_thread(AtomicUpload, str(slot.workspace), request.match_info["path"], mode)
            try:
                async for chunk in request.content.iter_chunked(CHUNK):
                    if upload.size + len(chunk) > self.limits.max_upload_bytes:
                        raise LimitExceeded(f"upload is over the limit of {self.limits.max_upload_bytes} bytes")
                    await asyncio.to_thread(upload.write, chunk)
                await asyncio.to_thread(upload.commit)
            except BaseException:
                await asyncio.to_thread(upload.abort)
                raise
            return web.json_response({"path": request.match_info["path"], "size": upload.size})

    async def download_tree(self, request: web.Request) -> web.StreamResponse:
        """A workspace folder as one tar.gz made here as the folder is walked, in tree
        frames (protocol.py); its end says what went in or why it stopped (server/trees.py)."""
        slot = self._leased(request)
        asked = protocol.TreeRequest.from_query(request.query, MAX_TREE_BYTES, MAX_TREE_ENTRIES)
        with self.table.running(slot):
            try:
                top_fd, parts = await asyncio.to_thread(open_tree, str(slot.workspace), asked.path)
            except ToolError as exc:
                if ErrorKind.read(exc.kind) in protocol.ERRORS:  # not_found, path: the usual refusals
                    raise refused(exc) from None
                # A kind the protocol has no status for (not_a_directory): said in the end
                # frame of an empty answer, so that the caller gets the kind itself.
                return await _tree_answer(request, protocol.TreeEnd(error_kind=ErrorKind.read(exc.kind),
                                                                    error=exc.message))
            try:
                producer = TreeProducer(top_fd, parts, asked)
            except ToolError as exc:  # a bad `exclude`
                os.close(top_fd)
                raise BadRequest(exc.message) from None
            producer.start()  # from here the producer owns top_fd, and closes it when it ends
            try:
                response = web.StreamResponse(headers={"Content-Type": protocol.TREE_CONTENT_TYPE})
                await response.prepare(request)
                while isinstance(block := await producer.next_block(), bytes):
                    await response.write(protocol.tree_frame(block))
                await _tree_end(response, block)
            finally:
                producer.stop()  # the client hung up, or the server stops: the walk ends too
            return response


async def _tree_answer(request: web.Request, end: protocol.TreeEnd) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": protocol.TREE_CONTENT_TYPE})
    await response.prepare(request)
    await _tree_end(response, end)
    return response


async def _tree_end(response: web.StreamResponse, end: protocol.TreeEnd) -> None:
    """The end frame, then the TreeEnd: the only sign that the archive is whole."""
    await response.write(protocol.tree_frame(b"") + json.dumps(end.to_json()).encode())
    await response.write_eof()


def _answer_of(run: asyncio.Future, call: Call) -> CallAnswer:
    """The answer of a streamed call's finished task; an error once the stream started
    is the answer's, as a plain call's would be in its JSON error."""
    if run.cancelled():
        return CallAnswer.failure(call, ErrorKind.SERVER_STOPPING,
                                  "the node server is stopping; the call was cancelled")
    exc = run.exception()
    if exc is None:
        return run.result()
    if isinstance(exc, ClientError):
        return CallAnswer.failure(call, exc.kind, str(exc))
    if isinstance(exc, OSError):
        return CallAnswer.failure(call, ErrorKind.IO, f"{exc.strerror or exc}")
    log.error("slot %d: streamed call %s failed: %s: %s", call.slot, call.exec_id, type(exc).__name__, exc)
    return CallAnswer.failure(call, ErrorKind.ERROR, f"{type(exc).__name__}: {exc}")


class _EventBuffer:
    """The output events of one streamed call on their way to its HTTP reader.

    Holds at most about `limit` bytes of encoded events (one event past it at most).
    When full, chunks are dropped, not waited for: the agent's channel must keep
    flowing. A dropped chunk's raw bytes are counted (in all, for the result event,
    and since the last chunk kept, for that chunk's `skipped`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.dropped = 0
        self.skipped = 0
        self.finished = False  # no more chunks will come
        self.closed = False  # nobody reads any more
        self._wakeup: asyncio.Future | None = None

    def offer(self, stream: str, data: bytes) -> None:
        """An OutputSink: keep the chunk if there is room, else count it (never decoded:
        dropping costs next to nothing, however fast the command writes)."""
        if self.closed or self.finished:
            return
        if self.size >= self.limit:
            self.dropped += len(data)
            self.skipped += len(data)
            return
        # Each chunk holds whole characters (the agent cuts them so): decoded on its own.
        line = StreamEvent.output(stream, data.decode("utf-8", "replace"), self.skipped).to_line()
        self.skipped = 0
        self.lines.append(line)
        self.size += len(line)
        self._wake()

    def finish(self) -> None:
        self.finished = True
        self._wake()

    def close(self) -> None:
        self.closed = True
        self.lines.clear()
        self.size = 0

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def take(self, most: int) -> bytes | None:
        """The next events, about `most` bytes of them at most (at least one); None
        when the call has finished and every event kept has been taken."""
        while not self.lines:
            if self.finished:
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        taken = [self.lines.popleft()]
        size = len(taken[0])
        while self.lines and size + len(self.lines[0]) <= most:
            line = self.lines.popleft()
            taken.append(line)
            size += len(line)
        self.size -= size
        return b"".join(taken)
