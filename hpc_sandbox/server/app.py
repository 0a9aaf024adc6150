"""The node server's HTTP API (/v1). Handlers are thin: they validate at the edge
and hand plain typed objects to the SlotTable.

    GET  /v1/health                      no auth; {"ready", "slots"}
    GET  /v1/slots                       slot list and state
    POST /v1/slots/acquire               {"trajectory_id"?, "ttl"?} -> {"slot", "lease", "ttl"}
    POST /v1/slots/{i}/release           {"reset_workspace"?}          (X-Lease header)
    POST /v1/slots/{i}/renew                                            (X-Lease header)
    POST /v1/slots/{i}/reset                                            (X-Lease header)
    POST /v1/slots/{i}/exec              {"exec_id", "tool", "args", "timeout"?}
    POST /v1/batch                       {"calls": [{"slot", "lease", "exec_id", "tool", "args", "timeout"?}]}
    GET  /v1/slots/{i}/files/{path}      stream a file out of the workspace
    PUT  /v1/slots/{i}/files/{path}      stream a file into the workspace (atomic replace)

Errors are {"error": {"kind", "message"}} with a 4xx/5xx status; the server stays up.
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

from ..errors import (AuthError, BadRequest, ClientError, LeaseLost, LimitExceeded, NoFreeSlot,
                      NotFound)
from ..models import DEFAULT_EXEC_TIMEOUT
from .files import AtomicUpload, open_for_read
from .slots import ExecCall, SlotTable

log = logging.getLogger(__name__)

STATUS = {
    AuthError: 401,
    NotFound: 404,
    LeaseLost: 409,
    BadRequest: 400,
    NoFreeSlot: 503,
    LimitExceeded: 429,
}
LEASE_HEADER = "X-Lease"
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
    return web.json_response({"error": {"kind": kind, "message": message}}, status=status)


def _status_for(exc: ClientError) -> int:
    for cls, status in STATUS.items():
        if isinstance(exc, cls):
            return status
    return 400


def make_app(table: SlotTable, token: str, limits: ServerLimits) -> web.Application:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.path != "/v1/health":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response("auth", "missing or wrong bearer token", 401)
        try:
            return await handler(request)
        except ClientError as exc:
            return error_response(exc.kind, str(exc), _status_for(exc))
        except web.HTTPRequestEntityTooLarge:
            return error_response("limit", f"request body over the server's limit of {limits.max_body_bytes} bytes", 413)
        except web.HTTPException as exc:
            return error_response("http", exc.reason or str(exc), exc.status)
        except OSError as exc:  # a full disk, a permission problem in the workspace
            return error_response("io", f"{exc.strerror or exc}", 500)

    api = Api(table, limits)
    app = web.Application(middlewares=[guard], client_max_size=limits.max_body_bytes)
    app.add_routes([
        web.get("/v1/health", api.health),
        web.get("/v1/slots", api.list_slots),
        web.post("/v1/slots/acquire", api.acquire),
        web.post("/v1/slots/{index}/release", api.release),
        web.post("/v1/slots/{index}/renew", api.renew),
        web.post("/v1/slots/{index}/reset", api.reset),
        web.post("/v1/slots/{index}/exec", api.exec_one),
        web.post("/v1/batch", api.batch),
        web.get("/v1/slots/{index}/files/{path:.+}", api.download),
        web.put("/v1/slots/{index}/files/{path:.+}", api.upload),
    ])
    return app


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json(loads=json.loads)
    except ValueError as exc:
        raise BadRequest(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


def _slot_index(request: web.Request) -> int:
    raw = request.match_info["index"]
    if not raw.isdigit():
        raise NotFound(f"no slot {raw!r}")
    return int(raw)


class Api:
    def __init__(self, table: SlotTable, limits: ServerLimits) -> None:
        self.table = table
        self.limits = limits

    def parse_call(self, body: dict[str, Any], slot: int | None, lease: str | None) -> ExecCall:
        exec_id = body.get("exec_id")
        tool = body.get("tool")
        args = body.get("args", {})
        timeout = body.get("timeout")
        if slot is None:
            slot = body.get("slot")
            lease = body.get("lease")
            if not isinstance(slot, int) or isinstance(slot, bool):
                raise BadRequest("each call needs an integer 'slot'")
        if not isinstance(exec_id, str) or not 1 <= len(exec_id) <= 128:
            raise BadRequest("'exec_id' must be a string of 1-128 characters")
        if not isinstance(tool, str):
            raise BadRequest("'tool' must be a string")
        if not isinstance(args, dict):
            raise BadRequest("'args' must be an object")
        if timeout is not None:
            if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= self.limits.max_timeout:
                raise BadRequest(f"'timeout' must be a number of seconds in (0, {self.limits.max_timeout:.0f}]")
        return ExecCall(slot=slot, lease=lease or "", exec_id=exec_id, tool=tool, args=args,
                        timeout=float(timeout) if timeout is not None else self.limits.default_timeout)

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.table.accepting, "slots": len(self.table.slots)})

    async def list_slots(self, request: web.Request) -> web.Response:
        return web.json_response({"slots": self.table.describe(), "counts": self.table.counts(),
                                  "running": self.table.in_flight})

    async def acquire(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        trajectory_id = body.get("trajectory_id")
        if trajectory_id is not None and not isinstance(trajectory_id, str):
            raise BadRequest("'trajectory_id' must be a string")
        ttl = body.get("ttl")
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool)):
            raise BadRequest("'ttl' must be a number of seconds")
        slot = self.table.acquire(trajectory_id, ttl)
        log.info("slot %d leased to %s", slot.index, trajectory_id or "(no trajectory)")
        return web.json_response({"slot": slot.index, "lease": slot.lease, "ttl": slot.ttl})

    async def release(self, request: web.Request) -> web.Response:
        slot = self.table.leased(_slot_index(request), request.headers.get(LEASE_HEADER))
        body = await _json_body(request)
        await self.table.release(slot, reset=bool(body.get("reset_workspace", True)))
        return web.json_response({"slot": slot.index, "released": True})

    async def renew(self, request: web.Request) -> web.Response:
        slot = self.table.leased(_slot_index(request), request.headers.get(LEASE_HEADER))
        return web.json_response({"slot": slot.index, "ttl": slot.ttl})

    async def reset(self, request: web.Request) -> web.Response:
        slot = self.table.leased(_slot_index(request), request.headers.get(LEASE_HEADER))
        await self.table.reset(slot)
        return web.json_response({"slot": slot.index, "reset": True})

    async def exec_one(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        call = self.parse_call(body, _slot_index(request), request.headers.get(LEASE_HEADER))
        return web.json_response(await self.table.execute(call))

    async def batch(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        raw_calls = body.get("calls")
        if not isinstance(raw_calls, list) or not raw_calls:
            raise BadRequest("'calls' must be a non-empty list")
        if len(raw_calls) > MAX_BATCH_CALLS:
            raise LimitExceeded(f"a batch holds at most {MAX_BATCH_CALLS} calls, got {len(raw_calls)}")
        calls = [self.parse_call(c if isinstance(c, dict) else {}, None, None) for c in raw_calls]
        results = await asyncio.gather(*(self._batch_one(call) for call in calls))
        return web.json_response({"results": results})

    async def _batch_one(self, call: ExecCall) -> dict[str, Any]:
        # One bad call (stale lease, unknown slot) is that call's error, not the batch's.
        try:
            return await self.table.execute(call)
        except ClientError as exc:
            return {"slot": call.slot, "exec_id": call.exec_id, "tool": call.tool, "ok": False,
                    "error": {"kind": exc.kind, "message": str(exc)}}

    async def download(self, request: web.Request) -> web.StreamResponse:
        slot = self.table.leased(_slot_index(request), request.headers.get(LEASE_HEADER))
        slot.in_flight += 1  # a long transfer keeps the lease alive
        try:
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
        finally:
            slot.in_flight -= 1

    async def upload(self, request: web.Request) -> web.Response:
        slot = self.table.leased(_slot_index(request), request.headers.get(LEASE_HEADER))
        if request.content_length is not None and request.content_length > self.limits.max_upload_bytes:
            raise LimitExceeded(f"upload of {request.content_length} bytes is over the limit of {self.limits.max_upload_bytes}")
        slot.in_flight += 1
        try:
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
        finally:
            slot.in_flight -= 1
