"""`hpc-sandbox render`: stdout is the jobspec only, errors are one line, output is stable."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpc_sandbox.cli import main
from hpc_sandbox.config import load_spec
from hpc_sandbox.jobspec import render

CONFIG = """
profiles:
  default:
    python: /opt/venv/bin/python
    state_dir: /home/alice/.hpc-sandbox
    scheduler: slurm
    partition: debug
  arr:
    python: /opt/venv/bin/python
    state_dir: /home/alice/.hpc-sandbox
    scheduler: slurm
    array: 30
    array_limit: 4
    max_array_size: 10
  local:
    scheduler: local
"""


@pytest.fixture
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No site, user or environment settings leak in from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("HPC_SANDBOX_"):
            monkeypatch.delenv(name)
    (tmp_path / "site.yaml").write_text("")
    monkeypatch.setenv("HPC_SANDBOX_SITE_CONFIG", str(tmp_path / "site.yaml"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    return config


def invoke(*args: str):
    return CliRunner().invoke(main, ["render", *args], catch_exceptions=False)


def test_stdout_is_exactly_the_jobspec(isolated_env):
    result = invoke("--config", str(isolated_env), "--nodes", "2", "--slots", "3")
    assert result.exit_code == 0, result.output
    expected = render(load_spec(config_file=isolated_env, overrides={"nodes": 2, "slots": 3}))[0].text
    assert result.stdout == expected
    assert result.stderr == ""


def test_same_inputs_give_byte_identical_output(isolated_env):
    args = ("--config", str(isolated_env), "--scheduler", "pbs", "--dialect", "pbspro", "--array", "5")
    assert invoke(*args).stdout == invoke(*args).stdout


@pytest.mark.parametrize("scheduler,marker", [("slurm", "#SBATCH"), ("pbs", "#PBS"), ("nomad", 'job "')])
def test_every_scheduler(isolated_env, scheduler, marker):
    result = invoke("--config", str(isolated_env), "--scheduler", scheduler)
    assert result.exit_code == 0 and marker in result.stdout


def test_dialect_flag(isolated_env):
    out = invoke("--config", str(isolated_env), "--scheduler", "pbs", "--dialect", "pbspro", "--nodes", "2").stdout
    assert "#PBS -l select=2:" in out
    out = invoke("--config", str(isolated_env), "--scheduler", "pbs", "--nodes", "2").stdout
    assert "#PBS -l nodes=2:" in out


def test_nodes_flag_replaces_a_profile_array(isolated_env):
    out = invoke("--config", str(isolated_env), "--profile", "arr", "--nodes", "2").stdout
    assert "--array" not in out and "#SBATCH --nodes=2" in out


def test_job_key_flag(isolated_env):
    out = invoke("--config", str(isolated_env), "--job-key", "demo-123abc").stdout
    assert "--job-id demo-123abc" in out and "/jobs/demo-123abc/token" in out


def test_split_array_to_stdout_notes_it_on_stderr(isolated_env):
    result = invoke("--config", str(isolated_env), "--profile", "arr")
    assert result.exit_code == 0
    assert result.stdout.count("#!/bin/bash") == 3
    assert "rendered as 3 array jobs" in result.stderr and "-o FILE" in result.stderr


def test_output_file_and_parts(isolated_env, tmp_path):
    single = tmp_path / "job.sbatch"
    result = invoke("--config", str(isolated_env), "-o", str(single))
    assert result.exit_code == 0 and result.stdout == ""
    assert single.read_text().startswith("#!/bin/bash\n")
    result = invoke("--config", str(isolated_env), "--profile", "arr", "-o", str(single))
    assert result.stdout == ""
    parts = sorted(p.name for p in tmp_path.glob("job.part*.sbatch"))
    assert parts == ["job.part1.sbatch", "job.part2.sbatch", "job.part3.sbatch"]
    assert f"wrote {tmp_path / 'job.part2.sbatch'}" in result.stderr


@pytest.mark.parametrize("args,message", [
    (("--slots", "0"), "Error: the command line: slots: must be at least 1, got 0"),
    (("--profile", "nope"), "Error: profile 'nope' is not defined in"),
    (("--profile", "local"), "has scheduler 'local', which has no jobspec; give --scheduler slurm|pbs|nomad"),
    (("--array", "500"), "Error: profile 'default': port_range: 9100-9163 has 64 ports"),
    (("--array", "2", "--nodes", "2"), "give --array or --nodes, not both"),
])
def test_errors_are_one_line_with_a_non_zero_exit(isolated_env, args, message):
    result = invoke("--config", str(isolated_env), *args)
    assert result.exit_code != 0
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_errors_name_the_file(isolated_env, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profiles:\n  default:\n    partiton: x\n")
    result = invoke("--config", str(bad), "--scheduler", "slurm")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: unknown key 'partiton' in {bad} profile 'default'")
    assert len(result.stderr.strip().splitlines()) == 1


def test_as_a_real_process(isolated_env):
    """The console entry point: stdout carries only the jobspec; an error is one stderr line."""
    cmd = [sys.executable, "-m", "hpc_sandbox", "render", "--config", str(isolated_env)]
    ok = subprocess.run(cmd + ["--scheduler", "nomad"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stderr == ""
    assert ok.stdout.startswith("# Rendered by hpc-sandbox")
    bad = subprocess.run(cmd + ["--slots", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["Error: the command line: slots: must be at least 1, got -1"]
