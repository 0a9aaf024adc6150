"""Safe defaults (issue 19 item 9): a per-slot memory limit derived on the node from its
memory and the slot count unless a profile says a size or `none`; a command the kernel's
OOM killer ended comes back as limit_exceeded, and any other unexplained signal death
says what it was."""
from __future__ import annotations

import itertools

import pytest

from hpc_sandbox import config
from hpc_sandbox.errors import ErrorKind, SpecError
from hpc_sandbox.jobspec import serve_argv
from hpc_sandbox.models import ToolResult
from hpc_sandbox.protocol import AcquireRequest, Call, CallAnswer
from hpc_sandbox.runtime import RuntimeOptions, make_runtime
from hpc_sandbox.server import defaults, slots
from hpc_sandbox.server.limits import SlotLimits
from hpc_sandbox.spec import SLOT_MEMORY_AUTO, SandboxSpec, parse_slot_memory

from helpers import start_server

GIB = 1 << 30


@pytest.mark.parametrize("text, value", [("none", None), ("None", None), ("auto", SLOT_MEMORY_AUTO),
                                         ("1G", 1024), (512, 512)])
def test_slot_memory_is_a_size_auto_or_none(text, value):
    assert parse_slot_memory(text) == value


def test_a_bad_slot_memory_names_the_key_and_the_words():
    with pytest.raises(SpecError, match=r"slot_memory: 'lots' is not a size.*auto.*none"):
        parse_slot_memory("lots")


def test_the_default_is_a_share_of_the_nodes_memory_over_the_slots(monkeypatch):
    monkeypatch.setattr(defaults, "available_memory", lambda: (16 * GIB, "MemTotal"))
    default = defaults.slot_memory_default(4)
    assert default is not None and default.mb == int(16 * 1024 * defaults.DEFAULT_MEMORY_SHARE / 4)
    assert "over 4 slots" in default.describe() and "none" in default.describe()
    # More slots than memory: never below the floor (the log says what it is).
    assert defaults.slot_memory_default(10_000).mb == defaults.MIN_DEFAULT_SLOT_MB  # type: ignore[union-attr]
    monkeypatch.setattr(defaults, "available_memory", lambda: None)
    assert defaults.slot_memory_default(4) is None


def test_a_smaller_cgroup_limit_wins_over_memtotal(monkeypatch, tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text(f"{2 * GIB}\n")
    unlimited = tmp_path / "memory.limit_in_bytes"
    unlimited.write_text("9223372036854771712\n")
    monkeypatch.setattr(defaults, "_cgroup_limit_files", lambda: [limit, unlimited])
    assert defaults.available_memory() == (2 * GIB, str(limit))
    limit.write_text("max\n")
    available, source = defaults.available_memory()  # type: ignore[misc]
    assert source == "MemTotal" and available > 0


def test_a_profile_says_a_size_none_or_nothing_and_the_jobspec_passes_it_on(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("profiles:\n  unlimited: {slot_memory: none}\n  sized: {slot_memory: 2G}\n  default: {}\n")
    environ = {"HOME": str(tmp_path), "HPC_SANDBOX_SITE_CONFIG": str(site)}
    argv = {name: serve_argv(config.load_spec(name, environ=environ), "job") for name in ("unlimited", "sized", "default")}
    assert argv["unlimited"][argv["unlimited"].index("--slot-memory") + 1] == "none"
    assert argv["sized"][argv["sized"].index("--slot-memory") + 1] == "2G"
    assert "--slot-memory" not in argv["default"]  # the node server decides
    with pytest.raises(SpecError, match="slot_memory"):
        SandboxSpec(slot_memory="lots").validate()


def test_a_node_server_without_a_setting_has_a_memory_limit_and_none_turns_it_off(state_dir):
    for job, extra, said in (("dflt", [], "MiB per slot by default"),
                             ("off", ["--slot-memory", "none"], "slot memory limit: none (turned off)")):
        server = start_server(state_dir, job_id=f"mem-{job}", slots=2, extra=extra)
        try:
            assert said in server.log.read_text()
        finally:
            assert server.stop() == 0


# --- a kill nobody here sent ---------------------------------------------------------------


def _answer(signal: int | None, exit_code: int | None = None) -> CallAnswer:
    call = Call(0, "lease", "e1", "bash", {"command": "x"})
    return CallAnswer.success(call, {"exit_code": exit_code, "signal": signal, "timed_out": False,
                                     "stdout": "", "stderr": ""})


def test_an_unexplained_signal_death_says_what_it_was():
    assert ToolResult.from_answer(_answer(9)).error == "killed by SIGKILL (out of memory?)"
    assert ToolResult.from_answer(_answer(15)).error == "killed by SIGTERM"
    assert ToolResult.from_answer(_answer(None, 0)).error is None


@pytest.mark.parametrize("oom_killer_killed", [True, False])
async def test_a_sigkill_while_the_kernels_oom_killer_killed_is_limit_exceeded(tmp_path, monkeypatch,
                                                                                 oom_killer_killed):
    counter = itertools.count() if oom_killer_killed else itertools.repeat(7)
    monkeypatch.setattr(slots, "oom_kills", lambda: next(counter))
    table = slots.SlotTable(make_runtime(RuntimeOptions()), tmp_path, 1, limits=SlotLimits(memory_mb=4096))
    await table.start()
    try:
        grant = await table.acquire(AcquireRequest("oom"))
        for args in ({"command": "kill -9 $$"}, {"command": "sh -c 'kill -9 $$'", "session": "s"}):
            answer = await table.execute(Call(grant.slot, grant.lease, f"e{len(args)}", "bash", args, 30))
            if oom_killer_killed:
                assert not answer.ok and answer.error_kind == ErrorKind.LIMIT_EXCEEDED, answer
                assert answer.error_message.startswith("out of memory: ")
            else:
                assert answer.ok, answer
    finally:
        await table.stop()
