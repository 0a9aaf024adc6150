"""Profiles: where a SandboxSpec's values come from.

Layers, lowest precedence first (a later layer wins, key by key):

1. the site file: $HPC_SANDBOX_SITE_CONFIG, else /etc/hpc-sandbox/config.yaml
2. the user file: ~/.hpc-sandbox/config.yaml
3. the file given with --config
4. environment variables HPC_SANDBOX_<KEY> (HPC_SANDBOX_PARTITION=gpu)
5. command-line flags

A file holds named profiles whose keys are SandboxSpec's fields, one to one:

    profiles:
      default:
        scheduler: slurm
        partition: debug
        runtime: apptainer
        image: /shared/images/sandbox.sif
      gpu:
        partition: gpu
        gpus: 1

A profile does not inherit from another; YAML merge keys do that where wanted
(top-level keys starting with `x-` are ignored, a place for anchors):

    x-common: &common {runtime: apptainer, image: /shared/images/sandbox.sif}
    profiles:
      gpu: {<<: *common, gpus: 1}
 Every mistake names the file, the profile and the key: an unknown key
lists the valid ones, a wrong type says what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import cloudprofile as cloud  # plain dataclasses beside spec.py; no cloud SDK
from .errors import ConfigError, SpecError
from .spec import FIELD_KINDS, SandboxSpec, parse_port_range

log = logging.getLogger(__name__)

SITE_CONFIG = Path("/etc/hpc-sandbox/config.yaml")
SITE_CONFIG_ENV = "HPC_SANDBOX_SITE_CONFIG"
PROFILE_ENV = "HPC_SANDBOX_PROFILE"
ENV_PREFIX = "HPC_SANDBOX_"
USER_CONFIG_RELATIVE = Path(".hpc-sandbox") / "config.yaml"
TOP_LEVEL_KEYS = ("profiles", "cloud")
# `profile` is the spec's record of which profile made it: it names a profile, it is
# not a key inside one.
PROFILE_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SandboxSpec) if f.name != "profile")


class _Clear:
    """An override that removes a key set by a lower layer (back to SandboxSpec's default)."""

    def __repr__(self) -> str:
        return "CLEAR"


CLEAR = _Clear()



@dataclass
class _Layer:
    """Values from one source, and where each came from (for error messages)."""

    values: dict[str, object] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def update(self, other: "_Layer") -> None:
        self.values.update(other.values)
        self.origins.update(other.origins)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, PROFILE_KEYS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, where: str) -> ConfigError:
    return ConfigError(f"unknown key {key!r} in {where}{_suggest(key)}; valid keys: {', '.join(PROFILE_KEYS)}")


def _expected(origin: str, key: str, what: str, value: object) -> ConfigError:
    return ConfigError(f"{origin}: {key}: expected {what}, got {value!r}")


def coerce(key: str, value: object, origin: str, base: Path | None = None) -> object:
    """A YAML value for `key`, checked and converted to what SandboxSpec takes (how is
    read off the spec's own annotations: spec.FIELD_KINDS)."""
    kind = FIELD_KINDS[key]
    if value is None:
        if kind.optional:
            return None
        raise _expected(origin, key, "a value (this key cannot be empty)", value)
    if kind.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(origin, key, "an integer" + (" or null" if kind.optional else ""), value)
        return value
    if kind.type is bool:
        if not isinstance(value, bool):
            raise _expected(origin, key, "true or false", value)
        return value
    if kind.lines:
        if isinstance(value, str):
            return tuple(line for line in value.splitlines() if line.strip())  # a YAML block scalar
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise _expected(origin, key, "a list of strings (one line each)", value)
        return tuple(str(v) for v in value)
    if kind.type is tuple:  # the port range
        try:
            return parse_port_range(value)
        except SpecError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    if key in ("walltime", "mem", "slot_memory", "slot_disk") and isinstance(value, int) and not isinstance(value, bool):
        return value  # seconds (YAML reads 01:00:00 as 3600) / megabytes; the spec converts
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _expected(origin, key, "a string", value)
    if kind.type is Path:
        path = Path(str(value)).expanduser()
        if key == "template_dir" and base is not None and not path.is_absolute():
            path = base / path  # relative to the file that names it
        return path
    return str(value)


_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def coerce_env(key: str, text: str, origin: str) -> object:
    """An environment variable's string for `key`, checked and converted."""
    kind = FIELD_KINDS[key]
    if text == "" and kind.optional:
        return None
    if kind.type is int:
        try:
            return int(text)
        except ValueError:
            raise _expected(origin, key, "an integer", text) from None
    if kind.type is bool:
        if text.strip().lower() not in _BOOLEANS:
            raise _expected(origin, key, f"one of {', '.join(_BOOLEANS)}", text)
        return _BOOLEANS[text.strip().lower()]
    if kind.lines:
        if text.lstrip().startswith("["):
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{origin}: {key}: not a valid YAML list: {exc}") from None
            return coerce(key, parsed, origin)
        return tuple(line for line in text.splitlines() if line.strip())
    return coerce(key, text, origin)


# --- files ------------------------------------------------------------------------------


def _read_file(path: Path) -> dict:
    """A config file's top level, checked: `profiles`, `cloud`, and `x-` anchors."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'profiles' key, got {type(data).__name__}")
    for key in data:
        if str(key).startswith("x-"):
            continue  # a place for YAML anchors (`x-common: &common`), as in docker-compose files
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown top-level key {key!r} in {path}; valid: {', '.join(TOP_LEVEL_KEYS)}")
    return data


def _sections(path: Path, data: dict, key: str) -> dict[str, dict]:
    """The named mappings under `key` (profiles, or cloud profiles), YAML merges applied."""
    named = data.get(key) or {}
    if not isinstance(named, dict):
        raise ConfigError(f"{path}: {key!r} must map profile names to settings, got {type(named).__name__}")
    out: dict[str, dict] = {}
    for name, settings in named.items():
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            where = f"{path} {'profile' if key == 'profiles' else 'cloud profile'} {name!r}"
            raise ConfigError(f"{where}: expected a mapping of keys to values, got {settings!r}")
        out[str(name)] = {k: v for k, v in settings.items() if k != "<<"}  # PyYAML has merged `<<` already
    return out


def read_profiles(path: Path) -> dict[str, dict[str, object]]:
    """The profiles of one config file, validated key by key (values coerced)."""
    out: dict[str, dict[str, object]] = {}
    for name, settings in _sections(path, _read_file(path), "profiles").items():
        where = f"{path} profile {name!r}"
        values = {}
        for key, value in settings.items():
            if key not in PROFILE_KEYS:
                raise _unknown_key(str(key), where)
            values[key] = coerce(key, value, where, base=path.parent)
        out[name] = values
    return out


def read_cloud_profiles(path: Path) -> dict[str, dict[str, object]]:
    """The cloud profiles (`cloud:`) of one config file, validated key by key."""
    return {name: {key: cloud.coerce(str(key), value, f"{path} cloud profile {name!r}")
                   for key, value in settings.items()}
            for name, settings in _sections(path, _read_file(path), "cloud").items()}


def profile_names(path: Path) -> list[str]:
    return list(read_profiles(path))


def site_config_path(environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The site file and whether it was named explicitly (then it must exist)."""
    named = environ.get(SITE_CONFIG_ENV)
    return (Path(named).expanduser(), True) if named else (SITE_CONFIG, False)


def user_config_path(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME") or os.path.expanduser("~")
    return Path(home) / USER_CONFIG_RELATIVE


def _env_layer(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for key in PROFILE_KEYS:
        name = ENV_PREFIX + key.upper()
        if name in environ:
            origin = f"environment variable {name}"
            layer.values[key] = coerce_env(key, environ[name], origin)
            layer.origins[key] = origin
    return layer


# --- the spec ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedSpec:
    spec: SandboxSpec
    files: tuple[Path, ...]  # the config files that were read, lowest precedence first


def load(profile: str | None = None, config_file: Path | None = None,
         overrides: Mapping[str, object] | None = None, *, environ: Mapping[str, str] | None = None,
         isolated: bool = False) -> LoadedSpec:
    """Build the spec for `profile` from every layer; see the module docstring.

    `overrides` are the command line's values (None means "not given", CLEAR means
    "drop what a lower layer set", e.g. a profile's array when --nodes is given). `isolated`
    reads only `config_file` and `overrides` (no site/user file, no environment):
    for reproducible renderings such as jobspecs/.
    """
    environ = os.environ if environ is None else environ
    name = profile or (None if isolated else environ.get(PROFILE_ENV)) or "default"
    files: list[tuple[Path, bool]] = []
    if not isolated:
        files.append(site_config_path(environ))
        files.append((user_config_path(environ), False))
    if config_file is not None:
        files.append((Path(config_file).expanduser(), True))

    merged = _Layer()
    read: list[Path] = []
    defined: dict[str, list[Path]] = {}
    for path, required in files:
        if not path.is_file():
            if required:
                raise ConfigError(f"config file {path} does not exist")
            log.debug("no config file at %s", path)
            continue
        profiles = read_profiles(path)
        read.append(path)
        for known in profiles:
            defined.setdefault(known, []).append(path)
        if name in profiles:
            origin = f"{path} profile {name!r}"
            merged.update(_Layer(dict(profiles[name]), {k: origin for k in profiles[name]}))
    if name != "default" and name not in defined:
        where = ", ".join(str(p) for p in read) or "no config file (none was found)"
        known = ", ".join(sorted(defined)) or "none"
        raise ConfigError(f"profile {name!r} is not defined in {where}; defined profiles: {known}")
    if not isolated:
        merged.update(_env_layer(environ))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in PROFILE_KEYS:
            raise ConfigError(f"unknown setting {key!r}; valid keys: {', '.join(PROFILE_KEYS)}")
        if value is CLEAR:
            merged.values.pop(key, None)
            merged.origins.pop(key, None)
            continue
        merged.values[key] = value
        merged.origins[key] = "the command line"
    try:
        spec = SandboxSpec(profile=name, **merged.values)  # type: ignore[arg-type]
    except SpecError as exc:
        origin = merged.origins.get(exc.field)
        raise ConfigError(f"{origin}: {exc}" if origin else f"profile {name!r}: {exc}") from None
    log.debug("profile %r from %s", name, ", ".join(str(p) for p in read) or "built-in defaults")
    return LoadedSpec(spec, tuple(read))


def load_spec(profile: str | None = None, config_file: Path | None = None,
              overrides: Mapping[str, object] | None = None, *, environ: Mapping[str, str] | None = None,
              isolated: bool = False) -> SandboxSpec:
    """The SandboxSpec for `profile`; what `render` and `submit` build their job from."""
    return load(profile, config_file, overrides, environ=environ, isolated=isolated).spec


def load_cloud_profile(name: str | None = None, *, cluster_profile: str | None = None,
                       config_file: Path | None = None, overrides: Mapping[str, object] | None = None,
                       environ: Mapping[str, str] | None = None) -> cloud.CloudProfile:
    """The cloud profile `name`, else the one cluster profile `cluster_profile` names
    (its `cloud` key), else "default"; layers as in cloudprofile.py's docstring."""
    environ = os.environ if environ is None else environ
    if name is None:
        name = load_spec(profile=cluster_profile, config_file=config_file, environ=environ).cloud or "default"
    files = [site_config_path(environ), (user_config_path(environ), False)]
    if config_file is not None:
        files.append((Path(config_file).expanduser(), True))
    values, origins = cloud.from_environment(name, environ, older_names=True)
    defined: dict[str, list[Path]] = {}
    for path, required in files:
        if not path.is_file():
            if required:
                raise ConfigError(f"config file {path} does not exist")
            continue
        for known, settings in read_cloud_profiles(path).items():
            defined.setdefault(known, []).append(path)
            if known == name:
                values.update(settings)
                origins.update({key: f"{path} cloud profile {name!r}" for key in settings})
    mine, where = cloud.from_environment(name, environ)
    if name != "default" and name not in defined and not origins and not mine:
        known = ", ".join(sorted(defined)) or "none"
        raise ConfigError(f"cloud profile {name!r} is not defined (under `cloud:` in a config file); "
                          f"defined cloud profiles: {known}")
    values.update(mine)
    origins.update(where)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = cloud.coerce(key, value, "the command line")
            origins[key] = "the command line"
    return cloud.build(name, values, origins)
