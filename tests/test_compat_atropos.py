"""hpc_sandbox.compat.atropos: the ToolBackend of Atropos-style environments, over real
node servers (a local job submitted by start(), or node servers started here): an
environment's rollout of 16 trajectories on 8 slots, the result shapes, the tool names
(bash_stateful as a session; tmux as real tmux where the slot has it, else a session),
artifacts and profiles."""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import uuid
import weakref
from collections import Counter
from pathlib import Path

import pytest

from hpc_sandbox import connect
from hpc_sandbox.compat import (AcquireTimeout, CompatToolResult, ExecutionResult, HpcSandboxBackend, Slot, SlotState,
                                ToolBackend)
from hpc_sandbox.errors import ConfigError
from hpc_sandbox.jobfolder import list_jobs

from helpers import free_port_range, pids_matching, requires_bwrap, wait_until

requires_tmux = pytest.mark.skipif(shutil.which("tmux") is None,
                                   reason="tmux is not installed (`apt-get install tmux`); the real-tmux "
                                          "path is untested")



def members(archive: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isreg() else None) for m in tar}  # type: ignore[union-attr]


# --- shapes, over node servers started here ---------------------------------------------------


@pytest.fixture
async def backend_with(state_dir, server_factory):
    """Makes a started backend over a node server of its own: backend_with(slots=2,
    extra=[serve options], **backend options); all stopped at the end."""
    made: list[HpcSandboxBackend] = []

    async def make(slots: int = 2, extra: list[str] | None = None, **options) -> HpcSandboxBackend:
        job_id = f"shapes-{uuid.uuid4().hex[:6]}"  # a workspace root of its own (named by job id and port)
        server_factory(job_id=job_id, slots=slots, extra=extra)
        backend = HpcSandboxBackend(connect.from_state_dir(state_dir, [job_id]), **options)
        await backend.start()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.stop(purge=True)


@pytest.fixture
async def backend(backend_with):
    return await backend_with()


async def test_bash_stateful_session_edges(backend: HpcSandboxBackend):
    slot = await backend.acquire("t")
    first, ended, fresh, named = await backend.execute_batch([
        (slot, "bash_stateful", {"command": "export KEEP=1; cat <<'EOF'\nheredoc $KEEP\nEOF"}),
        (slot, "bash_stateful", {"command": "exit 3"}),
        (slot, "bash_stateful", {"command": "echo ${KEEP:-gone}"}),
        (slot, "bash_stateful", {"command": "echo ${KEEP:-other session}", "session": "side"}),
    ])
    assert first.output == "heredoc $KEEP" and first.metadata["session"] == "main"
    assert (ended.success, ended.error, ended.metadata["session_ended"]) == (False, "Exit code: 3", True)
    assert fresh.output == "gone" and fresh.metadata["session_started"] is True
    assert named.output == "other session"
    slow, still = await backend.execute_batch([
        (slot, "bash_stateful", {"command": "export Y=2; sleep 20"}, 1),
        (slot, "bash_stateful", {"command": "echo $Y"}),
    ])
    assert slow.error == "Command timed out after 1s" and still.output == "2"  # the session outlived the timeout


async def test_tmux_session_fallback_interrupt_keys_and_sessions_apart(backend_with):
    # tmux="session" forces the fallback whether or not the slot has tmux.
    backend = await backend_with(tmux="session")
    slot = await backend.acquire("t")
    results = await backend.execute_batch([
        (slot, "tmux", {"action": "start"}),
        (slot, "tmux", {"action": "send_keys", "keys": ["echo one; sleep 30; echo never", "Enter"]}),
        (slot, "tmux", {"action": "send_keys", "keys": "C-c"}),
        (slot, "tmux", {"action": "send_keys", "keys": "echo part", "enter": False}),  # typed, not run yet
        (slot, "tmux", {"action": "capture"}),
        (slot, "tmux", {"action": "send_keys", "keys": [" two", "Enter"]}),
        (slot, "tmux", {"action": "capture"}),
        (slot, "bash_stateful", {"command": "echo main"}),
        (slot, "bash", {"command": "true"}),
        (slot, "tmux", {"action": "stop"}),
        (slot, "tmux", {"action": "bogus"}),
    ], timeout_s=20)
    started, waiting, interrupted, typed, first, _, second, main, _, stopped, bogus = results
    assert started.success and started.metadata["mode"] == "session"
    assert waiting.success and waiting.metadata["waiting"] is True
    assert interrupted.success and interrupted.metadata["waiting"] is False and interrupted.metadata["interrupted"]
    assert typed.success and first.output == "one\n"
    assert second.output == "part two\n"
    assert main.output == "main"
    assert stopped.success and stopped.metadata["closed"] is True
    assert bogus.success is False and bogus.metadata["error_kind"] == "bad_request"
    listed = await backend.execute(slot, "session", {"action": "list"})
    assert [s["name"] for s in json.loads(listed.output)["sessions"]] == ["main"]


async def capture_until(backend: HpcSandboxBackend, slot: Slot, session: str, wanted, timeout: float = 15.0):
    """Capture the real tmux pane until `wanted(screen)` holds (a program answers when it
    answers: no fixed sleep); the last capture's result."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await backend.execute(slot, "tmux", {"action": "capture", "session_name": session})
        assert result.success, result.to_dict()
        if wanted(result.output) or asyncio.get_running_loop().time() > deadline:
            return result
        await asyncio.sleep(0.1)


@requires_tmux
async def test_real_tmux_a_terminal_c_c_stop_and_release_leave_no_server(backend_with):
    backend = await backend_with()  # tmux="auto": the slot has tmux, so it is used
    slot = await backend.acquire("t")
    marker = random.randint(10000, 99999)  # a sleep of this length is this test's, in pids_matching

    def keys(session: str, keys, **extra):
        return backend.execute(slot, "tmux", {"action": "send_keys", "session_name": session, "keys": keys, **extra})

    started = await backend.execute(slot, "tmux", {"action": "start", "session_name": "repl"})
    assert started.success and started.metadata["mode"] == "tmux", started.to_dict()
    socket = started.metadata["socket"]
    folder = os.path.dirname(socket)
    # Its own server, on a socket in a 0700 folder of its own, not the node's shared /tmp/tmux-UID.
    assert pids_matching(socket) and (os.stat(folder).st_mode & 0o777) == 0o700 and "/tmux-" not in socket

    # A terminal: `tty` names a pty, and an interactive REPL (which needs one) answers.
    assert (await keys("repl", "tty")).success
    screen = await capture_until(backend, slot, "repl", lambda s: "/dev/pts/" in s)
    assert "/dev/pts/" in screen.output, screen.output
    await keys("repl", "python3 -q")
    await capture_until(backend, slot, "repl", lambda s: s.rstrip().endswith(">>>"))
    await keys("repl", ["print(6*7)", "Enter"])
    screen = await capture_until(backend, slot, "repl", lambda s: "\n42\n" in s)
    assert "\n42\n" in screen.output and screen.metadata["pane_command"].startswith("python"), screen.to_dict()
    await keys("repl", "C-d")  # end of input: the REPL exits, the shell is back
    screen = await capture_until(backend, slot, "repl", lambda s: not s.rstrip().endswith(">>>"))
    assert screen.metadata["pane_command"] == "bash", screen.to_dict()

    # C-c interrupts what runs in the pane, and the shell takes the next line.
    running = await keys("repl", f"sleep {marker}; echo never")
    assert running.metadata["settled"] is True and running.metadata["pane_command"] == "sleep"
    assert pids_matching(f"sleep {marker}")
    assert (await keys("repl", "^C")).success
    assert await asyncio.to_thread(wait_until, lambda: not pids_matching(f"sleep {marker}"), 10)
    # A pane that never goes quiet: send_keys returns after max_wait, the program still runs.
    busy = await keys("repl", "while :; do date +%N; sleep 0.05; done", max_wait=1)
    assert (busy.success, busy.metadata["settled"], busy.metadata["timed_out"]) == (True, False, False)
    assert busy.metadata["duration"] < 5, busy.to_dict()
    assert (await keys("repl", "C-c")).metadata["settled"] is True
    await keys("repl", "echo after-$((6*7))")
    screen = await capture_until(backend, slot, "repl", lambda s: "\nafter-42\n" in s)
    assert "\nafter-42\n" in screen.output and "never" not in screen.output.splitlines(), screen.output
    assert (await backend.execute(slot, "tmux", {"action": "capture", "session_name": "repl",
                                                 "scrollback": 0})).output.count("\n") <= 50  # the screen alone

    # start on a running name: a fresh session (the old one killed, its server with it,
    # as it was the only one: the new start must not reach the server while it exits).
    fresh = await backend.execute(slot, "tmux", {"action": "start", "session_name": "repl"})
    assert fresh.success and fresh.metadata["socket"] == socket, fresh.to_dict()
    screen = await capture_until(backend, slot, "repl", lambda s: s.strip() != "")
    assert "after-42" not in screen.output, screen.output

    # stop: the session; with the last one, the server and its folder.
    side = await backend.execute(slot, "tmux", {"action": "start", "session_name": "side"})
    assert side.metadata["socket"] == socket  # one server per slot, sessions side by side
    closed = await backend.execute(slot, "tmux", {"action": "stop", "session_name": "repl"})
    assert closed.success and closed.metadata["closed"] is True and pids_matching(socket)
    closed = await backend.execute(slot, "tmux", {"action": "stop", "session_name": "side"})
    assert closed.success and closed.metadata["closed"] is True
    assert await asyncio.to_thread(wait_until, lambda: not pids_matching(socket), 10), pids_matching(socket)
    assert not os.path.exists(folder)
    again = await backend.execute(slot, "tmux", {"action": "stop", "session_name": "side"})
    assert again.success and again.metadata["closed"] is False
    gone = await backend.execute(slot, "tmux", {"action": "capture", "session_name": "side"})
    assert (gone.success, gone.metadata["error_kind"]) == (False, "not_running")

    # Nothing of tmux in the workspace: no socket, no .bash_history (the REPL keeps its own
    # history in $HOME, which is the workspace, as it would on any terminal).
    listing = (await backend.list_artifacts(slot, ".", recursive=True))["entries"]
    assert {e["path"] for e in listing} <= {".python_history"}, listing

    # release(reset_workspace=True) with a session running: the backend removes only the
    # socket folder; the agent's reset ends the server, which daemonized out of the call's
    # process group, by the tag in the environment it inherited, and the pane's programs too.
    work = await backend.execute(slot, "tmux", {"action": "send_keys", "session_name": "work",  # starts it
                                                "keys": f"sleep {marker}"})
    assert work.success and work.metadata["pane_command"] == "sleep", work.to_dict()
    socket = work.metadata["socket"]
    assert os.path.dirname(socket) != folder and pids_matching(socket) and pids_matching(f"sleep {marker}")
    await backend.release(slot, reset_workspace=True)
    assert await asyncio.to_thread(wait_until, lambda: not pids_matching(socket), 10), pids_matching(socket)
    assert not pids_matching(f"sleep {marker}") and not os.path.exists(os.path.dirname(socket))


async def test_auto_falls_back_to_a_session_in_a_slot_without_tmux(backend_with, tmp_path):
    # Slots whose PATH holds bash and sleep but no tmux, as an image without it.
    tools = tmp_path / "no-tmux-bin"
    tools.mkdir()
    for name in ("bash", "sleep"):
        (tools / name).symlink_to(shutil.which(name))
    env_file = tmp_path / "slot-env.json"
    env_file.write_text(json.dumps({"PATH": str(tools)}))
    env_file.chmod(0o600)
    backend = await backend_with(extra=["--slot-env-file", str(env_file)])
    asked: list[str] = []
    [pool] = backend.pools.values()
    execute = pool.execute
    slot = await backend.acquire("t")  # its probe (pwd, network) before the counting starts

    async def counting(slot, tool, args=None, timeout=None):
        if tool == "bash" and "tmux -V" in (args or {}).get("command", ""):
            asked.append(slot.id)
        return await execute(slot, tool, args, timeout)

    pool.execute = counting  # type: ignore[method-assign]
    results = await backend.execute_batch([
        (slot, "tmux", {"action": "start"}),
        (slot, "tmux", {"action": "send_keys", "keys": "echo plain"}),
        (slot, "tmux", {"action": "capture"}),
        (slot, "tmux", {"action": "stop"}),
    ], timeout_s=20)
    assert all(r.success and r.metadata["mode"] == "session" for r in results), [r.to_dict() for r in results]
    assert results[2].output == "plain\n"
    assert asked == [slot.slot_id]  # asked once for the slot, not per call

    strict = await backend_with(extra=["--slot-env-file", str(env_file)], tmux="tmux")
    slot = await strict.acquire("u")
    refused = await strict.execute(slot, "tmux", {"action": "start"})
    assert (refused.success, refused.metadata["error_kind"]) == (False, "unavailable") and "no tmux" in refused.error
    with pytest.raises(ConfigError, match="tmux must be one of"):
        HpcSandboxBackend(connect.from_state_dir(tmp_path), tmux="screen")


@requires_tmux
async def test_real_tmux_keys_never_reach_the_driver_script(backend_with, tmp_path):
    # What an environment types goes to the slot in the call's environment, never in the
    # script the slot's bash runs: shell syntax in the keys is typed, not run by the driver.
    backend = await backend_with()
    [pool] = backend.pools.values()
    execute, commands = pool.execute, []

    async def recording(slot, tool, args=None, timeout=None):
        if tool == "bash":
            commands.append((args or {}).get("command", ""))
        return await execute(slot, tool, args, timeout)

    slot = await backend.acquire("t")
    pool.execute = recording  # type: ignore[method-assign]
    marker = tmp_path / "ran"
    typed = f"echo \"$(touch {marker})\"'; touch {marker}; '"
    sent = await backend.execute(slot, "tmux", {"action": "send_keys", "session_name": "x y:z", "keys": typed,
                                                "enter": False})
    assert sent.success and sent.metadata["mode"] == "tmux", sent.to_dict()
    screen = await capture_until(backend, slot, "x y:z", lambda s: typed in s)
    assert typed in screen.output and not marker.exists(), screen.output
    assert commands and not any(str(marker) in command or "x y:z" in command for command in commands)
    # Long text goes in pieces, each typed whole.
    long = "".join(f"{n:05d}" for n in range(1000))  # 5,000 characters: three pieces
    await backend.execute(slot, "tmux", {"action": "send_keys", "session_name": "long", "keys": ["C-c", long],
                                         "enter": False})
    screen = await capture_until(backend, slot, "long", lambda s: long[-20:] in s)
    assert long in screen.output.replace("\n", ""), screen.output
    await backend.release(slot, reset_workspace=True)


# --- the interface as the integration's executor plays it -------------------------------------
# (../shared/ATROPOS_TOOLBACKEND.md: batches of (slot, tool, args), to_tool_result(), artifact
# dicts read into models whose fields are below: unknown keys ignored, a missing or mistyped one fails)

READ_FIELDS = {"success": bool, "content": str, "error": (str, type(None)), "encoding": str, "truncated": bool,
               "bytes": int, "file_size": int, "path": str}
LIST_FIELDS = {"success": bool, "entries": list, "truncated": bool, "error": (str, type(None))}
ENTRY_FIELDS = {"path": str, "is_dir": bool, "size": int, "mtime": (int, float)}
ARCHIVE_FIELDS = {"success": bool, "content": str, "error": (str, type(None)), "encoding": str, "format": str,
                  "bytes": int, "entry_count": int}
SLOT_FIELDS = {"slot_id": str, "alloc_id": str, "container_addr": str, "workspace_dir": str, "state": SlotState,
               "trajectory_id": (str, type(None)), "metadata": dict}


def model(data: object, fields: dict) -> dict:
    """What a strict pydantic model of `fields` would accept: every field present, of its type."""
    values = data if isinstance(data, dict) else {name: getattr(data, name) for name in fields if hasattr(data, name)}
    for name, kind in fields.items():
        assert name in values, f"missing {name!r} in {data!r}"
        assert isinstance(values[name], kind) and not (kind is int and isinstance(values[name], bool)), \
            f"{name}={values[name]!r} is not {kind}"
    return values


def test_the_strict_check_fails_what_the_executor_would_refuse():
    with pytest.raises(AssertionError, match="missing 'success'"):
        model({"entries": [], "truncated": False, "error": None}, LIST_FIELDS)
    with pytest.raises(AssertionError, match="is not"):
        model({"success": "yes", "entries": [], "truncated": False, "error": None}, LIST_FIELDS)


async def test_executor_batches_results_and_tool_results(backend_with):
    backend = await backend_with(slots=2)
    assert backend.default_timeout_s == 300.0  # see DEFAULT_TIMEOUT_S: 30 s is shorter than a test run
    one, two = await backend.acquire("traj-1"), await backend.acquire("traj-2")
    for slot, trajectory in ((one, "traj-1"), (two, "traj-2")):
        model(slot, SLOT_FIELDS)
        assert slot.state is SlotState.ACQUIRED and slot.trajectory_id == trajectory
        assert slot.workspace_dir.startswith("/") and slot.alloc_id in slot.slot_id
    assert Slot.from_dict(json.loads(json.dumps(one.to_dict()))) == one
    where = (await backend.execute(one, "bash", {"command": "pwd"})).output
    assert where == one.workspace_dir  # the workspace as commands see it

    big = "y" * 100_001
    batch = [
        (one, "write_file", {"path": "src/a.py", "content": "print(6 * 7)\n"}),
        (two, "bash", {"command": "printf '  out  '; echo err >&2; exit 3"}),
        (one, "bash", {"command": "python3 src/a.py"}),
        (two, "bash", {"command": "echo err only >&2"}),
        (one, "read_file", {"path": "src/a.py"}),
        (two, "bash", {"command": "sleep 20"}),
        (one, "read_file", {"path": "missing.txt"}),
        (one, "read_file", {"path": "../etc/passwd"}),
        (one, "read_file", {"path": "src"}),
        (two, "write_file", {"path": "big.txt", "content": big}),
        (two, "bash", {"command": "python3 -c 'print(\"z\" * 60000)'"}),
        (one, "no_such_tool", {}),
        ("not a slot", "bash", {"command": "true"}),
    ]
    results = await backend.execute_batch(batch, timeout_s=2)
    assert len(results) == len(batch) and all(isinstance(r, ExecutionResult) for r in results)
    wrote, failed, ran, only_err, read, slow, missing, outside, folder, too_big, long, unknown, stray = results
    assert (wrote.success, wrote.output, wrote.error) == (True, "Successfully wrote 13 bytes to src/a.py", "")
    assert (wrote.metadata["path"], wrote.metadata["size"]) == ("src/a.py", 13)
    # The whole stripped, not each stream.
    assert (failed.success, failed.output, failed.error) == (False, "out  \n[stderr]\nerr", "Exit code: 3")
    assert failed.metadata["exit_code"] == failed.metadata["returncode"] == 3 and failed.slot_id == two.slot_id
    assert (ran.success, ran.output, ran.error, ran.metadata["exit_code"]) == (True, "42", "", 0)
    assert only_err.output == "err only"
    assert (read.success, read.output) == (True, "print(6 * 7)\n")
    assert (slow.success, slow.error) == (False, "Command timed out after 2s")
    assert slow.metadata["exit_code"] == -1 and slow.metadata["timeout"] is True
    assert (missing.success, missing.error) == (False, "File not found: missing.txt")
    assert outside.error == "Access denied: path outside workspace"
    assert folder.error == "Not a file: src"
    assert too_big.success is False and too_big.error.startswith("Content too large: ")
    assert long.success and long.output == "z" * 50_000 + "\n... (output truncated)"
    assert unknown.success is False and "no_such_tool" in unknown.error
    assert stray.success is False and "slot" in stray.error
    assert len({r.execution_id for r in results}) == len(results)

    # The executor's step: every result to the environment's ToolResult (here the compatible one).
    for result in results:
        tool = result.to_tool_result()
        assert isinstance(tool, CompatToolResult)
        assert (tool.success, tool.output, tool.error, tool.uniq_id) == (result.success, result.output, result.error,
                                                                         result.execution_id)
        assert set(tool.to_dict()) == {"success", "output", "error", "metadata", "uniq_id"}
        json.dumps(tool.to_dict())
    assert one.state is SlotState.ACQUIRED
    await backend.release(one, reset_workspace=True)
    assert one.state is SlotState.AVAILABLE


async def test_to_tool_result_uses_the_environments_class(monkeypatch):
    class ToolResult:  # the environment's own, as the executor imports it
        def __init__(self, success, output="", error="", metadata=None, uniq_id=None):
            self.success, self.output, self.error = success, output, error
            self.metadata, self.uniq_id = metadata, uniq_id

    monkeypatch.setattr(ExecutionResult, "tool_result_class", ToolResult)
    made = ExecutionResult(False, "", "Exit code: 1", metadata={"exit_code": 1}).to_tool_result()
    assert isinstance(made, ToolResult) and (made.error, made.metadata) == ("Exit code: 1", {"exit_code": 1})


async def test_artifact_dicts(backend: HpcSandboxBackend):
    slot = await backend.acquire("t")
    await backend.execute_batch([(slot, "write_file", {"path": "out/r.json", "content": '{"ok": true}'}),
                                 (slot, "write_file", {"path": "out/sub/x.txt", "content": "x" * 100})])
    read = model(await backend.read_artifact(slot, "out/r.json", include_sha256=True), READ_FIELDS)
    assert (read["success"], read["content"], read["bytes"], read["file_size"]) == (True, '{"ok": true}', 12, 12)
    assert read["sha256"] == hashlib.sha256(b'{"ok": true}').hexdigest() and read["mime"] == "application/json"
    head = model(await backend.read_artifact(slot, "out/sub/x.txt", encoding="base64", max_bytes=10,
                                             include_sha256=True), READ_FIELDS)
    assert (head["truncated"], head["bytes"], head["file_size"]) == (True, 10, 100)
    assert base64.b64decode(head["content"]) == b"x" * 10 and head["sha256"] == hashlib.sha256(b"x" * 10).hexdigest()
    for failure in (await backend.read_artifact(slot, "nope"), await backend.read_artifact(slot, "../x"),
                    await backend.list_artifacts(slot, "nope"), await backend.archive_artifacts(slot, "../etc"),
                    await backend.archive_artifacts(slot, ".", archive_format="zip")):
        assert failure["success"] is False and failure["error"], failure

    listing = model(await backend.list_artifacts(slot, ".", recursive=True), LIST_FIELDS)
    assert {e["path"]: e["is_dir"] for e in listing["entries"]} == {
        "out": True, "out/r.json": False, "out/sub": True, "out/sub/x.txt": False}
    assert all(model(e, ENTRY_FIELDS) for e in listing["entries"]) and listing["truncated"] is False
    cut = await backend.list_artifacts(slot, ".", recursive=True, max_entries=2)
    assert len(cut["entries"]) == 2 and cut["truncated"] is True
    # exclude (ours): a folder left out is not entered; what is left is listed whole.
    lean = model(await backend.list_artifacts(slot, ".", recursive=True, exclude=["sub"]), LIST_FIELDS)
    assert [e["path"] for e in lean["entries"]] == ["out", "out/r.json"] and lean["truncated"] is False
    lean_tar = await backend.archive_artifacts(slot, "out", exclude=["sub"])
    assert sorted(members(base64.b64decode(lean_tar["content"]))) == ["out", "out/r.json"]

    for fmt in ("tar.gz", "tgz"):
        packed = model(await backend.archive_artifacts(slot, "out", archive_format=fmt), ARCHIVE_FIELDS)
        data = base64.b64decode(packed["content"])
        assert packed["encoding"] == "base64" and packed["bytes"] == len(data) and packed["entry_count"] == 4
        assert members(data)["out/sub/x.txt"] == b"x" * 100
    assert (await backend.archive_artifacts(slot, "out", max_entries=2))["success"] is False
    await backend.release(slot)
    gone = await backend.read_artifact(slot, "out/r.json")
    assert gone["success"] is False and "not held" in gone["error"]


async def test_no_slot_in_time_is_a_timeout_error(state_dir, server_factory):
    server_factory(job_id="one", slots=1)
    async with HpcSandboxBackend(connect.from_state_dir(state_dir, ["one"], acquire_timeout=1)) as backend:
        await backend.acquire("first")
        with pytest.raises(TimeoutError) as waited:
            await backend.acquire("second")
        assert isinstance(waited.value, AcquireTimeout) and waited.value.kind == "no_capacity"


@requires_bwrap
async def test_allow_network_false_runs_only_where_the_slot_is_off_the_network(state_dir, server_factory):
    server_factory(job_id="sealed", slots=1, runtime="bwrap", extra=["--network", "none"])
    server_factory(job_id="open", slots=1)
    backend = HpcSandboxBackend.with_profiles(profiles={"sealed": connect.from_state_dir(state_dir, ["sealed"]),
                                                        "open": connect.from_state_dir(state_dir, ["open"])},
                                              default_profile="sealed")
    async with backend:
        sealed, open_ = await backend.acquire("a"), await backend.acquire("b", profile="open")
        assert sealed.workspace_dir == "/workspace" and sealed.metadata["network"] == "none"
        assert open_.metadata["network"] == "host" and open_.workspace_dir != "/workspace"
        marker = f"ran-{uuid.uuid4().hex[:8]}"
        results = await backend.execute_batch([
            (sealed, "bash", {"command": "echo offline", "allow_network": False, "require_sandbox": True}),
            (sealed, "bash_stateful", {"command": "echo kept", "allow_network": False,
                                       "require_stateful_sandbox": True}),
            (open_, "bash", {"command": f"touch {marker}", "allow_network": False}),
            (open_, "bash", {"command": f"touch {marker}", "require_sandbox": True}),
            (open_, "bash", {"command": "echo allowed", "allow_network": True}),
        ])
        assert [r.output for r in results[:2]] == ["offline", "kept"] and all(r.success for r in results[:2])
        for refused in results[2:4]:
            assert refused.success is False and refused.metadata["error_kind"] == "unavailable", refused.to_dict()
        assert "allow_network=False" in results[2].error and "require_sandbox" in results[3].error
        assert results[4].output == "allowed"
        listing = await backend.list_artifacts(open_, ".")
        assert listing["entries"] == []  # the refused commands never ran


async def test_profiles_start_lazily_and_the_context_manager_stops_on_error(state_dir, no_user_config, caplog):
    local = {"scheduler": "local", "state_dir": state_dir}
    backend = HpcSandboxBackend.with_profiles(
        app_name="rl", default_profile="small",
        profiles={"small": {**local, "slots_per_sandbox": 1, "port_range": free_port_range()},
                  "big": {**local, "slots_per_sandbox": 2, "execution_timeout_s": 900, "cpu": 2, "memory": 4096,
                          "min_sandboxes": 3, "port_range": free_port_range()}},
        wait_timeout=120, acquire_timeout=120)
    shown = backend.list_profiles()
    assert set(shown) == {"small", "big"} and shown["big"]["slots_per_sandbox"] == 2
    assert (shown["big"]["cpu"], shown["big"]["memory"], shown["big"]["active"]) == (2, "4096M", False)
    assert "min_sandboxes=3 ignored" in caplog.text
    with pytest.raises(RuntimeError, match="the rollout broke"):
        async with backend:
            await backend.start(profiles_to_start=["big"])  # a second start: nothing
            assert backend.get_status()["active_pools"] == ["small"] and len(backend.jobs) == 1
            slot = await backend.acquire("t", profile="big")  # started here, on first use
            assert backend.get_status()["active_pools"] == ["small", "big"] and len(backend.jobs) == 2
            status = backend.get_status()
            assert status["pools"]["big"]["total_slots"] == 2 and status["pools"]["big"]["available_slots"] == 1
            assert status["pools"]["big"]["healthy_sandboxes"] == 1 and status["healthy_sandboxes"] == 2
            assert status["default_profile"] == "small" and status["profiles"] == ["small", "big"]
            assert backend.list_profiles()["big"]["active"] is True
            ran = await backend.execute(slot, "bash", {"command": "sleep 1.2"})  # big's timeout: 900 s
            assert ran.success, ran.to_dict()
            jobs = list(backend.jobs)
            raise RuntimeError("the rollout broke")
    assert backend.jobs == [] and list_jobs(state_dir) == []
    assert await asyncio.to_thread(wait_until, lambda: not any(pids_matching(j.id) for j in jobs), 20)

    again = HpcSandboxBackend.with_profiles(profiles={"small": {**local, "slots_per_sandbox": 1,
                                                                "port_range": free_port_range()}},
                                            wait_timeout=120)
    await again.start(profiles_to_start=["nope", "small"])
    try:
        assert "no profile 'nope'" in caplog.text and len(again.jobs) == 1
    finally:
        await again.stop(purge=True)
    with pytest.raises(ConfigError, match="secrets"):
        HpcSandboxBackend.with_profiles(profiles={"x": {"secrets": ["openai"]}})


async def test_a_backend_collected_unstopped_warns(state_dir, no_user_config):
    backend = HpcSandboxBackend(scheduler="local", slots=1, state_dir=state_dir, port_range=free_port_range(),
                                wait_timeout=120)
    await backend.start()
    [job] = backend.jobs
    alive = weakref.ref(backend)
    try:
        with pytest.warns(ResourceWarning, match=f"its jobs {job.id} still run"):
            del backend
            for _ in range(3):
                gc.collect()
            assert alive() is None, [type(r).__name__ for r in gc.get_referrers(alive())]
    finally:
        await asyncio.to_thread(job.cancel, True)


# --- a rollout, and the guide's example -------------------------------------------------------


async def one_trajectory(backend: HpcSandboxBackend, number: int, seen: list[str]) -> None:
    slot = await backend.acquire(trajectory_id=f"traj-{number}")
    seen.append(slot.slot_id)
    try:
        # Whoever had this slot before released it with reset_workspace=True: nothing is left.
        assert (await backend.list_artifacts(slot, ".", recursive=True))["entries"] == []
        results = await backend.execute_batch([
            (slot, "write_file", {"path": "sub/notes.txt", "content": f"trajectory {number}\n"}),
            (slot, "write_file", {"path": "run.py", "content": "print(6 * 7)"}),
            (slot, "bash", {"command": "python3 run.py; echo careful >&2; exit 3"}),
            (slot, "bash_stateful", {"command": "cd sub && export X=1"}),
            (slot, "bash_stateful", {"command": "pwd; echo $X"}),
            (slot, "bash", {"command": "echo ${X:-unset}"}),  # plain bash: fresh, in the workspace
            (slot, "read_file", {"path": "sub/notes.txt"}),
        ], timeout_s=60)
        assert all(r.success for r in results[:2]), [r.to_dict() for r in results]
        failed, cd, kept, plain, read = results[2:]
        assert (failed.success, failed.output, failed.error) == (False, "42\n\n[stderr]\ncareful", "Exit code: 3")
        assert cd.success and kept.output == f"{slot.workspace_dir}/sub\n1" and plain.output == "unset"
        assert read.output == f"trajectory {number}\n"
        packed = await backend.archive_artifacts(slot, ".")
        assert set(members(base64.b64decode(packed["content"]))) == {"sub", "sub/notes.txt", "run.py"}
    finally:
        await backend.release(slot, reset_workspace=True)


async def test_rollout_of_16_trajectories_on_8_slots_then_stop_purge_cancels_the_job(state_dir, no_user_config):
    backend = HpcSandboxBackend(scheduler="local", slots=8, state_dir=state_dir, port_range=free_port_range(),
                                wait_timeout=120, acquire_timeout=120)
    assert list(backend.list_profiles()) == ["default"] and backend.jobs == []
    await backend.start()
    [job] = backend.jobs
    try:
        assert pids_matching(job.id) and backend.get_status()["total_slots"] == 8
        seen: list[str] = []
        await asyncio.wait_for(asyncio.gather(*(one_trajectory(backend, n, seen) for n in range(16))), 300)
        assert len(seen) == 16 and len(set(seen)) <= 8 and max(Counter(seen).values()) >= 2
        assert backend.get_status()["available_slots"] == 8
        # stop() without purge leaves the job running; start() attaches to it again.
        await backend.stop()
        assert backend.jobs == [job] and pids_matching(job.id)
        await backend.start()
        slot = await backend.acquire("after-restart")
        assert (await backend.execute(slot, "bash", {"command": "echo back"})).output == "back"
    finally:
        await backend.stop(purge=True)
    assert backend.jobs == [] and list_jobs(state_dir) == []
    assert await asyncio.to_thread(wait_until, lambda: not pids_matching(job.id), 10), pids_matching(job.id)


async def test_a_start_that_fails_leaves_no_job_behind(state_dir, no_user_config):
    from hpc_sandbox.jobs import JobFailed

    backend = HpcSandboxBackend(scheduler="local", slots=1, state_dir=state_dir, port_range=free_port_range(),
                                wait_timeout=0.01)  # no node server is ready that fast
    with pytest.raises(JobFailed, match="node servers ready after"):
        await backend.start()
    assert backend.jobs == [] and backend.pools == {"default": None} and list_jobs(state_dir) == []
    assert await asyncio.to_thread(wait_until, lambda: not pids_matching(str(state_dir)), 10)
    with pytest.raises(ConfigError, match="SlotPool, or a profile"):
        HpcSandboxBackend(connect.from_state_dir(state_dir), slots=2)


def test_the_guides_executor_example_runs_as_shown(tmp_path, state_dir, no_user_config):
    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text()
    section = guide[guide.index("One step of a `ToolExecutor`"):]
    code, rest = section.split("```python\n", 1)[1].split("```", 1)
    shown = rest.split("```\n", 1)[1].split("```", 1)[0].splitlines()
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "HPC_SANDBOX_STATE_DIR": str(state_dir), "HPC_SANDBOX_PORT_RANGE": free_port_range(),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr
    printed = ran.stdout.splitlines()
    assert len(printed) == len(shown)
    for line, expected in zip(printed, shown):
        if line.startswith("[('__pycache__',"):  # a folder's size is the filesystem's
            assert line.split("), ")[1:] == expected.split("), ")[1:]
        else:
            assert line == expected
    assert list_jobs(state_dir) == []  # the context manager cancelled its job


# --- per-profile settings (no job needed) ---------------------------------------------------


@dataclasses.dataclass
class ModalLikeConfig:
    """The fields the integration's multi-profile tests pass (ATROPOS_TOOLBACKEND.md), with
    the defaults its Modal backend gives them."""

    name: str = "default"
    app_name: str | None = None
    image: str = "python:3.11"
    gpu: str | None = None
    cpu: float = 1.0
    memory: int = 2048
    slots_per_sandbox: int = 10
    min_sandboxes: int = 1
    max_sandboxes: int = 5
    idle_timeout: int = 120
    max_lifetime: int = 3600
    acquire_timeout_s: float = 60.0
    execution_timeout_s: float = 30.0
    secrets: list = dataclasses.field(default_factory=list)
    env_vars: dict = dataclasses.field(default_factory=dict)
    workspace_base: str = "/data"


def test_modal_like_settings_map_onto_spec_overrides(caplog):
    from hpc_sandbox.compat.atropos_profiles import check_image, settings_of
    from hpc_sandbox.spec import SandboxSpec

    # Fields left at their defaults are not given: the hpc-sandbox profile decides them.
    assert settings_of("default", ModalLikeConfig()).overrides == {}
    gpu = settings_of("pytorch-gpu", ModalLikeConfig(name="pytorch-gpu", gpu="A100:2", cpu=3.5, memory=16384,
                                                      slots_per_sandbox=4, max_lifetime=7200, max_sandboxes=9,
                                                      execution_timeout_s=600, acquire_timeout_s=5))
    assert gpu.overrides == {"gpus": 2, "cpus_per_node": 4, "mem": "16384M", "slots": 4, "walltime": "02:00:00"}
    assert (gpu.execution_timeout, gpu.acquire_timeout, gpu.config_profile, gpu.named) == (600, 5, "pytorch-gpu",
                                                                                          False)
    assert "max_sandboxes=9 ignored" in caplog.text and "A100" in caplog.text
    assert settings_of("x", {"profile": "cluster", "runtime": "bwrap", "network": "none"}).named is True
    for refused in ({"secrets": ["key"]}, {"env_vars": {"A": "1"}}, {"no_such_field": 1}):
        with pytest.raises(ConfigError):
            settings_of("x", refused)
    spec = check_image("x", SandboxSpec(runtime="none", image="docker://python:3.11"))
    assert spec.image is None and "image 'docker://python:3.11' ignored" in caplog.text

    # The backend takes such an object in place of a pool (as ModalToolBackend(config) does).
    backend = HpcSandboxBackend(ModalLikeConfig(slots_per_sandbox=3, execution_timeout_s=120))
    assert backend.default_timeout_s == 120 and backend.list_profiles()["default"]["slots_per_sandbox"] == 3
    assert backend.get_status()["active_pools"] == [] and backend.get_status()["total_slots"] == 0
    multi = HpcSandboxBackend.with_profiles(profiles={"default": ModalLikeConfig(),
                                                      "pytorch-gpu": ModalLikeConfig(name="pytorch-gpu", gpu="T4")})
    assert multi.list_profiles()["pytorch-gpu"]["gpu"] == 1 and multi.default_profile == "default"
