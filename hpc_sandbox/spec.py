"""SandboxSpec: everything a jobspec (or the local scheduler) needs to start node servers.

One spec renders to every scheduler. Validation happens here, once, and names the
field that is wrong, so neither templates nor schedulers have to second-guess it.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

RUNTIMES = ("apptainer", "singularity", "bwrap", "none")
DEFAULT_PORT_RANGE = (9100, 9163)
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def default_state_dir() -> Path:
    return Path("~/.hpc-sandbox").expanduser()


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
    python: str = field(default_factory=lambda: sys.executable)
    setup_lines: tuple[str, ...] = ()
    extra_directives: tuple[str, ...] = ()
    skip_directives: tuple[str, ...] = ()
    state_dir: Path = field(default_factory=default_state_dir)
    profile: str = "default"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def servers(self) -> int:
        """How many node servers the job starts: one per node, or one per array task."""
        return self.array if self.array is not None else self.nodes

    def replace(self, **changes: object) -> "SandboxSpec":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if not _JOB_NAME.match(self.job_name):
            raise SpecError("job_name", f"{self.job_name!r} must be 1-63 of letters, digits, '.', '_', '-'")
        if self.nodes < 1:
            raise SpecError("nodes", f"must be at least 1, got {self.nodes}")
        if self.array is not None and self.array < 1:
            raise SpecError("array", f"must be at least 1, got {self.array}")
        if self.slots < 1:
            raise SpecError("slots", f"must be at least 1, got {self.slots}")
        if self.runtime not in RUNTIMES:
            raise SpecError("runtime", f"{self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.runtime in ("apptainer", "singularity") and not self.image:
            raise SpecError("image", f"runtime {self.runtime} needs an image (a .sif path or docker:// URI)")
        lo, hi = self.port_range
        if not (1024 <= lo <= hi <= 65535):
            raise SpecError("port_range", f"{lo}-{hi} must be an ascending range within 1024-65535")
        if self.gpus < 0:
            raise SpecError("gpus", f"must be 0 or more, got {self.gpus}")
