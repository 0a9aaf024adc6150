"""`hpc-sandbox check`: what this machine has for running slots."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from ..errors import RuntimeUnavailable
from ..runtime import RuntimeOptions, make_runtime
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


def _modal() -> Finding:
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return Finding("modal credentials", True, "MODAL_TOKEN_ID/MODAL_TOKEN_SECRET are set")
    config = Path(os.environ.get("MODAL_CONFIG_PATH", "~/.modal.toml")).expanduser()
    if config.is_file():
        return Finding("modal credentials", True, f"{config} exists")
    return Finding("modal credentials", False, "none (set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or run `modal setup`)")


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_dir_option
def check(as_json: bool, state_dir: Path | None) -> None:
    """Say what this machine has: runtimes, schedulers, state dir, Modal credentials."""
    findings = [_runtime(kind) for kind in ("bwrap", "apptainer", "singularity")]
    findings += [_command("sbatch", "Slurm"), _command("qsub", "PBS/Torque"), _command("nomad", "Nomad")]
    findings += [_state_dir(resolve_state_dir(state_dir)), _modal()]
    if as_json:
        click.echo(json.dumps([asdict(f) for f in findings], indent=2))
        return
    for finding in findings:
        click.echo(f"{'ok ' if finding.ok else '-- '} {finding.what:<20} {finding.detail}")
