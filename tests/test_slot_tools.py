"""What a slot's tools are (issue 19 item 7): `check` says which python3 a contained slot
gets, asked the way a slot's command asks; a profile's `pip_conf` reaches every slot as
its PIP_CONFIG_FILE (one file, read-only; its folder stays hidden), under runtimes none,
bwrap and Apptainer (the test double, tests/shims/apptainer)."""
from __future__ import annotations

import json
import os

import pytest

from hpc_sandbox import config
from hpc_sandbox.client import NodeClient
from hpc_sandbox.jobspec import serve_argv

from helpers import SHIMS, requires_bwrap, start_server

SHIM_PATH = {"PATH": f"{SHIMS}:{os.environ['PATH']}"}
MIRROR = "https://mirror.example.org/simple"


@requires_bwrap
def test_check_says_which_python3_a_contained_slot_gets(cli, tmp_path):
    image = tmp_path / "python.sif"
    image.write_bytes(b"SIF shim image")
    found = {f["what"]: f for f in json.loads(cli("check", "--json", "--image", str(image),
                                                  extra_env=SHIM_PATH).stdout)}
    for kind in ("bwrap", "apptainer"):
        line = found[f"python3 ({kind} slot)"]
        assert line["ok"] and line["detail"].startswith("/") and "(Python 3." in line["detail"], line
    # Without an image, Apptainer's slot python is not asked (it is the image's).
    plain = {f["what"] for f in json.loads(cli("check", "--json", extra_env=SHIM_PATH).stdout)}
    assert "python3 (bwrap slot)" in plain and "python3 (apptainer slot)" not in plain


def test_a_profiles_pip_conf_reaches_the_node_servers_command_line(tmp_path, monkeypatch):
    site = tmp_path / "site.yaml"
    site.write_text("profiles:\n  default: {pip_conf: ~/pip/pip.conf}\n")
    spec = config.load_spec(environ={"HOME": str(tmp_path), "HPC_SANDBOX_SITE_CONFIG": str(site)})
    monkeypatch.setenv("HOME", str(tmp_path))
    argv = serve_argv(spec, "job")
    assert argv[argv.index("--pip-conf") + 1] == str(spec.pip_conf) and spec.pip_conf.is_absolute()


@pytest.mark.parametrize("runtime", ["none", pytest.param("bwrap", marks=requires_bwrap),
                                     pytest.param("apptainer", marks=requires_bwrap)])
async def test_pip_conf_reaches_every_slot_read_only(state_dir, tmp_path, runtime):
    # Under the test's /tmp, which bwrap and Apptainer slots never see: only the file is bound.
    pip_conf = tmp_path / "private" / "pip.conf"
    pip_conf.parent.mkdir()
    pip_conf.write_text(f"[global]\nindex-url = {MIRROR}\n")
    extra, env = ["--pip-conf", str(pip_conf)], None
    if runtime == "apptainer":
        image = tmp_path / "python.sif"
        image.write_bytes(b"SIF shim image")
        extra, env = [*extra, "--image", str(image)], SHIM_PATH
    server = start_server(state_dir, job_id=f"pip-{runtime}", slots=1, runtime=runtime, extra=extra, env=env)
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("pip")
            listed = await client.execute(granted.slot, granted.lease, "bash",
                                          {"command": "python3 -m pip config list"}, timeout=120)
            assert listed.ok and f"global.index-url='{MIRROR}'" in listed.result["stdout"], listed
            if runtime != "none":
                where = await client.execute(granted.slot, granted.lease, "bash", {
                    "command": f'echo "$PIP_CONFIG_FILE"; ls {pip_conf.parent} 2>&1 | head -1; '
                               'echo x >> "$PIP_CONFIG_FILE" || echo refused'})
                lines = where.result["stdout"].splitlines()
                assert lines[0] == "/opt/hpc-sandbox/pip.conf" and "No such file" in lines[1], where
                assert lines[-1] == "refused" and pip_conf.read_text() == f"[global]\nindex-url = {MIRROR}\n"
    finally:
        assert server.stop() == 0


def test_serve_refuses_a_pip_conf_inside_the_state_dir(cli, state_dir):
    inside = state_dir / "pip.conf"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_text("[global]\n")
    result = cli("serve", "--job-id", "j", "--state-dir", str(state_dir), "--pip-conf", str(inside))
    assert result.returncode != 0 and "inside the state directory" in result.stderr, result
