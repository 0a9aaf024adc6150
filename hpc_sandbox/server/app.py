"""The node server's HTTP API. Handlers are thin: they validate at the edge (the
typed shapes of `protocol.py`, which also lists the routes) and hand plain typed
objects to the SlotTable. Errors are answered as `{"error": {"kind", "message"}}`
with the status `protocol.ERRORS` gives; the server stays up whatever it is sent.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import protocol
from ..errors import BadRequest, ClientError, LimitExceeded
from ..protocol import DEFAULT_EXEC_TIMEOUT, AcquireRequest, Call, CallAnswer, ReleaseRequest
from .files import AtomicUpload, open_for_read
from .slots import Slot, SlotTable

log = logging.getLogger(__name__)

MAX_BATCH_CALLS = 1024
CHUNK = 256 * 1024


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 64 << 20
    max_upload_bytes: int = 16 << 30
    max_concurrent: int = 256
    max_timeout: float = 24 * 3600.0
    default_timeout: float = DEFAULT_EXEC_TIMEOUT  # for a call that names none


def error_response(kind: str, message: str, status: int) -> web.Response:
    return web.json_response(protocol.error_body(kind, message), status=status)


def make_app(table: SlotTable, token: str, limits: ServerLimits) -> web.Application:
    expected = protocol.bearer(token).encode()

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path != protocol.HEALTH:
            given = request.headers.get(protocol.AUTH_HEADER, "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response("auth", "missing or wrong bearer token", 401)
        try:
            return await handler(request)
        except ClientError as exc:
            return error_response(exc.kind, str(exc), protocol.status_for(exc))
        except web.HTTPRequestEntityTooLarge:
            return error_response(LimitExceeded.kind,
                                  f"request body over the server's limit of {limits.max_body_bytes} bytes",
                                  protocol.BODY_TOO_LARGE)
        except web.HTTPException as exc:
            return error_response("http", exc.reason or str(exc), exc.status)
        except OSError as exc:  # a full disk, a permission problem in the workspace
            return error_response("io", f"{exc.strerror or exc}", 500)

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
        return web.json_response({"slot": slot.index, "ttl": slot.ttl})

    async def reset(self, request: web.Request) -> web.Response:
        slot = self._leased(request)
        await self.table.reset(slot)
        return web.json_response({"slot": slot.index, "reset": True})

    async def exec_one(self, request: web.Request) -> web.Response:
        index = protocol.parse_slot_index(request.match_info["index"])
        call = self._call(await _json_body(request), index, request.headers.get(protocol.LEASE_HEADER))
        return web.json_response((await self.table.execute(call)).to_json())

    async def batch(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        raw_calls = body.get("calls")
        if not isinstance(raw_calls, list) or not raw_calls:
            raise BadRequest("'calls' must be a non-empty list")
        if len(raw_calls) > MAX_BATCH_CALLS:
            raise LimitExceeded(f"a batch holds at most {MAX_BATCH_CALLS} calls, got {len(raw_calls)}")
        calls = [self._call(raw) for raw in raw_calls]
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
        with self.table.running(slot):
            upload = await asyncio.to_thread(AtomicUpload, str(slot.workspace), request.match_info["path"])
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
