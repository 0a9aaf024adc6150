"""Options and helpers shared by several commands."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..jobfolder import STATE_DIR_ENV, default_state_dir

state_dir_option = click.option(
    "--state-dir", type=click.Path(path_type=Path), envvar=STATE_DIR_ENV, default=None,
    help="State directory holding job folders [env HPC_SANDBOX_STATE_DIR; default ~/.hpc-sandbox].")


def resolve_state_dir(state_dir: Path | None) -> Path:
    return (state_dir or default_state_dir()).expanduser()


def interactive() -> bool:
    return sys.stderr.isatty()
