"""A value that ends in a newline is refused, naming its field.

Every one of these values is written into a jobspec line (`#SBATCH --partition=debug`,
`--job-id key`, `#SBATCH --output=<state_dir>/...`). Checked with `re.match("^...$")`,
`"debug\\n"` passed (`$` also matches before a final newline), and the newline ended the
directive early: the stray line after it is the script's first command, so sbatch
ignored every `#SBATCH` line below it. Hence `fullmatch` everywhere; these tests fail
on the code before it (9a69498).
"""
from __future__ import annotations

import pytest

from hpc_sandbox.errors import SpecError
from hpc_sandbox.jobspec import render
from hpc_sandbox.spec import SandboxSpec

# (field, a valid value): the value renders; the value + "\n" must not.
SPEC_FIELDS = [
    ("job_name", "probe"),
    ("profile", "p"),
    ("partition", "debug"),
    ("account", "proj"),
    ("qos", "normal"),
    ("interface", "ib0"),
    ("walltime", "01:00:00"),
]
STATE_DIR = "/home/a/.hpc-sandbox"


def refused(call, field: str) -> SpecError:
    with pytest.raises(SpecError) as err:
        call()
    assert err.value.field == field, err.value
    assert str(err.value).startswith(f"{field}: ")
    return err.value


@pytest.mark.parametrize("field,value", SPEC_FIELDS)
def test_a_spec_value_ending_in_a_newline_is_refused_naming_the_field(field, value):
    render(SandboxSpec(**{field: value}), "slurm")  # without the newline: fine
    refused(lambda: SandboxSpec(**{field: value + "\n"}), field)


@pytest.mark.parametrize("scheduler", ["slurm", "pbs", "nomad"])
def test_a_job_key_ending_in_a_newline_is_refused(scheduler):
    render(SandboxSpec(), scheduler, job_key="key")
    refused(lambda: render(SandboxSpec(), scheduler, job_key="key\n"), "job_key")


@pytest.mark.parametrize("scheduler,dialect", [("slurm", "torque"), ("pbs", "torque"), ("pbs", "pbspro")])
def test_a_state_dir_ending_in_a_newline_is_refused(scheduler, dialect):
    render(SandboxSpec(state_dir=STATE_DIR), scheduler, dialect=dialect)
    spec = SandboxSpec(state_dir=STATE_DIR + "\n")
    refused(lambda: render(spec, scheduler, dialect=dialect), "state_dir")
