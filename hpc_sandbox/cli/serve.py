"""`hpc-sandbox serve`: what a jobspec runs on each node (or array task)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from ..errors import SpecError
from ..jobfolder import JobFolder, read_private
from ..runtime import NETWORK_MODES, RUNTIMES, RuntimeOptions
from ..server.app import ServerLimits
from ..server.defaults import DEFAULT_MEMORY_SHARE, slot_memory_default
from ..server.limits import SlotLimits
from ..server.main import ServeOptions, run
from ..spec import DEFAULT_PORT_RANGE, SLOT_MEMORY_AUTO, parse_port_range, parse_size_mb, parse_slot_memory
from .common import resolve_state_dir, state_dir_option

log = logging.getLogger(__name__)


def read_slot_env(path: Path) -> tuple[tuple[str, str], ...]:
    """--slot-env-file: {NAME: VALUE}, from a file only we can read."""
    try:
        data = json.loads(read_private(path, "slot env file"))
    except ValueError as exc:
        raise click.BadParameter(f"{path} is not JSON: {exc}", param_hint="--slot-env-file") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                                             for k, v in data.items()):
        raise click.BadParameter(f"{path} must hold a JSON object of names to string values",
                                 param_hint="--slot-env-file")
    return tuple(sorted(data.items()))


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--slot-memory/--slot-disk: a size (512M, 1G, or MiB) as whole MiB."""
    if value is None:
        return None
    try:
        return parse_size_mb(value, param.name or "size")
    except SpecError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None


def _slot_memory(ctx: click.Context, param: click.Parameter, value: str) -> int | str | None:
    """--slot-memory: whole MiB, `auto` (decided in serve, once the slot count is known)
    or None (`none`: no limit)."""
    try:
        return parse_slot_memory(value)
    except SpecError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None


def resolve_slot_memory(value: int | str | None, slots: int) -> int | None:
    """The per-slot memory limit in MiB a server runs with: `auto` is this node's
    default (server/defaults.py), said in the log either way."""
    if value != SLOT_MEMORY_AUTO:
        log.info("slot memory limit: %s", f"{value} MiB per slot" if value else "none (turned off)")
        return value if isinstance(value, int) else None
    default = slot_memory_default(slots)
    if default is None:
        log.warning("slot memory limit: none (this node's memory could not be read); set slot_memory to have one")
        return None
    log.info("%s", default.describe())
    return default.mb


@click.command("serve")
@click.option("--job-id", required=True, help="hpc-sandbox job id (the job folder's name under the state dir).")
@click.option("--slots", type=click.IntRange(1, 4096), default=4, show_default=True, help="Slots this server runs.")
@click.option("--runtime", type=click.Choice(list(RUNTIMES)), default="none", show_default=True,
              help="How slots are isolated. 'none' is for trusted local use only.")
@click.option("--image", default=None, help="Container image (.sif path or docker:// URI) for apptainer/singularity.")
@click.option("--network", type=click.Choice(NETWORK_MODES), default="host", show_default=True,
              help="'none' cuts every slot off the network (its own loopback only; not with runtime none).")
@click.option("--gpus", type=click.IntRange(0, 64), default=0, show_default=True, help="GPUs to pass to slots (--nv).")
@click.option("--port-range", default=f"{DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}", show_default=True,
              help="Ports this server may bind; it takes the first free one.")
@click.option("--port-index", type=click.IntRange(0), default=0, show_default=True,
              help="Start the search at LO + INDEX (mod range size), e.g. the array task index, "
                   "so tasks sharing a node take different ports.")
@click.option("--host", default=None, help="Address to listen on (default: what this node's hostname resolves to).")
@click.option("--interface", default=None, help="Listen on this network interface's IPv4 address instead.")
@state_dir_option
@click.option("--token-file", type=click.Path(path_type=Path), default=None,
              help="Bearer token file, mode 0600 (default STATE_DIR/jobs/JOB/token).")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The job's TLS certificate (default STATE_DIR/jobs/JOB/tls.crt).")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Its private key, mode 0600 (default STATE_DIR/jobs/JOB/tls.key).")
@click.option("--insecure-http", is_flag=True,
              help="Serve plain HTTP without TLS: the token travels unencrypted. Trusted single-user machines only.")
@click.option("--slot-env-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A 0600 JSON file {NAME: VALUE} of variables every slot gets (runtimes none and bwrap; "
                   "how a cloud sandbox hands its profile's env to slots).")
@click.option("--workspace-root", type=click.Path(path_type=Path), default=None,
              help="Where slot workspaces live (default node-local $TMPDIR/hpc-sandbox-UID/...).")
@click.option("--python", "slot_python", default=None,
              help="Interpreter that runs the slot agent (default: this one for none/bwrap, python3 in the image).")
@click.option("--max-body", type=click.IntRange(1024), default=64 << 20, show_default=True,
              help="Largest JSON request body in bytes.")
@click.option("--max-concurrent", type=click.IntRange(1), default=256, show_default=True,
              help="Tool calls running at once before new ones get 429.")
@click.option("--slot-memory", metavar="SIZE|auto|none", callback=_slot_memory, default=SLOT_MEMORY_AUTO,
              show_default=True,
              help="Resident memory each slot's commands may use, e.g. 512M, 4G (a number alone is MiB); "
                   f"auto: {DEFAULT_MEMORY_SHARE:.0%} of the node's memory (or of this job's cgroup limit, "
                   "if smaller) over the slots; none: no limit.")
@click.option("--pip-conf", type=click.Path(path_type=Path, exists=True, dir_okay=False, resolve_path=True),
              default=None,
              help="A pip.conf every slot reads as its PIP_CONFIG_FILE (bound read-only into bwrap and "
                   "Apptainer slots). Slots can read it: no secret you would not give them.")
@click.option("--slot-procs", type=click.IntRange(1), default=None,
              help="Processes each slot's commands may run at once. Default: no limit.")
@click.option("--slot-disk", metavar="SIZE", callback=_size, default=None,
              help="Disk each slot's workspace may use, e.g. 1G (a number alone is MiB). Default: no limit.")
def serve(job_id: str, slots: int, runtime: str, network: str, image: str | None, gpus: int, port_range: str,
          port_index: int, host: str | None, interface: str | None, state_dir: Path | None, token_file: Path | None,
          tls_cert: Path | None, tls_key: Path | None, insecure_http: bool, slot_env_file: Path | None,
          workspace_root: Path | None,
          slot_python: str | None, max_body: int, max_concurrent: int, slot_memory: int | str | None,
          pip_conf: Path | None, slot_procs: int | None, slot_disk: int | None) -> None:
    """Run one node server: N slots behind an authenticated HTTP API.

    The server binds the first free port of --port-range, starts its slots' agents,
    then writes a ready record under STATE_DIR/jobs/JOB/servers/. SIGTERM or SIGINT
    stops it cleanly: running commands are killed and the record is removed.
    """
    if host and interface:
        raise click.UsageError("give --host or --interface, not both")
    # A node server's log is what a person reads when a job misbehaves: say what it
    # does (ready, leases, stopping) even without -v.
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    state = resolve_state_dir(state_dir)
    extra_env = read_slot_env(slot_env_file) if slot_env_file else ()
    slot_memory = resolve_slot_memory(slot_memory, slots)
    if pip_conf is not None and pip_conf.is_relative_to(state.resolve()):
        raise click.BadParameter(f"{pip_conf} is inside the state directory, which no slot may see",
                                 param_hint="--pip-conf")
    if extra_env and runtime in ("apptainer", "singularity"):
        raise click.UsageError("--slot-env-file is for runtimes none and bwrap (Apptainer would put the values "
                               "on its command line, readable by anyone on the node)")
    options = ServeOptions(
        job_id=job_id,
        slots=slots,
        token_file=token_file or JobFolder(state, job_id).token,
        state_dir=state,
        runtime=RuntimeOptions(kind=runtime, image=image, gpus=gpus, python=slot_python, network=network,
                               extra_env=extra_env, slot_memory_mb=slot_memory, slot_procs=slot_procs,
                               pip_conf=pip_conf),
        port_range=parse_port_range(port_range),
        port_index=port_index,
        host=host,
        interface=interface,
        workspace_root=workspace_root,
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure_http=insecure_http,
        limits=ServerLimits(max_body_bytes=max_body, max_concurrent=max_concurrent),
        slot_limits=SlotLimits(memory_mb=slot_memory, max_procs=slot_procs, disk_mb=slot_disk),
    )
    raise SystemExit(run(options))
