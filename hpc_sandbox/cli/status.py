"""`hpc-sandbox status`: jobs, their scheduler state and their node servers' slots."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from pathlib import Path

import click

from .. import jobs
from ..errors import HpcSandboxError
from ..jobfolder import PoolState, jobs_root, list_pools
from .common import resolve_state_dir, state_dir_option


@click.command("status")
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_dir_option
def status(job: str | None, as_json: bool, state_dir: Path | None) -> None:
    """Show JOB (or every job): scheduler state, node servers, slots free/leased."""
    state = resolve_state_dir(state_dir)
    reports = asyncio.run(jobs.report(state, job))
    pools = [] if job else _cloud_pools(state)
    if as_json:
        click.echo(json.dumps([{
            "job_id": r.info.job_id, "scheduler": r.info.scheduler, "state": r.status.state.value,
            "reason": r.status.reason, "servers_expected": r.info.servers, "free": r.free, "leased": r.leased,
            "servers": [{"name": s.record.name, "url": s.record.url, "reachable": s.reachable, "slots": s.record.slots,
                         "counts": s.counts, "error": s.error} for s in r.servers],
        } for r in reports] + pools, indent=2))
        return
    _print_cloud(pools)
    if not reports and pools:
        return
    if not reports:
        click.echo(f"No jobs in {jobs_root(state)}. Start one with: hpc-sandbox submit --wait")
        return
    for r in reports:
        reason = f" ({r.status.reason})" if r.status.reason else ""
        click.echo(f"{r.info.job_id}  {r.info.scheduler}  {r.status.state.value}{reason}  "
                   f"servers {sum(s.reachable for s in r.servers)}/{r.info.servers} ready  "
                   f"slots {r.free} free, {r.leased} leased")
        for s in r.servers:
            if s.reachable:
                detail = ", ".join(f"{n} {k}" for k, n in sorted(s.counts.items()))
            else:
                detail = f"unreachable: {s.error}"
            click.echo(f"  {s.record.name}  {s.record.url}  {s.record.runtime}  {detail}")


def _cloud_pools(state: Path) -> list[dict]:
    """Pools that burst to the cloud, from their state files (no call to Modal)."""
    now = time.time()
    out = []
    for folder in list_pools(state):
        for path in folder.state_files():
            try:
                pool = folder.read(path)
            except HpcSandboxError:
                continue
            entry = _cloud_pool(pool, now)
            if entry is not None:
                out.append(entry)
    return out


def _cloud_pool(pool: PoolState, now: float) -> dict | None:
    from ..burst.owner import Owner

    owner = Owner.parse(pool.owner)
    owner_alive = owner.alive() if owner else None
    alive = [s for s in pool.sandboxes if s.state in ("creating", "ready")]
    if not alive and (owner_alive is False or pool.stopped):
        return None  # a finished pool with nothing left: history, not status
    if owner_alive is False:
        # Its process is gone: what it wrote last may no longer hold (cleanup, Modal's
        # own timeouts); `hpc-sandbox cloud list` asks Modal.
        alive = [dataclasses.replace(s, state="left behind?") for s in alive]
    return {"cloud_pool": pool.pool_id, "profile": pool.profile, "runtime": pool.runtime, "owner": pool.owner,
            "owner_alive": owner_alive,
            "sandboxes": [{"id": s.id, "state": s.state, "slots": s.slots, "url": s.url} for s in alive],
            "slots": sum(s.slots for s in alive if s.state == "ready"),
            "sandbox_seconds": round(pool.sandbox_seconds(now), 1), "cost": pool.cost(now)}


def _print_cloud(pools: list[dict]) -> None:
    for p in pools:
        cost = f", about ${p['cost']:.2f}" if p["cost"] is not None else ""
        gone = "  (its pool is gone: hpc-sandbox cloud cleanup)" if p["owner_alive"] is False else ""
        click.echo(f"cloud pool {p['cloud_pool']}  modal profile {p['profile']}  "
                   f"{len(p['sandboxes'])} sandboxes, {p['slots']} slots ready  "
                   f"{p['sandbox_seconds']:.0f} sandbox-seconds{cost}{gone}")
        for s in p["sandboxes"]:
            click.echo(f"  {s['id']}  {s['state']}  {s['slots']} slots  {s['url'] or ''}")
        if p["sandboxes"] and p.get("runtime") == "none":
            click.echo("  (runtime none: the slots of one sandbox share its filesystem outside their workspaces)")
