"""jobspecs/: the reviewed examples are complete and exactly what the code renders today;
every Nomad job (examples and others) parses as HCL with its static port, its resources
and no inline secret."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import hcl2
import pytest
from click.testing import CliRunner

from hpc_sandbox.cli import main as cli
from hpc_sandbox.cli.render import regenerate_examples
from hpc_sandbox.config import load_spec, profile_names
from hpc_sandbox.jobspec import SUFFIXES, render
from hpc_sandbox.spec import SandboxSpec

ROOT = Path(__file__).resolve().parent.parent
JOBSPECS = ROOT / "jobspecs"
EXAMPLES = JOBSPECS / "examples.yaml"
REGENERATE = "python -m hpc_sandbox render --examples jobspecs/"


def rendered_files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for suffix in SUFFIXES.values() for p in folder.glob(f"*{suffix}")}


def test_jobspecs_are_fresh(tmp_path: Path):
    shutil.copy(EXAMPLES, tmp_path / "examples.yaml")
    regenerate_examples(tmp_path)
    expected = rendered_files(tmp_path)
    actual = rendered_files(JOBSPECS)
    stale = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    assert not stale, f"jobspecs/ is stale ({', '.join(stale)}): run `{REGENERATE}`"


def test_the_command_regenerates_and_removes_stale_examples(tmp_path: Path):
    shutil.copy(EXAMPLES, tmp_path / "examples.yaml")
    (tmp_path / "gone.sbatch").write_text("#!/bin/bash\n")
    result = CliRunner().invoke(cli, ["render", "--examples", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "gone.sbatch").exists()
    assert rendered_files(tmp_path) == rendered_files(JOBSPECS)
    refused = CliRunner().invoke(cli, ["render", "--examples", str(tmp_path), "--nodes", "2"])
    assert refused.exit_code == 2 and "--examples takes no other option" in refused.output


def test_every_template_and_mode_has_an_example():
    specs = {name: load_spec(name, config_file=EXAMPLES, isolated=True) for name in profile_names(EXAMPLES)}
    modes = {(s.scheduler, s.dialect if s.scheduler == "pbs" else "", s.nomad_type if s.scheduler == "nomad" else "",
              s.array is not None) for s in specs.values()}
    for mode in [("slurm", "", "", False), ("slurm", "", "", True), ("pbs", "torque", "", False),
                 ("pbs", "pbspro", "", False), ("pbs", "torque", "", True), ("pbs", "pbspro", "", True),
                 ("nomad", "", "batch", False), ("nomad", "", "service", False)]:
        assert mode in modes, f"no example for {mode}"
    assert all(s.runtime == "apptainer" for s in specs.values())
    assert any(s.gpus for s in specs.values()), "no GPU example"
    assert any(len(render(s, job_key=n)) > 1 for n, s in specs.items()), "no split-array example"


def test_readme_documents_the_command_and_walks_through_an_existing_example():
    readme = (JOBSPECS / "README.md").read_text()
    assert REGENERATE in readme
    walked = [name for name in rendered_files(JOBSPECS) if name in readme]
    assert walked, "README.md names none of the example files"


def test_readme_walkthrough_quotes_the_example_as_it_is():
    readme = (JOBSPECS / "README.md").read_text()
    example = set((JOBSPECS / "slurm-batch.sbatch").read_text().splitlines())
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks
    quoted = [line for block in blocks for line in block.splitlines() if line.strip()]
    missing = [line for line in quoted if line not in example]
    assert not missing, f"jobspecs/README.md quotes lines slurm-batch.sbatch no longer has: {missing}"


# --- Nomad HCL ------------------------------------------------------------------------


def unquote(value: object) -> object:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def label(block: dict) -> tuple[str, dict]:
    ((name, body),) = block.items()
    return unquote(name), body


def nomad_parts(text: str) -> dict:
    job_name, job = label(hcl2.loads(text)["job"][0])
    group_name, group = label(job["group"][0])
    task_name, task = label(group["task"][0])
    return {"job_name": job_name, "job": job, "group": group, "task": task}


def check_nomad(text: str, spec: SandboxSpec) -> None:
    parts = nomad_parts(text)
    group, task = parts["group"], parts["task"]
    lo, _ = spec.port_range
    # the static port, and the server told to use exactly that one
    port_name, port = label(group["network"][0]["port"][0])
    assert port_name == "http" and port["static"] == lo
    args = [unquote(a) for a in task["config"][0]["args"]]
    assert args[args.index("--port-range") + 1] == f"{lo}-{lo}"
    assert args[args.index("--host") + 1] == "${NOMAD_IP_http}"
    # resources
    resources = task["resources"][0]
    assert resources["cores"] == (spec.cpus_per_node or 1)
    assert resources["memory"] == (spec.mem_mb or 1024)
    if spec.gpus:
        gpu_name, gpu = label(resources["device"][0])
        assert gpu_name == "nvidia/gpu" and gpu["count"] == spec.gpus
    # the secrets (token, TLS certificate and key): files in the secrets dir, filled by
    # Nomad from the job's Variable; never inline
    secrets = {"token": "--token-file"}
    if spec.tls:
        secrets.update({"tls_cert": "--tls-cert", "tls_key": "--tls-key"})
    assert len(task["template"]) == len(secrets)
    for template, (key, flag) in zip(task["template"], secrets.items()):
        destination = unquote(template["destination"])
        assert args[args.index(flag) + 1] == destination and destination.startswith("${NOMAD_SECRETS_DIR}/")
        assert unquote(template["perms"]) == "0600"
        data = unquote(template["data"])
        assert f'nomadVar "nomad/jobs/{parts["job_name"]}"' in data and f"{{{{ .{key} }}}}" in data
    if not spec.tls:
        assert "--insecure-http" in args
    assert "env" not in task, "no environment block: a token must not travel through the environment"
    assert task["driver"] == '"raw_exec"'


@pytest.mark.parametrize("name", [n for n in rendered_files(JOBSPECS) if n.endswith(".nomad.hcl")])
def test_nomad_examples_parse(name):
    profile = name.removesuffix(".nomad.hcl")
    check_nomad((JOBSPECS / name).read_text(), load_spec(profile, config_file=EXAMPLES, isolated=True))


@pytest.mark.parametrize("kwargs", [
    {},
    {"nodes": 4, "cpus_per_node": 8, "mem": "3G", "gpus": 1, "runtime": "apptainer", "image": "docker://x/y:1"},
    {"array": 50, "array_limit": 10, "nomad_type": "service", "partition": "p", "account": "ns"},
    {"extra_directives": ("priority = 80", 'meta { owner = "rl" }'), "skip_directives": ("restart",)},
    {"tls": False, "runtime": "bwrap", "network": "none"},
])
def test_nomad_jobs_parse(kwargs):
    spec = SandboxSpec(python="/venv/bin/python", **kwargs)
    (rendered,) = render(spec, "nomad", job_key="k-1")
    check_nomad(rendered.text, spec)
    job = nomad_parts(rendered.text)["job"]
    assert job["type"] == f'"{spec.nomad_type}"'
    assert nomad_parts(rendered.text)["group"]["count"] == spec.servers
