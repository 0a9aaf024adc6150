"""`hpc-sandbox render`: print the exact jobspec `submit` would hand to the scheduler.

stdout carries the jobspec and nothing else, so it can be piped or diffed; notes go
to stderr. The same profile, flags and job key always give byte-identical output.

`render --examples jobspecs/` regenerates the reviewed examples (one file per profile of
jobspecs/examples.yaml). It lives here, not in jobspec.py, because it reads profiles
from a config file: the renderer below it knows specs only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import click

from ..config import CLEAR, load_spec, profile_names
from ..errors import HpcSandboxError
from ..jobspec import RENDER_SCHEDULERS, SUFFIXES, RenderedJobspec, render as render_spec
from ..spec import PBS_DIALECTS

log = logging.getLogger(__name__)

EXAMPLES_FILE = "examples.yaml"  # the profiles behind the examples, in the examples' folder


@dataclass(frozen=True)
class Regenerated:
    written: list[Path]
    removed: list[Path]  # renderings no profile makes any more


def regenerate_examples(folder: Path) -> Regenerated:
    """Render every profile of FOLDER/examples.yaml into FOLDER (the file named after the
    profile, a split array one file per part) and remove stale renderings. The file is
    read alone (no site or user file, no environment), so every machine renders the same."""
    source = folder / EXAMPLES_FILE
    written: list[Path] = []
    for profile in profile_names(source):
        spec = load_spec(profile=profile, config_file=source, isolated=True)
        for rendered in render_spec(spec, job_key=profile):
            path = folder / rendered.name
            path.write_text(rendered.text, encoding="utf-8")
            written.append(path)
    removed: list[Path] = []
    for stale in sorted(p for suffix in SUFFIXES.values() for p in folder.glob(f"*{suffix}")):
        if stale not in written:
            stale.unlink()
            removed.append(stale)
    return Regenerated(written, removed)


def _part_path(output: Path, rendered: RenderedJobspec) -> Path:
    """-o job.sbatch with three parts gives job.part1.sbatch, job.part2.sbatch, ..."""
    if rendered.parts == 1:
        return output
    return output.with_name(f"{output.stem}.part{rendered.part}{output.suffix}")


@click.command("render")
@click.option("--scheduler", type=click.Choice(RENDER_SCHEDULERS), default=None,
              help="Scheduler to render for [default: the profile's scheduler].")
@click.option("--array", type=int, default=None, metavar="N",
              help="An array of N tasks, one node server each (instead of --nodes).")
@click.option("--nodes", type=int, default=None, metavar="N", help="N nodes, one node server each.")
@click.option("--slots", type=int, default=None, metavar="N", help="Slots per node server.")
@click.option("--profile", default=None, help="Profile to use [env HPC_SANDBOX_PROFILE; default 'default'].")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A config file read after the site and user files (it wins over them).")
@click.option("--dialect", type=click.Choice(PBS_DIALECTS), default=None,
              help="PBS dialect: torque (-l nodes=, -t) or pbspro (-l select=, -J).")
@click.option("--job-key", default=None,
              help="hpc-sandbox job id used in the job's paths [default: the job name].")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the jobspec to this file (a split array: FILE's stem + .partN) instead of stdout.")
@click.option("--examples", type=click.Path(path_type=Path, file_okay=False, exists=True), default=None,
              metavar="FOLDER", help=f"Regenerate the reviewed examples: every profile of FOLDER/{EXAMPLES_FILE} "
                                     "rendered into FOLDER, stale ones removed (normally jobspecs/).")
def render(scheduler: str | None, array: int | None, nodes: int | None, slots: int | None, profile: str | None,
           config_file: Path | None, dialect: str | None, job_key: str | None, output: Path | None,
           examples: Path | None) -> None:
    """Print the jobspec (sbatch script, qsub script or Nomad HCL) for a profile.

    \b
    Examples:
      hpc-sandbox render --scheduler slurm --nodes 2
      hpc-sandbox render --scheduler pbs --dialect pbspro --array 50 --profile gpu
      hpc-sandbox render --scheduler nomad -o job.nomad.hcl
      hpc-sandbox render --examples jobspecs/
    """
    if examples is not None:
        given = [scheduler, array, nodes, slots, profile, config_file, dialect, job_key, output]
        if any(value is not None for value in given):
            raise click.UsageError(f"--examples takes no other option: the profiles are in {EXAMPLES_FILE}")
        _regenerate(examples)
        return
    if array is not None and nodes is not None:
        raise click.UsageError("give --array or --nodes, not both")
    overrides: dict[str, object] = {"slots": slots, "dialect": dialect, "scheduler": scheduler}
    if array is not None:
        overrides.update(array=array, nodes=1)
    if nodes is not None:
        overrides.update(nodes=nodes, array=CLEAR, array_limit=CLEAR)
    try:
        spec = load_spec(profile=profile, config_file=config_file, overrides=overrides)
        if spec.scheduler not in RENDER_SCHEDULERS:
            raise click.UsageError(f"profile {spec.profile!r} has scheduler {spec.scheduler!r}, which has no "
                                   f"jobspec; give --scheduler {'|'.join(RENDER_SCHEDULERS)}")
        rendered = render_spec(spec, job_key=job_key)
    except HpcSandboxError as exc:
        raise click.ClickException(str(exc)) from None
    if len(rendered) > 1:
        click.echo(f"note: the array of {spec.array} tasks is rendered as {len(rendered)} array jobs "
                   f"(at most {rendered[0].servers} tasks each: max_array_size)"
                   + ("" if output else "; use -o FILE to write them to separate files"), err=True)
    if output is None:
        click.echo("".join(r.text for r in rendered), nl=False)
        return
    for item in rendered:
        path = _part_path(output, item)
        try:
            path.write_text(item.text, encoding="utf-8")
        except OSError as exc:
            raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None
        click.echo(f"wrote {path}", err=True)


def _regenerate(folder: Path) -> None:
    try:
        done = regenerate_examples(folder)
    except HpcSandboxError as exc:
        raise click.ClickException(str(exc)) from None
    for path in done.written:
        click.echo(f"wrote {path}", err=True)
    for path in done.removed:
        click.echo(f"removed stale example {path}", err=True)
