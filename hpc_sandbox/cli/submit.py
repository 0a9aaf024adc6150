"""`hpc-sandbox submit`: start a job's node servers and (optionally) wait for them."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from .. import jobs
from ..runtime import RUNTIMES
from ..schedulers import SCHEDULERS
from ..server.main import parse_port_range
from ..spec import DEFAULT_PORT_RANGE, SandboxSpec
from .common import interactive, resolve_state_dir, state_dir_option


def _progress(ready: int, total: int, state: str) -> None:
    if interactive():
        width = 20
        filled = width * ready // max(total, 1)
        click.echo(f"\r[{'#' * filled}{'.' * (width - filled)}] {ready}/{total} node servers ready ({state})  ",
                   err=True, nl=False)


@click.command("submit")
@click.option("--scheduler", type=click.Choice(sorted(SCHEDULERS)), default="local", show_default=True,
              help="Where node servers run; 'local' starts them as processes on this machine.")
@click.option("--nodes", type=click.IntRange(1), default=1, show_default=True, help="Node servers to start.")
@click.option("--slots", type=click.IntRange(1), default=4, show_default=True, help="Slots per node server.")
@click.option("--runtime", type=click.Choice(sorted(RUNTIMES)), default="none", show_default=True,
              help="Slot isolation; 'none' is for trusted local use only.")
@click.option("--image", default=None, help="Container image for apptainer/singularity (.sif or docker://).")
@click.option("--job-name", default="hpc-sandbox", show_default=True, help="Prefix of the job id.")
@click.option("--port-range", default=f"{DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}", show_default=True,
              help="Ports the node servers may bind.")
@click.option("--wait/--no-wait", default=False, help="Block until every node server answers.")
@click.option("--wait-timeout", type=click.FloatRange(1), default=300.0, show_default=True,
              help="Seconds --wait gives the node servers.")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON instead of its id.")
@state_dir_option
def submit(scheduler: str, nodes: int, slots: int, runtime: str, image: str | None, job_name: str, port_range: str,
           wait: bool, wait_timeout: float, as_json: bool, state_dir: Path | None) -> None:
    """Submit a job of node servers and print its job id.

    \b
    Example:
      hpc-sandbox submit --nodes 2 --slots 4 --wait
      hpc-sandbox exec -- echo hello
    """
    state = resolve_state_dir(state_dir)
    spec = SandboxSpec(job_name=job_name, nodes=nodes, slots=slots, runtime=runtime, image=image,
                       port_range=parse_port_range(port_range), state_dir=state)
    info = jobs.submit(spec, scheduler)
    if wait:
        try:
            asyncio.run(jobs.wait_ready(state, info, wait_timeout, _progress))
        except KeyboardInterrupt:
            click.echo(f"\nStopped waiting; job {info.job_id} keeps running. "
                       f"Cancel it with: hpc-sandbox cancel {info.job_id}", err=True)
            raise SystemExit(130)
        finally:
            if interactive():
                click.echo("", err=True)
    if as_json:
        click.echo(json.dumps({"job_id": info.job_id, "scheduler": info.scheduler, "servers": info.servers,
                               "slots_per_server": info.slots_per_server, "runtime": info.runtime,
                               "scheduler_ids": list(info.scheduler_ids), "ready": wait}, indent=2))
    else:
        click.echo(info.job_id)
