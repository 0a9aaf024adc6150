"""Per-profile settings of the Atropos face: `ModalSandboxConfig`-like objects (or dicts
with its field names) mapped onto hpc-sandbox profiles.

A profile of `with_profiles(profiles={name: settings})` is submitted as the config
profile of the same name (or `profile`), with these overrides of its SandboxSpec:

    image                -> image (a container runtime runs it; bwrap/none run the node's own
                            files: there the image is ignored with a warning)
    cpu                  -> cpus_per_node (rounded up; a Modal sandbox is our node server)
    memory (MB)          -> mem ("<N>M" for the node server's whole allocation)
    gpu ("A100", "T4:2") -> gpus (the count; the model is the partition's business, warned)
    slots_per_sandbox    -> slots (per node server)
    max_lifetime (s)     -> walltime
    acquire_timeout_s    -> this profile's acquire timeout
    execution_timeout_s  -> this profile's default per-call timeout
    any SandboxSpec field (scheduler, runtime, network, slot_memory, state_dir, ...) as is.

Ignored with a warning (they size or place Modal sandboxes, which a job does not have):
min_sandboxes, max_sandboxes, idle_timeout, workspace_base, app_name. Refused
(ConfigError), because a command would then run without what it counts on: non-empty
`secrets` (Modal Secret names) and `env_vars`.

An object's attributes equal to ModalSandboxConfig's defaults count as not given
(python:3.11, 1 cpu, 2048 MB, 10 slots, 30 s, ...): a config built with
`ModalSandboxConfig(name="gpu", gpu="T4")` overrides the gpu count alone, and the rest
comes from the hpc-sandbox profile. A dict says exactly what it sets.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..spec import SandboxSpec

log = logging.getLogger(__name__)

# ModalSandboxConfig's defaults: an object's field left at one of these is "not given".
MODAL_DEFAULTS: dict[str, Any] = {
    "name": "default", "app_name": None, "image": "python:3.11", "gpu": None, "cpu": 1.0, "memory": 2048,
    "slots_per_sandbox": 10, "min_sandboxes": 1, "max_sandboxes": 5, "idle_timeout": 120, "max_lifetime": 3600,
    "acquire_timeout_s": 60.0, "execution_timeout_s": 30.0, "secrets": [], "env_vars": {}, "workspace_base": "/data"}
IGNORED = ("min_sandboxes", "max_sandboxes", "idle_timeout", "workspace_base", "app_name")
SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(SandboxSpec))
CONTAINER_RUNTIMES = ("apptainer", "singularity")


@dataclass
class ProfileSettings:
    """One profile's settings in hpc-sandbox's terms."""

    config_profile: str
    named: bool = False  # config_profile named by a `profile` key, not taken from the profile's name
    overrides: dict[str, Any] = field(default_factory=dict)  # SandboxSpec fields
    acquire_timeout: float | None = None
    execution_timeout: float | None = None
    shown: dict[str, Any] = field(default_factory=dict)  # what list_profiles() says of it


def profile_settings(settings: Any) -> dict[str, Any]:
    """The settings as a dict of what was given (see the module's docstring)."""
    if isinstance(settings, Mapping):
        return dict(settings)
    if dataclasses.is_dataclass(settings):
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    else:
        values = {key: value for key, value in vars(settings).items() if not key.startswith("_")}
    return {key: value for key, value in values.items()
            if not (key in MODAL_DEFAULTS and value == MODAL_DEFAULTS[key])}


def _walltime(seconds: float) -> str:
    total = max(60, int(math.ceil(seconds)))
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _gpus(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    model, _, count = str(value).partition(":")
    log.warning("profile %s: gpu %r: asking for %s GPU(s); the model (%s) is chosen by the profile's partition, "
                "not here", name, value, count or 1, model)
    try:
        return int(count or 1)
    except ValueError:
        raise ConfigError(f"profile {name!r}: gpu {value!r} is not MODEL or MODEL:COUNT") from None


def settings_of(name: str, settings: Any, named: str | None = None) -> ProfileSettings:
    """A profile's settings from a ModalSandboxConfig-like object or a dict (None: none);
    `named`: the config profile, named by the caller (else the `profile` key, else `name`)."""
    given = profile_settings(settings) if settings is not None else {}
    given.pop("name", None)
    chosen = named if named is not None else given.pop("profile", None)
    found = ProfileSettings(config_profile=str(chosen or name), named=chosen is not None)
    for key in ("secrets", "env_vars"):
        if given.pop(key, None):
            raise ConfigError(f"profile {name!r}: {key} cannot be passed to hpc-sandbox slots; set them in the "
                              "command, or in the profile's setup_lines for the node server")
    for key in IGNORED:
        if key in given:
            log.warning("profile %s: %s=%r ignored (it sizes Modal sandboxes; a job's size comes from its profile: "
                        "nodes, array, slots)", name, key, given.pop(key))
    mapped = {"image": "image", "slots_per_sandbox": "slots"}
    for key, spec_key in mapped.items():
        if key in given:
            found.overrides[spec_key] = given.pop(key)
    if "cpu" in given:
        found.overrides["cpus_per_node"] = int(math.ceil(float(given.pop("cpu"))))
    if "memory" in given:
        found.overrides["mem"] = f"{int(given.pop('memory'))}M"
    if "gpu" in given:
        gpu = given.pop("gpu")
        found.overrides["gpus"] = _gpus(gpu, name) if gpu else 0
    if "max_lifetime" in given:
        found.overrides["walltime"] = _walltime(float(given.pop("max_lifetime")))
    if "acquire_timeout_s" in given:
        found.acquire_timeout = float(given.pop("acquire_timeout_s"))
    if "execution_timeout_s" in given:
        found.execution_timeout = float(given.pop("execution_timeout_s"))
    unknown = sorted(set(given) - SPEC_FIELDS)
    if unknown:
        raise ConfigError(f"profile {name!r}: unknown settings {', '.join(unknown)} (ModalSandboxConfig fields or "
                          "SandboxSpec fields)")
    found.overrides.update(given)
    found.shown = {"image": found.overrides.get("image"), "gpu": found.overrides.get("gpus", 0),
                   "cpu": found.overrides.get("cpus_per_node"), "memory": found.overrides.get("mem"),
                   "slots": found.overrides.get("slots"), "runtime": found.overrides.get("runtime"),
                   "network": found.overrides.get("network"), "config_profile": found.config_profile,
                   "execution_timeout_s": found.execution_timeout, "acquire_timeout_s": found.acquire_timeout}
    return found


def check_image(name: str, spec: SandboxSpec) -> SandboxSpec:
    """A spec whose image its runtime cannot run: the image dropped, with a warning."""
    if spec.image is not None and spec.runtime not in CONTAINER_RUNTIMES:
        log.warning("profile %s: image %r ignored: runtime %s runs the node's own files (use runtime apptainer "
                    "or singularity to run an image)", name, spec.image, spec.runtime)
        return dataclasses.replace(spec, image=None)
    return spec


def read_profiles_file(path: str | Path) -> dict[str, Any]:
    import yaml  # a dependency of the config already

    data = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    found = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(found, dict) or not found:
        raise ConfigError(f"{path}: expected a mapping `profiles: {{name: {{image: ..., ...}}}}`")
    return found


def pool_status(entry: Any, held: list[Any]) -> dict[str, Any]:
    """A started profile's status as known without asking a node server: slots on node
    servers up (total_slots), those not held by this backend (available_slots: other
    clients of the same jobs may hold some), node servers (healthy_sandboxes: those up as
    the profile started, or holding its slots now), held, pending servers, jobs."""
    outlooks = [source.outlook() for source in entry.pool.sources]
    total = sum(o.slots for o in outlooks)
    servers = len({lease.endpoint.url for lease in held if lease is not None})
    jobs = [job.id for job in ([entry.job] if entry.job else []) + list(entry.pool.jobs)]
    return {"total_slots": total, "available_slots": max(0, total - len(held)), "held": len(held),
            "healthy_sandboxes": max(servers, entry.servers),
            "pending_servers": sum(len(o.pending) for o in outlooks),
            "jobs": list(dict.fromkeys(jobs))}


@dataclass
class Life:
    """Shared with the finalizer, which must not hold the backend itself."""

    running: bool = False


def warn_unstopped(pools: Any, life: Life) -> None:
    jobs = [job.id for job in pools.jobs]
    if life.running and jobs:
        message = (f"an Atropos backend was garbage-collected without stop(): its jobs {', '.join(jobs)} still run "
                   f"(use `async with backend:` or stop(purge=True); `hpc-sandbox cancel JOB` ends them)")
        log.warning(message)
        warnings.warn(message, ResourceWarning, stacklevel=2)
