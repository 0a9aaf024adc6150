"""`hpc-sandbox cancel`: stop a job and remove its folder."""
from __future__ import annotations

from pathlib import Path

import click

from .. import jobs
from .common import resolve_state_dir, state_dir_option


@click.command("cancel")
@click.argument("job")
@click.option("--purge", is_flag=True, help="Nomad: also purge the job from Nomad at once (not left for its GC).")
@state_dir_option
def cancel(job: str, purge: bool, state_dir: Path | None) -> None:
    """Cancel JOB through its scheduler; its records and token are removed, its logs
    kept for `hpc-sandbox logs JOB`."""
    info = jobs.cancel(resolve_state_dir(state_dir), job, purge=purge)
    click.echo(f"cancelled {info.job_id} ({info.scheduler})", err=True)
