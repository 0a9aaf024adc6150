"""Site quirks in jobspecs, without a new template.

- `extra_directives` pass through verbatim (one line each, with or without the
  `#SBATCH`/`#PBS` prefix; for Nomad, one HCL attribute or one-line block inside `job`).
- `skip_directives` drop generated lines a site rejects (`--mem`, `-l place`, `datacenters`).
- Options the design depends on are *protected*: no extra directive may set them and
  no skip may drop them, and the refusal says why.
- An extra directive may not silently duplicate a generated line either: the site
  skips the generated one first (that is how a generated line is replaced).

Keys are normalised so that spellings cannot sneak past the checks: Slurm short
options map to their long names (`-J` is `--job-name`) and a long option that is an
abbreviation of a known one counts as that one (sbatch accepts `--job=x`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import SpecError

PREFIXES = {"slurm": "#SBATCH", "pbs": "#PBS"}

_WHY_LOGS = "node server logs must land in the job folder (STATE_DIR/jobs/JOB/logs), where `status` reads them"
_WHY_ONE_PER_NODE = ("the job starts exactly one node server per node (or per array task); "
                     "set nodes or array instead")
_WHY_ARRAY = ("array bounds come from array, array_limit and max_array_size (large arrays are split into "
              "several jobs); set those instead")

PROTECTED: dict[str, dict[str, str]] = {
    "slurm": {
        "--job-name": "the job name comes from job_name; set that instead",
        "--output": _WHY_LOGS,
        "--error": _WHY_LOGS,
        "--signal": ("node servers must get SIGTERM before the walltime kill to remove their records; "
                     "set signal_seconds instead"),
        "--array": _WHY_ARRAY,
        "--nodes": _WHY_ONE_PER_NODE,
        "--ntasks": _WHY_ONE_PER_NODE,
        "--ntasks-per-node": _WHY_ONE_PER_NODE,
    },
    "pbs": {
        "-N": "the job name comes from job_name; set that instead",
        "-o": _WHY_LOGS,
        "-e": _WHY_LOGS,
        "-j": _WHY_LOGS,
        "-t": _WHY_ARRAY,
        "-J": _WHY_ARRAY,
        "-W max_run_subjobs": _WHY_ARRAY,
        "-l nodes": _WHY_ONE_PER_NODE + " (and cpus_per_node, gpus)",
        "-l select": _WHY_ONE_PER_NODE + " (and cpus_per_node, mem, gpus)",
    },
    "nomad": {
        "type": "the job type comes from nomad_type; set that instead",
        "name": "the job name comes from job_name; set that instead",
        "id": "the job id is hpc-sandbox's job key, which names the token's Nomad Variable",
        "group": "the job has one group of node servers; its count comes from nodes or array",
        "task": "tasks belong inside the group, which hpc-sandbox generates",
    },
}

# Slurm short options whose long names matter to the checks.
_SLURM_SHORT = {
    "-J": "--job-name", "-o": "--output", "-e": "--error", "-a": "--array", "-N": "--nodes",
    "-n": "--ntasks", "-p": "--partition", "-A": "--account", "-q": "--qos", "-t": "--time",
    "-c": "--cpus-per-task",
}
# Long options a Slurm template may generate; abbreviations of these are resolved.
_SLURM_KNOWN_LONG = sorted(set(PROTECTED["slurm"]) | {
    "--partition", "--account", "--qos", "--time", "--cpus-per-task", "--mem", "--gres"})
_HCL_LINE = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_-]*)\s*(?:=|\{|\")")


def normalise(scheduler: str, raw: str) -> str:
    """The directive without its prefix, stripped; refuses one meant for another scheduler."""
    text = raw.strip()
    for other, prefix in PREFIXES.items():
        if text.startswith(prefix) and (len(text) == len(prefix) or text[len(prefix)].isspace()):
            if other != scheduler:
                raise SpecError("extra_directives", f"{raw!r} is a {other} directive, not a {scheduler} one")
            text = text[len(prefix):].strip()
    if not text:
        raise SpecError("extra_directives", f"{raw!r} is empty")
    return text


def keys_of(scheduler: str, text: str, field_name: str = "extra_directives") -> tuple[str, ...]:
    """The normalised option keys a directive (already without prefix) sets."""
    if scheduler == "slurm":
        return _slurm_keys(text, field_name)
    if scheduler == "pbs":
        return _pbs_keys(text, field_name)
    if scheduler == "nomad":
        return _nomad_keys(text, field_name)
    raise SpecError("scheduler", f"{scheduler!r} has no directives")


def _slurm_keys(text: str, field_name: str) -> tuple[str, ...]:
    if not text.startswith("-"):
        raise SpecError(field_name, f"{text!r} is not an sbatch option (it must start with '-')")
    token = re.split(r"[\s=]", text, maxsplit=1)[0]
    if token.startswith("--"):
        if token in _SLURM_KNOWN_LONG:
            return (token,)
        # sbatch (getopt_long) accepts any unambiguous abbreviation: `--job=x` is --job-name.
        matches = tuple(name for name in _SLURM_KNOWN_LONG if name.startswith(token) and len(token) > 2)
        return matches or (token,)
    return (_SLURM_SHORT.get(token[:2], token[:2]),)


def _pbs_keys(text: str, field_name: str) -> tuple[str, ...]:
    if not text.startswith("-") or len(text) < 2:
        raise SpecError(field_name, f"{text!r} is not a qsub option (it must start with '-')")
    option, rest = text[:2], text[2:].strip()
    if option not in ("-l", "-W"):
        return (option,)
    if not rest:
        return (option,)
    # `-l a=1,b=2` (and `-W x=1,y=2`) set several resources or attributes at once.
    names = [part.split("=", 1)[0].strip() for part in rest.split(",") if part.strip()]
    return tuple(f"{option} {name}" for name in names) or (option,)


def _nomad_keys(text: str, field_name: str) -> tuple[str, ...]:
    match = _HCL_LINE.match(text)
    if not match:
        raise SpecError(field_name, f"{text!r} is not one HCL attribute (`key = value`) or one-line block "
                                    "(`meta { key = \"value\" }`)")
    if text.count("{") != text.count("}") or text.count("[") != text.count("]"):
        raise SpecError(field_name, f"{text!r} has unbalanced braces or brackets; give a whole block on one line")
    return (match["key"],)


def skip_key(scheduler: str, raw: str) -> str:
    """The key a skip_directives entry names (`--mem`, `#SBATCH --mem=1G`, `-l place`)."""
    text = normalise(scheduler, raw) if scheduler in PREFIXES else raw.strip()
    if scheduler == "nomad" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", text):
        return text  # a bare attribute or block name: `datacenters`, `constraint`
    keys = keys_of(scheduler, text, "skip_directives")
    if len(keys) != 1:
        raise SpecError("skip_directives", f"{raw!r} is ambiguous ({', '.join(keys)}); give one option")
    return keys[0]


@dataclass
class DirectiveTracker:
    """Per render: which optional directives a template offered, generated, or skipped.

    Templates ask `keep(key, value)` before each optional directive: it answers whether
    to write the line, and records the key so that a skip_directives entry that matches
    nothing (a typo) is an error instead of a silent no-op.
    """

    scheduler: str
    skips: frozenset[str]
    offered: set[str] = field(default_factory=set)
    generated: set[str] = field(default_factory=set)

    @classmethod
    def for_spec(cls, scheduler: str, skip_directives: tuple[str, ...]) -> "DirectiveTracker":
        skips = set()
        for raw in skip_directives:
            key = skip_key(scheduler, raw)
            why = PROTECTED[scheduler].get(key)
            if why:
                raise SpecError("skip_directives", f"{raw!r} cannot be skipped: {why}")
            skips.add(key)
        return cls(scheduler, frozenset(skips))

    def keep(self, key: str, value: object = True) -> bool:
        self.offered.add(key)
        if key in self.skips or value is None or value is False or value == "" or value == 0:
            return False
        self.generated.add(key)
        return True

    def check_skips_used(self) -> None:
        unused = sorted(self.skips - self.offered)
        if unused:
            raise SpecError("skip_directives", (
                f"{', '.join(repr(u) for u in unused)} matches no directive this {self.scheduler} template "
                f"generates; it can skip: {', '.join(sorted(self.offered)) or 'nothing'}"))

    def check_extras(self, extras: list[str]) -> None:
        protected = PROTECTED[self.scheduler]
        for text in extras:
            keys = keys_of(self.scheduler, text)
            for key in keys:
                if key in protected:
                    raise SpecError("extra_directives", f"{text!r} sets {key}, which hpc-sandbox controls: "
                                                        f"{protected[key]}")
            for key in keys:
                if key in self.generated:
                    raise SpecError("extra_directives", (
                        f"{text!r} sets {key}, which is already generated from the profile; change the "
                        f"profile's value, or add {key!r} to skip_directives to replace the generated line"))
