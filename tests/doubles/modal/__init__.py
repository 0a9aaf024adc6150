"""A DOUBLE of the Modal SDK (`modal`, shapes of 1.6.4), for tests only. It is not Modal.

The Modal service cannot be reached from here, so tests of the overflow adapter
(hpc_sandbox/burst/modal.py) run against this package instead of the real SDK. Where
Modal would start a sandbox in a container in the cloud, the double starts a real local
process group, and serves its encrypted ports through real TLS tunnels on 127.0.0.1.

How it becomes `import modal`:
- in this process: `modal = doubles.modal._double.install(monkeypatch, state_dir)` (prepends
  tests/doubles to sys.path, swaps sys.modules["modal"*] for the double, sets
  MODAL_DOUBLE_DIR; the test's end terminates every sandbox and gives back the real SDK);
- in a subprocess: `env=modal._double.subprocess_env(state_dir)`, i.e. tests/doubles first
  on PYTHONPATH and MODAL_DOUBLE_DIR=<state dir>. Processes on one state dir share apps,
  sandboxes and fault controls (see _double.py for the files).

Surface (same names, parameter names and return shapes as the real SDK; a keyword the
real one lacks raises TypeError): App.lookup, Image.from_registry / .pip_install /
.add_local_python_source / .env, Secret.from_dict / .from_name, Probe.with_tcp,
Sandbox.create / .from_name / .from_id / .list and a sandbox's wait_until_ready, tunnels,
poll, wait, terminate, get_tags, set_tags, object_id, returncode; Tunnel; `exception`.
Async-capable calls have `.aio`, like the real SDK's. Nothing else of the SDK exists.

Tests drive and inspect it through `modal._double` (see its docstring): `calls`,
`check_against_real_sdk`, `ca_bundle`, `throttle`, `fail`, `create_delay`,
`named_secret`, `kill`, `sandboxes`, `cleanup`.

Liberties it takes (what a real Modal sandbox would do differently):
- Images are not built: the sandbox runs on this machine's Python and packages.
  `python`/`python3` as argv[0] become this interpreter; `.env()` and
  `add_local_python_source()` (module folders first on PYTHONPATH) are honoured,
  `pip_install` and `add_python` are recorded only.
- The sandbox's environment is the creating process's own, plus the image's env, every
  secret's values, then `env=` (Modal delivers secrets as environment variables too).
- One network namespace for all: a container port P in `encrypted_ports` becomes a free
  local port in argv (`--port P`, `--port=P`, `--port-range P-P`), and `--host X` becomes
  127.0.0.1. The readiness probe checks the remapped port.
- Tunnels: TLS terminated on 127.0.0.1 by the sandbox's supervisor process, with a
  certificate for 127.0.0.1/localhost from a CA made per state dir; trust it with
  SSL_CERT_FILE=`_double.ca_bundle(state_dir)`. Tunnel(host="127.0.0.1", port=<proxy>,
  unencrypted_host="", unencrypted_port=0). h2_ports and unencrypted_ports are not served.
- `timeout` (lifetime) is enforced (exit code 124); `idle_timeout`, gpu, cpu, memory,
  region, cloud are recorded, not enforced. Terminated or crashed sandboxes report 137.
- Working folder: a fresh folder per sandbox under the state dir; `workdir` (absolute,
  as Modal requires) is created inside it and used as the working folder.
- `Secret.from_name` holds what `_double.named_secret()` set, else {} (Modal would fail
  on an unknown name); missing required_keys raise NotFoundError at create.
- `wait_until_ready` on a sandbox that finished raises ConflictError, a timeout
  modal.exception.TimeoutError, as the real 1.6.4 does.
- No credentials: with MODAL_DOUBLE_DIR unset, calls that would reach Modal raise AuthError.
"""
from __future__ import annotations

from . import _double, exception  # noqa: F401 - modal._double: the controls, for tests
from ._sdk import App, Image, Probe, Sandbox, Secret
from ._tunnel import Tunnel
from .exception import Error

__version__ = "1.6.4"  # the SDK version whose shapes this double follows
__modal_double__ = True

__all__ = ["App", "Error", "Image", "Probe", "Sandbox", "Secret", "Tunnel", "exception"]
