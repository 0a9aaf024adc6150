"""What a cloud sandbox runs: the same node server as a cluster node.

    python -m hpc_sandbox.burst.entry --port 8000 --slots 4 --runtime none

The pool's token arrives as the environment variable TOKEN_ENV (a Modal Secret: never
in the image, the argv, a tag or a name). It is read once, written to the token file of a
job folder in a private state directory (by the job folder's own code, 0600, as `submit`
writes a job's), and the node server is started by `exec` with an environment that no
longer holds it: so neither the server's /proc/PID/environ nor any slot's environment
shows it. The server speaks plain HTTP inside the sandbox: Modal's edge terminates TLS
(`encrypted_ports`) and is the only way in.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from ..jobfolder import JobFolder, write_private

TOKEN_ENV = "HPC_SANDBOX_TOKEN"
# Names (never values) of the sandbox's variables its slots get: the profile's env and
# pass_env. The values come from the sandbox's own environment (Modal Secrets, env).
SLOT_ENV_NAMES = "HPC_SANDBOX_SLOT_ENV_NAMES"
JOB_ID = "cloud"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hpc_sandbox.burst.entry", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--runtime", default="none")
    parser.add_argument("--host", default="0.0.0.0")  # the sandbox's own network namespace
    options = parser.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        sys.exit(f"hpc-sandbox entry: no token in ${TOKEN_ENV} (the pool passes it as a Modal Secret)")
    state = Path(tempfile.mkdtemp(prefix="hpc-sandbox-state-"))  # 0700
    folder = JobFolder(state, JOB_ID)
    folder.create_token(token)
    names = [n for n in os.environ.get(SLOT_ENV_NAMES, "").split(",") if n and n != TOKEN_ENV]
    slot_env = {name: os.environ[name] for name in names if name in os.environ}
    # In the state dir, which bwrap slots do not see, like the token.
    write_private(folder.slot_env, json.dumps(slot_env).encode())
    environment = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    command = [sys.executable, "-m", "hpc_sandbox", "serve", "--job-id", JOB_ID, "--slots", str(options.slots),
               "--slot-env-file", str(folder.slot_env),
               "--runtime", options.runtime, "--host", options.host, "--port-range", f"{options.port}-{options.port}",
               "--state-dir", str(state), "--token-file", str(folder.token), "--insecure-http"]
    os.execve(sys.executable, command, environment)


if __name__ == "__main__":
    main()
