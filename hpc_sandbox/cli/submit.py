"""`hpc-sandbox submit`: start a job's node servers and (optionally) wait for them."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from .. import jobs
from ..config import CLEAR, load_spec
from ..schedulers import SUBMIT_SCHEDULERS
from ..spec import PBS_DIALECTS, RUNTIMES
from .common import interactive

_STAGES = {"pending": "queued", "running": "starting", "completing": "ending"}


def _progress(ready: int, total: int, state: str) -> None:
    if interactive():
        width = 20
        filled = width * ready // max(total, 1)
        stage = "ready" if ready >= total else _STAGES.get(state, state)
        click.echo(f"\r[{'#' * filled}{'.' * (width - filled)}] {ready}/{total} node servers ready ({stage})  ",
                   err=True, nl=False)


@click.command("submit")
@click.option("--scheduler", type=click.Choice(SUBMIT_SCHEDULERS), default=None,
              help="Where node servers run [default: the profile's, else local]. 'local' starts them as "
                   "processes on this machine.")
@click.option("--nodes", type=click.IntRange(1), default=None, help="Node servers to start, one per node [1].")
@click.option("--array", type=click.IntRange(1), default=None, metavar="N",
              help="An array of N tasks, one node server each (instead of --nodes).")
@click.option("--slots", type=click.IntRange(1), default=None, help="Slots per node server [4].")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None,
              help="Slot isolation [none]; 'none' is for trusted local use only.")
@click.option("--image", default=None, help="Container image for apptainer/singularity (.sif or docker://).")
@click.option("--partition", default=None, help="Slurm partition / PBS queue.")
@click.option("--walltime", default=None, help="HH:MM:SS (or D-HH:MM:SS) [01:00:00].")
@click.option("--job-name", default=None, help="Job name, also the prefix of the job id [hpc-sandbox].")
@click.option("--port-range", default=None, help="Ports the node servers may bind [9100-9163].")
@click.option("--dialect", type=click.Choice(PBS_DIALECTS), default=None, help="PBS dialect.")
@click.option("--profile", default=None, help="Profile to use [env HPC_SANDBOX_PROFILE; default 'default'].")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A config file read after the site and user files.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="State directory [env HPC_SANDBOX_STATE_DIR; default ~/.hpc-sandbox]. On a cluster it must "
                   "be on a filesystem the compute nodes share.")
@click.option("--wait/--no-wait", default=False, help="Block until every node server answers.")
@click.option("--wait-timeout", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Seconds --wait gives the node servers (a queued job keeps running afterwards).")
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON instead of its id.")
def submit(scheduler: str | None, nodes: int | None, array: int | None, slots: int | None, runtime: str | None,
           image: str | None, partition: str | None, walltime: str | None, job_name: str | None,
           port_range: str | None, dialect: str | None, profile: str | None, config_file: Path | None,
           state_dir: Path | None, wait: bool, wait_timeout: float, as_json: bool) -> None:
    """Submit a job of node servers and print its job id.

    Settings come from the profile (site file, ~/.hpc-sandbox/config.yaml, --config,
    HPC_SANDBOX_* variables), then these flags. `hpc-sandbox render` with the same
    flags prints the exact script this submits; the submitted copy is kept in the
    job folder (jobs/JOB/submit/).

    \b
    Examples:
      hpc-sandbox submit --nodes 2 --slots 4 --wait
      hpc-sandbox submit --scheduler slurm --array 16 --runtime apptainer --image img.sif --wait
    """
    if array is not None and nodes is not None:
        raise click.UsageError("give --array or --nodes, not both")
    overrides: dict[str, object] = {
        "scheduler": scheduler, "slots": slots, "runtime": runtime, "image": image, "partition": partition,
        "walltime": walltime, "job_name": job_name, "port_range": port_range, "dialect": dialect,
        "state_dir": state_dir,
    }
    if array is not None:
        overrides.update(array=array, nodes=1)
    if nodes is not None:
        overrides.update(nodes=nodes, array=CLEAR, array_limit=CLEAR)
    spec = load_spec(profile=profile, config_file=config_file, overrides=overrides)
    job = jobs.submit(spec)
    info = job.info
    if wait:
        try:
            asyncio.run(job.wait_ready(wait_timeout, _progress))
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
