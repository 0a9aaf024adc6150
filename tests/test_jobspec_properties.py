"""Property tests over specs: every valid spec renders well-formed jobspecs, invalid ones
are refused with the field named, and no job name or extra directive can add a line
that the shell (or Nomad) would run.

The hostile-input tests end early when a value is refused. So that they cannot pass by
refusing everything (or, for Nomad, by rendering HCL that never parses), each counts
how its cases ended (OUTCOMES), valid values that must get all the way through are
given as @example, and test_enough_cases_went_all_the_way_through (last in this
module) requires that many random cases did."""
from __future__ import annotations

import math
import re
import string
import subprocess
from collections import Counter

import hcl2
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from hpc_sandbox.errors import SpecError
from hpc_sandbox.jobspec import DEFAULT_MAX_ARRAY_SIZE, render
from hpc_sandbox.spec import GPU_RUNTIMES, RUNTIMES, SandboxSpec, format_hms

from test_jobspec_examples import check_nomad, nomad_parts

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
site_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.+@:-]{0,12}", fullmatch=True)
paths = st.from_regex(r"/[A-Za-z0-9._/-]{1,30}", fullmatch=True)
images = st.one_of(paths.map(lambda p: p + ".sif"), names.map(lambda n: f"docker://{n.lower()}:1"))
SETUP = st.lists(st.sampled_from(["module load apptainer", "source /venv/bin/activate", "export A=1",
                                  "ulimit -n 4096"]), max_size=3).map(tuple)


def walltime_text(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    return f"{days}-{format_hms(rest)}" if days else format_hms(seconds)


@st.composite
def spec_kwargs(draw, scheduler: str, dialect: str = "torque") -> dict:
    runtime = draw(st.sampled_from(RUNTIMES))
    kwargs: dict = {"runtime": runtime, "job_name": draw(names), "python": draw(paths),
                    "state_dir": draw(paths), "slots": draw(st.integers(1, 64)), "dialect": dialect,
                    "setup_lines": draw(SETUP), "walltime": walltime_text(draw(st.integers(1, 30 * 86400)))}
    if runtime in ("apptainer", "singularity") or draw(st.booleans()):
        kwargs["image"] = draw(images)
    if runtime in GPU_RUNTIMES:
        kwargs["gpus"] = draw(st.integers(0, 8))
    if draw(st.booleans()):
        array = draw(st.integers(1, 3000))
        limit = draw(st.none() | st.integers(1, 300))
        cap = draw(st.none() | st.integers(1, 2000))
        default_cap = DEFAULT_MAX_ARRAY_SIZE[dialect if scheduler == "pbs" else scheduler]
        parts = math.ceil(array / (cap or default_cap or array)) if scheduler != "nomad" else 1
        assume(parts <= 4 and (limit is None or limit >= parts))  # a few parts keep the test fast
        kwargs.update(array=array, array_limit=limit, max_array_size=cap)
        colocated = min(array, limit or array)
    else:
        kwargs["nodes"] = draw(st.integers(1, 64))
        colocated = 1
    per_node = draw(st.none() | st.integers(1, 40))
    kwargs["servers_per_node"] = per_node
    lo = draw(st.integers(1024, 60000))
    kwargs["port_range"] = (lo, lo + (per_node or colocated) - 1 + draw(st.integers(0, 300)))
    assume(kwargs["port_range"][1] <= 65535)
    for key in ("partition", "account", "interface") + (() if dialect == "pbspro" else ("qos",)):
        kwargs[key] = draw(st.none() | site_names)
    kwargs["cpus_per_node"] = draw(st.none() | st.integers(1, 128))
    kwargs["mem"] = draw(st.none() | st.builds("{}{}".format, st.integers(1, 4096), st.sampled_from("MG")))
    kwargs["nomad_type"] = draw(st.sampled_from(["batch", "service"]))
    return kwargs


def first_command_index(lines: list[str]) -> int:
    return next(i for i, line in enumerate(lines) if i > 0 and line.strip() and not line.startswith("#"))


def commands(text: str) -> list[str]:
    # split as bash does, on "\n" only
    return [line for line in text.split("\n") if line.strip() and not line.lstrip().startswith("#")]


def bash_n(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


SBATCH_LINE = re.compile(r"^#SBATCH --[a-z][a-z-]*=[^\s]+$|^#SBATCH --ntasks-per-node=1$")
PBS_LINE = re.compile(r"^#PBS -[A-Za-z] [^\s]+$")


@SETTINGS
@given(kwargs=spec_kwargs("slurm"))
def test_every_valid_spec_gives_well_formed_slurm_scripts(kwargs):
    spec = SandboxSpec(**kwargs)
    for rendered in render(spec, "slurm"):
        lines = rendered.text.splitlines()
        directives = [line for line in lines if line.startswith("#SBATCH")]
        assert directives and all(SBATCH_LINE.match(line) for line in directives), directives
        assert all(lines.index(d) < first_command_index(lines) for d in directives)
        assert sum("-m hpc_sandbox serve" in line for line in lines) == 1
        bash_n(rendered.text)


@pytest.mark.parametrize("dialect", ["torque", "pbspro"])
@SETTINGS
@given(data=st.data())
def test_every_valid_spec_gives_well_formed_pbs_scripts(dialect, data):
    spec = SandboxSpec(**data.draw(spec_kwargs("pbs", dialect)))
    for rendered in render(spec, "pbs", dialect=dialect):
        lines = rendered.text.splitlines()
        directives = [line for line in lines if line.startswith("#PBS")]
        assert directives and all(PBS_LINE.match(line) for line in directives), directives
        assert all(lines.index(d) < first_command_index(lines) for d in directives)
        assert sum("-m hpc_sandbox serve" in line for line in lines) == 1
        bash_n(rendered.text)


@SETTINGS
@given(kwargs=spec_kwargs("nomad"))
def test_every_valid_spec_gives_a_parsable_nomad_job(kwargs):
    spec = SandboxSpec(**kwargs)
    (rendered,) = render(spec, "nomad")
    check_nomad(rendered.text, spec)


# --- refusals -------------------------------------------------------------------------

INVALID = [
    ({"slots": 0}, "slots"),
    ({"nodes": 0}, "nodes"),
    ({"walltime": "1h"}, "walltime"),
    ({"walltime": "1-25:00:00"}, "walltime"),
    ({"walltime": "00:00:00"}, "walltime"),
    ({"runtime": "docker"}, "runtime"),
    ({"runtime": "apptainer"}, "image"),
    ({"runtime": "bwrap", "gpus": 1}, "gpus"),
    ({"array": 65}, "port_range"),
    ({"array": 10, "array_limit": 10, "port_range": (9100, 9108)}, "port_range"),
    ({"port_range": (80, 90)}, "port_range"),
    ({"array_limit": 3}, "array_limit"),
    ({"array": 4, "nodes": 2}, "nodes"),
    ({"mem": "lots"}, "mem"),
    ({"partition": "a b"}, "partition"),
    ({"account": "x;rm -rf /"}, "account"),
    ({"signal_seconds": 70000}, "signal_seconds"),
    ({"dialect": "sge"}, "dialect"),
    ({"setup_lines": ("module load a\nrm -rf ~",)}, "setup_lines"),
    ({"extra_directives": ("--comment=a\n#SBATCH --job-name=x",)}, "extra_directives"),
    # U+2028 is a line break to Python's splitlines (and editors), not to bash
    ({"extra_directives": ("--comment=a\u2028rm -rf ~",)}, "extra_directives"),
    ({"image": "x.sif\r\nrm -rf ~"}, "image"),
]


@pytest.mark.parametrize("change,field", INVALID)
def test_invalid_specs_are_refused_naming_the_field(change, field):
    with pytest.raises(SpecError) as err:
        render(SandboxSpec(**change), "slurm")
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


# How each hostile-input test's cases ended, for this session: {(test, outcome): count}.
OUTCOMES: Counter = Counter()


def tally(test: str, outcome: str) -> None:
    OUTCOMES[test, outcome] += 1
    event(outcome)  # shown by `pytest --hypothesis-show-statistics`


def final_newline(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Values that end in "\n": `re.match("^...$")` lets them through, and the newline,
    written into a jobspec, ends the line early."""
    return strategy.map(lambda text: text + "\n")


NAME_CHARS = set(string.ascii_letters + string.digits + "._-")


def is_valid_name(name: str) -> bool:
    """The job name rule, written without a regex: 1-63 of ASCII letters, digits, . _ -,
    starting with a letter or digit."""
    return 1 <= len(name) <= 63 and name[0] not in "._-" and set(name) <= NAME_CHARS


job_names = st.one_of(st.text(min_size=1, max_size=40), final_newline(st.text(max_size=39)),
                      final_newline(names), names.map(lambda n: n + "\r"), names.map(lambda n: n + " x"),
                      # valid ones
                      names, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{40,62}", fullmatch=True),
                      st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", fullmatch=True))


@SETTINGS
@example(name="probe")  # must render
@example(name="a" * 63)  # must render
@example(name="probe\n")  # must be refused
@example(name="a" * 64)  # must be refused
@given(name=job_names)
def test_a_job_name_cannot_carry_shell_syntax_or_lines(name):
    try:
        spec = SandboxSpec(job_name=name)
    except SpecError as exc:
        assert exc.field == "job_name"
        assert not is_valid_name(name), f"{name!r} is a valid job name, yet refused: {exc}"
        tally("job_name", "refused")
        return
    assert is_valid_name(name), f"{name!r} was accepted"
    assert len(render(spec, "slurm")[0].text.splitlines()) == len(render(SandboxSpec(), "slurm")[0].text.splitlines())
    tally("job_name", "rendered")


BASE = dict(python="/venv/bin/python", state_dir="/home/a/.hpc-sandbox", job_name="j", partition="p")
# Directives each scheduler takes as they are: these must render (and, for Nomad, parse).
VALID_EXTRAS = {"slurm": ("--comment=probe", "--exclusive", "-C gpu", "#SBATCH --mail-type=END"),
                "pbs": ("-m abe", "-r n", "#PBS -W umask=022"),
                "nomad": ('meta { owner = "probe" }', "priority = 50", 'region = "global"')}
words = st.one_of(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), st.from_regex(r"[!-~]{1,12}", fullmatch=True),
                  st.text(max_size=20))
# What may follow a valid start, to end its line early or run something.
tails = st.sampled_from(["", "", "\n", "\r\n", "; rm -rf ~", " $(id)", " `id`", " && id", ' } job "x" {', "\\"])
GARBAGE = (
    st.text(max_size=60),
    st.lists(st.sampled_from(["-", "--comment=", "#SBATCH ", "#PBS ", "\n", "\r", ";", "&&", "$(", "`", "'", '"',
                              "rm -rf /", "}", "{", "#", " ", "x", "=", "\\", "\x00", "EOT", "\u2028"]),
             max_size=12).map("".join),
    final_newline(st.text(max_size=59)),
)
# sbatch/qsub options (either scheduler takes most of them), and one-line HCL for Nomad.
options = st.one_of(st.builds("{}{}{}".format, st.sampled_from(["-m ", "-C ", "-r "]), words, tails),
                    st.builds("--comment={}{}".format, words, tails),
                    st.builds("{}{}{}".format, st.sampled_from(["#SBATCH --comment=", "#PBS -m "]), words, tails))
hcl_keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
hcl_lines = st.one_of(st.builds('meta {{ {} = "{}" }}{}'.format, hcl_keys, words, tails),
                      st.builds('{} = "{}"{}'.format, hcl_keys, words, tails),
                      st.builds("priority = {}{}".format, st.integers(0, 100), tails))
option_extras = st.one_of(*GARBAGE, options, st.sampled_from(VALID_EXTRAS["slurm"] + VALID_EXTRAS["pbs"]))
nomad_extras = st.one_of(*GARBAGE, hcl_lines, st.sampled_from(VALID_EXTRAS["nomad"]))


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
@SETTINGS
@example(extra="--comment=probe")
@example(extra="--comment=probe\n")
@example(extra="-m abe")
@example(extra="-m abe\n")
@given(extra=option_extras)
def test_an_extra_directive_cannot_inject_a_command(scheduler, extra):
    base = render(SandboxSpec(**BASE), scheduler)[0].text
    try:
        text = render(SandboxSpec(**BASE, extra_directives=(extra,)), scheduler)[0].text
    except SpecError as exc:
        assert exc.field == "extra_directives"
        assert extra not in VALID_EXTRAS[scheduler], f"{extra!r} is a valid {scheduler} directive, yet refused: {exc}"
        tally(f"extra_directives/{scheduler}", "refused")
        return
    prefix = "#SBATCH" if scheduler == "slurm" else "#PBS"
    # the shell runs exactly what it ran before; the directive is one more comment line
    assert commands(text) == commands(base)
    added = [line for line in text.split("\n") if line.startswith(prefix)]
    assert len(added) == len([line for line in base.split("\n") if line.startswith(prefix)]) + 1
    assert "\n" not in extra and "\r" not in extra
    tally(f"extra_directives/{scheduler}", "rendered")


PLACEHOLDER = 'meta { placeholder = "x" }'


@SETTINGS
@example(extra='meta { owner = "probe" }')  # must parse
@example(extra="priority = 50")  # must parse
@example(extra='meta { owner = "probe" }\n')  # must be refused
@example(extra='x = "a" } job "evil" { y = "b"')  # a second job: refused, or unparseable
@given(extra=nomad_extras)
def test_an_extra_nomad_line_cannot_change_the_task(extra):
    base_text = render(SandboxSpec(**BASE), "nomad")[0].text
    base = nomad_parts(base_text)
    try:
        text = render(SandboxSpec(**BASE, extra_directives=(extra,)), "nomad")[0].text
    except SpecError as exc:
        assert exc.field == "extra_directives"
        assert extra not in VALID_EXTRAS["nomad"], f"{extra!r} is a valid Nomad line, yet refused: {exc}"
        tally("extra_directives/nomad", "refused")
        return
    # The job is the one rendered around a harmless line (which parses), with that one
    # line replaced by the extra: if it does not parse, the extra line is what breaks it.
    reference = render(SandboxSpec(**BASE, extra_directives=(PLACEHOLDER,)), "nomad")[0].text
    nomad_parts(reference)
    ref_lines, lines = reference.split("\n"), text.split("\n")
    at = next(i for i, line in enumerate(ref_lines) if line.strip() == PLACEHOLDER)
    assert len(lines) == len(ref_lines) and lines[:at] == ref_lines[:at] and lines[at + 1:] == ref_lines[at + 1:]
    assert lines[at].strip() == extra.strip()
    try:
        parts = nomad_parts(text)
    except Exception:  # noqa: BLE001 - not valid HCL: Nomad refuses the whole job, nothing runs
        assert extra not in VALID_EXTRAS["nomad"], f"{extra!r} is a valid Nomad line, yet the job does not parse"
        tally("extra_directives/nomad", "unparseable")
        return
    assert parts["task"] == base["task"] and parts["group"] == base["group"]
    assert len(hcl2.loads(text)["job"]) == 1  # no second job beside this one
    tally("extra_directives/nomad", "parsed")


# --- the early returns above did not carry the runs ----------------------------------------

# Least number of cases per test that must get all the way through in one run: the two
# valid @examples each has, and at least two random ones. Far below what the strategies
# give (over 200 runs: at least 11 job names, 7 slurm, 7 pbs and 6 nomad; typically
# about 20), far above none.
ENOUGH = {
    ("job_name", "rendered"): 4,
    ("extra_directives/slurm", "rendered"): 4,
    ("extra_directives/pbs", "rendered"): 4,
    ("extra_directives/nomad", "parsed"): 4,
}
PROPERTY_TESTS = {
    "job_name": lambda: test_a_job_name_cannot_carry_shell_syntax_or_lines(),
    "extra_directives/slurm": lambda: test_an_extra_directive_cannot_inject_a_command(scheduler="slurm"),
    "extra_directives/pbs": lambda: test_an_extra_directive_cannot_inject_a_command(scheduler="pbs"),
    "extra_directives/nomad": lambda: test_an_extra_nomad_line_cannot_change_the_task(),
}


@pytest.mark.parametrize("test,outcome", list(ENOUGH))
def test_enough_cases_went_all_the_way_through(test, outcome):
    if not any(name == test for name, _ in OUTCOMES):  # not run in this session (-k, another order): run it
        PROPERTY_TESTS[test]()
    counts = {what: n for (name, what), n in OUTCOMES.items() if name == test}
    assert counts.get(outcome, 0) >= ENOUGH[test, outcome], counts
