"""`hpc-sandbox exec`: run one command in a fresh slot and exit with its exit code."""
from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
from pathlib import Path

import click

from .. import connect, jobs
from ..errors import HpcSandboxError
from ..models import ToolResult
from ..protocol import DEFAULT_EXEC_TIMEOUT, exec_timeout
from ..pool import CloudSource
from .common import resolve_state_dir, state_dir_option

EXIT_TIMEOUT = 124  # as coreutils `timeout`
EXIT_INTERNAL = 125  # hpc-sandbox itself failed (as `docker run`); the command's codes stay its own


async def _run(state: Path, job: str | None, command: str, timeout: float | None, acquire_timeout: float,
               env: dict[str, str], overflow: CloudSource | None, stream: bool) -> ToolResult:
    pool = connect.from_state_dir(state, jobs.job_ids(state, job) if job else None, acquire_timeout=acquire_timeout,
                                  overflow=overflow)
    async with pool:
        async with pool.slot(trajectory_id="cli-exec") as slot:
            args = {"command": command, "env": env}
            if not stream:
                return await pool.execute(slot, "bash", args, timeout=timeout)
            async with contextlib.aclosing(pool.stream(slot, "bash", args, timeout=timeout)) as events:
                async for event in events:
                    if event.result is not None:
                        if event.dropped_bytes:
                            click.echo(f"hpc-sandbox: {event.dropped_bytes} bytes of output were not shown "
                                       "(this end read slower than the command wrote)", err=True)
                        return event.result
                    if event.skipped:
                        sys.stderr.write(f"\n[... hpc-sandbox: {event.skipped} bytes not shown ...]\n")
                    out = sys.stdout if event.kind == "stdout" else sys.stderr
                    out.write(event.data)
                    out.flush()
            raise AssertionError("pool.stream ends with a result event")


@click.command("exec", context_settings={"ignore_unknown_options": True})
@click.option("--job", default=None, help="Use this job's slots (default: any live job).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=None,
              help=f"Kill the command after this many seconds (exit code 124) [default: {DEFAULT_EXEC_TIMEOUT:.0f}].")
@click.option("--acquire-timeout", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Seconds to wait for a free slot.")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Extra environment (repeatable).")
@click.option("--overflow", type=click.Choice(connect.OVERFLOW_PROVIDERS), default=None,
              help="When no cluster slot frees up within the cloud profile's burst_after (or none is coming), "
                   "run in a cloud sandbox; it is stopped afterwards.")
@click.option("--cloud-profile", default=None,
              help="Cloud profile for --overflow [default: the one --profile names, else 'default'].")
@click.option("--profile", default=None, help="Cluster profile whose `cloud` key names the cloud profile.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="An extra config file for --overflow's cloud profile (above the site and user files; "
                   "HPC_SANDBOX_MODAL_* variables and flags win over it).")
@click.option("--stream/--no-stream", default=None,
              help="Print output as the command writes it [default: when stdout is a terminal]; "
                   "--no-stream prints it all at the end.")
@state_dir_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(job: str | None, timeout: float | None, acquire_timeout: float, env_pairs: tuple[str, ...],
          overflow: str | None, cloud_profile: str | None, profile: str | None, config_file: Path | None,
          stream: bool | None, state_dir: Path | None, command: tuple[str, ...]) -> None:
    """Run COMMAND with bash in a free slot; print its output; exit with its code.

    One argument is taken as a shell string (`exec -- 'ls | wc -l'`); several are
    quoted and joined (`exec -- python -c 'print(1)'`). Output is printed as it
    comes when stdout is a terminal (or with --stream), else at the end, each
    stream (at most its capped head and tail) in turn. The slot is released and
    its workspace wiped afterwards. Exit codes: the command's own; 124 on timeout;
    128+N if killed by signal N; 125 if hpc-sandbox itself failed.
    """
    env = {}
    for pair in env_pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    script = command[0] if len(command) == 1 else shlex.join(command)
    state = resolve_state_dir(state_dir)
    try:
        cloud = connect.cloud_source(overflow, state, profile, config_file, cloud_profile) if overflow else None
        if stream is None:
            stream = sys.stdout.isatty()
        result = asyncio.run(_run(state, job, script, timeout, acquire_timeout, env, cloud, stream))
    except HpcSandboxError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_INTERNAL)
    if not stream:  # streamed output is out already
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
    if result.timed_out:
        click.echo(f"hpc-sandbox: command timed out after {exec_timeout(timeout):g}s in {result.slot}", err=True)
        raise SystemExit(EXIT_TIMEOUT)
    if result.killed_by_signal and result.signal:
        raise SystemExit(128 + result.signal)  # as a shell reports it
    if result.exit_code is None:
        click.echo(f"Error: {result.error} ({result.error_kind})", err=True)
        raise SystemExit(EXIT_INTERNAL)
    raise SystemExit(result.exit_code)
