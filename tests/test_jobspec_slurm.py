"""Every rendered Slurm script is accepted by the real sbatch (`--test-only`) of the
local single-node cluster (see slurm/start.sh); skipped with the reason when no
cluster runs, failed instead under HPC_SANDBOX_REQUIRE_SLURM=1."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc_sandbox.config import load_spec, profile_names
from hpc_sandbox.jobspec import render
from hpc_sandbox.spec import SandboxSpec

from slurm_fixtures import slurm_cluster  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "jobspecs" / "examples.yaml"


def sbatch_test_only(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return subprocess.run(["sbatch", "--test-only", *args, str(path)], capture_output=True, text=True, timeout=30)


def accepted(proc: subprocess.CompletedProcess) -> bool:
    # --test-only answers "sbatch: Job N to start at ... on nodes X" and submits nothing
    return proc.returncode == 0 and "to start at" in proc.stderr


@pytest.fixture
def fits(slurm_cluster, tmp_path):  # noqa: F811 - the fixture imported above
    """Spec settings the test node can satisfy (its partition, its cores, little memory)."""
    return dict(python="/usr/bin/python3", state_dir=str(tmp_path / "state"), partition=slurm_cluster.partition,
                cpus_per_node=min(2, slurm_cluster.cpus), mem="100M", walltime="00:10:00", slots=2)


CASES = {
    "single node": {},
    "apptainer, setup lines": {"runtime": "apptainer", "image": "/shared/x.sif",
                               "setup_lines": ("module load apptainer", "source /venv/bin/activate")},
    "site quirks": {"extra_directives": ("--comment=reviewed-by-admin", "#SBATCH --exclusive"),
                    "skip_directives": ("--time",), "account": "rl", "qos": "normal"},
    "array with limit": {"array": 8, "array_limit": 3},
    "array at MaxArraySize default": {"array": 1001, "array_limit": 64},
    "split array": {"array": 25, "array_limit": 6, "max_array_size": 10},
    "interface, short walltime": {"interface": "lo", "walltime": "00:01:00"},
    "days of walltime": {"walltime": "1-00:00:00"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_scripts_are_accepted_by_sbatch(case, fits, tmp_path):
    for rendered in render(SandboxSpec(**{**fits, **CASES[case]}), "slurm"):
        proc = sbatch_test_only(rendered.text, tmp_path)
        assert accepted(proc), f"{rendered.name}: {proc.stderr.strip()}\n{rendered.text}"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(array=st.none() | st.integers(1, 300), limit=st.none() | st.integers(4, 64),
       cap=st.none() | st.integers(100, 1000), slots=st.integers(1, 64), seconds=st.integers(60, 7 * 86400),
       signal=st.integers(0, 600))
def test_generated_specs_are_accepted_by_sbatch(fits, tmp_path, array, limit, cap, slots, seconds, signal):
    days, rest = divmod(seconds, 86400)
    walltime = f"{days}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    spec = SandboxSpec(**{**fits, "slots": slots, "walltime": walltime, "signal_seconds": signal,
                          "array": array, "array_limit": limit if array else None, "max_array_size": cap,
                          "servers_per_node": 64 if array else None})
    for rendered in render(spec, "slurm"):
        proc = sbatch_test_only(rendered.text, tmp_path)
        assert accepted(proc), f"{rendered.name}: {proc.stderr.strip()}\n{rendered.text}"


# Resource sizes in jobspecs/ are a real site's (2 nodes, 16 cores, 32G); the test node
# has one node and two cores. Command-line options win over #SBATCH lines, so these
# shrink the request to fit and leave every other line of the example to sbatch.
FIT_ARGS = ("--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--mem=100M", "--constraint=")


@pytest.mark.parametrize("profile", [p for p in profile_names(EXAMPLES)
                                     if load_spec(p, config_file=EXAMPLES, isolated=True).scheduler == "slurm"])
def test_jobspec_examples_are_accepted_by_sbatch(profile, slurm_cluster, tmp_path):  # noqa: F811
    spec = load_spec(profile, config_file=EXAMPLES, isolated=True)
    for rendered in render(spec, job_key=profile):
        text = (ROOT / "jobspecs" / rendered.name).read_text()
        args = (*FIT_ARGS, f"--partition={slurm_cluster.partition}")
        if spec.gpus:
            # The test node has no GPUs (no GRES): the example as written is refused for
            # exactly that reason, and accepted once the GPU request is cleared.
            refused = sbatch_test_only(text, tmp_path, *args)
            assert not accepted(refused) and "gres" in refused.stderr.lower(), refused.stderr
            args += ("--gres=none",)
        proc = sbatch_test_only(text, tmp_path, *args)
        assert accepted(proc), f"{rendered.name}: {proc.stderr.strip()}"


@pytest.mark.parametrize("dialect", ["torque", "pbspro"])
@pytest.mark.parametrize("kwargs", [{}, {"array": 4, "array_limit": 2}])
def test_pbs_scripts_pass_slurms_own_pbs_reader(dialect, kwargs, fits, tmp_path):
    """sbatch reads #PBS lines too (that is how slurm-wlm-torque's qsub runs scripts):
    a single-node PBS script of either dialect is a valid batch script for it."""
    for rendered in render(SandboxSpec(**{**fits, **kwargs}), "pbs", dialect=dialect):
        proc = sbatch_test_only(rendered.text, tmp_path)
        assert accepted(proc), f"{rendered.name}: {proc.stderr.strip()}\n{rendered.text}"
