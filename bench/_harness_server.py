#!/usr/bin/env python3
"""Protocol-level harness server WITHOUT AGENTS, for `pool_bench.py` only.

Not a node server: it runs no agent and no command, and keeps no workspace. It speaks
just enough of the node server's protocol (`hpc_sandbox/protocol.py`, whose dataclasses
it uses for every request and answer) for a SlotPool to acquire and release slots:

    POST /v1/slots/acquire       AcquireRequest -> Grant; with `wait`, the request is
                                 held, first come first served, and a released slot
                                 goes to the oldest request still waiting (as
                                 server/slots.py's SlotTable does)
    POST /v1/slots/{i}/release   ReleaseRequest (X-Lease) -> {"slot", "released"}
    POST /v1/slots/{i}/renew     (X-Lease)                -> {"slot", "ttl"}
    GET  /v1/slots                                        -> SlotsAnswer

with the bearer token checked and errors answered as protocol.error_body with the
status protocol.ERRORS gives. Leases never expire and grants need no confirmation.

One process serves many "node servers", each on its own port (clients address
servers by URL, as they do real ones), each with its own slots and its own queue of
waiting requests:

    HARNESS_TOKEN=... python bench/_harness_server.py --ports 21000,21001,... \\
        --slots 100 --ready-file /tmp/ready [--tls-cert C --tls-key K]

Plain HTTP unless --tls-cert/--tls-key are given. The ready file is written once
every port listens. SIGTERM/SIGINT stop it.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hmac
import json
import os
import secrets
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from hpc_sandbox import protocol
from hpc_sandbox.errors import BadRequest, ClientError, LeaseLost, NoFreeSlot, NotFound
from hpc_sandbox.protocol import AcquireRequest, Grant, ReleaseRequest, SlotsAnswer

TTL = 600.0  # what a grant says its lease lasts (never enforced here)


class HarnessNode:
    """The slots of one harness "node server" (one port)."""

    __slots__ = ("name", "free", "leases", "owners", "waiting", "grants", "waited")

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self.free: collections.deque[int] = collections.deque(range(slots))  # O(1) at any size
        self.leases: list[str | None] = [None] * slots
        self.owners: list[str | None] = [None] * slots
        # Requests waiting for a slot, oldest first: (future of a Grant, request, the request's still-there test)
        self.waiting: collections.deque = collections.deque()
        self.grants = 0
        self.waited = 0  # grants that went to a request which had to wait

    def lease(self, index: int, asked: AcquireRequest) -> Grant:
        lease = secrets.token_urlsafe(18)
        self.leases[index] = lease
        self.owners[index] = asked.trajectory_id
        self.grants += 1
        return Grant(index, lease, asked.ttl or TTL, free=len(self.free))

    def check(self, raw_index: str, lease: str | None) -> int:
        index = protocol.parse_slot_index(raw_index)
        if index >= len(self.leases):
            raise NotFound(f"no slot {index} (this server has slots 0-{len(self.leases) - 1})")
        current = self.leases[index]
        if not lease or current is None or not secrets.compare_digest(current, lease):
            raise LeaseLost(f"slot {index}: lease is not current")
        return index

    def give_back(self, index: int) -> None:
        self.leases[index] = None
        self.owners[index] = None
        while self.waiting:
            future, asked, still_there = self.waiting.popleft()
            if future.done():
                continue  # gave up
            if not still_there():
                future.cancel()
                continue
            self.waited += 1
            future.set_result(self.lease(index, asked))
            return
        self.free.append(index)


def make_app(nodes: dict[int, HarnessNode], token: str) -> web.Application:
    expected = protocol.bearer(token).encode()

    def node_of(request: web.Request) -> HarnessNode:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        node = nodes.get(sockname[1]) if sockname else None
        if node is None:
            raise NotFound("no harness node on this port")
        return node

    @web.middleware
    async def guard(request: web.Request, handler):
        if not hmac.compare_digest(request.headers.get(protocol.AUTH_HEADER, "").encode(), expected):
            return web.json_response(protocol.error_body("auth", "missing or wrong bearer token"), status=401)
        try:
            return await handler(request)
        except ClientError as exc:
            return web.json_response(protocol.error_body(exc.kind, str(exc)), status=protocol.status_for(exc))

    async def body_of(request: web.Request) -> dict:
        if not request.body_exists:
            return {}
        try:
            body = await request.json(loads=json.loads)
        except ValueError as exc:
            raise BadRequest(f"malformed JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the JSON body must be an object")
        return body

    async def acquire(request: web.Request) -> web.Response:
        node = node_of(request)
        asked = AcquireRequest.from_json(await body_of(request))
        if node.free:
            return web.json_response(node.lease(node.free.popleft(), asked).to_json())
        if asked.wait <= 0:
            raise NoFreeSlot(f"all {len(node.leases)} slots are leased")
        future = asyncio.get_running_loop().create_future()

        def still_there() -> bool:
            transport = request.transport
            return transport is not None and not transport.is_closing()

        node.waiting.append((future, asked, still_there))
        done, _ = await asyncio.wait({future}, timeout=asked.wait)
        if not done:
            future.cancel()  # give_back passes over it
            raise NoFreeSlot(f"no slot of {len(node.leases)} freed up within {asked.wait:.0f}s")
        if future.cancelled():
            raise NoFreeSlot("the request's client went away")
        return web.json_response(future.result().to_json())

    async def release(request: web.Request) -> web.Response:
        node = node_of(request)
        index = node.check(request.match_info["index"], request.headers.get(protocol.LEASE_HEADER))
        ReleaseRequest.from_json(await body_of(request))  # validated; nothing to reset here
        node.give_back(index)
        return web.json_response({"slot": index, "released": True})

    async def renew(request: web.Request) -> web.Response:
        node = node_of(request)
        index = node.check(request.match_info["index"], request.headers.get(protocol.LEASE_HEADER))
        return web.json_response({"slot": index, "ttl": TTL})

    async def list_slots(request: web.Request) -> web.Response:
        node = node_of(request)
        slots = [{"index": i, "state": "leased" if lease else "free", "trajectory_id": node.owners[i],
                  "lease_expires_in": TTL if lease else None, "running": 0, "restarts": 0, "last_error": None}
                 for i, lease in enumerate(node.leases)]
        leased = sum(1 for lease in node.leases if lease)
        counts = {"free": len(node.leases) - leased, "leased": leased}
        return web.json_response(SlotsAnswer(slots, counts, 0).to_json())

    app = web.Application(middlewares=[guard])
    app.add_routes([
        web.get(protocol.SLOTS, list_slots),
        web.post(protocol.ACQUIRE, acquire),
        web.post(f"{protocol.SLOTS}/{{index}}/release", release),
        web.post(f"{protocol.SLOTS}/{{index}}/renew", renew),
    ])
    return app


async def serve(args: argparse.Namespace) -> None:
    token = os.environ.get("HARNESS_TOKEN", "")
    if len(token) < 16:
        raise SystemExit("HARNESS_TOKEN (16+ characters) must be set")
    ports = [int(p) for p in args.ports.split(",") if p]
    nodes = {port: HarnessNode(f"{args.host}:{port}", args.slots) for port in ports}
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    runner = web.AppRunner(make_app(nodes, token), access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for port in ports:
            await web.TCPSite(runner, args.host, port, ssl_context=tls, backlog=1024, shutdown_timeout=1.0).start()
        Path(args.ready_file).write_text(json.dumps({"pid": os.getpid(), "ports": ports}))
        await stop.wait()
    finally:
        grants = sum(n.grants for n in nodes.values())
        waited = sum(n.waited for n in nodes.values())
        print(f"harness: {len(nodes)} nodes, {grants} grants, {waited} after waiting", file=sys.stderr, flush=True)
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", required=True, help="comma-separated ports, one harness node server each")
    parser.add_argument("--slots", type=int, required=True, help="slots per node server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
