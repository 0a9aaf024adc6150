"""Profiles: layering (site < user < --config < environment < flags) and error messages."""
from __future__ import annotations

from pathlib import Path

import pytest

from hpc_sandbox import config
from hpc_sandbox.config import CLEAR, PROFILE_KEYS, load, load_spec, read_profiles
from hpc_sandbox.errors import ConfigError
from hpc_sandbox.spec import SandboxSpec


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    (path / ".hpc-sandbox").mkdir(parents=True)
    return path


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return tmp_path / "site.yaml"


def env(home: Path, site: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), "HPC_SANDBOX_SITE_CONFIG": str(site), **extra}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_built_in_defaults_without_any_file(home, site):
    write(site, "")
    spec = load_spec(environ=env(home, site))
    assert spec.profile == "default" and spec.slots == 4 and spec.scheduler == "local"


def test_layers_in_order_of_precedence(home, site, tmp_path):
    write(site, "profiles:\n  default: {slots: 1, nodes: 1, partition: site, account: site, qos: site, mem: 1G}\n")
    write(home / ".hpc-sandbox/config.yaml", "profiles:\n  default: {slots: 2, nodes: 2, partition: user, account: user}\n")
    extra = write(tmp_path / "extra.yaml", "profiles:\n  default: {slots: 3, nodes: 3, partition: file}\n")
    environ = env(home, site, HPC_SANDBOX_SLOTS="4", HPC_SANDBOX_NODES="4")
    loaded = load(config_file=extra, overrides={"slots": 5, "nodes": None}, environ=environ)
    spec = loaded.spec
    assert (spec.slots, spec.nodes, spec.partition, spec.account, spec.qos, spec.mem) == (
        5, 4, "file", "user", "site", "1G")
    assert loaded.files == (site, home / ".hpc-sandbox/config.yaml", extra)


def test_named_profile_and_profile_from_environment(home, site):
    write(site, "profiles:\n  gpu: {gpus: 1, runtime: apptainer, image: /i.sif}\n  default: {slots: 9}\n")
    assert load_spec("gpu", environ=env(home, site)).gpus == 1
    assert load_spec("gpu", environ=env(home, site)).slots == 4  # no inheritance from default
    spec = load_spec(environ=env(home, site, HPC_SANDBOX_PROFILE="gpu"))
    assert spec.profile == "gpu" and spec.gpus == 1


def test_unknown_profile_lists_the_defined_ones(home, site):
    write(site, "profiles:\n  gpu: {}\n  cpu: {}\n")
    with pytest.raises(ConfigError) as err:
        load_spec("gpus", environ=env(home, site))
    assert "profile 'gpus' is not defined" in str(err.value) and "cpu, gpu" in str(err.value)


def test_unknown_key_names_file_profile_and_valid_keys(home, site):
    write(site, "profiles:\n  gpu:\n    partiton: gpu\n")
    with pytest.raises(ConfigError) as err:
        load_spec("gpu", environ=env(home, site))
    message = str(err.value)
    assert message.startswith(f"unknown key 'partiton' in {site} profile 'gpu'")
    assert "did you mean 'partition'?" in message
    assert "valid keys: " + ", ".join(PROFILE_KEYS) in message


@pytest.mark.parametrize("line,expected", [
    ("slots: many", "slots: expected an integer, got 'many'"),
    ("slots: true", "slots: expected an integer, got True"),
    ("setup_lines: {a: b}", "setup_lines: expected a list of strings"),
    ("partition: [a, b]", "partition: expected a string, got ['a', 'b']"),
    ("port_range: 9100", "port_range: 9100 is not LO-HI"),
    ("nodes: null", "nodes: expected a value"),
])
def test_wrong_types_name_file_key_and_what_was_expected(home, site, line, expected):
    write(site, f"profiles:\n  default:\n    {line}\n")
    with pytest.raises(ConfigError) as err:
        load_spec(environ=env(home, site))
    assert str(err.value).startswith(f"{site} profile 'default': ")
    assert expected in str(err.value)


def test_bad_values_name_the_file_and_the_allowed_values(home, site):
    write(site, "profiles:\n  default: {runtime: dockr}\n")
    with pytest.raises(ConfigError) as err:
        load_spec(environ=env(home, site))
    assert str(err.value) == (f"{site} profile 'default': runtime: 'dockr' is not one of "
                              "none, bwrap, apptainer, singularity")


def test_environment_values_are_converted_and_named_in_errors(home, site):
    write(site, "")
    spec = load_spec(environ=env(home, site, HPC_SANDBOX_PARTITION="gpu", HPC_SANDBOX_PORT_RANGE="9000-9010",
                                 HPC_SANDBOX_SETUP_LINES='["module load a", "module load b"]',
                                 HPC_SANDBOX_EXTRA_DIRECTIVES="--exclusive", HPC_SANDBOX_IMAGE=""))
    assert spec.partition == "gpu" and spec.port_range == (9000, 9010)
    assert spec.setup_lines == ("module load a", "module load b")
    assert spec.extra_directives == ("--exclusive",)
    assert spec.image is None
    with pytest.raises(ConfigError) as err:
        load_spec(environ=env(home, site, HPC_SANDBOX_SLOTS="x"))
    assert str(err.value) == "environment variable HPC_SANDBOX_SLOTS: slots: expected an integer, got 'x'"


def test_environment_variables_that_are_not_keys_are_ignored(home, site):
    write(site, "")
    spec = load_spec(environ=env(home, site, HPC_SANDBOX_REQUIRE_SLURM="1", HPC_SANDBOX_SLURM_DIR="/x"))
    assert spec.slots == 4


def test_value_errors_from_the_command_line(home, site):
    write(site, "")
    with pytest.raises(ConfigError, match="^the command line: slots: must be at least 1"):
        load_spec(overrides={"slots": 0}, environ=env(home, site))


def test_clear_drops_a_value_from_a_lower_layer(home, site):
    write(site, "profiles:\n  default: {array: 10, array_limit: 2}\n")
    spec = load_spec(overrides={"array": CLEAR, "array_limit": CLEAR, "nodes": 3}, environ=env(home, site))
    assert spec.array is None and spec.array_limit is None and spec.nodes == 3


def test_isolated_reads_only_the_given_file(home, site, tmp_path):
    write(site, "profiles:\n  default: {slots: 1}\n")
    extra = write(tmp_path / "x.yaml", "profiles:\n  p: {nodes: 2}\n")
    spec = load_spec("p", config_file=extra, environ=env(home, site, HPC_SANDBOX_SLOTS="7"), isolated=True)
    assert spec.nodes == 2 and spec.slots == 4


def test_yaml_conveniences(home, site, tmp_path):
    write(site, """
x-common: &common
  runtime: apptainer
  image: /shared/img.sif
profiles:
  default:
    <<: *common
    walltime: 01:30:00
    mem: 2048
    template_dir: site-templates
    setup_lines: |
      module load apptainer
      source /venv/bin/activate
""")
    spec = load_spec(environ=env(home, site))
    assert spec.runtime == "apptainer" and spec.image == "/shared/img.sif"
    assert spec.walltime == "01:30:00"  # YAML 1.1 read it as 5400 seconds
    assert spec.mem == "2048M"
    assert spec.template_dir == tmp_path / "site-templates"  # relative to the file
    assert spec.setup_lines == ("module load apptainer", "source /venv/bin/activate")


@pytest.mark.parametrize("text,expected", [
    ("profiles: [a]", "'profiles' must map profile names"),
    ("- a\n- b", "expected a mapping with a 'profiles' key"),
    ("profile:\n  default: {}", "unknown top-level key 'profile'"),
    ("profiles:\n  default: [1]", "expected a mapping of keys to values"),
    ("profiles: {default: {slots: 1}", "is not valid YAML"),
])
def test_malformed_files(tmp_path, text, expected):
    path = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=expected):
        read_profiles(path)


def test_missing_named_files_are_errors_but_missing_default_files_are_not(home, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(config_file=tmp_path / "nope.yaml", environ={"HOME": str(home)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(environ={"HOME": str(home), "HPC_SANDBOX_SITE_CONFIG": str(tmp_path / "nope.yaml")})
    # The default site file (not named by HPC_SANDBOX_SITE_CONFIG), moved off /etc so that
    # this machine's own /etc/hpc-sandbox has no say: first shown to be the file read ...
    monkeypatch.setattr(config, "SITE_CONFIG", write(tmp_path / "default-site.yaml", "profiles:\n  default: {slots: 7}\n"))
    assert load_spec(environ={"HOME": str(home)}).slots == 7
    # ... then absent, as is the user file: no error, the built-in defaults.
    monkeypatch.setattr(config, "SITE_CONFIG", tmp_path / "absent.yaml")
    assert not config.SITE_CONFIG.exists() and not (home / ".hpc-sandbox" / "config.yaml").exists()
    loaded = load(environ={"HOME": str(home)})
    assert loaded.files == () and loaded.spec == SandboxSpec(state_dir=loaded.spec.state_dir)  # built-in defaults
