"""`hpc-sandbox cp`: copy files and folders into a fresh slot, run a command there,
copy results back, in one lease.

Every CLI call gets a slot of its own and gives it back wiped (as `exec` does): a
slot's workspace does not outlive the call. So `cp` does in one call what a script
does with one slot: every `LOCAL slot:PATH` pair is copied in (in order), then
`--run` runs (if given), then every `slot:PATH LOCAL` pair is copied out, whatever
the command's exit code (test reports are wanted most when tests fail).

    hpc-sandbox cp ./proj slot:proj --run 'cd proj && python -m pytest -q' slot:proj/report ./report
"""
from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import click

from .. import connect, jobs
from ..agent import SLOT_WORKSPACE, ToolError, workspace_parts
from ..errors import ErrorKind, HpcSandboxError, JobNotFound
from ..models import Slot, ToolResult
from ..pool import SlotPool
from .common import resolve_state_dir, state_dir_option
from .exec_ import EXIT_INTERNAL, EXIT_TIMEOUT

SLOT_PREFIX = "slot:"
_ROOTS = [[part for part in SLOT_WORKSPACE.split("/") if part]]


class BadInput(click.ClickException):
    """Bad pairs: one line on stderr and exit code 2, before any slot is taken."""

    exit_code = 2


@dataclass(frozen=True)
class Copy:
    """One SRC DEST pair: into the slot (`up`) or out of it."""

    local: Path
    remote: str
    up: bool

    def __str__(self) -> str:
        return f"{self.local} -> slot:{self.remote}" if self.up else f"slot:{self.remote} -> {self.local}"


def parse_pairs(paths: tuple[str, ...]) -> list[Copy]:
    """SRC DEST pairs, each with exactly one side in the slot; checked before any slot
    is taken (a local source that is missing, a slot path out of the workspace)."""
    if not paths or len(paths) % 2:
        raise BadInput("give SRC DEST pairs (one side of each starting with 'slot:')")
    copies = []
    for src, dest in zip(paths[::2], paths[1::2]):
        if src.startswith(SLOT_PREFIX) == dest.startswith(SLOT_PREFIX):
            raise BadInput(f"{src} {dest}: exactly one of SRC and DEST must start with 'slot:'")
        up = dest.startswith(SLOT_PREFIX)
        remote = (dest if up else src)[len(SLOT_PREFIX):] or "."
        try:
            workspace_parts(remote, _ROOTS)
        except ToolError as exc:
            raise BadInput(f"slot:{remote}: {exc.message.split(': ', 1)[-1]}") from None
        local = Path(src if up else dest).expanduser()
        if up and not local.exists():
            raise BadInput(f"{local}: no such file or folder")
        copies.append(Copy(local, remote, up))
    return copies


async def _copy(pool: SlotPool, slot: Slot, copy: Copy) -> ToolResult:
    if copy.up:
        if copy.local.is_dir():
            return await pool.upload_tree(slot, copy.local, copy.remote)
        return await pool.upload(slot, copy.local, copy.remote)
    result = await pool.download_tree(slot, copy.remote, copy.local)
    if result.error_kind == ErrorKind.NOT_A_DIRECTORY:  # a file: copied as one (into LOCAL if a folder, as cp does)
        local = copy.local / PurePosixPath(copy.remote).name if copy.local.is_dir() else copy.local
        return await pool.download(slot, copy.remote, local)
    return result


def _said(copy: Copy, result: ToolResult) -> str:
    data = result.data
    if "files" in data:
        what = f"{data['files']} files, {data['dirs']} folders, {data['links']} links, {data['bytes']} bytes"
    else:
        what = f"{data.get('size', 0)} bytes"
    skipped = data.get("skipped") or []
    left = f"; left out: {', '.join(s['path'] for s in skipped[:5])}{' ...' if len(skipped) > 5 else ''}" \
        if skipped else ""
    return f"hpc-sandbox: {copy} ({what}{left})"


async def _run(state: Path, job: str | None, copies: list[Copy], command: str | None, timeout: float | None,
               acquire_timeout: float) -> tuple[ToolResult | None, str | None]:
    """The command's result (None without --run) and the first copy that failed."""
    wanted = jobs.job_ids(state, job)
    if not wanted:  # said at once, not after --acquire-timeout
        raise JobNotFound(f"no job in {state} to take a slot from (start one: hpc-sandbox submit)")
    pool = connect.from_state_dir(state, wanted if job else None, acquire_timeout=acquire_timeout)
    async with pool:
        async with pool.slot(trajectory_id="cli-cp") as slot:
            for copy in (c for c in copies if c.up):
                result = await _copy(pool, slot, copy)
                if not result.success:
                    return None, f"{copy}: {result.error} ({result.error_kind})"
                click.echo(_said(copy, result), err=True)
            ran = await pool.execute(slot, "bash", {"command": command}, timeout=timeout) if command else None
            if ran is not None:
                sys.stdout.write(ran.stdout)
                sys.stderr.write(ran.stderr)
            for copy in (c for c in copies if not c.up):
                result = await _copy(pool, slot, copy)
                if not result.success:
                    return ran, f"{copy}: {result.error} ({result.error_kind})"
                click.echo(_said(copy, result), err=True)
            return ran, None


@click.command("cp")
@click.option("--run", "command", default=None, metavar="COMMAND",
              help="Run COMMAND with bash in the slot after copying in and before copying out.")
@click.option("--job", default=None, help="Use this job's slots (default: any live job).")
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=None,
              help="Kill --run's command after this many seconds (exit code 124).")
@click.option("--acquire-timeout", type=click.FloatRange(0), default=60.0, show_default=True,
              help="Seconds to wait for a free slot.")
@state_dir_option
@click.argument("paths", nargs=-1, required=True, metavar="SRC DEST [SRC DEST]...")
def cp(command: str | None, job: str | None, timeout: float | None, acquire_timeout: float,
       state_dir: Path | None, paths: tuple[str, ...]) -> None:
    """Copy SRC to DEST for each SRC DEST pair, in one fresh slot.

    One side of each pair is in the slot, written `slot:PATH` (relative to its
    workspace, or under /workspace). A folder is copied as one archive (its contents
    go into DEST, made if missing; modes kept, ownership not; symlinks that lead out
    of the folder and special files are left out and named); a file as a file.

    Pairs into the slot are copied first, then --run runs, then pairs out of the
    slot are copied (also when the command failed). The slot is released and wiped
    afterwards, as `exec` does: nothing stays in it. Exit codes: the command's own
    (0 without --run); 124 on its timeout; 125 if a copy or hpc-sandbox failed.
    """
    copies = parse_pairs(paths)
    state = resolve_state_dir(state_dir)
    try:
        ran, failed = asyncio.run(_run(state, job, copies, command, timeout, acquire_timeout))
    except HpcSandboxError as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_INTERNAL)
    if failed:
        click.echo(f"Error: {failed}", err=True)
        raise SystemExit(EXIT_INTERNAL)
    if ran is None:
        raise SystemExit(0)
    if ran.timed_out:
        click.echo(f"hpc-sandbox: command timed out in {ran.slot}", err=True)
        raise SystemExit(EXIT_TIMEOUT)
    if ran.killed_by_signal and ran.signal:
        raise SystemExit(128 + ran.signal)
    if ran.exit_code is None:
        click.echo(f"Error: {ran.error} ({ran.error_kind})", err=True)
        raise SystemExit(EXIT_INTERNAL)
    raise SystemExit(ran.exit_code)
