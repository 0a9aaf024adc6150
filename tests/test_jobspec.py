"""The jobspec renderer: every scheduler and mode, the serve contract, site quirks."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from hpc_sandbox.cli.serve import serve as serve_command
from hpc_sandbox.errors import SpecError
from hpc_sandbox.jobspec import RenderedJobspec, Raw, render, serve_argv, split_array
from hpc_sandbox.spec import SandboxSpec

STATE = "/home/alice/.hpc-sandbox"


def spec(**kwargs) -> SandboxSpec:
    base = dict(python="/opt/venv/bin/python", state_dir=STATE, job_name="demo", slots=4)
    base.update(kwargs)
    return SandboxSpec(**base)


def one(rendered: list[RenderedJobspec]) -> str:
    assert len(rendered) == 1
    return rendered[0].text


def directives(text: str, prefix: str) -> list[str]:
    return [line[len(prefix) + 1:] for line in text.splitlines() if line.startswith(prefix + " ")]


def commands(text: str) -> list[str]:
    """The lines bash executes (not blank, not comments)."""
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def bash_syntax_ok(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- Slurm ----------------------------------------------------------------------------


def test_slurm_batch_runs_one_node_server_per_node_with_srun():
    text = one(render(spec(nodes=3, cpus_per_node=4, mem="8G", partition="debug"), "slurm"))
    sbatch = directives(text, "#SBATCH")
    for expected in ("--job-name=demo", f"--output={STATE}/jobs/demo/logs/slurm-%j.out", "--nodes=3",
                     "--ntasks=3", "--ntasks-per-node=1", "--cpus-per-task=4", "--mem=8G", "--partition=debug",
                     "--time=01:00:00", "--signal=TERM@120"):
        assert expected in sbatch
    assert "srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --cpus-per-task=4 \\" in text
    assert "--port-index 0" in text
    bash_syntax_ok(text)


def test_slurm_array_signals_the_batch_shell_which_execs_the_server():
    text = one(render(spec(array=10, array_limit=3), "slurm"))
    sbatch = directives(text, "#SBATCH")
    assert "--array=0-9%3" in sbatch
    assert "--signal=B:TERM@120" in sbatch
    assert f"--output={STATE}/jobs/demo/logs/slurm-%A_%a.out" in sbatch
    assert "exec /opt/venv/bin/python -m hpc_sandbox serve \\" in text
    assert '--port-index "$SLURM_ARRAY_TASK_ID"' in text
    bash_syntax_ok(text)


def test_all_directives_come_before_the_first_command():
    # sbatch and qsub stop reading directives at the first command line.
    for scheduler, prefix in (("slurm", "#SBATCH"), ("pbs", "#PBS")):
        for s in (spec(nodes=2, setup_lines=("module load x",)), spec(array=5, extra_directives=("--comment=x",)
                                                                       if scheduler == "slurm" else ("-m n",))):
            lines = one(render(s, scheduler)).splitlines()
            first_command = next(i for i, line in enumerate(lines[1:], 1) if line and not line.startswith("#"))
            assert all(i < first_command for i, line in enumerate(lines) if line.startswith(prefix))


def test_walltime_units_per_scheduler():
    s = spec(walltime="2-03:04:05")
    assert "--time=2-03:04:05" in directives(one(render(s, "slurm")), "#SBATCH")
    assert "-l walltime=51:04:05" in directives(one(render(s, "pbs")), "#PBS")
    assert '"183845s"' in one(render(s, "nomad"))


def test_signal_is_capped_at_half_the_walltime():
    s = spec(walltime="00:01:40", signal_seconds=300)
    assert "--signal=TERM@50" in directives(one(render(s, "slurm")), "#SBATCH")


def test_gpus_in_each_dialect():
    s = spec(gpus=2, runtime="apptainer", image="/img.sif", nodes=2, cpus_per_node=8, mem="1000M")
    assert "--gres=gpu:2" in directives(one(render(s, "slurm")), "#SBATCH")
    assert "-l nodes=2:ppn=8:gpus=2" in directives(one(render(s, "pbs", dialect="torque")), "#PBS")
    assert "-l select=2:ncpus=8:mpiprocs=1:mem=1000mb:ngpus=2" in directives(
        one(render(s, "pbs", dialect="pbspro")), "#PBS")
    assert 'device "nvidia/gpu"' in one(render(s, "nomad"))
    assert "--gpus 2" in one(render(s, "slurm"))


# --- PBS ------------------------------------------------------------------------------


def test_torque_multi_node_uses_pbsdsh_once_per_unique_node():
    text = one(render(spec(nodes=2, cpus_per_node=4, mem="2G", partition="batch",
                           setup_lines=("module load apptainer",)), "pbs", dialect="torque"))
    pbs = directives(text, "#PBS")
    assert {"-N demo", "-j oe", f"-o {STATE}/jobs/demo/logs/", "-l nodes=2:ppn=4", "-l mem=4gb", "-q batch",
            "-l walltime=01:00:00"} <= set(pbs)
    assert 'pbsdsh -u -- /bin/bash -c "$node_script"' in text
    # setup runs on every node, inside the node script
    script = text.split("<<'HPC_SANDBOX_NODE_SCRIPT'")[1].split("\nHPC_SANDBOX_NODE_SCRIPT\n")[0]
    assert "module load apptainer" in script and "exec /opt/venv/bin/python -m hpc_sandbox serve" in script
    bash_syntax_ok(text)


def test_pbspro_select_and_scatter():
    text = one(render(spec(nodes=2, cpus_per_node=4, mem="2G", account="proj"), "pbs", dialect="pbspro"))
    pbs = directives(text, "#PBS")
    assert "-l select=2:ncpus=4:mpiprocs=1:mem=2gb" in pbs
    assert "-l place=scatter" in pbs
    assert "-A proj" in pbs
    assert 'pbsdsh -- /bin/bash -c "$node_script"' in text
    bash_syntax_ok(text)


def test_pbs_single_node_runs_the_server_directly():
    text = one(render(spec(nodes=1), "pbs"))
    assert "pbsdsh" not in text
    assert "exec /opt/venv/bin/python -m hpc_sandbox serve \\" in text


def test_pbs_array_dialects():
    s = spec(array=20, array_limit=5)
    torque = one(render(s, "pbs", dialect="torque"))
    assert "-t 0-19%5" in directives(torque, "#PBS")
    assert '--port-index "${PBS_ARRAYID:-$SLURM_ARRAY_TASK_ID}"' in torque
    pro = one(render(s, "pbs", dialect="pbspro"))
    assert "-J 0-19" in directives(pro, "#PBS")
    # some PBS Pro builds reject %N: the limit is an attribute there
    assert "-W max_run_subjobs=5" in directives(pro, "#PBS")
    assert not any("%" in d for d in directives(pro, "#PBS") if d.startswith("-J"))
    assert '--port-index "$PBS_ARRAY_INDEX"' in pro
    bash_syntax_ok(torque)
    bash_syntax_ok(pro)


def test_pbspro_qos_is_refused_not_dropped():
    with pytest.raises(SpecError) as err:
        render(spec(qos="high"), "pbs", dialect="pbspro")
    assert err.value.field == "qos"
    assert "-l qos=high" in directives(one(render(spec(qos="high"), "pbs", dialect="torque")), "#PBS")


# --- arrays larger than the cap -------------------------------------------------------


def test_split_array_shares_the_limit_and_keeps_global_indices():
    parts = split_array(2500, 1001, 60)
    assert [(p.first, p.count) for p in parts] == [(0, 1001), (1001, 1001), (2002, 498)]
    assert sum(p.limit for p in parts) == 60
    assert split_array(5, None, None)[0].count == 5


def test_split_array_refuses_a_limit_smaller_than_the_parts():
    with pytest.raises(SpecError) as err:
        split_array(30, 10, 2)
    assert err.value.field == "array_limit"


def test_large_slurm_array_renders_several_jobs_with_offset_port_indices():
    rendered = render(spec(array=25, array_limit=6, max_array_size=10), "slurm")
    assert [r.name for r in rendered] == ["demo.part1.sbatch", "demo.part2.sbatch", "demo.part3.sbatch"]
    assert [r.first_index for r in rendered] == [0, 10, 20]
    assert [r.servers for r in rendered] == [10, 10, 5]
    assert "--array=0-9%2" in directives(rendered[0].text, "#SBATCH")
    assert "--array=0-4%2" in directives(rendered[2].text, "#SBATCH")
    assert '--port-index "$((20 + $SLURM_ARRAY_TASK_ID))"' in rendered[2].text
    # all parts are one hpc-sandbox job: same folder, same token
    assert all("--token-file /home/alice/.hpc-sandbox/jobs/demo/token" in r.text for r in rendered)


def test_default_caps_split_slurm_at_maxarraysize_and_pbspro_at_10000():
    assert len(render(spec(array=1002, array_limit=64), "slurm")) == 2
    assert len(render(spec(array=1001, array_limit=64), "slurm")) == 1
    assert len(render(spec(array=10001, array_limit=64), "pbs", dialect="pbspro")) == 2
    assert len(render(spec(array=10001, array_limit=64), "pbs", dialect="torque")) == 1


def test_pbspro_one_task_part_becomes_a_plain_job():
    rendered = render(spec(array=3, max_array_size=2), "pbs", dialect="pbspro")
    last = rendered[-1].text
    assert not any(d.startswith(("-J", "-W max_run_subjobs")) for d in directives(last, "#PBS"))
    assert "--port-index 2" in last


# --- Nomad ----------------------------------------------------------------------------


def test_nomad_batch_and_service():
    batch = one(render(spec(nodes=3), "nomad"))
    assert 'type = "batch"' in batch and "count = 3" in batch
    assert 'command = "/usr/bin/timeout"' in batch
    service = one(render(spec(nomad_type="service"), "nomad"))
    assert 'type = "service"' in service and "/usr/bin/timeout" not in service
    assert 'command = "/opt/venv/bin/python"' in service


def test_nomad_maps_partition_and_account():
    text = one(render(spec(partition="pool-a", account="team"), "nomad"))
    assert 'node_pool = "pool-a"' in text and 'namespace = "team"' in text


def test_nomad_escapes_hcl_interpolation_in_values():
    text = one(render(spec(runtime="apptainer", image='/i"m${HOME}%{x}.sif'), "nomad"))
    assert r'"/i\"m$${HOME}%%{x}.sif"' in text


# --- the serve contract ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {},
    {"runtime": "apptainer", "image": "docker://ubuntu:22.04", "gpus": 1},
    {"interface": "ib0"},
])
def test_serve_argv_is_accepted_by_the_serve_command(kwargs):
    argv = serve_argv(spec(**kwargs), "job-1", port_index=7)
    assert argv[:4] == ["/opt/venv/bin/python", "-m", "hpc_sandbox", "serve"]
    ctx = serve_command.make_context("serve", argv[4:])
    assert ctx.params["job_id"] == "job-1"
    assert ctx.params["port_index"] == 7
    assert str(ctx.params["token_file"]) == f"{STATE}/jobs/job-1/token"
    assert ctx.params["port_range"] == "9100-9163"
    for key, value in kwargs.items():
        assert ctx.params[key] == value


def test_rendered_shell_command_parses_back_to_the_same_argv():
    text = one(render(spec(runtime="apptainer", image="/path with space/x.sif"), "slurm"))
    joined = text.split("srun --nodes=1 --ntasks=1 --ntasks-per-node=1 \\\n", 1)[1].replace("\\\n", " ")
    words = shlex.split(joined)
    assert words == serve_argv(spec(runtime="apptainer", image="/path with space/x.sif"), "demo", port_index=0)


def test_raw_values_are_not_quoted_away():
    argv = serve_argv(spec(), "k", port_index=Raw("$X"))
    assert argv[argv.index("--port-index") + 1] == "$X"


# --- invariants -----------------------------------------------------------------------


ALL = [("slurm", "torque", {}), ("slurm", "torque", {"array": 4}), ("pbs", "torque", {"nodes": 2}),
       ("pbs", "pbspro", {"nodes": 2}), ("pbs", "torque", {"array": 4}), ("pbs", "pbspro", {"array": 4}),
       ("nomad", "torque", {}), ("nomad", "torque", {"nomad_type": "service"})]


@pytest.mark.parametrize("scheduler,dialect,kwargs", ALL)
def test_output_is_deterministic_and_tidy(scheduler, dialect, kwargs):
    s = spec(**kwargs)
    first = one(render(s, scheduler, dialect=dialect))
    assert first == one(render(s, scheduler, dialect=dialect))
    assert first.endswith("\n") and not first.endswith("\n\n")
    assert not re.search(r"[ \t]+$", first, re.M)
    assert "\n\n\n" not in first
    header = first.splitlines()[1] if first.startswith("#!") else first.splitlines()[0]
    assert header.startswith("# Rendered by hpc-sandbox ") and "profile 'default'" in header


@pytest.mark.parametrize("scheduler,dialect,kwargs", ALL)
def test_no_token_ever_appears_only_the_token_file(scheduler, dialect, kwargs, tmp_path):
    token_value = "s3cr3t-token-value"
    text = one(render(spec(**kwargs), scheduler, dialect=dialect, job_key="k1"))
    assert token_value not in text
    assert "--token-file" in text
    assert not re.search(r"(?i)token\s*=", text)


def test_job_key_names_the_paths_not_the_scheduler_id():
    text = one(render(spec(), "slurm", job_key="demo-a1b2c3"))
    assert f"{STATE}/jobs/demo-a1b2c3/token" in text
    assert "--job-id demo-a1b2c3" in text
    assert "--job-name=demo" in directives(text, "#SBATCH")
    assert "%j" not in text.split("--token-file")[1]


def test_bad_job_key_and_unsafe_state_dir_are_refused():
    with pytest.raises(SpecError) as err:
        render(spec(), "slurm", job_key="a b")
    assert err.value.field == "job_key"
    with pytest.raises(SpecError) as err:
        render(spec(state_dir="/home/al ice/x"), "slurm")
    assert err.value.field == "state_dir"
    with pytest.raises(SpecError) as err:
        render(spec(state_dir="/home/alice/100%"), "pbs")
    assert err.value.field == "state_dir"


def test_local_scheduler_has_no_jobspec():
    with pytest.raises(SpecError) as err:
        render(spec(), "local")
    assert err.value.field == "scheduler"


# --- site quirks ----------------------------------------------------------------------


def test_extra_directives_pass_through_verbatim_with_or_without_prefix():
    s = spec(extra_directives=("--constraint=haswell", "#SBATCH --exclusive", "  --comment='a b'  "))
    sbatch = directives(one(render(s, "slurm")), "#SBATCH")
    assert {"--constraint=haswell", "--exclusive", "--comment='a b'"} <= set(sbatch)


@pytest.mark.parametrize("scheduler,extra,reason", [
    ("slurm", "--job-name=other", "job_name"),
    ("slurm", "-J other", "job_name"),
    ("slurm", "--job=other", "job_name"),  # an abbreviation sbatch would accept
    ("slurm", "--output=/tmp/x", "job folder"),
    ("slurm", "-o /tmp/x", "job folder"),
    ("slurm", "--signal=USR1@60", "SIGTERM"),
    ("slurm", "--array=0-99", "array"),
    ("slurm", "--ntasks-per-node=2", "one node server per node"),
    ("pbs", "-N other", "job_name"),
    ("pbs", "-o /tmp/", "job folder"),
    ("pbs", "-l nodes=4:ppn=2", "one node server per node"),
    ("pbs", "-l walltime=1:00:00,select=2", "one node server per node"),
    ("pbs", "-J 0-9", "array"),
    ("pbs", "-W max_run_subjobs=3", "array"),
    ("nomad", 'type = "system"', "nomad_type"),
    ("nomad", 'group "x" {}', "one group"),
])
def test_extra_directive_overriding_a_protected_option_is_refused_with_why(scheduler, extra, reason):
    with pytest.raises(SpecError) as err:
        render(spec(extra_directives=(extra,)), scheduler)
    assert err.value.field == "extra_directives"
    assert "hpc-sandbox controls" in str(err.value) and reason in str(err.value)


def test_extra_directive_duplicating_a_generated_line_must_skip_it_first():
    with pytest.raises(SpecError) as err:
        render(spec(partition="a", extra_directives=("--partition=b",)), "slurm")
    assert "skip_directives" in str(err.value)
    text = one(render(spec(partition="a", extra_directives=("--partition=b",), skip_directives=("--partition",)),
                      "slurm"))
    sbatch = directives(text, "#SBATCH")
    assert "--partition=b" in sbatch and "--partition=a" not in sbatch


def test_extra_directive_for_another_scheduler_is_refused():
    with pytest.raises(SpecError, match="is a pbs directive"):
        render(spec(extra_directives=("#PBS -m n",)), "slurm")


def test_skip_directives_drop_generated_lines():
    s = spec(mem="1G", nodes=2, skip_directives=("--mem", "#SBATCH --time"))
    sbatch = directives(one(render(s, "slurm")), "#SBATCH")
    assert not any(d.startswith(("--mem", "--time")) for d in sbatch)
    pro = directives(one(render(spec(nodes=2, skip_directives=("-l place", "-S")), "pbs", dialect="pbspro")), "#PBS")
    assert "-l place=scatter" not in pro and "-S /bin/bash" not in pro
    hcl = one(render(spec(skip_directives=("datacenters", "constraint")), "nomad"))
    assert "datacenters" not in hcl and "attr.kernel.name" not in hcl and "distinct_hosts" in hcl


def test_skipping_a_protected_option_is_refused():
    with pytest.raises(SpecError, match="cannot be skipped") as err:
        render(spec(skip_directives=("--signal",)), "slurm")
    assert err.value.field == "skip_directives"


def test_a_skip_that_matches_nothing_is_an_error_listing_what_can_be_skipped():
    with pytest.raises(SpecError) as err:
        render(spec(skip_directives=("--mme",)), "slurm")
    assert "--mem" in str(err.value) and "'--mme'" in str(err.value)
    # a skip for a directive that is simply absent this time is fine (site profiles)
    render(spec(skip_directives=("--gres",)), "slurm")


def test_site_template_folder_overrides_by_name(tmp_path: Path):
    (tmp_path / "_header.j2").write_text("# SITE HEADER for {{ job_key }}\n")
    text = one(render(spec(template_dir=tmp_path), "slurm"))
    assert text.splitlines()[1] == "# SITE HEADER for demo"
    assert "#SBATCH --job-name=demo" in text  # the rest is still the packaged template
    (tmp_path / "slurm_batch.sh.j2").write_text("#!/bin/bash\n#SBATCH --job-name={{ spec.job_name }}\n")
    text = one(render(spec(template_dir=tmp_path), "slurm"))
    assert text == "#!/bin/bash\n#SBATCH --job-name=demo\n"


def test_a_broken_site_template_is_a_spec_error(tmp_path: Path):
    (tmp_path / "slurm_batch.sh.j2").write_text("{{ no_such_variable }}\n")
    with pytest.raises(SpecError) as err:
        render(spec(template_dir=tmp_path), "slurm")
    assert err.value.field == "template_dir" and "no_such_variable" in str(err.value)
    with pytest.raises(SpecError, match="not a folder"):
        render(spec(template_dir=tmp_path / "missing"), "slurm")


def test_setup_lines_cannot_end_the_node_script_early():
    with pytest.raises(SpecError) as err:
        render(spec(nodes=2, setup_lines=("HPC_SANDBOX_NODE_SCRIPT",)), "pbs")
    assert err.value.field == "setup_lines"


def test_templates_folder_holds_only_templates():
    folder = Path(__file__).resolve().parent.parent / "templates"
    assert folder.is_dir()
    assert all(p.suffix == ".j2" for p in folder.iterdir()), sorted(p.name for p in folder.iterdir())
