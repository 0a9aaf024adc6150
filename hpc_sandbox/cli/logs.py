"""`hpc-sandbox logs`: print a job's node server logs, while it runs or after cancel."""
from __future__ import annotations

import collections
from pathlib import Path

import click

from ..errors import JobNotFound
from ..jobfolder import KEPT_JOB_LOGS, JobFolder, job_logs
from .common import resolve_state_dir, state_dir_option


@click.command("logs")
@click.argument("job")
@click.option("--tail", "tail", type=click.IntRange(min=1), default=None, metavar="N",
              help="Only the last N lines of each log.")
@state_dir_option
def logs(job: str, tail: int | None, state_dir: Path | None) -> None:
    """Print JOB's node server logs, each after a `==> FILE <==` header: from its
    job folder while it has one; a cancelled job's from STATE_DIR/logs/JOB/, where
    the logs of the last jobs cancelled are kept."""
    state = resolve_state_dir(state_dir)
    found = job_logs(state, job)
    if not found and JobFolder(state, job).exists():
        raise JobNotFound(f"job {job!r} has no logs in its folder yet (a Nomad job's stay in Nomad: "
                          "nomad alloc logs -stderr ALLOC serve)")
    if not found:
        raise JobNotFound(f"no logs of job {job!r} in {state} (not a job of this state dir, or cancelled before "
                          f"the last {KEPT_JOB_LOGS} jobs, whose logs are kept)")
    for index, path in enumerate(found):
        click.echo(f"{chr(10) if index else ''}==> {path} <==")
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = collections.deque(handle, maxlen=tail) if tail else handle
            for line in lines:
                click.echo(line, nl=False)
