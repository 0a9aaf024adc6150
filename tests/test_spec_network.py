"""`network` in the spec: "host" (the default) or "none" (slots cut off the network),
checked with the runtime, read from profiles, and passed to `serve` as `--network none`."""
from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from hpc_sandbox.cli.serve import serve
from hpc_sandbox.config import load_spec
from hpc_sandbox.errors import ConfigError, SpecError
from hpc_sandbox.jobspec import render, serve_argv
from hpc_sandbox.spec import SandboxSpec

BASE = dict(python="/venv/bin/python", state_dir="/home/a/.hpc-sandbox")
SEALED = [dict(runtime="bwrap"), dict(runtime="apptainer", image="/img/agent.sif"),
          dict(runtime="singularity", image="docker://python:3.12")]


def test_runtime_none_cannot_cut_slots_off_the_network():
    with pytest.raises(SpecError) as err:
        SandboxSpec(runtime="none", network="none")
    assert err.value.field == "network" and str(err.value).startswith("network: ")
    SandboxSpec(runtime="none", network="host")


def test_an_unknown_network_lists_the_valid_ones():
    with pytest.raises(SpecError) as err:
        SandboxSpec(runtime="bwrap", network="bridge")
    assert err.value.field == "network"
    assert str(err.value) == "network: 'bridge' is not one of host, none"


@pytest.mark.parametrize("kwargs", SEALED)
def test_sealed_runtimes_take_network_none(kwargs):
    assert SandboxSpec(**kwargs, network="none").network == "none"


def test_network_none_in_a_yaml_profile(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("profiles:\n  sealed: {runtime: bwrap, network: none}\n  open: {runtime: none, network: none}\n")
    assert load_spec("sealed", config_file=path, isolated=True).network == "none"
    assert load_spec("default", config_file=path, isolated=True).network == "host"
    with pytest.raises(ConfigError) as err:
        load_spec("open", config_file=path, isolated=True)
    assert str(err.value).startswith(f"{path} profile 'open': network: ")


@pytest.mark.parametrize("kwargs", SEALED + [dict(runtime="none")])
def test_serve_gets_network_none_only_when_the_spec_says_so(kwargs):
    default = serve_argv(SandboxSpec(**BASE, **kwargs), "k")
    assert "--network" not in default
    assert serve_argv(SandboxSpec(**BASE, **kwargs, network="host"), "k") == default
    if kwargs["runtime"] == "none":
        return
    sealed = serve_argv(SandboxSpec(**BASE, **kwargs, network="none"), "k")
    at = sealed.index("--network")
    assert sealed[at + 1] == "none" and sealed.count("--network") == 1
    assert sealed[:at] + sealed[at + 2:] == default  # nothing else changes
    # and `serve` takes it: its own parser reads the words after `-m hpc_sandbox serve`
    ctx = serve.make_context("serve", sealed[sealed.index("serve") + 1:])
    assert ctx.params["network"] == "none"


@pytest.mark.parametrize("scheduler,added", [("slurm", "--network none \\"), ("pbs", "--network none \\"),
                                             ("nomad", '"--network", "none",')])
def test_rendered_jobs_differ_by_the_network_line_only(scheduler, added):
    default = render(SandboxSpec(**BASE, runtime="bwrap"), scheduler)[0].text
    assert "--network" not in default
    assert render(SandboxSpec(**BASE, runtime="bwrap", network="host"), scheduler)[0].text == default
    sealed = render(SandboxSpec(**BASE, runtime="bwrap", network="none"), scheduler)[0].text
    diff = [line for line in difflib.ndiff(default.split("\n"), sealed.split("\n")) if line[:2] in ("+ ", "- ")]
    assert [line[2:].strip() for line in diff] == [added] and diff[0].startswith("+ "), diff
