"""`hpc-sandbox check --scheduler ...`: submit a tiny job and prove, from here, that its
node server can be reached with its token, step by step.

The most common failure on a real cluster is a firewall between login and compute
nodes: the node server starts and announces itself, and nothing can connect to it.
That case is named plainly, with the port range to open.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from . import jobs
from .client import NodeClient, endpoint_of
from .errors import ClientError, HpcSandboxError
from .models import ToolResult
from .jobfolder import JobFolder
from .jobstate import jittered
from .schedulers import get_scheduler
from .spec import SandboxSpec


@dataclass(frozen=True)
class Step:
    name: str
    ok: bool
    detail: str


async def run_preflight(spec: SandboxSpec, timeout: float, report: Callable[[Step], None]) -> list[Step]:
    """Submit, wait for the node server's record, reach it, use a slot, cancel."""
    steps: list[Step] = []

    def step(name: str, ok: bool, detail: str) -> bool:
        steps.append(Step(name, ok, detail))
        report(steps[-1])
        return ok

    state_dir = spec.state_dir
    if spec.scheduler == "nomad":
        from .schedulers.nomad import NomadConnection, agent_checks

        for name, ok, detail in await asyncio.to_thread(agent_checks, NomadConnection.for_spec(spec)):
            if not step(name, ok, detail):
                return steps
    try:
        info = jobs.submit(spec).info
    except HpcSandboxError as exc:
        step("submit", False, str(exc))
        return steps
    step("submit", True, f"job {info.job_id} ({spec.scheduler} id {', '.join(info.scheduler_ids)})")
    try:
        record = await _wait_for_record(spec, info, timeout, step)
        if record is None:
            return steps
        endpoint = endpoint_of(record, JobFolder(state_dir, info.job_id).credentials())
        async with aiohttp.ClientSession() as session:
            client = NodeClient(endpoint, session=session)
            # A node server that a scheduler's API names (Nomad: a running allocation) may
            # still be starting: give it a little while before calling it unreachable.
            exc = await _first_answer(client, min(timeout, 30.0) if record.pid <= 0 else 0.0)
            if exc is not None:
                lo, hi = spec.port_range
                step("reach", False,
                     f"the node server started on {record.hostname} and listens on {record.url}, but "
                     f"{socket.gethostname()} cannot connect to it ({exc}). This is almost always a firewall "
                     f"between login and compute nodes: allow TCP ports {lo}-{hi} from here to the compute nodes "
                     f"(or pick a port range your site opens, --port-range / port_range).")
                return steps
            step("reach", True, f"{record.url} answers from {socket.gethostname()}")
            try:
                slots = await client.slots()
            except ClientError as exc:
                step("token", False, f"the node server refused the job's token: {exc}")
                return steps
            step("token", True, f"token accepted; {len(slots.slots)} slot(s)")
            try:
                granted = await client.acquire("preflight", ttl=60)
                answer = await client.execute(granted.slot, granted.lease, "bash",
                                              {"command": "echo ok from $(hostname)"}, timeout=30)
                await client.release(granted.slot, granted.lease)
            except ClientError as exc:
                step("exec", False, str(exc))
                return steps
            result = ToolResult.from_answer(answer)
            if result.success:
                step("exec", True, result.stdout.strip())
            else:
                step("exec", False, result.error or f"exit code {result.exit_code}: {result.stderr.strip()}")
        return steps
    finally:
        try:
            jobs.cancel(state_dir, info.job_id)
            step("cancel", True, f"job {info.job_id} cancelled and its folder removed")
        except HpcSandboxError as exc:
            step("cancel", False, f"{exc}; cancel it by hand: hpc-sandbox cancel {info.job_id}")


async def _first_answer(client: NodeClient, patience: float) -> ClientError | None:
    """None once the node server answers; its last error if it has not within `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            await client.health(timeout=10)
            return None
        except ClientError as exc:
            if time.monotonic() >= deadline:
                return exc
            await asyncio.sleep(0.5)


async def _wait_for_record(spec: SandboxSpec, info, timeout: float, step):
    backend = get_scheduler(info.scheduler, spec.state_dir)
    folder = JobFolder(spec.state_dir, info.job_id)
    deadline = time.monotonic() + timeout
    while True:
        records = await asyncio.to_thread(jobs.server_records, spec.state_dir, info.job_id, info)
        if records:
            step("start", True, f"node server ready on {records[0].hostname} ({records[0].url})")
            return records[0]
        status = backend.status([info])[info.job_id]
        if status.state.ended:
            tail = folder.log_tail()
            step("start", False, f"the job {status.state.value} before its node server was ready"
                                 f"{': ' + tail if tail else ''}")
            return None
        if time.monotonic() > deadline:
            step("start", False, f"no node server after {timeout:.0f}s; the job is {status.state.value}"
                                 f"{' (' + status.reason + ')' if status.reason else ''}")
            return None
        await asyncio.sleep(jittered(0.5))
