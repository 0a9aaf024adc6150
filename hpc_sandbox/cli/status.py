"""`hpc-sandbox status`: jobs, their scheduler state and their node servers' slots."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from .. import jobs
from .common import resolve_state_dir, state_dir_option


@click.command("status")
@click.argument("job", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_dir_option
def status(job: str | None, as_json: bool, state_dir: Path | None) -> None:
    """Show JOB (or every job): scheduler state, node servers, slots free/leased."""
    state = resolve_state_dir(state_dir)
    reports = asyncio.run(jobs.report(state, job))
    if as_json:
        click.echo(json.dumps([{
            "job_id": r.info.job_id, "scheduler": r.info.scheduler, "state": r.status.state.value,
            "reason": r.status.reason, "servers_expected": r.info.servers, "free": r.free, "leased": r.leased,
            "servers": [{"name": s.record.name, "url": s.record.url, "reachable": s.reachable, "slots": s.record.slots,
                         "counts": s.counts, "error": s.error} for s in r.servers],
        } for r in reports], indent=2))
        return
    if not reports:
        click.echo(f"No jobs in {state / 'jobs'}. Start one with: hpc-sandbox submit --wait")
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
