"""Async HTTP client for one node server.

Keep-alive connections, typed errors, an HTTP timeout of the command's own timeout
plus a margin, and retries only where they are safe: on a broken connection, with
the same execution id (the server answers a repeated id with the first result).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from urllib.parse import quote
from pathlib import Path
from typing import Any

import aiohttp

from .errors import (AuthError, BadRequest, CallTimeout, ClientError, LeaseLost, LimitExceeded, NoFreeSlot,
                     NotFound, ServerGone)
from .models import DEFAULT_EXEC_TIMEOUT, Endpoint
from .paths import workspace_relative

log = logging.getLogger(__name__)

LEASE_HEADER = "X-Lease"
TIMEOUT_MARGIN = 15.0  # seconds on top of a command's timeout: kill grace + transfer
CONTROL_TIMEOUT = 30.0  # acquire, release, health...
# A node that died without a word (power, network) leaves a record that looks alive:
# connecting to it must fail fast, whatever the call's own timeout.
CONNECT_TIMEOUT = 5.0
RETRY_DELAYS = (0.1, 0.5, 1.5)
_KIND_TO_ERROR: dict[str, type[ClientError]] = {
    "auth": AuthError,
    "not_found": NotFound,
    "bad_request": BadRequest,
    "lease_lost": LeaseLost,
    "no_free_slot": NoFreeSlot,
    "limit": LimitExceeded,
}


def _timeout(total: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, sock_connect=CONNECT_TIMEOUT)


def new_exec_id() -> str:
    return uuid.uuid4().hex


class NodeClient:
    def __init__(self, endpoint: Endpoint, session: aiohttp.ClientSession | None = None) -> None:
        self.endpoint = endpoint
        self._session = session
        self._own_session = session is None
        self._auth = {"Authorization": f"Bearer {endpoint.token}"}

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
            headers[LEASE_HEADER] = lease
        url = self.endpoint.url + path
        attempts = len(RETRY_DELAYS) + 1 if retry else 1
        for attempt in range(attempts):
            try:
                async with self.session.request(method, url, json=json, headers=headers,
                                                timeout=_timeout(timeout)) as response:
                    return await self._decode(response)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectorError,
                    aiohttp.ClientPayloadError) as exc:
                # A broken or refused connection: the request may not have arrived (or
                # its answer was lost). Safe to repeat: exec ids make it idempotent.
                if attempt + 1 >= attempts:
                    raise ServerGone(f"node server {self.endpoint.name} ({self.endpoint.url}) is unreachable: "
                                     f"{exc.__class__.__name__}: {exc}") from None
                await asyncio.sleep(RETRY_DELAYS[attempt])
            except aiohttp.ServerTimeoutError as exc:  # before TimeoutError: it is one too
                # Only the connect timeout is set: the host does not answer at all (a dead
                # node, a firewall). Not retried: it would only wait CONNECT_TIMEOUT again.
                raise ServerGone(f"node server {self.endpoint.name} ({self.endpoint.url}) is unreachable: "
                                 f"no connection within {CONNECT_TIMEOUT:.0f}s ({exc})") from None
            except asyncio.TimeoutError:
                raise CallTimeout(f"node server {self.endpoint.name} did not answer {method} {path} "
                                  f"within {timeout:.0f}s") from None
        raise AssertionError("unreachable")

    async def _decode(self, response: aiohttp.ClientResponse) -> Any:
        if response.status < 400:
            try:
                return await response.json()
            except (aiohttp.ContentTypeError, ValueError):
                raise ClientError(f"{self.endpoint.url} answered HTTP {response.status} without JSON: "
                                  "is that a node server?") from None
        try:
            error = (await response.json()).get("error") or {}
        except (aiohttp.ContentTypeError, ValueError):
            error = {"kind": "http", "message": (await response.text())[:200]}
        kind = error.get("kind", "http")
        message = error.get("message", f"HTTP {response.status}")
        if response.status == 413:
            kind = "limit"
        cls = _KIND_TO_ERROR.get(kind, ClientError)
        raise cls(f"{self.endpoint.name}: {message}")

    # --- API ---------------------------------------------------------------------

    async def health(self, timeout: float = 5.0) -> dict[str, Any]:
        return await self._request("GET", "/v1/health", timeout=timeout, retry=False)

    async def slots(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/slots")

    async def acquire(self, trajectory_id: str | None = None, ttl: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"trajectory_id": trajectory_id}
        if ttl is not None:
            body["ttl"] = ttl
        # Not retried: a lost answer would leave a slot leased to nobody until its ttl.
        return await self._request("POST", "/v1/slots/acquire", json=body, retry=False)

    async def release(self, slot: int, lease: str, reset_workspace: bool = True) -> None:
        await self._request("POST", f"/v1/slots/{slot}/release", json={"reset_workspace": reset_workspace},
                            lease=lease, timeout=CONTROL_TIMEOUT + 30)

    async def renew(self, slot: int, lease: str) -> None:
        await self._request("POST", f"/v1/slots/{slot}/renew", lease=lease)

    async def reset(self, slot: int, lease: str) -> None:
        await self._request("POST", f"/v1/slots/{slot}/reset", lease=lease, timeout=CONTROL_TIMEOUT + 30)

    async def execute(self, slot: int, lease: str, tool: str, args: dict[str, Any],
                      timeout: float | None = None, exec_id: str | None = None) -> dict[str, Any]:
        """One tool call; returns the server's answer {"ok", "tool", "result" | "error"}."""
        timeout = timeout or DEFAULT_EXEC_TIMEOUT
        body = {"exec_id": exec_id or new_exec_id(), "tool": tool, "args": args, "timeout": timeout}
        return await self._request("POST", f"/v1/slots/{slot}/exec", json=body, lease=lease,
                                   timeout=timeout + TIMEOUT_MARGIN)

    async def batch(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Several calls (each with slot, lease, exec_id, tool, args, timeout) in one request."""
        calls = [{**c, "timeout": c.get("timeout") or DEFAULT_EXEC_TIMEOUT} for c in calls]
        longest = max(c["timeout"] for c in calls)
        answer = await self._request("POST", "/v1/batch", json={"calls": calls}, timeout=longest + TIMEOUT_MARGIN)
        return answer["results"]

    async def download(self, slot: int, lease: str, path: str, dest: Path, timeout: float = 3600.0) -> int:
        """Stream a workspace file to `dest` (written atomically); returns its size."""
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".part")
        headers = {**self._auth, LEASE_HEADER: lease}
        try:
            async with self.session.get(f"{self.endpoint.url}/v1/slots/{slot}/files/{quote(workspace_relative(path))}",
                                        headers=headers, timeout=_timeout(timeout)) as response:
                if response.status >= 400:
                    await self._decode(response)
                size = 0
                with open(partial, "wb") as handle:
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        handle.write(chunk)
                        size += len(chunk)
            partial.replace(dest)
            return size
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ServerGone(f"node server {self.endpoint.name}: download broke off: {exc}") from None
        except asyncio.TimeoutError:
            raise CallTimeout(f"node server {self.endpoint.name}: download of {path} took over {timeout:.0f}s") from None
        finally:
            partial.unlink(missing_ok=True)

    async def upload(self, slot: int, lease: str, source: Path, path: str, timeout: float = 3600.0) -> int:
        """Stream a local file into the workspace (replacing atomically); returns its size."""
        headers = {**self._auth, LEASE_HEADER: lease}

        async def chunks():
            with open(source, "rb") as handle:
                while block := handle.read(256 * 1024):
                    yield block

        try:
            async with self.session.put(f"{self.endpoint.url}/v1/slots/{slot}/files/{quote(workspace_relative(path))}",
                                        data=chunks(), headers=headers,
                                        timeout=_timeout(timeout)) as response:
                return (await self._decode(response))["size"]
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ServerGone(f"node server {self.endpoint.name}: upload broke off: {exc}") from None
        except asyncio.TimeoutError:
            raise CallTimeout(f"node server {self.endpoint.name}: upload to {path} took over {timeout:.0f}s") from None
