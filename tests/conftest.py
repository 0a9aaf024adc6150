"""Shared fixtures. Every test runs against real processes on loopback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import RunningServer, start_server  # noqa: E402
from slurm_fixtures import slurm_cluster  # noqa: E402,F401  (the real single-node cluster; see slurm/)


@pytest.fixture
def no_user_config(tmp_path: Path, monkeypatch) -> None:
    """Read no site or user config file and no HPC_SANDBOX_* variable of whoever runs the tests."""
    home = tmp_path / "home"
    home.mkdir()
    site = tmp_path / "site.yaml"
    site.write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HPC_SANDBOX_SITE_CONFIG", str(site))
    for name in list(os.environ):
        if name.startswith("HPC_SANDBOX_") and name != "HPC_SANDBOX_SITE_CONFIG":
            monkeypatch.delenv(name)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def cli(state_dir: Path):
    """Run `python -m hpc_sandbox ARGS...` as a user types it, with HPC_SANDBOX_STATE_DIR
    set to this test's state dir; afterwards cancel every job the test left behind (so
    a failed test leaves no node servers, nor cluster jobs holding their ports)."""
    def run(*args: str, timeout: float = 120, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "HPC_SANDBOX_STATE_DIR": str(state_dir), **(extra_env or {})}
        return subprocess.run([sys.executable, "-m", "hpc_sandbox", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    yield run
    for job in (state_dir / "jobs").glob("*"):
        run("cancel", job.name)


@pytest.fixture
def server(state_dir: Path):
    """A node server with 2 slots, runtime none."""
    running = start_server(state_dir, slots=2)
    yield running
    running.stop()


@pytest.fixture
def server_factory(state_dir: Path):
    started: list[RunningServer] = []

    def make(**kwargs) -> RunningServer:
        running = start_server(state_dir, **kwargs)
        started.append(running)
        return running

    yield make
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait()


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch):
    """A folder first on PATH for stand-in scheduler commands (see helpers.stand_in) that
    log their arguments, one line per call, to calls.log."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder
