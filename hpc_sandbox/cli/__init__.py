"""The `hpc-sandbox` command line: one module per command, registered here."""
from __future__ import annotations

import importlib
import logging

import click

from .. import __version__
from ..errors import HpcSandboxError

log = logging.getLogger(__name__)


# Each command lives in its own module, imported only when that command runs: a node
# server (`serve`, started once per array task) then never pays for jinja2, YAML and
# the schedulers. Listed in the order --help shows them.
COMMANDS = {
    "serve": "serve:serve",
    "submit": "submit:submit",
    "status": "status:status",
    "exec": "exec_:exec_",
    "cp": "cp:cp",
    "cancel": "cancel:cancel",
    "logs": "logs:logs",
    "check": "check:check",
    "cloud": "cloud:cloud",
    "render": "render:render",
}


class _Cli(click.Group):
    """Loads commands on demand; turns our own errors into one line on stderr and a
    non-zero exit, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, _, attr = target.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except HpcSandboxError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except OSError as exc:  # a file or program the user named, a full disk, a refused permission
            raise click.ClickException(_describe_os_error(exc)) from None
        except Exception as exc:  # a bug: still one line, with the way to see more
            log.debug("unexpected error", exc_info=True)
            raise click.ClickException(f"unexpected {type(exc).__name__}: {exc} "
                                       "(rerun with -vv for the traceback, and please report it)") from None


def _describe_os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpc-sandbox")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Sandbox slots for code-executing agents on HPC clusters.

    Start node servers (locally or through Slurm/PBS/Nomad), then run commands in
    their slots. `hpc-sandbox COMMAND --help` explains each command.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
