"""One sandbox of the Modal DOUBLE: the process that plays Modal's side of a container.

`Sandbox.create` starts this script (standard library only, run with `python -I` so that
nothing on PYTHONPATH shadows it) as the leader of a new session, with the sandbox's
environment and working folder, and sends it its configuration as JSON on stdin. It then:
- runs the sandbox's argv as its child, in the same process group, so that a signal to
  the group reaches everything the sandbox started;
- serves each encrypted port's tunnel: a TLS-terminating TCP proxy on a listening socket
  the creator bound and passed down (so its port is known before this process starts),
  forwarding plain TCP to the local port that stands for the container port, as Modal's
  edge does;
- enforces the lifetime (`timeout`), and on SIGTERM (terminate) stops the child, waiting
  `GRACE` seconds before SIGKILL;
- writes the sandbox's exit code to a file (first writer wins, see `write_exit`): the
  child's own, 137 when terminated, 124 when the lifetime ran out (Modal's codes).
It lives independently of the process that created the sandbox, as a Modal sandbox
outlives its client: a SIGKILLed client leaves its sandboxes running.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys

GRACE = 2.0  # seconds between SIGTERM and SIGKILL
TERMINATED, TIMED_OUT, NOT_STARTED = 137, 124, 127
log = logging.getLogger("modal-double.sandbox")


def write_exit(path: str, code: int) -> None:
    """Record the exit code unless one is recorded already: the file appears complete and
    at most once (link fails if it exists), so whoever decides first (terminate, lifetime,
    the child's own exit) is the one reported."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as out:
        out.write(str(code))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


class Supervisor:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.decided: int | None = None  # exit code chosen by a stop request, if any
        self.stop_requested = asyncio.Event()
        self.connections: set[asyncio.StreamWriter] = set()

    def request_stop(self, code: int) -> None:
        if self.decided is None:
            self.decided = code
            self.stop_requested.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, TERMINATED)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.config["cert"], self.config["key"])
        servers = []
        for tunnel in self.config["tunnels"]:
            sock = socket.socket(fileno=tunnel["fd"])
            servers.append(await asyncio.start_server(
                lambda r, w, port=tunnel["target_port"]: self.forward(r, w, port), sock=sock, ssl=context))
        try:
            child = await asyncio.create_subprocess_exec(*self.config["argv"], stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error("could not start %s: %s", self.config["argv"][0], exc)
            write_exit(self.config["exit_path"], NOT_STARTED)
            return
        exited = asyncio.ensure_future(child.wait())
        stopped = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({exited, stopped}, timeout=self.config["timeout"], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if exited.done() and self.decided is None:
            code = child.returncode if child.returncode >= 0 else 128 - child.returncode
        else:
            self.request_stop(TIMED_OUT)  # no-op if terminate asked first
            code = self.decided
        # Tunnels close before the exit code shows, so a caller who sees the sandbox
        # finished never reaches a half-dead one through them.
        for server in servers:
            server.close()
        for writer in list(self.connections):
            writer.close()
        if child.returncode is None:
            try:
                os.killpg(os.getpgid(0), signal.SIGTERM)  # our own handler ignores it: decided already
                await asyncio.wait_for(exited, GRACE)
            except (asyncio.TimeoutError, ProcessLookupError):
                pass
        write_exit(self.config["exit_path"], code)
        logging.shutdown()
        os.killpg(os.getpgid(0), signal.SIGKILL)  # whatever the sandbox left, this process included

    async def forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        """One tunnel connection: TLS from the client, plain TCP to the sandbox's port."""
        self.connections.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", port)
            self.connections.add(upstream)
            await asyncio.gather(pump(reader, upstream), pump(up_reader, writer))
        except OSError:
            pass  # nothing listens there (yet): the client sees the connection close
        finally:
            for side in (writer, upstream):
                if side is not None:
                    self.connections.discard(side)
                    side.close()


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy one direction until it ends, then pass the end on: half-close plain TCP; TLS
    here cannot half-close, so close it. A side that fails ends its direction the same way."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                writer.close()
        else:
            writer.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="modal-double: %(message)s", stream=sys.stderr)
    config = json.load(sys.stdin)
    asyncio.run(Supervisor(config).run())


if __name__ == "__main__":
    main()
