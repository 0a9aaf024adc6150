"""`hpc-sandbox check --scheduler slurm|pbs`: the preflight, live on the real cluster."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.config import load_spec
from hpc_sandbox.errors import ServerGone
from hpc_sandbox.preflight import run_preflight


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])  # pbs: qsub/qstat/qdel, Slurm's Torque wrappers
def test_preflight_walks_every_step_and_cleans_up(state_dir, slurm_cluster, scheduler):
    result = subprocess.run([sys.executable, "-m", "hpc_sandbox", "check", "--scheduler", scheduler,
                             "--partition", slurm_cluster.partition, "--json", "--timeout", "90"],
                            capture_output=True, text=True, timeout=180,
                            env={**os.environ, "HPC_SANDBOX_STATE_DIR": str(state_dir)})
    steps = json.loads(result.stdout)
    assert [s["name"] for s in steps] == ["submit", "start", "reach", "token", "exec", "cancel"]
    assert all(s["ok"] for s in steps), steps
    assert result.returncode == 0
    assert list((state_dir / "jobs").iterdir()) == []


def test_an_unreachable_node_server_is_named_as_a_firewall_problem(state_dir, slurm_cluster, monkeypatch):
    # The node server really starts; only the connection from "the login node" is refused,
    # as a firewall between login and compute nodes would (no firewall can be set up here).
    async def refused(self, timeout: float = 5.0):
        raise ServerGone(f"node server {self.endpoint.name} ({self.endpoint.url}) is unreachable: connection refused")

    monkeypatch.setattr(NodeClient, "health", refused)
    spec = load_spec(overrides={"scheduler": "slurm", "partition": slurm_cluster.partition, "slots": 1,
                                "walltime": "00:05:00", "state_dir": state_dir, "port_range": "22300-22363"},
                     isolated=True)
    steps = asyncio.run(run_preflight(spec, 90, lambda step: None))
    assert [(s.name, s.ok) for s in steps] == [("submit", True), ("start", True), ("reach", False), ("cancel", True)]
    assert "firewall" in steps[2].detail and "22300-22363" in steps[2].detail
