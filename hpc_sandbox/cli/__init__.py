"""The `hpc-sandbox` command line: one module per command, registered here."""
from __future__ import annotations

import logging

import click

from .. import __version__
from ..errors import HpcSandboxError

log = logging.getLogger(__name__)


class _Cli(click.Group):
    """Turns our own errors into one line on stderr and a non-zero exit, never a traceback."""

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


# Each command lives in its own module and is registered here, in the order --help lists them.
from .serve import serve  # noqa: E402

main.add_command(serve)
from .submit import submit  # noqa: E402
from .status import status  # noqa: E402
from .exec_ import exec_  # noqa: E402
from .cancel import cancel  # noqa: E402
from .check import check  # noqa: E402

for _command in (submit, status, exec_, cancel, check):
    main.add_command(_command)
from .render import render; main.add_command(render)  # noqa: E402,E702
