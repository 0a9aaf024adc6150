"""`hpc-sandbox cancel`: stop a job and remove its folder."""
from __future__ import annotations

from pathlib import Path

import click

from .. import jobs
from .common import resolve_state_dir, state_dir_option


@click.command("cancel")
@click.argument("job")
@state_dir_option
def cancel(job: str, state_dir: Path | None) -> None:
    """Cancel JOB through its scheduler; its records, token and logs are removed."""
    info = jobs.cancel(resolve_state_dir(state_dir), job)
    click.echo(f"cancelled {info.job_id} ({info.scheduler})", err=True)
