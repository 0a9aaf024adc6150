"""Tests of the Modal SDK double (tests/doubles/modal) itself: its shapes against the real
installed SDK, and its behaviour with real local processes, real TLS and real signals."""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from doubles.modal._double import install

pytest.importorskip("modal", reason="the double's shapes are checked against the installed modal SDK")

# A tiny HTTP server for a sandbox: answers GET with the token it got in its environment.
SERVER = textwrap.dedent("""
    import http.server, os, sys
    port = int(sys.argv[sys.argv.index('--port') + 1])
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = os.environ.get('HPC_SANDBOX_TOKEN', '').encode()
            self.send_response(200)
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(('127.0.0.1', port), Handler).serve_forever()
""")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "modal-double"


@pytest.fixture
def modal(monkeypatch, state: Path):
    """The double as `modal` in this process; its teardown terminates every sandbox."""
    return install(monkeypatch, state)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


async def sleeper(modal, *, app_name: str = "double-test", **kwargs):
    app = await modal.App.lookup.aio(app_name, create_if_missing=True)
    return await modal.Sandbox.create.aio("sleep", "30", app=app, **kwargs)


# --- shapes ---------------------------------------------------------------------------------------

SURFACE = ["App.lookup", "Image.from_registry", "Image.pip_install", "Image.add_local_python_source", "Image.env",
           "Secret.from_dict", "Secret.from_name", "Probe.with_tcp", "Sandbox.create", "Sandbox.from_name",
           "Sandbox.from_id", "Sandbox.list", "Sandbox.wait_until_ready", "Sandbox.tunnels", "Sandbox.poll",
           "Sandbox.wait", "Sandbox.terminate", "Sandbox.get_tags", "Sandbox.set_tags"]


def resolve(module, name: str):
    target = module
    for part in name.split("."):
        target = getattr(target, part)
    return target


def test_surface_has_the_real_parameters_and_aio_where_the_real_has_it(modal):
    real = modal._double.real_modal()
    assert real is not modal and not hasattr(real, "__modal_double__")
    for name in SURFACE:
        ours, theirs = resolve(modal, name), resolve(real, name)
        shape = [(p.name, p.kind) for p in inspect.signature(ours).parameters.values()]
        assert shape == [(p.name, p.kind) for p in inspect.signature(theirs).parameters.values()], name
        assert hasattr(ours, "aio") == hasattr(theirs, "aio"), name


def test_exceptions_have_the_real_hierarchy(modal):
    real = modal._double.real_modal().exception
    names = [n for n, v in vars(modal.exception).items() if isinstance(v, type) and v.__module__ == "modal.exception"]
    assert {"Error", "AuthError", "NotFoundError", "ResourceExhaustedError", "ImageBuildError", "SandboxTerminatedError",
            "InvalidError", "TimeoutError", "SandboxTimeoutError", "ConnectionError", "AlreadyExistsError"} <= set(names)
    for name in names:
        ours = [k.__name__ for k in getattr(modal.exception, name).__mro__]
        assert ours == [k.__name__ for k in getattr(real, name).__mro__], name


def test_signature_check_catches_a_misspelled_keyword(modal):
    check, Call = modal._double.check_against_real_sdk, modal._double.Call
    check([Call("Sandbox.create", ("python", "-m", "x"), {"encrypted_ports": [8000], "timeout": 60}),
           Call("Sandbox.wait_until_ready", (), {"timeout": 5}), Call("Image.pip_install", ("aiohttp",), {}),
           Call("Sandbox.list", (), {"app_id": "ap-1", "tags": {}})])
    with pytest.raises(AssertionError, match=r"'encrypted_port'.*encrypted_ports"):
        check([Call("Sandbox.create", ("python",), {"encrypted_port": [8000]})])
    with pytest.raises(AssertionError, match="Sandbox.tunnels"):
        check([Call("Sandbox.tunnels", (1, 2), {})])  # too many positional arguments
    with pytest.raises(AssertionError, match="no modal.Sandbox.exec_all"):
        check([Call("Sandbox.exec_all", (), {})])
    # The double itself refuses the keyword too, and the refused call is on record.
    with pytest.raises(TypeError):
        modal.Sandbox.create("sleep", "1", encrypted_port=[8000])
    with pytest.raises(AssertionError, match="encrypted_port"):
        check(modal._double.calls)


def test_argv_is_remapped_to_local_ports(modal):
    remap = modal._double.remap_argv
    ports = {8000: 41000}
    assert remap(["python3", "-m", "srv", "--host", "0.0.0.0", "--port", "8000", "--other", "8000"], ports) == \
        [sys.executable, "-m", "srv", "--host", "127.0.0.1", "--port", "41000", "--other", "8000"]
    assert remap(["srv", "--host=::", "--port=8000", "--port-range", "8000-8000"], ports) == \
        ["srv", "--host=127.0.0.1", "--port=41000", "--port-range", "41000-41000"]
    assert remap(["srv", "--port", "9000", "--port-range=9100-9163"], ports) == \
        ["srv", "--port", "9000", "--port-range=9100-9163"]  # not an encrypted port: left alone


# --- a sandbox, end to end ------------------------------------------------------------------------

async def test_server_sandbox_through_a_verified_tls_tunnel(modal, state, monkeypatch):
    token = "tok-" + os.urandom(8).hex()
    modal._double.named_secret("site", {"SITE_KEY": "k1"})
    app = await modal.App.lookup.aio("double-test", create_if_missing=True)
    image = modal.Image.from_registry("python:3.11-slim", add_python=None).pip_install("aiohttp") \
        .add_local_python_source("hpc_sandbox").env({"IMAGE_VAR": "1"})
    sb = await modal.Sandbox.create.aio(
        "python", "-c", SERVER, "--host", "0.0.0.0", "--port", "8000", app=app, name="srv", tags={"pool": "p1"},
        image=image, secrets=[modal.Secret.from_dict({"HPC_SANDBOX_TOKEN": token}), modal.Secret.from_name("site")],
        env={"EXTRA": "x"}, timeout=60, idle_timeout=30, gpu=None, cpu=1.0, memory=512, region=None,
        encrypted_ports=[8000], readiness_probe=modal.Probe.with_tcp(8000), verbose=False)
    assert sb.object_id.startswith("sb-") and await sb.poll.aio() is None
    await sb.wait_until_ready.aio(timeout=20)
    tunnel = (await sb.tunnels.aio(timeout=10))[8000]
    assert (tunnel.host, tunnel.unencrypted_host, tunnel.unencrypted_port) == ("127.0.0.1", "", 0)
    assert tunnel.url == f"https://127.0.0.1:{tunnel.port}"

    # Trusted through the double's CA, as Modal's edge is through the system's CAs...
    bundle = modal._double.ca_bundle(state)
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    context = ssl.create_default_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    with urllib.request.urlopen(tunnel.url + "/", context=context, timeout=10) as answer:
        assert answer.read().decode() == token  # the secret reached the process as an env var
    with urllib.request.urlopen(f"https://localhost:{tunnel.port}/",
                                context=ssl.create_default_context(cafile=str(bundle)), timeout=10) as answer:
        assert answer.status == 200
    # ...and verification is real: without that CA the same URL is refused.
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(urllib.error.URLError) as refused_tls:
        urllib.request.urlopen(tunnel.url + "/", context=ssl.create_default_context(), timeout=10)
    assert isinstance(refused_tls.value.reason, ssl.SSLCertVerificationError)

    [seen] = modal._double.sandboxes()
    assert seen["id"] == sb.object_id and seen["argv"][0] == sys.executable
    assert seen["argv"][-4:] == ["--host", "127.0.0.1", "--port", str(seen["ports"]["8000"])]
    assert seen["env"]["HPC_SANDBOX_TOKEN"] == token and seen["env"]["SITE_KEY"] == "k1"
    assert seen["env"]["EXTRA"] == "x" and seen["env"]["IMAGE_VAR"] == "1"
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parents[1])
    assert Path(seen["workdir"]).is_dir() and seen["idle_timeout"] == 30
    assert await sb.get_tags.aio() == {"pool": "p1"}
    await sb.set_tags.aio({"pool": "p1", "state": "busy"})
    assert await (await modal.Sandbox.from_id.aio(sb.object_id)).get_tags.aio() == {"pool": "p1", "state": "busy"}

    assert await sb.terminate.aio(wait=True) == 137
    assert await sb.poll.aio() == 137 and gone(seen["pid"]) and refused(tunnel.port)
    await sb.terminate.aio()  # idempotent

    # The token went where secrets go, and nowhere else the double writes.
    for text in [*seen["argv"], json.dumps(seen["tags"]), seen["name"], Path(seen["log"]).read_text(),
                 *(p.read_text() for p in (state / "sandboxes").glob("*.json")), (state / "calls.jsonl").read_text()]:
        assert token not in text
    modal._double.check_against_real_sdk(modal._double.calls)


async def test_a_subprocess_lists_finds_and_is_throttled(modal, state):
    app = await modal.App.lookup.aio("double-test", create_if_missing=True)
    mine = await modal.Sandbox.create.aio("sleep", "30", app=app, name="one", tags={"pool": "p", "kind": "a"})
    await modal.Sandbox.create.aio("sleep", "30", app=app, tags={"pool": "other"})
    modal._double.throttle(1)  # read by the subprocess from the state dir
    script = textwrap.dedent("""
        import json, modal
        app = modal.App.lookup("double-test")
        found = [sb.object_id for sb in modal.Sandbox.list(app_id=app.app_id, tags={"pool": "p"})]
        named = modal.Sandbox.from_name("double-test", "one").object_id
        try:
            modal.Sandbox.create("sleep", "1", app=app)
            throttled = False
        except modal.exception.ResourceExhaustedError:
            throttled = True
        print(json.dumps({"double": modal.__modal_double__, "found": found, "named": named, "throttled": throttled}))
    """)
    done = subprocess.run([sys.executable, "-c", script], env=modal._double.subprocess_env(state),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"double": True, "found": [mine.object_id], "named": mine.object_id,
                                       "throttled": True}
    modal._double.check_against_real_sdk(modal._double.recorded_calls(state))  # its calls are on record too


async def test_sandbox_outlives_a_sigkilled_creator(modal, state):
    script = textwrap.dedent("""
        import time, modal
        app = modal.App.lookup("survivor", create_if_missing=True)
        sb = modal.Sandbox.create("sleep", "60", app=app, tags={"owner": "killed"})
        print(sb.object_id, flush=True)
        time.sleep(60)
    """)
    with subprocess.Popen([sys.executable, "-c", script], env=modal._double.subprocess_env(state),
                          stdout=subprocess.PIPE, text=True) as creator:
        try:
            sandbox_id = creator.stdout.readline().strip()
        finally:
            creator.send_signal(signal.SIGKILL)
    app = await modal.App.lookup.aio("survivor")
    [sb] = [sb async for sb in modal.Sandbox.list.aio(app_id=app.app_id, tags={"owner": "killed"})]
    assert sb.object_id == sandbox_id and await sb.poll.aio() is None
    pid = modal._double.load_record(sandbox_id)["pid"]
    assert not gone(pid)
    await (await modal.Sandbox.from_id.aio(sandbox_id)).terminate.aio()
    assert gone(pid) and await sb.poll.aio() == 137
    assert [s async for s in modal.Sandbox.list.aio(app_id=app.app_id)] == []


# --- faults and limits ----------------------------------------------------------------------------

async def test_throttle_and_injected_failures(modal):
    modal._double.fail("App.lookup", modal.exception.AuthError)
    with pytest.raises(modal.exception.AuthError):
        await modal.App.lookup.aio("double-test", create_if_missing=True)
    app = await modal.App.lookup.aio("double-test", create_if_missing=True)
    assert (await modal.App.lookup.aio("double-test")).app_id == app.app_id
    with pytest.raises(modal.exception.NotFoundError):
        modal.App.lookup("never-made")

    modal._double.throttle(2)
    modal._double.fail("Sandbox.create", modal.exception.ImageBuildError("bad image"))
    for expected in (modal.exception.ImageBuildError, modal.exception.ResourceExhaustedError,
                     modal.exception.ResourceExhaustedError):
        with pytest.raises(expected):
            await modal.Sandbox.create.aio("sleep", "30", app=app)
    sb = await modal.Sandbox.create.aio("sleep", "30", app=app, name="only")
    with pytest.raises(modal.exception.AlreadyExistsError):
        await modal.Sandbox.create.aio("sleep", "30", app=app, name="only")
    assert (await modal.Sandbox.from_name.aio("double-test", "only")).object_id == sb.object_id
    with pytest.raises(modal.exception.NotFoundError):
        await modal.Sandbox.from_name.aio("double-test", "nobody")
    with pytest.warns(modal.exception.DeprecationError):
        assert [s.object_id for s in modal.Sandbox.list()] == [sb.object_id]


async def test_create_delay_leaves_the_callers_loop_free(modal):
    modal._double.create_delay(0.5)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    started = time.monotonic()
    await sleeper(modal)
    ticker.cancel()
    assert time.monotonic() - started >= 0.5 and ticks >= 15


async def test_kill_crashes_the_sandbox_and_closes_its_tunnel(modal):
    sb = await sleeper(modal, encrypted_ports=[8000])
    port = (await sb.tunnels.aio())[8000].port
    assert not refused(port)  # the proxy accepts (nothing behind it yet, so it hangs up)
    modal._double.kill(sb.object_id)
    assert await sb.poll.aio() == 137 and refused(port)
    assert modal._double.sandboxes() == []


async def test_lifetime_and_readiness_limits(modal):
    short = await sleeper(modal, timeout=1)
    deaf = await sleeper(modal, readiness_probe=modal.Probe.with_tcp(8000), encrypted_ports=[8000])
    app = await modal.App.lookup.aio("double-test")
    quitter = await modal.Sandbox.create.aio("true", app=app, readiness_probe=modal.Probe.with_tcp(8000))
    with pytest.raises(modal.exception.TimeoutError):
        await deaf.wait_until_ready.aio(timeout=1)  # nothing listens on the probe's port
    with pytest.raises(modal.exception.ConflictError):
        await quitter.wait_until_ready.aio(timeout=5)  # finished before it was ready
    assert await quitter.poll.aio() == 0
    with pytest.raises(modal.exception.SandboxTimeoutError):
        await asyncio.wait_for(short.wait.aio(), 5)
    assert await short.poll.aio() == 124 and await deaf.poll.aio() is None


def test_install_gives_the_real_sdk_back_and_leaves_no_process(tmp_path):
    before = sys.modules.get("modal")
    with pytest.MonkeyPatch.context() as patch:
        double = install(patch, tmp_path / "state")
        import modal as imported
        assert imported is double and double.__modal_double__
        sb = double.Sandbox.create("sleep", "30", app=double.App.lookup("a", create_if_missing=True))
        pid = double._double.load_record(sb.object_id)["pid"]
        patch.delenv("MODAL_DOUBLE_DIR")
        with pytest.raises(double.exception.AuthError):  # no state dir: like no Modal credentials
            double.App.lookup("a")
        patch.setenv("MODAL_DOUBLE_DIR", str(tmp_path / "state"))
    assert sys.modules.get("modal") is before and gone(pid)
