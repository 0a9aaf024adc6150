"""SandboxSpec: everything a jobspec (or the local scheduler) needs to start node servers.

One spec renders to every scheduler. Validation happens here, once, and names the
field that is wrong, so neither templates nor schedulers have to second-guess it.
Values are normalised on the way in (lists become tuples, strings become paths,
"9100-9163" becomes a port tuple, a walltime in seconds becomes HH:MM:SS) so that a
spec built from YAML, the environment or Python is the same spec.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError
from .jobfolder import default_state_dir
from .runtime import NETWORK_MODES, RUNTIMES as _RUNTIME_CLASSES

RUNTIMES = tuple(_RUNTIME_CLASSES)
GPU_RUNTIMES = tuple(name for name, cls in _RUNTIME_CLASSES.items() if cls.passes_gpus)
# Every scheduler a profile may name; schedulers/ says which of them can submit today,
# jobspec.py which have a template.
SCHEDULERS = ("local", "slurm", "pbs", "nomad")
PBS_DIALECTS = ("torque", "pbspro")
NOMAD_TYPES = ("batch", "service")
DEFAULT_PORT_RANGE = (9100, 9163)
# Ports below 1024 need root; a node server never runs as root on a cluster.
MIN_PORT = 1024
# Slurm's `--signal` takes at most 65535 seconds.
MAX_SIGNAL_SECONDS = 65535

# Every pattern below is used with fullmatch: `$` with match() lets a final "\n"
# through, and a newline in a value written into a jobspec starts a line of its own.
# Job names, job keys (ids) and profile names: safe as a file name and in a directive.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Partition, account, QoS and interface names go into directive lines unquoted, so
# they are held to the characters schedulers use for names (comma: partition lists).
_SITE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,+@:-]{0,127}")
_WALLTIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<hours>\d+):(?P<minutes>[0-5]\d):(?P<seconds>[0-5]\d)")
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMGT]?)(?:i?B)?", re.IGNORECASE)
_SIZE_FACTOR_MB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}
# Control characters, and the Unicode line breaks that some tools (Python's splitlines,
# editors) treat as a new line: none may appear inside one line of a jobspec.
_CONTROL = re.compile("[\x00-\x1f\x7f\x85\u2028\u2029]")


def parse_walltime(value: str) -> int:
    """Seconds in a `[D-]HH:MM:SS` walltime; SpecError('walltime') when malformed."""
    match = _WALLTIME.fullmatch(value)
    if not match:
        raise SpecError("walltime", f"{value!r} is not HH:MM:SS or D-HH:MM:SS (e.g. 01:30:00, 2-00:00:00)")
    days = int(match["days"] or 0)
    hours = int(match["hours"])
    if match["days"] is not None and hours > 23:
        raise SpecError("walltime", f"{value!r}: with a day count, hours must be 0-23")
    seconds = ((days * 24 + hours) * 60 + int(match["minutes"])) * 60 + int(match["seconds"])
    if seconds <= 0:
        raise SpecError("walltime", f"{value!r} must be longer than zero")
    return seconds


def format_hms(seconds: int) -> str:
    """HH:MM:SS with as many hour digits as needed (PBS and Slurm both accept it)."""
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def parse_size_mb(value: str | int, field: str = "mem") -> int:
    """Whole MB (MiB) in a size: 16G, 16GB, 1.5g, 512MiB, 800K, 1T, or a bare number of
    MB; SpecError(field) otherwise. The job's memory and the slot limits read sizes so."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SpecError(field, f"{value!r} is not a size like 512M, 16G, 16GB or 1T (a bare number means MB)")
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise SpecError(field, f"{value!r} is not a size like 512M, 16G, 16GB or 1T (a bare number means MB)")
    mb = float(match["number"]) * _SIZE_FACTOR_MB[match["unit"].upper()]
    if mb <= 0:
        raise SpecError(field, f"{value!r} is less than 1 MB")
    return int(-(-mb // 1))  # round up: never ask for less (nor limit to less) than was written


# slot_memory's words beside a size: `auto` (what no value means) lets each node server
# derive a limit from its node's memory and its slot count; `none` turns the limit off.
SLOT_MEMORY_AUTO = "auto"
SLOT_MEMORY_OFF = "none"


def parse_slot_memory(value: str | int) -> int | str | None:
    """A slot_memory value: whole MiB, SLOT_MEMORY_AUTO, or None for `none` (no limit);
    SpecError('slot_memory') otherwise. The spec, the config and `serve` read it so."""
    word = value.strip().lower() if isinstance(value, str) else None
    if word == SLOT_MEMORY_OFF:
        return None
    if word == SLOT_MEMORY_AUTO:
        return SLOT_MEMORY_AUTO
    try:
        return parse_size_mb(value, "slot_memory")
    except SpecError as exc:
        raise SpecError("slot_memory", f"{exc.args[0].split(': ', 1)[-1]}, or {SLOT_MEMORY_AUTO} "
                                       f"(the node's default) or {SLOT_MEMORY_OFF} (no limit)") from None


_PORT_RANGE = re.compile(r"\s*([0-9]{1,5})\s*-\s*([0-9]{1,5})\s*")


def parse_port_range(value: object) -> tuple[int, int]:
    """(lo, hi) from "LO-HI", [lo, hi] or (lo, hi), ascending within MIN_PORT-65535;
    SpecError('port_range') otherwise. The spec, the config and `serve` all use it."""
    if isinstance(value, str):
        match = _PORT_RANGE.fullmatch(value)
        if not match:
            raise SpecError("port_range", f"{value!r} is not LO-HI, e.g. 9100-9163")
        lo, hi = int(match[1]), int(match[2])
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        lo, hi = int(value[0]), int(value[1])
    else:
        raise SpecError("port_range", f"{value!r} is not LO-HI or a [lo, hi] pair")
    if not (MIN_PORT <= lo <= hi <= 65535):
        raise SpecError("port_range", f"{lo}-{hi} must be an ascending range within {MIN_PORT}-65535")
    return lo, hi


@dataclass(frozen=True)
class SandboxSpec:
    job_name: str = "hpc-sandbox"
    nodes: int = 1
    array: int | None = None
    array_limit: int | None = None
    slots: int = 4
    runtime: str = "none"
    image: str | None = None
    cpus_per_node: int | None = None
    mem: str | None = None
    gpus: int = 0
    walltime: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    # `none` cuts slots off the network (bwrap --unshare-net, Apptainer --network none).
    network: str = "host"
    # Node servers serve HTTPS with the job's own certificate, which clients pin. False
    # is plain HTTP: only for a trusted single-user machine.
    tls: bool = True
    # Limits of each slot, kept by the node server's watchdog: resident memory and
    # workspace disk (sizes like 4G), processes. None: no limit, but for slot_memory,
    # where None (or `auto`) leaves it to each node server to derive one from its node's
    # memory and its slots (see server/defaults.py) and `none` turns it off.
    slot_memory: str | None = None
    slot_procs: int | None = None
    slot_disk: str | None = None
    python: str = field(default_factory=lambda: sys.executable)
    setup_lines: tuple[str, ...] = ()
    extra_directives: tuple[str, ...] = ()
    skip_directives: tuple[str, ...] = ()
    state_dir: Path = field(default_factory=default_state_dir)
    profile: str = "default"
    # Where the job runs; `render` needs slurm, pbs or nomad (a flag can override).
    scheduler: str = "local"
    # PBS flavour: Torque (`-l nodes=N:ppn=C`, `-t`) or PBS Pro (`-l select=`, `-J`).
    dialect: str = "torque"
    # Most tasks one array job may have (Slurm MaxArraySize, PBS Pro max_array_size, a
    # site's subjob cap); larger arrays are rendered as several array jobs. None: the
    # scheduler's own default (see jobspec.DEFAULT_MAX_ARRAY_SIZE).
    max_array_size: int | None = None
    # Most of this job's node servers that can run on one node at once: each needs its
    # own port. None: every array task that may run at once (array_limit, else array).
    servers_per_node: int | None = None
    # Node servers get SIGTERM this long before the walltime kill (Slurm --signal), so
    # they can remove their records; capped at half the walltime.
    signal_seconds: int = 120
    # Network interface node servers listen on (e.g. ib0); None: the node's hostname.
    interface: str | None = None
    nomad_type: str = "batch"
    # The Nomad agent (default: NOMAD_ADDR, else http://127.0.0.1:4646), its region and the
    # CA that signed its certificate (default: NOMAD_REGION, NOMAD_CACERT). The namespace
    # is `account`; the ACL token only ever comes from NOMAD_TOKEN.
    nomad_address: str | None = None
    nomad_region: str | None = None
    nomad_cacert: Path | None = None
    # A site's template folder; files there override the packaged templates by name.
    template_dir: Path | None = None
    # A pip.conf every slot reads (its PIP_CONFIG_FILE; bound read-only, never the
    # user's home): a site or user mirror reaches slots, whose own pip sees only
    # /etc/pip.conf. On a path the nodes see.
    pip_conf: Path | None = None
    # The cloud profile (under `cloud:` in the config) this profile bursts to.
    cloud: str | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    # --- derived values --------------------------------------------------------------

    @property
    def servers(self) -> int:
        """How many node servers the job starts: one per node, or one per array task."""
        return self.array if self.array is not None else self.nodes

    @property
    def walltime_seconds(self) -> int:
        return parse_walltime(self.walltime)

    @property
    def mem_mb(self) -> int | None:
        return parse_size_mb(self.mem) if self.mem is not None else None

    @property
    def port_count(self) -> int:
        return self.port_range[1] - self.port_range[0] + 1

    @property
    def colocated_servers(self) -> int:
        """How many of this job's node servers may share one node (each needs a port)."""
        if self.servers_per_node is not None:
            return self.servers_per_node
        if self.array is None:
            return 1  # one node server per node: srun/pbsdsh start exactly one per node
        return min(self.array, self.array_limit or self.array)

    @property
    def effective_signal_seconds(self) -> int:
        return min(self.signal_seconds, self.walltime_seconds // 2)

    def replace(self, **changes: object) -> "SandboxSpec":
        return dataclasses.replace(self, **changes)

    # --- normalisation and validation ----------------------------------------------------

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ may do this

    def _normalise(self) -> None:
        for name in ("setup_lines", "extra_directives", "skip_directives"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise SpecError(name, f"must be a list of strings, got the single string {value!r}")
            self._set(name, tuple(value))
            for item in getattr(self, name):
                if not isinstance(item, str):
                    raise SpecError(name, f"every entry must be a string, got {item!r}")
        self._set("port_range", parse_port_range(self.port_range))
        if isinstance(self.walltime, int) and not isinstance(self.walltime, bool):
            # YAML 1.1 reads an unquoted 01:00:00 as 3600: accept seconds.
            self._set("walltime", format_hms(self.walltime))
        for name in ("mem", "slot_memory", "slot_disk"):  # a bare number is MB
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                self._set(name, f"{value}M")
        if not isinstance(self.state_dir, Path):
            self._set("state_dir", Path(str(self.state_dir)))
        # Node servers run elsewhere, in another working directory: the path must be
        # absolute, and ~ is expanded here, for the user who renders the spec.
        self._set("state_dir", Path(self.state_dir).expanduser().absolute())
        if self.nomad_cacert is not None and not isinstance(self.nomad_cacert, Path):
            self._set("nomad_cacert", Path(str(self.nomad_cacert)).expanduser())
        if self.template_dir is not None and not isinstance(self.template_dir, Path):
            self._set("template_dir", Path(str(self.template_dir)).expanduser())
        if self.pip_conf is not None:  # read on the nodes, from another working directory
            self._set("pip_conf", Path(str(self.pip_conf)).expanduser().absolute())

    def validate(self) -> None:
        self._check_types()
        if not NAME.fullmatch(self.job_name):
            raise SpecError("job_name", f"{self.job_name!r} must be 1-63 of letters, digits, '.', '_', '-'")
        if self.cloud is not None and not NAME.fullmatch(self.cloud):
            raise SpecError("cloud", f"{self.cloud!r} is not a cloud profile name (letters, digits, '.', '_', '-')")
        if self.nodes < 1:
            raise SpecError("nodes", f"must be at least 1, got {self.nodes}")
        if self.array is not None:
            if self.array < 1:
                raise SpecError("array", f"must be at least 1, got {self.array}")
            if self.nodes != 1:
                raise SpecError("nodes", f"is {self.nodes}, but an array job runs one node server per task, "
                                         "each on one node: set nodes to 1 or drop array")
        if self.array_limit is not None:
            if self.array is None:
                raise SpecError("array_limit", "limits how many array tasks run at once; it needs array")
            if self.array_limit < 1:
                raise SpecError("array_limit", f"must be at least 1, got {self.array_limit}")
        if self.slots < 1:
            raise SpecError("slots", f"must be at least 1, got {self.slots}")
        if self.runtime not in RUNTIMES:
            raise SpecError("runtime", f"{self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.network not in NETWORK_MODES:
            raise SpecError("network", f"{self.network!r} is not one of {', '.join(NETWORK_MODES)}")
        if self.network != "host" and self.runtime == "none":
            raise SpecError("network", "runtime none runs slots as plain processes of the node: it cannot cut them "
                                       "off the network; use runtime bwrap, apptainer or singularity")
        if self.runtime in ("apptainer", "singularity") and not self.image:
            raise SpecError("image", f"runtime {self.runtime} needs an image (a .sif path or docker:// URI)")
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            raise SpecError("cpus_per_node", f"must be at least 1, got {self.cpus_per_node}")
        if self.mem is not None:
            parse_size_mb(self.mem)
        if self.slot_memory is not None:
            parse_slot_memory(self.slot_memory)
        if self.slot_disk is not None:
            parse_size_mb(self.slot_disk, "slot_disk")
        if self.slot_procs is not None and self.slot_procs < 1:
            raise SpecError("slot_procs", f"must be at least 1, got {self.slot_procs}")
        if self.gpus < 0:
            raise SpecError("gpus", f"must be 0 or more, got {self.gpus}")
        if self.gpus and self.runtime not in GPU_RUNTIMES:
            raise SpecError("gpus", f"runtime {self.runtime} cannot pass GPUs to slots (its /dev has no GPU "
                                    f"devices); use one of {', '.join(GPU_RUNTIMES)}, or gpus: 0")
        parse_walltime(self.walltime)
        if not 0 <= self.signal_seconds <= MAX_SIGNAL_SECONDS:
            raise SpecError("signal_seconds", f"must be 0-{MAX_SIGNAL_SECONDS}, got {self.signal_seconds}")
        for name in ("partition", "account", "qos", "interface"):
            value = getattr(self, name)
            if value is not None and not _SITE_NAME.fullmatch(value):
                raise SpecError(name, f"{value!r} may only hold letters, digits and . _ , + @ : - "
                                      "(it is written into directive lines)")
        lo, hi = self.port_range
        if self.servers_per_node is not None and self.servers_per_node < 1:
            raise SpecError("servers_per_node", f"must be at least 1, got {self.servers_per_node}")
        if self.colocated_servers > self.port_count:
            raise SpecError("port_range", (
                f"{lo}-{hi} has {self.port_count} ports, but up to {self.colocated_servers} node servers of this "
                "job could share a node and each needs its own port: widen port_range, set array_limit, "
                "or set servers_per_node to what fits on one of your nodes"))
        if self.max_array_size is not None and self.max_array_size < 1:
            raise SpecError("max_array_size", f"must be at least 1, got {self.max_array_size}")
        if self.scheduler not in SCHEDULERS:
            raise SpecError("scheduler", f"{self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.dialect not in PBS_DIALECTS:
            raise SpecError("dialect", f"{self.dialect!r} is not one of {', '.join(PBS_DIALECTS)}")
        if self.nomad_type not in NOMAD_TYPES:
            raise SpecError("nomad_type", f"{self.nomad_type!r} is not one of {', '.join(NOMAD_TYPES)}")
        if not self.python or _CONTROL.search(self.python):
            raise SpecError("python", f"{self.python!r} must be a non-empty path without control characters")
        if not NAME.fullmatch(self.profile):
            raise SpecError("profile", f"{self.profile!r} must be 1-63 of letters, digits, '.', '_', '-'")
        if self.image is not None and (not self.image or _CONTROL.search(self.image)):
            raise SpecError("image", f"{self.image!r} must be non-empty, without control characters")
        # One entry is one line: a newline (or any control character) inside an entry
        # would let it smuggle a second line into the script.
        for name in ("setup_lines", "extra_directives", "skip_directives"):
            for item in getattr(self, name):
                if _CONTROL.search(item.replace("\t", " ")):
                    raise SpecError(name, f"{item!r} contains a newline or control character; "
                                          "give one line per entry")
                if name != "setup_lines" and not item.strip():
                    raise SpecError(name, "entries must not be empty")

    def _check_types(self) -> None:
        """Catch wrong Python types early with the field's name (not a TypeError later).
        Paths, lines and port ranges are normalised before this runs."""
        for name, kind in FIELD_KINDS.items():
            value = getattr(self, name)
            if kind.type not in _TYPE_NAMES or (value is None and kind.optional):
                continue
            if not isinstance(value, kind.type) or (kind.type is int and isinstance(value, bool)):
                raise SpecError(name, f"expected {_TYPE_NAMES[kind.type]}"
                                      f"{' or nothing' if kind.optional else ''}, got {value!r}")


@dataclass(frozen=True)
class FieldKind:
    """What a SandboxSpec field holds, read off its annotation (the one place it is
    written): `type` is int, str, Path, or tuple; `lines` tells a tuple of lines
    (tuple[str, ...]) from a pair (the port range)."""

    type: type
    optional: bool
    lines: bool = False


def _field_kinds() -> dict[str, FieldKind]:
    hints = typing.get_type_hints(SandboxSpec)
    kinds = {}
    for f in dataclasses.fields(SandboxSpec):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args and typing.get_origin(hint) is not tuple
        base = next(a for a in args if a is not type(None)) if optional else hint
        if typing.get_origin(base) is tuple:
            kinds[f.name] = FieldKind(tuple, optional, lines=typing.get_args(base)[-1] is Ellipsis)
        elif base in (int, str, bool, Path):
            kinds[f.name] = FieldKind(base, optional)
        else:  # a new field of a new kind: say so at import, not as a wrong coercion later
            raise TypeError(f"SandboxSpec.{f.name}: no FieldKind for {hint!r}")
    return kinds


FIELD_KINDS: dict[str, FieldKind] = _field_kinds()
_TYPE_NAMES = {int: "an integer", str: "a string", bool: "true or false"}
