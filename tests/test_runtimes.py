"""Runtimes for real: bwrap namespaces, and Apptainer through its named test double.

Apptainer/Singularity cannot be installed here, so `tests/shims/apptainer` stands in:
it checks the argv our runtime builds and runs the agent under bwrap.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.errors import RuntimeUnavailable
from hpc_sandbox.runtime import ApptainerRuntime, BwrapRuntime, RuntimeOptions, make_runtime

from helpers import SHIMS, pids_matching, requires_bwrap, start_server, wait_until

SHIM_PATH = {"PATH": f"{SHIMS}:{os.environ['PATH']}"}


async def _run(server, *commands: str, slots: int = 1) -> list[list[dict]]:
    """Acquire `slots` slots and run every command in each; answers per slot."""
    async with NodeClient(server.endpoint) as client:
        leases = [await client.acquire(f"t{i}") for i in range(slots)]
        out = []
        for granted in leases:
            out.append([await client.execute(granted["slot"], granted["lease"], "bash", {"command": c}, timeout=30)
                        for c in commands])
        return out


def test_unknown_runtime_lists_the_valid_ones():
    with pytest.raises(RuntimeUnavailable, match="valid: none, bwrap, apptainer, singularity"):
        make_runtime(RuntimeOptions(kind="docker"))


def test_apptainer_argv_contains_everything_and_gpu_flag(tmp_path):
    image = tmp_path / "img.sif"
    image.write_bytes(b"")
    runtime = ApptainerRuntime(RuntimeOptions(kind="apptainer", image=str(image), gpus=1, executable="/x/apptainer"))
    argv, env = runtime.agent_command(tmp_path / "ws", 3)
    assert argv[:2] == ["/x/apptainer", "exec"]
    assert "--containall" in argv and "--nv" in argv
    assert argv[argv.index("--no-mount") + 1] == "bind-paths"
    assert f"{tmp_path / 'ws'}:/workspace" in argv
    assert argv[argv.index(str(image)) + 1:] == ["python3", "-u", "/opt/hpc-sandbox/agent.py", "--workspace", "/workspace"]
    assert "HPC_SANDBOX_SLOT=3" in argv
    assert set(env) <= {"PATH", "LANG"}


def test_missing_binary_or_image_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(RuntimeUnavailable, match="'apptainer' executable is not on PATH"):
        make_runtime(RuntimeOptions(kind="apptainer", image="x.sif")).check()
    with pytest.raises(RuntimeUnavailable, match="'bwrap' executable is not on PATH"):
        make_runtime(RuntimeOptions(kind="bwrap")).check()
    runtime = make_runtime(RuntimeOptions(kind="apptainer", image=str(tmp_path / "missing.sif"),
                                          executable=str(SHIMS / "apptainer")))
    with pytest.raises(RuntimeUnavailable, match="image not found"):
        runtime.check()


def test_apptainer_version_is_detected_through_spython():
    runtime = make_runtime(RuntimeOptions(kind="apptainer", image="docker://x", executable=str(SHIMS / "apptainer")))
    assert runtime.check() == "apptainer version 1.3.4-shim"


@requires_bwrap
def test_bwrap_slots_cannot_see_each_other_or_the_secrets(state_dir):
    server = start_server(state_dir, job_id="iso", slots=2, runtime="bwrap")
    marker = f"hpcsbx-iso-{os.getpid()}"
    token = server.token

    async def scenario():
        async with NodeClient(server.endpoint) as client:
            a, b = await client.acquire("a"), await client.acquire("b")

            async def run(granted, command):
                return (await client.execute(granted["slot"], granted["lease"], "bash", {"command": command},
                                             timeout=30))["result"]

            started = await run(a, f"echo secret-a > mine.txt; (exec -a {marker} sleep 30) & echo started")
            own_view = await run(a, "ls /workspace")
            other_view = await run(b, "ls -a /workspace /tmp; ps -eo args")
            probes = [await run(s, f"cat {state_dir}/jobs/iso/token 2>&1; ls {state_dir}/jobs 2>&1; "
                                   "touch /usr/hpcsbx-probe 2>&1 || echo readonly") for s in (a, b)]
            return started, own_view, other_view, probes

    try:
        started, own_view, other_view, probes = asyncio.run(scenario())
        assert started["stdout"] == "started\n"
        assert own_view["stdout"] == "mine.txt\n"
        assert "mine.txt" not in other_view["stdout"] and marker not in other_view["stdout"]
        for probe in probes:
            assert token not in probe["stdout"] + probe["stderr"]
            assert "readonly" in probe["stdout"]
        assert not Path("/usr/hpcsbx-probe").exists()
    finally:
        assert server.stop() == 0
    assert wait_until(lambda: not pids_matching(marker), 5)


@pytest.fixture
def home_outside_tmp():
    """A $HOME outside /tmp (which bwrap replaces anyway), so hiding is really tested."""
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="hpcsbx-home-", dir="/var/tmp"))
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE-KEY-MARKER\n")
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_bwrap_binds_back_only_the_python_that_lives_in_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    for sub in ("bin", "lib", ".ssh", "venv/bin"):
        (home / sub).mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    runtime = BwrapRuntime(RuntimeOptions(kind="bwrap"))
    runtime._prefixes = {home.resolve()}  # a Python built with --prefix=$HOME
    assert runtime.home_binds("python3") == ["--tmpfs", str(home.resolve()),
                                             "--ro-bind", str(home / "bin"), str(home / "bin"),
                                             "--ro-bind", str(home / "lib"), str(home / "lib")]
    runtime._prefixes = {(home / "venv").resolve(), Path("/usr")}  # a venv in $HOME over a system Python
    assert runtime.home_binds("python3") == ["--tmpfs", str(home.resolve()),
                                             "--ro-bind", str(home / "venv"), str(home / "venv")]


@requires_bwrap
def test_bwrap_hides_home_state_dir_munge_and_other_workspaces(home_outside_tmp):
    home = home_outside_tmp
    state_dir = home / ".hpc-sandbox"  # the default layout: the state dir lives in $HOME
    state_dir.mkdir(mode=0o700)
    workspaces = home.parent / f"{home.name}-ws"  # outside /tmp and outside $HOME
    server = start_server(state_dir, job_id="hide", slots=2, runtime="bwrap", env={"HOME": str(home)},
                          extra=["--workspace-root", str(workspaces)])
    probe = (f"cat {home}/.ssh/id_ed25519 {state_dir}/jobs/hide/token 2>&1; ls -A {home} {workspaces} 2>&1; "
             "ls -A /run/munge /etc/munge 2>&1; echo probed")
    try:
        [a, b] = asyncio.run(_run(server, "echo neighbour > mine.txt", probe, slots=2))
        seen = b[1]["result"]["stdout"] + b[1]["result"]["stderr"]
        assert seen.endswith("probed\n")
        assert "PRIVATE-KEY-MARKER" not in seen and server.token not in seen
        assert "mine.txt" not in seen and "slot-" not in seen
        assert "munge.socket" not in seen and "munge.key" not in seen
    finally:
        assert server.stop() == 0
        import shutil
        shutil.rmtree(workspaces, ignore_errors=True)


@requires_bwrap
def test_bwrap_timeout_kills_the_group_inside_the_namespace(state_dir):
    server = start_server(state_dir, job_id="bt", slots=1, runtime="bwrap")
    marker = f"hpcsbx-bt-{os.getpid()}"
    try:
        async def go():
            async with NodeClient(server.endpoint) as client:
                granted = await client.acquire("t")
                return await client.execute(granted["slot"], granted["lease"], "bash",
                                            {"command": f"(exec -a {marker} sleep 60) & wait"}, timeout=0.5)
        answer = asyncio.run(go())
        assert answer["result"]["timed_out"]
        assert wait_until(lambda: not pids_matching(marker), 5)
    finally:
        server.stop()


@requires_bwrap
def test_apptainer_slots_through_the_shim(state_dir, tmp_path):
    image = tmp_path / "python.sif"
    image.write_bytes(b"SIF shim image")
    server = start_server(state_dir, job_id="app", slots=1, runtime="apptainer",
                          extra=["--image", str(image), "--gpus", "1"], env=SHIM_PATH)
    try:
        [answers] = asyncio.run(_run(server, "pwd; echo $HOME; ls /root | wc -l", f"ls {state_dir} 2>&1 | head -1"))
        assert answers[0]["result"]["stdout"] == "/workspace\n/workspace\n0\n"
        assert "No such file" in answers[1]["result"]["stdout"]
    finally:
        server.stop()
    calls = (tmp_path / "python.sif.calls").read_text()
    assert "--containall" in calls and "--nv" in calls and ":/workspace" in calls


def test_apptainer_with_a_missing_image_fails_at_start_with_the_reason(state_dir, tmp_path):
    with pytest.raises(RuntimeError, match="image not found"):
        start_server(state_dir, job_id="noimg", runtime="apptainer",
                     extra=["--image", str(tmp_path / "nope.sif")], env=SHIM_PATH)
