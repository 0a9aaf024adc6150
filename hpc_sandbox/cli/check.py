"""`hpc-sandbox check`: what this machine has for running slots."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from ..config import CLEAR, load_spec
from ..errors import RuntimeUnavailable
from ..preflight import Step, run_preflight
from ..runtime import RuntimeOptions, make_runtime
from ..schedulers import SUBMIT_SCHEDULERS
from .common import resolve_state_dir, state_dir_option


@dataclass(frozen=True)
class Finding:
    what: str
    ok: bool
    detail: str


def _runtime(kind: str) -> Finding:
    try:
        # Image-less probe: only whether the binary runs (an image is checked at serve time).
        runtime = make_runtime(RuntimeOptions(kind=kind, image="docker://probe"))
        return Finding(f"runtime {kind}", True, runtime.check())
    except RuntimeUnavailable as exc:
        return Finding(f"runtime {kind}", False, str(exc))


# What a slot's `python3` is, asked the way a command in a slot asks: the first on its PATH.
SLOT_PYTHON_PROBE = "command -v python3 && python3 -V 2>&1"


def _slot_python(kind: str, image: str | None = None) -> Finding:
    """Which python3 a slot of runtime `kind` (in `image`) gets: not always this shell's
    (bwrap hides $HOME, where pyenv and conda live; a container has its image's)."""
    what = f"python3 ({kind} slot)"
    try:
        runtime = make_runtime(RuntimeOptions(kind=kind, image=image))
        runtime.check()
        with tempfile.TemporaryDirectory(prefix="hpc-sandbox-check-") as workspace:
            argv, env = runtime.probe_command(Path(workspace), SLOT_PYTHON_PROBE)
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    except (RuntimeUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        return Finding(what, False, str(exc))
    lines = proc.stdout.split("\n")
    if proc.returncode != 0 or len(lines) < 2:
        return Finding(what, False, f"no python3 on the slot's PATH ({env.get('PATH', 'image default')}): "
                                    "the agent and most agent code need one")
    found, version = lines[0].strip(), lines[1].strip()
    mine = shutil.which("python3")
    note = f"; this shell's python3 is {mine}" if mine and Path(mine).resolve() != Path(found).resolve() else ""
    return Finding(what, True, f"{found} ({version}){note}")


def _command(name: str, purpose: str) -> Finding:
    path = shutil.which(name)
    return Finding(name, path is not None, f"{path} ({purpose})" if path else f"not on PATH ({purpose})")


def _state_dir(state: Path) -> Finding:
    try:
        state.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".check-"):
            pass
        return Finding("state dir", True, f"{state} is writable")
    except OSError as exc:
        return Finding("state dir", False, f"{state}: {exc.strerror}")


def _modal_package() -> Finding:
    import importlib.util

    spec = importlib.util.find_spec("modal")
    if spec is None:
        return Finding("modal package", False, "not installed (pip install 'hpc-sandbox[modal]'); needed for --overflow modal")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return Finding("modal package", True, f"modal {version('modal')}")
    except PackageNotFoundError:
        return Finding("modal package", True, f"modal at {spec.origin}")


def _modal() -> Finding:
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return Finding("modal credentials", True, "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET are set")
    config = Path(os.environ.get("MODAL_CONFIG_PATH", "~/.modal.toml")).expanduser()
    if config.is_file():
        return Finding("modal credentials", True, f"{config} exists")
    return Finding("modal credentials", False, "none (set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or run `modal setup`)")


def _preflight(scheduler: str, partition: str | None, profile: str | None, config_file: Path | None,
               state_dir: Path | None, timeout: float, as_json: bool) -> None:
    overrides: dict[str, object] = {"scheduler": scheduler, "partition": partition, "slots": 1, "nodes": 1,
                                    "array": CLEAR, "array_limit": CLEAR, "walltime": "00:05:00",
                                    "job_name": "hpc-sandbox-check", "state_dir": state_dir}
    spec = load_spec(profile=profile, config_file=config_file, overrides=overrides)

    def report(step: Step) -> None:
        if not as_json:
            click.echo(f"{'ok ' if step.ok else 'FAIL'} {step.name:<7} {step.detail}")

    steps = asyncio.run(run_preflight(spec, timeout, report))
    if as_json:
        click.echo(json.dumps([asdict(s) for s in steps], indent=2))
    if not all(s.ok for s in steps):
        raise SystemExit(1)


@click.command("check")
@click.option("--scheduler", type=click.Choice([s for s in SUBMIT_SCHEDULERS if s != "local"]), default=None,
              help="Also run a preflight: submit a tiny job, reach its node server from here with its token, "
                   "run a command, cancel it; each step reported.")
@click.option("--partition", default=None, help="Partition/queue for the preflight job.")
@click.option("--profile", default=None, help="Profile for the preflight job (runtime, image, ports...).")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A config file read after the site and user files.")
@click.option("--timeout", type=click.FloatRange(1), default=300.0, show_default=True,
              help="Seconds the preflight job may take to start.")
@click.option("--image", default=None,
              help="Also say which python3 an apptainer/singularity slot gets in this image.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_dir_option
def check(scheduler: str | None, partition: str | None, profile: str | None, config_file: Path | None,
          timeout: float, image: str | None, as_json: bool, state_dir: Path | None) -> None:
    """Say what this machine has: runtimes, schedulers, state dir, Modal credentials.

    With --scheduler, also prove that a job's node server is usable from here. Exit
    code 1 if a preflight step failed.
    """
    if scheduler:
        _preflight(scheduler, partition, profile, config_file, state_dir, timeout, as_json)
        return
    findings = [_runtime(kind) for kind in ("bwrap", "apptainer", "singularity")]
    # A slot's python3, where a runtime can run here (Apptainer needs an image to ask).
    contained = [kind for kind, found in zip(("bwrap", "apptainer", "singularity"), findings)
                 if found.ok and (kind == "bwrap" or image)]
    findings += [_slot_python(kind, image) for kind in contained]
    findings += [_command("sbatch", "Slurm"), _command("qsub", "PBS/Torque"), _command("nomad", "Nomad")]
    findings += [_state_dir(resolve_state_dir(state_dir)), _modal_package(), _modal()]
    if as_json:
        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
        return
    for finding in findings:
        click.echo(f"{'ok ' if finding.ok else '-- '} {finding.what:<20} {finding.detail}")
