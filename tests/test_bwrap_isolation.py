"""bwrap slots for real: no capability on the host, hidden neighbours, any venv, no network.

Most tests build the argv with `BwrapRuntime.agent_command` and run it directly,
speaking the agent's JSON-lines protocol; the capability test also goes through a
real node server.
"""
from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.runtime import BwrapRuntime, RuntimeOptions

from helpers import requires_bwrap, start_server
from test_runtimes import bash_in_slot

pytestmark = requires_bwrap
NO_CAPS = "CapEff:\t0000000000000000"
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to user nobody needs root (CI runs as root)")


def run_in_slot(argv: list[str], env: dict[str, str], *commands: str, as_user: str | None = None,
                timeout: float = 30) -> list[dict]:
    """Start the agent with `argv`, run each bash command in turn, return the results."""
    if as_user:
        argv = ["setpriv", f"--reuid={as_user}", "--regid=nogroup", "--clear-groups", *argv]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd="/")
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        ready = proc.stdout.readline()
        assert ready and json.loads(ready)["result"]["ready"], f"agent did not start: {proc.stderr.read()}"
        results = []
        for number, command in enumerate(commands, 1):
            proc.stdin.write(json.dumps({"id": str(number), "tool": "bash", "args": {"command": command}}) + "\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            assert answer["id"] == str(number) and answer["ok"], answer
            results.append(answer["result"])
        proc.stdin.close()
        assert proc.wait(10) == 0
        return results
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def output(result: dict) -> str:
    return result["stdout"] + result["stderr"]


@pytest.fixture
def var_tmp():
    """A folder outside /tmp (which every slot gets privately anyway)."""
    path = Path(tempfile.mkdtemp(prefix="hpcsbx-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# 1. No capability on the host ------------------------------------------------------------

def test_a_slot_of_a_root_server_holds_no_capability(state_dir):
    server = start_server(state_dir, job_id="caps", slots=1, runtime="bwrap")
    home = str(Path.home())
    commands = ["grep CapEff /proc/self/status",
                "mount -o remount,rw,bind /var 2>&1; echo rc=$?",
                f"umount -l {home} 2>&1; echo rc=$?",
                "umount -l /workspace 2>&1; echo rc=$?",
                "unshare -U -r true 2>&1; echo rc=$?"]

    async def scenario():
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("caps")
            return [await bash_in_slot(client, granted, c) for c in commands]

    try:
        caps, remount, umount_home, umount_ws, new_userns = asyncio.run(scenario())
    finally:
        assert server.stop() == 0
    assert caps["stdout"].strip() == NO_CAPS
    for attempt in (remount, umount_home, umount_ws):
        assert "rc=0" not in attempt["stdout"], attempt
    assert "rc=0" not in new_userns["stdout"], "a slot could make a user namespace and regain capabilities"


def test_a_slot_keeps_the_callers_ids(tmp_path):
    argv, env = BwrapRuntime(RuntimeOptions(kind="bwrap")).agent_command(tmp_path, 0)
    [ids] = run_in_slot(argv, env, "id -u; id -g; touch made; stat -c %u:%g made")
    assert ids["stdout"] == f"{os.getuid()}\n{os.getgid()}\n{os.getuid()}:{os.getgid()}\n"
    assert (tmp_path / "made").stat().st_uid == os.getuid()


@requires_root
def test_a_slot_of_an_unprivileged_server_holds_no_capability(var_tmp, monkeypatch):
    nobody = pwd.getpwnam("nobody")
    workspace = var_tmp / "ws"
    workspace.mkdir()
    os.chown(var_tmp, nobody.pw_uid, nobody.pw_gid)
    os.chown(workspace, nobody.pw_uid, nobody.pw_gid)
    # The argv is built here, as root, but bwrap will run as nobody: it must carry
    # nobody's ids and home, as it would in a server running as nobody.
    monkeypatch.setenv("HOME", nobody.pw_dir)
    monkeypatch.setattr(os, "getuid", lambda: nobody.pw_uid)
    monkeypatch.setattr(os, "getgid", lambda: nobody.pw_gid)
    argv, env = BwrapRuntime(RuntimeOptions(kind="bwrap", python="/usr/bin/python3")).agent_command(workspace, 0)
    monkeypatch.undo()
    [answer, userns] = run_in_slot(argv, env, "grep CapEff /proc/self/status; id -u; touch /workspace/mine",
                                   "unshare -U -r true 2>&1; echo rc=$?", as_user="nobody")
    assert answer["stdout"] == f"{NO_CAPS}\n{nobody.pw_uid}\n"
    assert (workspace / "mine").stat().st_uid == nobody.pw_uid
    assert "rc=0" not in userns["stdout"]


# 2. A hidden folder that contains the slot's own workspace -------------------------------

@pytest.mark.parametrize("spelling", ["real", "symlinked"])
def test_a_hidden_base_hides_other_servers_roots_but_not_the_own_workspace(var_tmp, spelling):
    # The server names the base as $TMPDIR/hpc-sandbox-<uid>; on clusters TMPDIR often
    # goes through a symlink (/scratch -> /local/scratch).
    (var_tmp / "local").mkdir()
    (var_tmp / "scratch").symlink_to(var_tmp / "local")
    base = var_tmp / ("local" if spelling == "real" else "scratch") / "hpc-sandbox-0"
    mine, other = base / "job-a-1", base / "job-b-2"
    (mine / "slot-0").mkdir(parents=True)
    other.mkdir()
    (other / "secret.txt").write_text("NEIGHBOUR-SECRET\n")
    runtime = BwrapRuntime(RuntimeOptions(kind="bwrap", hidden_paths=(base,)))
    argv, env = runtime.agent_command(mine / "slot-0", 0)
    assert argv.index(str(base.resolve())) < argv.index(str(mine / "slot-0"))
    [listing, probe, write] = run_in_slot(argv, env, f"ls -A {base} {mine} 2>&1",
                                          f"cat {other}/secret.txt 2>&1; echo probed",
                                          "echo written > /workspace/out.txt && cat /workspace/out.txt")
    assert "job-b-2" not in output(listing) and "slot-0" not in output(listing)
    assert "NEIGHBOUR-SECRET" not in output(probe) and output(probe).endswith("probed\n")
    assert write["stdout"] == "written\n"
    assert (mine / "slot-0" / "out.txt").read_text() == "written\n"


# 3. The server's venv, wherever it lives ------------------------------------------------

def _venv(where: Path, base_python: str) -> Path:
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(where)], check=True)
    return where / "bin" / "python"


@pytest.mark.parametrize("base_python", [sys.executable, "/usr/bin/python3"], ids=["pyenv-base", "system-base"])
def test_a_venv_under_tmp_runs_the_agent(tmp_path, base_python):
    venv = Path(tempfile.mkdtemp(prefix="hpcsbx-venv-", dir="/tmp"))
    try:
        python = _venv(venv, base_python)
        argv, env = BwrapRuntime(RuntimeOptions(kind="bwrap", python=str(python))).agent_command(tmp_path, 0)
        [answer] = run_in_slot(argv, env, "echo ok")
        assert answer["stdout"] == "ok\n"
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def test_a_venv_in_home_runs_the_agent_and_home_stays_hidden(tmp_path, var_tmp, monkeypatch):
    home = var_tmp / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE-KEY-MARKER\n")
    python = _venv(home / "venv", "/usr/bin/python3")
    monkeypatch.setenv("HOME", str(home))
    argv, env = BwrapRuntime(RuntimeOptions(kind="bwrap", python=str(python))).agent_command(tmp_path, 0)
    [answer] = run_in_slot(argv, env, f"echo ok; cat {home}/.ssh/id_ed25519 2>&1")
    assert answer["stdout"].startswith("ok\n") and "PRIVATE-KEY-MARKER" not in output(answer)


# 4. Network per slot --------------------------------------------------------------------

@pytest.fixture
def host_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


OWN_LOOPBACK = ("/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen(); "
                "socket.create_connection(s.getsockname()); print(\"loopback ok\")'")


@pytest.mark.parametrize("network", ["host", "none"])
def test_network_none_cuts_the_slot_off_the_host(tmp_path, host_listener, network):
    runtime = BwrapRuntime(RuntimeOptions(kind="bwrap", network=network))
    argv, env = runtime.agent_command(tmp_path, 0)
    [connect, loopback] = run_in_slot(argv, env, f"exec 3<>/dev/tcp/127.0.0.1/{host_listener} && echo connected",
                                      OWN_LOOPBACK)
    assert ("connected" in connect["stdout"]) == (network == "host")
    assert loopback["stdout"] == "loopback ok\n"
