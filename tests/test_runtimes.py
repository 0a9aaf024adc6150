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


async def bash_in_slot(client, granted, command: str, timeout: float = 30) -> dict:
    """Run one bash command in a leased slot; its result (stdout, stderr, exit_code...)."""
    answer = await client.execute(granted.slot, granted.lease, "bash", {"command": command}, timeout=timeout)
    return answer.result


async def _run(server, *commands: str, slots: int = 1) -> list[list[dict]]:
    """Acquire `slots` slots and run every command in each; results per slot."""
    async with NodeClient(server.endpoint) as client:
        leases = [await client.acquire(f"t{i}") for i in range(slots)]
        return [[await bash_in_slot(client, granted, c) for c in commands] for granted in leases]


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
    assert argv[argv.index(str(image)) + 1:] == ["python3", "-u", "/opt/hpc-sandbox/agent.py", "--workspace", "/workspace",
                                                   "--own-pid-namespace", "--scratch", "/tmp", "--scratch",
                                                   "/var/tmp", "--scratch", "/dev/shm"]
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

            def run(granted, command):
                return bash_in_slot(client, granted, command)

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


@pytest.fixture
def fake_home(home_outside_tmp, monkeypatch):
    """$HOME outside /tmp, and no host path hidden on every node (munge), for exact argv."""
    monkeypatch.setenv("HOME", str(home_outside_tmp))
    monkeypatch.setattr("hpc_sandbox.runtime.BWRAP_HIDDEN_HOST_PATHS", ())
    return home_outside_tmp.resolve()


def test_bwrap_binds_back_only_the_python_that_lives_in_home(fake_home):
    home = fake_home
    for sub in ("bin", "lib", "venv/bin"):
        (home / sub).mkdir(parents=True)
    runtime = BwrapRuntime(RuntimeOptions(kind="bwrap"))
    # A Python built with --prefix=$HOME: its bin and lib only, never ~/.ssh.
    assert runtime.hiding_mounts(frozenset({home})) == ["--tmpfs", "/tmp", "--tmpfs", str(home),
                                                        "--ro-bind", str(home / "bin"), str(home / "bin"),
                                                        "--ro-bind", str(home / "lib"), str(home / "lib")]
    # A venv in $HOME over a system Python: the venv only; /usr is visible anyway.
    assert runtime.hiding_mounts(frozenset({home / "venv", Path("/usr")})) == [
        "--tmpfs", "/tmp", "--tmpfs", str(home), "--ro-bind", str(home / "venv"), str(home / "venv")]


def test_bwrap_mounts_deeper_paths_last_so_the_deeper_rule_wins(fake_home, tmp_path):
    home = fake_home
    prefix, hidden_in_prefix, state = home / "py", home / "py" / "secrets", home / ".hpc-sandbox"
    for folder in (hidden_in_prefix, state, tmp_path / "venv"):
        folder.mkdir(parents=True)
    (state / "token").write_text("t")
    runtime = BwrapRuntime(RuntimeOptions(kind="bwrap", hidden_paths=(hidden_in_prefix, state, state / "token")))
    argv = runtime.hiding_mounts(frozenset({prefix, tmp_path / "venv"}))
    mounts = [argv[i:i + 3] if argv[i] == "--ro-bind" else argv[i:i + 2]
              for i, arg in enumerate(argv) if arg.startswith("--")]
    # The hidden folder inside the bound-back prefix is hidden again after it; the
    # venv under the slot's private /tmp is bound back after that tmpfs; $HOME's tmpfs
    # already hides the state dir and its token, so they take no mount of their own.
    assert sorted(mounts) == sorted([["--tmpfs", "/tmp"], ["--tmpfs", str(home)],
                                     ["--ro-bind", str(prefix), str(prefix)], ["--tmpfs", str(hidden_in_prefix)],
                                     ["--ro-bind", str(tmp_path / "venv"), str(tmp_path / "venv")]])
    position = {mount[-1]: index for index, mount in enumerate(mounts)}
    assert position["/tmp"] < position[str(tmp_path / "venv")]
    assert position[str(home)] < position[str(prefix)] < position[str(hidden_in_prefix)]


def test_bwrap_resolves_hidden_paths_and_hides_them_before_binding_the_workspace(home_outside_tmp):
    outside_tmp = home_outside_tmp.resolve()  # under /tmp, a hidden path would need no mount of its own
    base = outside_tmp / "base"
    (base / "job-a-1" / "slot-0").mkdir(parents=True)
    (outside_tmp / "link").symlink_to(outside_tmp)  # TMPDIR=/scratch/me with /scratch -> /local/scratch
    runtime = BwrapRuntime(RuntimeOptions(kind="bwrap", hidden_paths=(outside_tmp / "link" / "base",)))
    argv, _ = runtime.agent_command(outside_tmp / "link" / "base" / "job-a-1" / "slot-0", 0)
    options = argv[:argv.index("--bind")]
    assert str(outside_tmp / "link" / "base") not in options  # bwrap cannot make a mount point through a symlink
    assert options[options.index(str(base)) - 1] == "--tmpfs"
    assert argv[argv.index("--bind") + 2] == "/workspace"


def test_bwrap_slot_has_its_own_user_namespace_and_no_capability():
    argv, _ = BwrapRuntime(RuntimeOptions(kind="bwrap", executable="/x/bwrap")).agent_command(Path("/ws"), 0)
    options = argv[:argv.index("--bind")]
    assert "--unshare-user" in options and options[options.index("--cap-drop") + 1] == "ALL"
    assert options[options.index("--uid") + 1] == str(os.getuid())
    assert options[options.index("--gid") + 1] == str(os.getgid())
    assert "--unshare-net" not in options


def test_network_modes_are_checked_once_for_every_runtime(tmp_path):
    with pytest.raises(RuntimeUnavailable, match="unknown network 'vpn'; valid: host, none"):
        make_runtime(RuntimeOptions(kind="bwrap", network="vpn"))
    with pytest.raises(RuntimeUnavailable, match="runtime none cannot cut a slot off the network"):
        make_runtime(RuntimeOptions(kind="none", network="none"))
    assert "--unshare-net" in make_runtime(RuntimeOptions(kind="bwrap", network="none")).namespace_args()
    image = tmp_path / "img.sif"
    image.write_bytes(b"")
    for network, flags in (("none", ["--net", "--network", "none"]), ("host", [])):
        argv, _ = make_runtime(RuntimeOptions(kind="apptainer", image=str(image), network=network,
                                              executable="/x/apptainer")).agent_command(tmp_path, 0)
        found = [arg for arg in argv if arg in ("--net", "--network", "none")]
        assert found == flags


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
        seen = b[1]["stdout"] + b[1]["stderr"]
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
                return await bash_in_slot(client, granted, f"(exec -a {marker} sleep 60) & wait", timeout=0.5)
        assert asyncio.run(go())["timed_out"]
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
        assert answers[0]["stdout"] == "/workspace\n/workspace\n0\n"
        assert "No such file" in answers[1]["stdout"]
    finally:
        server.stop()
    calls = (tmp_path / "python.sif.calls").read_text()
    assert "--containall" in calls and "--nv" in calls and ":/workspace" in calls


def test_apptainer_with_a_missing_image_fails_at_start_with_the_reason(state_dir, tmp_path):
    with pytest.raises(RuntimeError, match="image not found"):
        start_server(state_dir, job_id="noimg", runtime="apptainer",
                     extra=["--image", str(tmp_path / "nope.sif")], env=SHIM_PATH)
