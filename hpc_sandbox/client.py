"""Async HTTP client for one node server.

Keep-alive connections, typed errors, an HTTP timeout of the command's own timeout
plus a margin, and retries only where they are safe: on a broken connection, with
the same execution id (the server answers a repeated id with the first result).
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from . import protocol
from .errors import CallTimeout, ClientError, ErrorKind, ServerGone
from .jobfolder import Credentials, ServerRecord
from .models import Endpoint
from .paths import workspace_relative
from .tls import pinned_context, system_context
from .protocol import (AcquireRequest, BadAnswer, Call, CallAnswer, Grant, Health, ReleaseRequest, RenewRequest,
                       SlotsAnswer, StreamEvent, TreeEnd, TreeRequest, exec_timeout)

log = logging.getLogger(__name__)

TIMEOUT_MARGIN = 15.0  # seconds on top of a command's timeout: kill grace + transfer
CONTROL_TIMEOUT = 30.0  # acquire, release, health...
# A node that died without a word (power, network) leaves a record that looks alive:
# connecting to it must fail fast, whatever the call's own timeout.
CONNECT_TIMEOUT = 5.0
RETRY_DELAYS = (0.1, 0.5, 1.5)
# What a request can fail with below HTTP: every one of them is read by _transport_error.
TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
# No connection at all within CONNECT_TIMEOUT (aiohttp >= 3.10 tells it from a read
# timeout; before, every ServerTimeoutError was taken for it).
_NO_CONNECTION = getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError)


def endpoint_of(record: ServerRecord, credentials: Credentials, location: str = "cluster") -> Endpoint:
    """How a client reaches a job's node server: its ready record and the job's credentials
    (here, not in models.py: the plain types do not know the job folder's records)."""
    return Endpoint(url=record.url, token=credentials.token, job_id=record.job_id, name=record.name,
                    location=location, slots=record.slots, cert=credentials.cert)


def _timeout(total: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, sock_connect=CONNECT_TIMEOUT)


def new_exec_id() -> str:
    return uuid.uuid4().hex


def _ssl_for(endpoint: Endpoint) -> ssl.SSLContext | bool:
    """How to reach `endpoint`: pinned to its job's certificate, with the system's CAs
    (https without a pin: a cloud tunnel), or plain HTTP (the documented opt-out)."""
    if endpoint.url.startswith("https://"):
        return pinned_context(endpoint.cert) if endpoint.cert else system_context()
    if endpoint.cert:
        raise ServerGone(f"node server {endpoint.name} is recorded as plain HTTP ({endpoint.url}) but its job has "
                          "a certificate: refusing to send the job's token unencrypted")
    return False


class NodeClient:
    def __init__(self, endpoint: Endpoint, session: aiohttp.ClientSession | None = None) -> None:
        self.endpoint = endpoint
        self._session = session
        self._own_session = session is None
        self._auth = {protocol.AUTH_HEADER: protocol.bearer(endpoint.token)}
        self._ssl = _ssl_for(endpoint)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=60))
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> "NodeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- transport ---------------------------------------------------------------

    async def _request(self, method: str, path: str, *, json: Any = None, lease: str | None = None,
                       timeout: float = CONTROL_TIMEOUT, retry: bool = True) -> Any:
        headers = dict(self._auth)
        if lease:
            headers[protocol.LEASE_HEADER] = lease
        url = self.endpoint.url + path
        attempts = len(RETRY_DELAYS) + 1 if retry else 1
        for attempt in range(attempts):
            try:
                async with self.session.request(method, url, json=json, headers=headers, ssl=self._ssl,
                                                timeout=_timeout(timeout)) as response:
                    return await self._decode(response)
            except TRANSPORT_ERRORS as exc:
                # Safe to repeat where the mapping allows: exec ids make a call idempotent.
                error, repeatable = self._transport_error(
                    exc, broke=f"node server {self.endpoint.name} ({self.endpoint.url}) is unreachable",
                    late=f"node server {self.endpoint.name} did not answer {method} {path} within {timeout:.0f}s")
                if not repeatable or attempt + 1 >= attempts:
                    raise error from None
                await asyncio.sleep(RETRY_DELAYS[attempt])
        raise AssertionError("unreachable")

    def _transport_error(self, exc: BaseException, *, broke: str, late: str) -> tuple[ClientError, bool]:
        """What a failure below HTTP (one of TRANSPORT_ERRORS) is, the one reading of it
        for every request: the error to raise, and whether repeating the request may
        help. `broke` begins the message of a broken connection, `late` is that of a
        request that ran out of time, each in the request's own words."""
        if isinstance(exc, aiohttp.ClientSSLError):  # before the connection errors: it is one too
            return self._impostor(exc), False
        if isinstance(exc, _NO_CONNECTION):  # before TimeoutError: it is one too
            # The host does not answer at all (a dead node, a firewall). Not repeated: it
            # would only wait CONNECT_TIMEOUT again.
            return ServerGone(f"node server {self.endpoint.name} ({self.endpoint.url}) is unreachable: "
                              f"no connection within {CONNECT_TIMEOUT:.0f}s ({exc})"), False
        if isinstance(exc, asyncio.TimeoutError):  # the request's own time, or a read that waited too long
            return CallTimeout(late), False
        # A broken or refused connection: the request may not have arrived (or its answer
        # was lost), so repeating it may help.
        return ServerGone(f"{broke}: {exc.__class__.__name__}: {exc}"), True

    async def _decode(self, response: aiohttp.ClientResponse) -> Any:
        if response.status < 400:
            try:
                return await response.json()
            except (aiohttp.ContentTypeError, ValueError):
                raise self._nonsense(f"HTTP {response.status} without JSON") from None
        try:
            error = (await response.json()).get("error") or {}
        except (aiohttp.ContentTypeError, ValueError, AttributeError):
            error = {}
        if not isinstance(error, dict):
            error = {}
        kind = str(error.get("kind") or ErrorKind.HTTP)
        message = str(error.get("message") or f"HTTP {response.status}")
        raise protocol.error_for(kind, response.status, f"{self.endpoint.name}: {message}")

    def _impostor(self, exc: Exception) -> ServerGone:
        """The TLS handshake failed: whatever answers there cannot prove it is the job's
        own node server (the token was not sent). Not retried: it will not become so."""
        return ServerGone(f"node server {self.endpoint.name} ({self.endpoint.url}) is gone: what answers on its "
                          f"port does not hold the job's certificate, so the token was not sent "
                          f"(a stale record of a dead server?): {exc}")

    def _nonsense(self, detail: str) -> ServerGone:
        """Whatever answers on the node server's port, it does not speak our protocol:
        as good as gone (a stale record, a port taken over), and said plainly."""
        return ServerGone(f"{self.endpoint.url} ({self.endpoint.name}) is not answering as a node server "
                          f"would: {detail}")

    def _parse(self, parse: Any, data: Any, *args: Any) -> Any:
        try:
            return parse(data, *args)
        except BadAnswer as exc:
            raise self._nonsense(str(exc)) from None

    # --- API ---------------------------------------------------------------------

    async def health(self, timeout: float = 5.0) -> Health:
        answer = await self._request("GET", protocol.HEALTH, timeout=timeout, retry=False)
        return self._parse(Health.from_json, answer)

    async def slots(self) -> SlotsAnswer:
        return self._parse(SlotsAnswer.from_json, await self._request("GET", protocol.SLOTS))

    async def acquire(self, trajectory_id: str | None = None, ttl: float | None = None, wait: float = 0.0,
                      confirm_within: float = protocol.DEFAULT_CONFIRM_WITHIN) -> Grant:
        """A slot of this server; with `wait`, the server holds the request (first come,
        first served) until one is free or `wait` seconds pass (then NoFreeSlot)."""
        asked = AcquireRequest(trajectory_id, ttl, min(wait, protocol.MAX_ACQUIRE_WAIT), confirm_within)
        # Not retried: a lost answer's grant returns to the server unconfirmed (confirm_within).
        answer = await self._request("POST", protocol.ACQUIRE, json=asked.to_json(), retry=False,
                                     timeout=CONTROL_TIMEOUT + asked.wait)
        return self._parse(Grant.from_json, answer)

    async def release(self, slot: int, lease: str, reset_workspace: bool = True) -> None:
        await self._request("POST", protocol.slot_route(slot, "release"),
                            json=ReleaseRequest(reset_workspace).to_json(), lease=lease,
                            timeout=CONTROL_TIMEOUT + 30)

    async def renew(self, slot: int, lease: str) -> None:
        await self._request("POST", protocol.slot_route(slot, "renew"), lease=lease)

    async def name_holder(self, slot: int, lease: str, trajectory_id: str | None) -> None:
        """Renew the lease and say which trajectory holds it now (see protocol.RenewRequest)."""
        await self._request("POST", protocol.slot_route(slot, "renew"), lease=lease,
                            json=RenewRequest(trajectory_id, rename=True).to_json())

    async def reset(self, slot: int, lease: str) -> None:
        await self._request("POST", protocol.slot_route(slot, "reset"), lease=lease, timeout=CONTROL_TIMEOUT + 30)

    async def execute(self, slot: int, lease: str, tool: str, args: dict[str, Any],
                      timeout: float | None = None, exec_id: str | None = None) -> CallAnswer:
        """One tool call; a repeated exec id gets the first run's answer."""
        call = Call(slot, lease, exec_id or new_exec_id(), tool, args, exec_timeout(timeout))
        answer = await self._request("POST", protocol.slot_route(slot, "exec"), json=call.to_json(with_slot=False),
                                     lease=lease, timeout=call.timeout + TIMEOUT_MARGIN)
        return self._parse(CallAnswer.from_json, answer)

    async def stream(self, slot: int, lease: str, tool: str, args: dict[str, Any], timeout: float | None = None,
                     exec_id: str | None = None) -> AsyncGenerator[StreamEvent, None]:
        """One tool call, its output as it comes: stdout/stderr events, then one result
        event holding the same answer `execute` returns (the last item; the iterator
        ends after it). Refusals (lease, limits, auth) raise as for `execute`; a stream
        that breaks off raises ServerGone, one that goes silent past the call's timeout
        plus a margin CallTimeout. Closing the iterator early hangs up: the call still
        runs to its end on the server, its answer kept under its exec id."""
        call = Call(slot, lease, exec_id or new_exec_id(), tool, args, exec_timeout(timeout), stream=True)
        headers = {**self._auth, protocol.LEASE_HEADER: lease, "Accept": protocol.STREAM_CONTENT_TYPE}
        # How long the stream lasts is the reader's pace as much as the command's: no
        # total timeout, but none of its reads may wait longer than the call could.
        http_timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                             sock_read=call.timeout + TIMEOUT_MARGIN)
        url = self.endpoint.url + protocol.slot_route(slot, "exec")
        started = False  # once an event is out, nothing is retried (its output would repeat)
        for attempt in range(len(RETRY_DELAYS) + 1):
            try:
                async with self.session.post(url, json=call.to_json(with_slot=False), headers=headers, ssl=self._ssl,
                                             timeout=http_timeout) as response:
                    if response.status >= 400:
                        await self._decode(response)  # raises the refusal's own error
                    if response.content_type != protocol.STREAM_CONTENT_TYPE:
                        # A node server that does not stream answers as to a plain exec.
                        answer = self._parse(CallAnswer.from_json, await self._decode(response))
                        started = True
                        yield StreamEvent.result(answer)
                        return
                    async for event in self._events(response):
                        started = True
                        yield event
                        if event.answer is not None:
                            return
                    raise ServerGone(f"node server {self.endpoint.name}: the stream of call {call.exec_id} ended "
                                     "without its result")
            except TRANSPORT_ERRORS as exc:
                error, repeatable = self._transport_error(
                    exc, broke=(f"node server {self.endpoint.name} ({self.endpoint.url}): stream "
                                f"{'broke off' if started else 'could not start'}"),
                    late=(f"node server {self.endpoint.name}: stream of call {call.exec_id} was silent "
                          f"for {call.timeout + TIMEOUT_MARGIN:.0f}s"))
                # Repeated before any event, as `_request` does (the exec id makes it safe);
                # after one, a repeat would show output twice: the stream is over.
                if not repeatable or started or attempt >= len(RETRY_DELAYS):
                    raise error from None
                await asyncio.sleep(RETRY_DELAYS[attempt])

    async def _events(self, response: aiohttp.ClientResponse) -> AsyncGenerator[StreamEvent, None]:
        """The events of a streamed answer, one per line, as they arrive."""
        pending = bytearray()
        scanned = 0  # pending holds no newline before this (a long result line comes in many pieces)
        async for piece in response.content.iter_any():
            pending += piece
            while True:
                end = pending.find(b"\n", scanned)
                if end < 0:
                    scanned = len(pending)
                    break
                line = bytes(pending[:end])
                del pending[:end + 1]
                scanned = 0
                if line.strip():
                    try:
                        data = json.loads(line)
                    except ValueError:
                        raise self._nonsense("a stream line that is not JSON") from None
                    event = self._parse(StreamEvent.from_json, data)
                    if event.answer is not None:
                        # The last line: read the body's end (the server ends it right after)
                        # so that the connection is reused, whether or not the caller asks
                        # for more after the result.
                        await response.content.read()
                    yield event
            if len(pending) > protocol.MAX_STREAM_LINE:
                raise self._nonsense(f"a stream line over {protocol.MAX_STREAM_LINE} bytes")

    async def batch(self, calls: list[Call]) -> list[CallAnswer]:
        """Several calls in one request; one answer per call, in call order."""
        longest = max(c.timeout for c in calls)
        answer = await self._request("POST", protocol.BATCH, json={"calls": [c.to_json() for c in calls]},
                                     timeout=longest + TIMEOUT_MARGIN)
        return self._parse(protocol.batch_answers, answer, calls)

    async def download(self, slot: int, lease: str, path: str, dest: Path, timeout: float = 3600.0) -> int:
        """Stream a workspace file to `dest` (written atomically); returns its size."""
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".part")
        headers = {**self._auth, protocol.LEASE_HEADER: lease}
        try:
            async with self.session.get(self.endpoint.url + protocol.file_route(slot, workspace_relative(path)),
                                        headers=headers, ssl=self._ssl, timeout=_timeout(timeout)) as response:
                if response.status >= 400:
                    await self._decode(response)
                size = 0
                with open(partial, "wb") as handle:
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        handle.write(chunk)
                        size += len(chunk)
            partial.replace(dest)
            return size
        except TRANSPORT_ERRORS as exc:  # never repeated: the file may be half written
            raise self._transport_error(
                exc, broke=f"node server {self.endpoint.name}: download broke off",
                late=f"node server {self.endpoint.name}: download of {path} took over {timeout:.0f}s")[0] from None
        finally:
            partial.unlink(missing_ok=True)

    async def download_tree(self, slot: int, lease: str, asked: TreeRequest, sink: BinaryIO,
                            timeout: float = 3600.0) -> TreeEnd:
        """Stream the tar.gz of a workspace folder into `sink` (a file: the archive is
        never held here whole), and return the server's last word on it: counts, or
        the error that stopped it (a cap: too_large) in `error_kind`. Only an end
        without an error vouches for what `sink` holds; a body cut short raises
        ServerGone (broke off), as any broken download does."""
        headers = {**self._auth, protocol.LEASE_HEADER: lease}
        url = self.endpoint.url + protocol.slot_route(slot, protocol.TREE)
        try:
            async with self.session.get(url, params=asked.to_query(), headers=headers, ssl=self._ssl,
                                        timeout=_timeout(timeout)) as response:
                if response.status >= 400:
                    await self._decode(response)
                if response.content_type != protocol.TREE_CONTENT_TYPE:
                    raise self._nonsense(f"a tree answered as {response.content_type}")
                while True:
                    size = int.from_bytes(await response.content.readexactly(protocol.TREE_FRAME_HEADER), "big")
                    if size > protocol.TREE_FRAME_BYTES:
                        raise self._nonsense(f"a tree frame of {size} bytes")
                    if not size:
                        break
                    sink.write(await response.content.readexactly(size))
                last = b""
                while chunk := await response.content.read(1 << 20):
                    last += chunk
                    if len(last) > protocol.MAX_TREE_END_BYTES:
                        raise self._nonsense("a tree's end over its size limit")
            try:
                return TreeEnd.from_json(json.loads(last))
            except (ValueError, BadAnswer) as exc:
                raise self._nonsense(f"a tree's end: {exc}"[:200]) from None
        except asyncio.IncompleteReadError:  # the body ended before the end frame
            raise ServerGone(f"node server {self.endpoint.name}: download of the tree {asked.path} broke off") from None
        except TRANSPORT_ERRORS as exc:  # never repeated: `sink` is half written
            raise self._transport_error(
                exc, broke=f"node server {self.endpoint.name}: download of the tree {asked.path} broke off",
                late=f"node server {self.endpoint.name}: download of the tree {asked.path} took over "
                     f"{timeout:.0f}s")[0] from None

    async def upload(self, slot: int, lease: str, source: Path, path: str, timeout: float = 3600.0,
                     mode: int | None = None) -> int:
        """Stream a local file into the workspace (replacing atomically), with `mode`
        (permission bits; default 0644); returns its size."""
        headers = {**self._auth, protocol.LEASE_HEADER: lease}
        if mode is not None:
            headers[protocol.MODE_HEADER] = protocol.mode_header(mode)

        async def chunks():
            with open(source, "rb") as handle:
                while block := handle.read(256 * 1024):
                    yield block

        try:
            async with self.session.put(self.endpoint.url + protocol.file_route(slot, workspace_relative(path)),
                                        data=chunks(), headers=headers, ssl=self._ssl,
                                        timeout=_timeout(timeout)) as response:
                answer = await self._decode(response)
                if not isinstance(answer, dict) or not isinstance(answer.get("size"), int):
                    raise self._nonsense(f"upload answered {answer!r}"[:200])
                return answer["size"]
        except TRANSPORT_ERRORS as exc:  # never repeated: the body was a stream read once
            raise self._transport_error(
                exc, broke=f"node server {self.endpoint.name}: upload broke off",
                late=f"node server {self.endpoint.name}: upload to {path} took over {timeout:.0f}s")[0] from None
