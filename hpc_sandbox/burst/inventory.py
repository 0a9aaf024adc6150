"""The cloud sandboxes of hpc-sandbox as Modal lists them, and stopping them by hand:
what `hpc-sandbox cloud list|cleanup` shows and does. Apart from the source
(modal.py), which stops its own sandboxes itself; this is for what a crash left."""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import ConfigError
from ..cloudprofile import CloudProfile
from .owner import Owner
from .sdk import OWNER_TAG, POOL_TAG, PROFILE_TAG, VERSION_TAG, describe, import_sdk


@dataclass(frozen=True)
class LeftSandbox:
    """A sandbox of ours as Modal lists it."""

    id: str
    pool: str
    profile: str
    version: str
    owner: str
    owner_alive: bool | None  # None: on another host, cannot be told

    @property
    def status(self) -> str:
        return {True: "in use", False: "left behind", None: "owner on another host"}[self.owner_alive]


async def list_sandboxes(profile: CloudProfile, pool_id: str | None = None,
                         sdk: ModuleType | None = None) -> tuple[list[LeftSandbox], dict[str, Any]]:
    """Running sandboxes of hpc-sandbox in the profile's app (of one pool, or of all),
    and their SDK handles by id."""
    sdk = sdk or import_sdk()
    try:
        app = await sdk.App.lookup.aio(profile.app_name, create_if_missing=False)
    except Exception as exc:
        if type(exc).__name__ == "NotFoundError":
            return [], {}  # no app: nothing was ever started there
        raise ConfigError(f"cannot reach Modal: {describe(exc)}") from None
    found: list[LeftSandbox] = []
    handles: dict[str, Any] = {}
    async for handle in sdk.Sandbox.list.aio(app_id=app.app_id, tags={POOL_TAG: pool_id} if pool_id else None):
        tags = await handle.get_tags.aio()
        if POOL_TAG not in tags:
            continue  # in the same app, but not one of ours
        owner = Owner.parse(tags.get(OWNER_TAG, ""))
        found.append(LeftSandbox(handle.object_id, tags[POOL_TAG], tags.get(PROFILE_TAG, "?"),
                                 tags.get(VERSION_TAG, "?"), str(owner) if owner else "?",
                                 owner.alive() if owner else False))
        handles[handle.object_id] = handle
    return found, handles


async def cleanup(profile: CloudProfile, pool_id: str | None, *, include_live: bool = False,
                  sdk: ModuleType | None = None) -> list[LeftSandbox]:
    """Stop the sandboxes of `pool_id` (every pool's with None) whose pool is gone (its
    process on this host has exited); with `include_live`, also those of running pools
    and of pools on other hosts. Returns what was stopped."""
    found, handles = await list_sandboxes(profile, pool_id, sdk)
    # An owner on another host cannot be told alive or not: only --force stops its sandboxes.
    chosen = [s for s in found if include_live or s.owner_alive is False]
    for sandbox in chosen:
        await handles[sandbox.id].terminate.aio()
    return chosen


__all__ = ["LeftSandbox", "cleanup", "list_sandboxes"]
