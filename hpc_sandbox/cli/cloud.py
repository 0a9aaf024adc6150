"""`hpc-sandbox cloud list|cleanup`: the cloud sandboxes pools have started, by hand."""
from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import click

from ..config import load_cloud_profile
from ..errors import HpcSandboxError
from .common import resolve_state_dir, state_dir_option

_profile_options = [
    click.option("--cloud-profile", default=None,
                 help="Cloud profile (under `cloud:` in the config) [default: the one --profile names, else 'default']."),
    click.option("--profile", default=None, help="Cluster profile whose `cloud` key names the cloud profile."),
    click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                 help="An extra config file (above the site and user files; HPC_SANDBOX_MODAL_* variables win)."),
]


def _with_profile_options(command):
    for option in reversed(_profile_options):
        command = option(command)
    return command


@click.group("cloud")
def cloud() -> None:
    """Cloud sandboxes started by pools that burst to Modal.

    Every sandbox is tagged with its pool and the process that runs that pool; a pool
    stops its own when it stops, when they are idle, and at its next start if a crash
    left any. These commands show and stop them by hand.
    """


@cloud.command("list")
@_with_profile_options
@click.option("--all-pools", is_flag=True, help="Every pool's sandboxes in the app, not only this pool's.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@state_dir_option
def list_(cloud_profile: str | None, profile: str | None, config_file: Path | None, all_pools: bool, as_json: bool,
          state_dir: Path | None) -> None:
    """Show running sandboxes: id, pool, profile, owner, and whether the owner still runs."""
    from ..burst.inventory import list_sandboxes
    from ..burst.sdk import default_pool_id

    cloud = load_cloud_profile(cloud_profile, cluster_profile=profile, config_file=config_file)
    pool_id = None if all_pools else default_pool_id(resolve_state_dir(state_dir), cloud.name)
    found, _ = asyncio.run(list_sandboxes(cloud, pool_id))
    if as_json:
        click.echo(json.dumps([{**asdict(s), "status": s.status} for s in found], indent=2))
        return
    if not found:
        which = "any pool" if all_pools else f"pool {pool_id}"
        click.echo(f"No running sandboxes of {which} in Modal app {cloud.app_name}.")
        return
    for s in found:
        click.echo(f"{s.id}  pool {s.pool}  profile {s.profile}  v{s.version}  owner {s.owner}  {s.status}")


@cloud.command("cleanup")
@_with_profile_options
@click.option("--all-pools", is_flag=True, help="Every pool's sandboxes in the app, not only this pool's.")
@click.option("--force", is_flag=True,
              help="Also stop sandboxes whose pool still runs, or runs on another host (it cannot be told).")
@state_dir_option
def cleanup(cloud_profile: str | None, profile: str | None, config_file: Path | None, all_pools: bool, force: bool,
            state_dir: Path | None) -> None:
    """Stop sandboxes whose pool is gone (this pool's, or with --all-pools every pool's)."""
    from ..burst.inventory import cleanup as stop_sandboxes
    from ..burst.sdk import default_pool_id

    cloud = load_cloud_profile(cloud_profile, cluster_profile=profile, config_file=config_file)
    state = resolve_state_dir(state_dir)
    pool_id = None if all_pools else default_pool_id(state, cloud.name)
    stopped = asyncio.run(stop_sandboxes(cloud, pool_id, include_live=force))
    _forget_dead_pools(state, pool_id)
    for s in stopped:
        click.echo(f"stopped {s.id}  pool {s.pool}  owner {s.owner}  ({s.status})")
    click.echo(f"{len(stopped)} sandbox{'es' if len(stopped) != 1 else ''} stopped.")


def _forget_dead_pools(state: Path, pool_id: str | None) -> None:
    """Drop the state files of pools whose process is gone (their sandboxes were just
    stopped): `hpc-sandbox status` stops listing them."""
    from ..burst.owner import Owner
    from ..jobfolder import list_pools

    for folder in list_pools(state):
        if pool_id is not None and folder.pool_id != pool_id:
            continue
        for path in folder.state_files():
            try:
                owner = Owner.parse(folder.read(path).owner)
            except HpcSandboxError:
                continue
            if owner is not None and owner.alive() is False:
                path.unlink(missing_ok=True)
