"""Render a SandboxSpec into the jobspec a scheduler runs: sbatch, qsub or Nomad HCL.

The templates (top-level `templates/`, installed as `hpc_sandbox.templates`) are the
truth a sysadmin reads; this module only prepares their inputs: the serve command
line (built once, here, for every template and for the local scheduler), the job's
paths, the resource values in each scheduler's units, and how a large array is split
into several array jobs. Rendering is deterministic: the same spec, scheduler and job
key give byte-identical text (no clock, no host name, no random id).

Regenerate the reviewed examples in jobspecs/ with:

    python -m hpc_sandbox.jobspec --regenerate jobspecs/
"""
from __future__ import annotations

import argparse
import functools
import logging
import re
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import jinja2

from . import __version__
from .directives import DirectiveTracker, keys_of, normalise
from .errors import HpcSandboxError, SpecError
from .jobfolder import JobFolder
from .spec import NAME, PBS_DIALECTS, SCHEDULERS, SandboxSpec, format_hms

if TYPE_CHECKING:  # importlib.abc.Traversable moved in 3.11; only annotations need it
    from importlib.resources.abc import Traversable

log = logging.getLogger(__name__)

# Every scheduler but the embedded `local` one has a template.
RENDER_SCHEDULERS = tuple(name for name in SCHEDULERS if name != "local")
# Most tasks one array job may have when the spec does not say (max_array_size):
# Slurm's default MaxArraySize is 1001 (indices 0-1000); PBS Pro's max_array_size is
# 10000; Torque has no default cap and Nomad has no arrays.
DEFAULT_MAX_ARRAY_SIZE: dict[str, int | None] = {"slurm": 1001, "torque": None, "pbspro": 10000, "nomad": None}
SUFFIXES = {"slurm": ".sbatch", "pbs": ".pbs", "nomad": ".nomad.hcl"}
# A state dir path is written into directive lines (`#SBATCH --output=...`), unquoted:
# it must not hold spaces, quotes, `%` (a Slurm filename pattern) or shell syntax.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@,=:~-]*")  # fullmatch: no final newline slips through
NODE_SCRIPT_END = "HPC_SANDBOX_NODE_SCRIPT"
TLS_CERT, TLS_KEY = "tls.crt", "tls.key"
# What a Nomad task gets from its job's Variable: (key in the Variable, file in the secrets dir).
NOMAD_SECRET_FILES = (("token", "token"), ("tls_cert", TLS_CERT), ("tls_key", TLS_KEY))
NOMAD_KILL_TIMEOUT = 30


class Raw(str):
    """A value the template must not quote: a shell or Nomad expression we wrote."""


@dataclass(frozen=True)
class ArrayPart:
    """One array job of a (possibly split) array: global task indices first..first+count-1."""

    first: int
    count: int
    limit: int | None


@dataclass(frozen=True)
class RenderedJobspec:
    """One file to submit. An array larger than the scheduler's cap gives several."""

    name: str  # a file name: JOBKEY.sbatch, JOBKEY.part2.pbs, JOBKEY.nomad.hcl
    text: str
    scheduler: str
    template: str
    part: int = 1
    parts: int = 1
    first_index: int = 0  # global index of this part's first node server
    servers: int = 1  # node servers this file starts


# --- templates ------------------------------------------------------------------------


class _ResourceLoader(jinja2.BaseLoader):
    """Loads packaged templates through importlib.resources (works from a wheel too)."""

    def __init__(self, root: Traversable) -> None:
        self.root = root

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, Callable[[], bool]]:
        resource = self.root.joinpath(template)
        if not resource.is_file():
            raise jinja2.TemplateNotFound(template)
        return resource.read_text(encoding="utf-8"), f"hpc_sandbox.templates/{template}", lambda: True

    def list_templates(self) -> list[str]:
        return sorted(item.name for item in self.root.iterdir() if item.name.endswith(".j2"))


def packaged_templates() -> Traversable:
    """The packaged template folder, from an install or from a source checkout."""
    try:
        return resources.files("hpc_sandbox.templates")
    except ModuleNotFoundError:
        # A source checkout that is not installed: templates/ sits beside the package.
        return Path(__file__).resolve().parent.parent / "templates"


def make_environment(template_dir: Path | None = None) -> jinja2.Environment:
    """The Jinja environment for a site template folder (or none): site files first."""
    if template_dir is None:
        return _environment(None, ())
    if not template_dir.is_dir():
        raise SpecError("template_dir", f"{template_dir} is not a folder")
    # The folder's listing is part of the cache key: a site template added later must
    # win over the packaged one that an earlier render compiled.
    listing = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in template_dir.iterdir() if p.is_file()))
    return _environment(template_dir, listing)


@functools.lru_cache(maxsize=16)
def _environment(template_dir: Path | None, listing: tuple) -> jinja2.Environment:
    """Kept per folder and listing, so that Jinja compiles each template once."""
    loaders: list[jinja2.BaseLoader] = []
    if template_dir is not None:
        loaders.append(jinja2.FileSystemLoader(str(template_dir)))
    loaders.append(_ResourceLoader(packaged_templates()))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,  # a typo in a template is an error, not an empty string
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["sh"] = shell_word
    env.filters["hcl"] = hcl_string
    return env


def shell_word(value: object) -> str:
    if isinstance(value, Raw):
        return f'"{value}"'
    return shlex.quote(str(value))


def hcl_string(value: object) -> str:
    if isinstance(value, Raw):
        return f'"{value}"'
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    # HCL would interpolate ${...} and %{...}: doubling the sigil makes them literal.
    text = text.replace("${", "$${").replace("%{", "%%{")
    return f'"{text}"'


# --- the node server command line -------------------------------------------------------


def serve_groups(spec: SandboxSpec, job_key: str, *, port_index: int | str = 0,
                 state_dir: str | None = None, token_file: str | None = None, tls_dir: str | None = None,
                 port_range: tuple[int, int] | None = None, host: str | None = None) -> list[list[str]]:
    """`python -m hpc_sandbox serve ...` as groups: the interpreter, then one flag per group.

    This is the contract with `hpc-sandbox serve`; every template (and anything else
    that starts node servers) builds it here. Values may be `Raw` shell or Nomad
    expressions (an array index, ${NOMAD_SECRETS_DIR}/token). `tls_dir` names where the
    job's certificate and key are when not in its job folder (Nomad's secrets dir).
    """
    state = state_dir if state_dir is not None else str(spec.state_dir)
    token = token_file if token_file is not None else str(JobFolder(Path(state), job_key).token)
    lo, hi = port_range or spec.port_range
    groups = [[spec.python, "-m", "hpc_sandbox", "serve"],
              ["--job-id", job_key],
              ["--state-dir", state],
              ["--token-file", token],
              ["--slots", str(spec.slots)],
              ["--runtime", spec.runtime]]
    if spec.image:
        groups.append(["--image", spec.image])
    if spec.gpus:
        groups.append(["--gpus", str(spec.gpus)])
    if spec.network != "host":
        groups.append(["--network", spec.network])
    for flag, value in (("--slot-memory", spec.slot_memory), ("--slot-procs", spec.slot_procs),
                        ("--slot-disk", spec.slot_disk)):
        if value is not None:
            groups.append([flag, str(value)])
    if not spec.tls:
        groups.append(["--insecure-http"])
    elif tls_dir is not None:
        # A Raw folder (a Nomad expression) keeps its paths Raw: the template must not quote them.
        wrap = Raw if isinstance(tls_dir, Raw) else str
        groups.append(["--tls-cert", wrap(f"{tls_dir}/{TLS_CERT}")])
        groups.append(["--tls-key", wrap(f"{tls_dir}/{TLS_KEY}")])
    groups.append(["--port-range", f"{lo}-{hi}"])
    groups.append(["--port-index", port_index if isinstance(port_index, Raw) else str(port_index)])
    if host is not None:
        groups.append(["--host", host])
    elif spec.interface:
        groups.append(["--interface", spec.interface])
    return groups


def serve_argv(spec: SandboxSpec, job_key: str, **kwargs: object) -> list[str]:
    """The same command as one argv list."""
    return [word for group in serve_groups(spec, job_key, **kwargs) for word in group]  # type: ignore[arg-type]


# --- arrays -----------------------------------------------------------------------------


def split_array(total: int, max_size: int | None, limit: int | None) -> list[ArrayPart]:
    """Split an array of `total` tasks into array jobs of at most `max_size` tasks.

    A concurrency limit is shared out between the parts so that all parts together
    never run more than `limit` tasks at once.
    """
    size = max_size or total
    parts = [(first, min(size, total - first)) for first in range(0, total, size)]
    if limit is not None and limit < len(parts):
        raise SpecError("array_limit", (
            f"{limit} is smaller than the {len(parts)} array jobs an array of {total} is split into "
            f"(at most {size} tasks each): raise array_limit to at least {len(parts)}, or max_array_size"))
    limits: list[int | None] = [None] * len(parts)
    if limit is not None:
        base, extra = divmod(limit, len(parts))
        limits = [min(count, base + (1 if i < extra else 0)) for i, (_, count) in enumerate(parts)]
    return [ArrayPart(first, count, lim) for (first, count), lim in zip(parts, limits)]


# --- rendering --------------------------------------------------------------------------


def _check_renderable(spec: SandboxSpec, scheduler: str, dialect: str, job_key: str) -> None:
    if scheduler not in RENDER_SCHEDULERS:
        raise SpecError("scheduler", f"{scheduler!r} has no jobspec; render one of {', '.join(RENDER_SCHEDULERS)}")
    if dialect not in PBS_DIALECTS:
        raise SpecError("dialect", f"{dialect!r} is not one of {', '.join(PBS_DIALECTS)}")
    if not NAME.fullmatch(job_key):
        raise SpecError("job_key", f"{job_key!r} must be 1-63 of letters, digits, '.', '_', '-'")
    if scheduler != "nomad" and not _SAFE_PATH.fullmatch(str(spec.state_dir)):
        raise SpecError("state_dir", f"{spec.state_dir} is written into #SBATCH/#PBS lines unquoted: it may only "
                                     "hold letters, digits and . _ / + @ , = : ~ -")
    if NODE_SCRIPT_END in (line.strip() for line in spec.setup_lines):
        raise SpecError("setup_lines", f"a line may not be {NODE_SCRIPT_END!r} (it ends the node script)")
    if scheduler == "pbs" and dialect == "pbspro" and spec.qos:
        raise SpecError("qos", "PBS Pro has no QoS; drop qos, or pass the site's own option in extra_directives")


def _mem_slurm(mb: int) -> str:
    return f"{mb // 1024}G" if mb % 1024 == 0 else f"{mb}M"


def _mem_pbs(mb: int) -> str:
    return f"{mb // 1024}gb" if mb % 1024 == 0 else f"{mb}mb"


def _slurm_time(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}-{format_hms(rest)}" if days else format_hms(rest)


def _template_name(scheduler: str, is_array: bool) -> str:
    if scheduler == "nomad":
        return "nomad_job.hcl.j2"
    return f"{scheduler}_{'array' if is_array else 'batch'}.sh.j2"


def _array_index_expr(scheduler: str, dialect: str, part: ArrayPart, plain: bool) -> int | Raw:
    """What --port-index gets: the task's global index within the whole (split) array."""
    if plain:
        return part.first  # a one-task PBS Pro "array" is rendered as a plain job
    # Torque sets PBS_ARRAYID; Slurm's Torque wrappers (a common way to keep PBS
    # scripts running on Slurm) set only SLURM_ARRAY_TASK_ID, so fall back to it.
    index = {"slurm": "$SLURM_ARRAY_TASK_ID",
             "pbs": "${PBS_ARRAYID:-$SLURM_ARRAY_TASK_ID}" if dialect == "torque" else "$PBS_ARRAY_INDEX"}[scheduler]
    return Raw(index) if part.first == 0 else Raw(f"$(({part.first} + {index}))")


def render(spec: SandboxSpec, scheduler: str | None = None, *, dialect: str | None = None,
           job_key: str | None = None, template_dir: Path | None = None) -> list[RenderedJobspec]:
    """Render `spec` for `scheduler` (default spec.scheduler); one file per array job.

    job_key is hpc-sandbox's own job id (the job folder's name), chosen before the
    scheduler assigns its ids; it defaults to the job name so that `render` alone is
    deterministic. Every SpecError names the field to fix.
    """
    scheduler = scheduler or spec.scheduler
    dialect = dialect or spec.dialect
    job_key = job_key or spec.job_name
    _check_renderable(spec, scheduler, dialect, job_key)
    template_dir = template_dir if template_dir is not None else spec.template_dir
    env = make_environment(template_dir)
    is_array = spec.array is not None
    name = _template_name(scheduler, is_array)
    if is_array and scheduler != "nomad":
        cap = spec.max_array_size or DEFAULT_MAX_ARRAY_SIZE[dialect if scheduler == "pbs" else scheduler]
        parts = split_array(spec.servers, cap, spec.array_limit)
    else:
        parts = [ArrayPart(0, spec.servers, spec.array_limit)]
    out = []
    for number, part in enumerate(parts, start=1):
        text = _render_part(env, name, spec, scheduler, dialect, job_key, part, number, len(parts), is_array,
                            _origin(name, template_dir))
        suffix = SUFFIXES[scheduler]
        file_name = f"{job_key}{f'.part{number}' if len(parts) > 1 else ''}{suffix}"
        out.append(RenderedJobspec(file_name, text, scheduler, name, number, len(parts), part.first, part.count))
    if len(parts) > 1:
        log.info("array of %d tasks split into %d array jobs", spec.servers, len(parts))
    return out


def _render_part(env: jinja2.Environment, name: str, spec: SandboxSpec, scheduler: str, dialect: str,
                 job_key: str, part: ArrayPart, number: int, parts: int, is_array: bool, origin: str) -> str:
    tracker = DirectiveTracker.for_spec(scheduler, spec.skip_directives)
    extras = [normalise(scheduler, raw) if scheduler != "nomad" else raw.strip() for raw in spec.extra_directives]
    for text in extras:
        keys_of(scheduler, text)  # refuse malformed lines before rendering anything
    folder = JobFolder(spec.state_dir, job_key)
    lo, hi = spec.port_range
    # PBS Pro refuses a one-subjob array (-J 0-0): such a part becomes a plain job.
    plain = is_array and part.count == 1 and scheduler == "pbs" and dialect == "pbspro"
    context = {
        "spec": spec,
        "version": __version__,
        "template_origin": origin,
        "scheduler": scheduler,
        "dialect": dialect,
        "job_key": job_key,
        "job_dir": str(folder.path),
        "log_dir": str(folder.logs),
        "token_file": str(folder.token),
        "port_lo": lo,
        "port_hi": hi,
        "part": number,
        "parts": parts,
        "array": part if is_array and not plain else None,
        "servers": part.count,
        "walltime_hms": format_hms(spec.walltime_seconds),
        "walltime_seconds": spec.walltime_seconds,
        "walltime_slurm": _slurm_time(spec.walltime_seconds),
        "signal_seconds": spec.effective_signal_seconds,
        "mem_mb": spec.mem_mb,
        "mem_slurm": _mem_slurm(spec.mem_mb) if spec.mem_mb else None,
        "mem_pbs": _mem_pbs(spec.mem_mb) if spec.mem_mb else None,
        # Torque's -l mem is the whole job's memory; the spec's mem is per node.
        "mem_pbs_total": _mem_pbs(spec.mem_mb * spec.nodes) if spec.mem_mb else None,
        "cpus": spec.cpus_per_node or 1,
        "extras": extras,
        "keep": tracker.keep,
        "node_script_end": NODE_SCRIPT_END,
        "kill_timeout": NOMAD_KILL_TIMEOUT,
    }
    if scheduler == "nomad":
        context["serve"] = serve_groups(
            spec, job_key, port_index=0, state_dir=Raw("${NOMAD_ALLOC_DIR}/hpc-sandbox"),
            token_file=Raw("${NOMAD_SECRETS_DIR}/token"), tls_dir=Raw("${NOMAD_SECRETS_DIR}"), port_range=(lo, lo),
            host=Raw("${NOMAD_IP_http}"))
        context["nomad_variable"] = f"nomad/jobs/{job_key}"
        # Each secret file: its key in the Variable, its name in the secrets dir, and the
        # Go template that renders it (built here so Jinja never parses it).
        context["secret_files"] = [
            {"key": key, "file": file, "template": f'{{{{ with nomadVar "nomad/jobs/{job_key}" }}}}'
                                                  f'{{{{ .{key} }}}}{{{{ end }}}}'}
            for key, file in NOMAD_SECRET_FILES if key == "token" or spec.tls]
    else:
        index = _array_index_expr(scheduler, dialect, part, plain) if is_array else 0
        context["serve"] = serve_groups(spec, job_key, port_index=index)
    try:
        text = env.get_template(name).render(context)
    except jinja2.TemplateError as exc:
        where = f" ({exc.filename}:{exc.lineno})" if isinstance(exc, jinja2.TemplateSyntaxError) else ""
        raise SpecError("template_dir", f"template {name} failed: {exc}{where}") from None
    tracker.check_skips_used()
    tracker.check_extras(extras)
    return _tidy(text)


def _origin(name: str, template_dir: Path | None) -> str:
    if template_dir is not None and (template_dir / name).is_file():
        return f"site template {template_dir / name}"
    return f"template {name}"


def _tidy(text: str) -> str:
    """No trailing whitespace, no runs of blank lines, exactly one final newline."""
    # split on "\n" only: splitlines() would also break at U+2028 and friends, which bash
    # does not, and so could turn one directive into two lines.
    lines = [line.rstrip() for line in text.split("\n")]
    tidy: list[str] = []
    for line in lines:
        if line or (tidy and tidy[-1]):
            tidy.append(line)
    while tidy and not tidy[-1]:
        tidy.pop()
    return "\n".join(tidy) + "\n"


# --- examples ---------------------------------------------------------------------------


def regenerate(folder: Path) -> list[Path]:
    """Render every profile of FOLDER/examples.yaml into FOLDER; remove stale renderings."""
    from .config import load_spec, profile_names  # config imports spec, not jobspec: no cycle

    source = folder / "examples.yaml"
    written: list[Path] = []
    for profile in profile_names(source):
        spec = load_spec(profile=profile, config_file=source, isolated=True)
        for rendered in render(spec, job_key=profile):
            path = folder / rendered.name
            path.write_text(rendered.text, encoding="utf-8")
            written.append(path)
    for stale in sorted(p for suffix in SUFFIXES.values() for p in folder.glob(f"*{suffix}")):
        if stale not in written:
            stale.unlink()
            log.info("removed stale example %s", stale)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpc_sandbox.jobspec",
                                     description="Regenerate the reviewed jobspec examples.")
    parser.add_argument("--regenerate", metavar="FOLDER", type=Path, required=True,
                        help="folder holding examples.yaml (normally jobspecs/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = regenerate(args.regenerate)
    except HpcSandboxError as exc:
        log.error("Error: %s", exc)
        return 1
    for path in written:
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
