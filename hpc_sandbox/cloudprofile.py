"""CloudProfile: what one kind of cloud sandbox is, and when a pool bursts to it.

A cloud profile lives in the same YAML files as the cluster profiles, under `cloud:`,
and a cluster profile names its counterpart with `cloud: NAME`:

    profiles:
      default: {scheduler: slurm, partition: debug, cloud: cpu}
    cloud:
      cpu:
        image: python:3.11-slim
        cpu: 2
        memory: 4G
        slots_per_sandbox: 4
        burst_after: 30
        max_cloud_slots: 64
        cost_per_hour: 0.12

Keys are the fields below, one to one (as for SandboxSpec). Layers, lowest precedence
first: the older ATROPOS_MODAL_PROFILE_<NAME>_<KEY> and ATROPOS_MODAL_<KEY> variables
(IMAGE, GPU, CPU, MEMORY, SLOTS_PER_SANDBOX, MAX_SANDBOXES, IDLE_TIMEOUT, MAX_LIFETIME,
SECRETS, ENV_VARS, APP_NAME: a setup made for those keeps working), the site file, the user
file, --config, HPC_SANDBOX_MODAL_<KEY> variables, then arguments.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import ConfigError, SpecError
from .spec import NAME, parse_size_mb

PROVIDERS = ("modal",)
CLOUD_RUNTIMES = ("none", "bwrap")  # what a sandbox's slots can run in (no apptainer inside a container)
MAX_LIFETIME = 24 * 3600  # Modal's longest sandbox lifetime
ENV_PREFIX = "HPC_SANDBOX_MODAL_"
SEED_PREFIX = "ATROPOS_MODAL_"


@dataclass(frozen=True)
class CloudProfile:
    name: str = "default"
    provider: str = "modal"
    # The Modal app the sandboxes belong to (created when missing).
    app_name: str = "hpc-sandbox"
    # A registry image; `add_python` installs a Python (e.g. "3.11") into one that has none.
    image: str = "python:3.11-slim"
    add_python: str | None = None
    gpu: str | None = None  # a Modal GPU type: "T4", "A10G", "A100", "H100", "L4:2", ...
    cpu: float | None = None  # cores; None: Modal's default
    memory: int | None = None  # MiB (sizes like 4G are accepted in files); None: Modal's default
    region: str | None = None
    # A sandbox's longest life (seconds) and Modal's own idle reaper: both hold even when
    # the pool that made it is killed, so a sandbox cannot leak for long.
    timeout: int = 3600
    # Modal counts a request through the tunnel as activity, not a lease held quietly:
    # keep this longer than a caller may hold a cloud slot between two calls.
    idle_timeout: int = 900
    # Names of Modal Secrets: their variables are set in the sandbox. Slots start from a
    # clean environment, as on the cluster: they get `env`, and of the sandbox's own
    # variables (a Secret's) those named in `pass_env`.
    secrets: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = ()
    runtime: str = "none"  # how slots of one sandbox are kept apart: none shares its filesystem
    port: int = 8000  # the node server's port inside the sandbox
    slots_per_sandbox: int = 4
    # The overflow policy: a caller waits this long for the cluster before the cloud is
    # asked (at once when the cluster has nothing that is expected to free up sooner).
    burst_after: float = 30.0
    max_cloud_slots: int = 64
    cloud_idle_timeout: float = 120.0  # a sandbox none of whose slots was used this long is stopped
    max_creates_per_second: float = 4.0
    max_creates_in_flight: int = 16
    cost_per_hour: float | None = None  # per sandbox, for the pool's cost estimate
    # Adopt this pool's sandboxes that a crashed run left (after a health check with the
    # pool's token) instead of stopping them.
    recover: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "secrets", tuple(self.secrets))
        object.__setattr__(self, "pass_env", tuple(self.pass_env))
        object.__setattr__(self, "env", dict(self.env))
        if isinstance(self.memory, str):
            object.__setattr__(self, "memory", parse_size_mb(self.memory, "memory"))
        self.validate()

    def validate(self) -> None:
        if not NAME.fullmatch(self.name):
            raise SpecError("name", f"{self.name!r} must be 1-63 of letters, digits, '.', '_', '-'")
        if not NAME.fullmatch(self.app_name):
            raise SpecError("app_name", f"{self.app_name!r} must be 1-63 of letters, digits, '.', '_', '-'")
        if self.provider not in PROVIDERS:
            raise SpecError("provider", f"{self.provider!r} is not one of {', '.join(PROVIDERS)}")
        if self.runtime not in CLOUD_RUNTIMES:
            raise SpecError("runtime", f"{self.runtime!r} is not one of {', '.join(CLOUD_RUNTIMES)} "
                                       "(a cloud sandbox is a container already)")
        if not 1 <= self.timeout <= MAX_LIFETIME:
            raise SpecError("timeout", f"must be 1-{MAX_LIFETIME} seconds (Modal's limit), got {self.timeout}")
        if self.idle_timeout < 1:
            raise SpecError("idle_timeout", f"must be at least 1 second, got {self.idle_timeout}")
        if not 1 <= self.slots_per_sandbox <= 4096:
            raise SpecError("slots_per_sandbox", f"must be 1-4096, got {self.slots_per_sandbox}")
        if self.max_cloud_slots < 0:
            raise SpecError("max_cloud_slots", f"must be 0 (no cloud) or more, got {self.max_cloud_slots}")
        if self.burst_after < 0:
            raise SpecError("burst_after", f"must be 0 or more seconds, got {self.burst_after}")
        if self.cloud_idle_timeout <= 0:
            raise SpecError("cloud_idle_timeout", f"must be more than 0 seconds, got {self.cloud_idle_timeout}")
        if self.max_creates_per_second <= 0 or self.max_creates_in_flight < 1:
            raise SpecError("max_creates_per_second", "must be > 0 (and max_creates_in_flight >= 1)")
        if self.cpu is not None and self.cpu <= 0:
            raise SpecError("cpu", f"must be > 0, got {self.cpu}")
        if self.memory is not None and self.memory < 1:
            raise SpecError("memory", f"must be at least 1 MiB, got {self.memory}")
        if not 1024 <= self.port <= 65535:
            raise SpecError("port", f"must be 1024-65535, got {self.port}")
        for key in self.env:
            if not key or "=" in key or "," in key:
                raise SpecError("env", f"{key!r} is not an environment variable name")
        for key in self.pass_env:
            if not key or "=" in key or "," in key:
                raise SpecError("pass_env", f"{key!r} is not an environment variable name")

    @property
    def max_sandboxes(self) -> int:
        return math.ceil(self.max_cloud_slots / self.slots_per_sandbox)

    def replace(self, **changes: object) -> "CloudProfile":
        return dataclasses.replace(self, **changes)


KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(CloudProfile) if f.name != "name")
_HINTS = typing.get_type_hints(CloudProfile)


def _kind(key: str) -> type:
    """The plain type a key holds (int, float, str, bool, tuple or dict), optional or not."""
    hint = _HINTS[key]
    if type(None) in typing.get_args(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint) or hint
    return dict if origin in (dict, collections.abc.Mapping) else origin


_OPTIONAL = frozenset(key for key in KEYS if type(None) in typing.get_args(_HINTS[key]))


def coerce(key: str, value: object, origin: str) -> object:
    """A YAML value for `key`, checked and converted; errors name where it came from."""
    if key not in KEYS:
        close = difflib.get_close_matches(key, KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{origin}: unknown key {key!r}{hint}; valid keys: {', '.join(KEYS)}")
    kind = _kind(key)

    def wrong(what: str) -> ConfigError:
        return ConfigError(f"{origin}: {key}: expected {what}, got {value!r}")

    if value is None:
        if key in _OPTIONAL:
            return None
        raise wrong("a value (this key cannot be empty)")
    if key == "memory" and isinstance(value, str):
        try:
            return parse_size_mb(value, "memory")
        except SpecError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        return float(value)
    if kind is tuple:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of names")
        return tuple(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping of names to values")
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise wrong("a string")
    return str(value)


# The older variable names, and how their values map onto our keys.
_SEED_KEYS = {"IMAGE": "image", "GPU": "gpu", "CPU": "cpu", "MEMORY": "memory",
              "SLOTS_PER_SANDBOX": "slots_per_sandbox", "IDLE_TIMEOUT": "idle_timeout",
              "MAX_LIFETIME": "timeout", "SECRETS": "secrets", "ENV_VARS": "env", "APP_NAME": "app_name"}


def _from_text(key: str, text: str, origin: str) -> object:
    kind = _kind(key)
    if text == "" and key in _OPTIONAL:
        return None
    try:
        if kind is int and key != "memory":
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"{origin}: expected a number, got {text!r}") from None
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{origin}: expected true or false, got {text!r}")
        return lowered in ("true", "1", "yes")
    if kind is dict:  # KEY=VALUE;KEY=VALUE, as the older variables had it
        pairs = (p.partition("=") for p in text.split(";") if p.strip())
        return {k.strip(): v.strip() for k, sep, v in pairs if sep}
    return coerce(key, text, origin)


def from_environment(name: str, environ: Mapping[str, str], *, older_names: bool = False
                     ) -> tuple[dict[str, object], dict[str, str]]:
    """Settings for cloud profile `name` from HPC_SANDBOX_MODAL_<KEY> variables (or, with
    `older_names`, from the ATROPOS_MODAL_* ones), and where each came from."""
    values: dict[str, object] = {}
    origins: dict[str, str] = {}
    if not older_names:
        for key in KEYS:
            variable = ENV_PREFIX + key.upper()
            if variable in environ:
                origin = f"environment variable {variable}"
                values[key], origins[key] = _from_text(key, environ[variable], origin), origin
        return values, origins
    seed_profile = f"{SEED_PREFIX}PROFILE_{name.upper().replace('-', '_').replace('.', '_')}_"
    for seed_key, key in _SEED_KEYS.items():
        for variable in (seed_profile + seed_key, SEED_PREFIX + seed_key):  # the profile's own first
            if variable in environ:
                origin = f"environment variable {variable}"
                values[key], origins[key] = _from_text(key, environ[variable], origin), origin
                break
    for variable in (seed_profile + "MAX_SANDBOXES", SEED_PREFIX + "MAX_SANDBOXES"):
        if variable in environ:  # counted in sandboxes there, in slots here
            origin = f"environment variable {variable}"
            sandboxes = _from_text("max_cloud_slots", environ[variable], origin)
            # Counted in sandboxes there, in slots here: converted in build(), once every
            # layer has said what slots_per_sandbox is.
            values["max_sandboxes"], origins["max_cloud_slots"] = int(sandboxes), origin  # type: ignore[arg-type]
            break
    return values, origins


def build(name: str, values: Mapping[str, object], origins: Mapping[str, str]) -> CloudProfile:
    values = dict(values)
    sandboxes = values.pop("max_sandboxes", None)
    if sandboxes is not None and "max_cloud_slots" not in values:
        values["max_cloud_slots"] = int(sandboxes) * int(values.get("slots_per_sandbox",  # type: ignore[call-overload]
                                                                    CloudProfile.slots_per_sandbox))
    try:
        return CloudProfile(name=name, **values)  # type: ignore[arg-type]
    except SpecError as exc:
        origin = origins.get(exc.field)
        raise ConfigError(f"{origin}: {exc}" if origin else f"cloud profile {name!r}: {exc}") from None
