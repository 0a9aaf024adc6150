"""hpc_sandbox.compat.atropos: the ToolBackend of Atropos-style environments, over real
node servers (a local job submitted by start(), or node servers started here): an
environment's rollout of 16 trajectories on 8 slots, the result shapes, the tool names
(bash_stateful as a session; tmux as real tmux where the slot has it, else a session),
artifacts and profiles."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import uuid
from collections import Counter

import pytest

from hpc_sandbox import connect
from hpc_sandbox.compat import ArtifactError, BackendSlot, ExecutionResult, HpcSandboxBackend, ToolBackend
from hpc_sandbox.errors import ConfigError
from hpc_sandbox.jobfolder import list_jobs

from helpers import free_port_range, pids_matching, wait_until

requires_tmux = pytest.mark.skipif(shutil.which("tmux") is None,
                                   reason="tmux is not installed (`apt-get install tmux`); the real-tmux "
                                          "path is untested")



def members(archive: bytes) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isreg() else None) for m in tar}  # type: ignore[union-attr]


# --- the rollout ---------------------------------------------------------------------------


async def one_trajectory(backend: HpcSandboxBackend, number: int, seen: list[str]) -> None:
    slot = await backend.acquire(trajectory_id=f"traj-{number}")
    seen.append(slot.slot_id)
    try:
        # Whoever had this slot before released it with reset_workspace=True: nothing is left.
        assert list(await backend.list_artifacts(slot, ".", recursive=True)) == []

        wrote = await backend.execute_batch([
            (slot, "write_file", {"path": "sub/notes.txt", "content": f"trajectory {number}\n"}),
            (slot, "write_file", {"path": "sub/deep/data.txt", "content": "x" * 100}),
            {"slot": slot, "tool_name": "write_file", "arguments": json.dumps({"path": "run.py",
                                                                                "content": "print(6 * 7)"})},
        ])
        assert [r.success for r in wrote] == [True, True, True], [r.to_dict() for r in wrote]

        ran = await backend.execute_batch([
            (slot, "bash", {"command": "python3 run.py; echo careful >&2; exit 3"}),
            (slot, "bash_stateful", {"command": "cd sub && export X=1"}),
            (slot, "bash_stateful", {"command": "pwd; echo $X"}),
            (slot, "bash", {"command": "pwd; echo ${X:-unset}"}),  # plain bash: fresh, in the workspace
            (slot, "read_file", {"path": "sub/notes.txt"}),
        ], timeout_s=30)
        failed, cd, kept, plain, read = ran
        assert (failed.success, failed.output, failed.error) == (False, "42\n[stderr]\ncareful\n", "exit code 3")
        assert failed.metadata["exit_code"] == 3 and failed.metadata["slot"] == slot.slot_id
        assert cd.success and cd.error is None and cd.metadata["exit_code"] == 0
        assert kept.success and kept.output.endswith("/sub\n1\n"), kept.to_dict()
        assert plain.success and plain.output.endswith("\nunset\n") and not plain.output.startswith(kept.output[:-3])
        assert (read.success, read.output) == (True, f"trajectory {number}\n")
        assert len({r.execution_id for r in wrote + ran}) == len(wrote + ran)

        tmux = await backend.execute_batch([
            (slot, "tmux", {"action": "start", "session_name": "work"}),
            (slot, "tmux", {"action": "send_keys", "session_name": "work",
                            "keys": "for n in 1 2 3; do echo tick $n; done"}),
            (slot, "tmux", {"action": "send_keys", "session_name": "work",
                            "keys": "echo 'name?'; read NAME; echo hello $NAME"}),
            (slot, "tmux", {"action": "capture", "session_name": "work"}),
            (slot, "tmux", {"action": "send_keys", "session_name": "work", "keys": f"ada{number}"}),
            (slot, "tmux", {"action": "capture", "session_name": "work"}),
            (slot, "tmux", {"action": "capture", "session_name": "work"}),
        ], timeout_s=30)
        assert all(r.success for r in tmux), [r.to_dict() for r in tmux]
        asked, answered, again = tmux[3], tmux[5], tmux[6]
        assert tmux[0].metadata["mode"] == ("tmux" if shutil.which("tmux") else "session")  # "auto" chose
        if tmux[0].metadata["mode"] == "tmux":
            # Real tmux (the test machine has it): a capture is the screen at that moment,
            # typed lines and prompts included. send_keys waits for the pane to go quiet, so
            # the batch's captures show the answers but on a node too loaded to print within
            # tmux_idle; what must hold is that the screen comes to show the whole exchange.
            hello = f"\nhello ada{number}\n"

            def answered_at_prompt(screen: str) -> bool:  # the shell's prompt (bash's "$ " or "# ") back
                return hello in screen and screen.rstrip()[-1:] in ("$", "#")

            screen = answered.output if answered_at_prompt(answered.output) else \
                (await capture_until(backend, slot, "work", answered_at_prompt)).output
            assert "\ntick 1\ntick 2\ntick 3\n" in screen and "\nname?\n" in screen and hello in screen, screen
            assert screen.index("\nname?\n") < screen.index(hello)  # read took the keys sent after the question
            assert "tick 1" in asked.output and "tick 1" in again.output
            still = await backend.execute(slot, "tmux", {"action": "capture", "session_name": "work"})
            assert still.output == screen  # the same screen while nothing moves
        else:
            assert asked.output == "tick 1\ntick 2\ntick 3\nname?\n" and asked.metadata["waiting"] is True
            assert answered.output == f"hello ada{number}\n" and answered.metadata["waiting"] is False
            assert again.output == ""  # the session fallback's capture: what was printed since the last
        stopped = await backend.execute(slot, "tmux", {"action": "stop", "session_name": "work"})
        assert stopped.success and stopped.metadata["closed"] is True, stopped.to_dict()

        # Nothing of tmux in the workspace (its socket is elsewhere, the pane's shell keeps no history).
        listing = await backend.list_artifacts(slot, ".", recursive=True)
        assert {e["path"]: e["is_dir"] for e in listing} == {
            "run.py": False, "sub": True, "sub/notes.txt": False, "sub/deep": True, "sub/deep/data.txt": False}
        assert all(isinstance(e["mtime"], float) for e in listing) and not listing.truncated
        assert [e["size"] for e in listing if e["path"] == "sub/deep/data.txt"] == [100]
        cut = await backend.list_artifacts(slot, ".", recursive=True, max_entries=2)
        assert len(cut) == 2 and cut.truncated
        assert [e["path"] for e in await backend.list_artifacts(slot, "sub")] == ["sub/deep", "sub/notes.txt"]

        head = await backend.read_artifact(slot, "sub/deep/data.txt", max_bytes=10)
        assert (head["content"], head["size"], head["truncated"]) == ("x" * 10, 100, True)
        assert head["sha256"] == hashlib.sha256(b"x" * 100).hexdigest()

        packed = await backend.archive_artifacts(slot, ["sub/deep", "run.py"])
        assert hashlib.sha256(packed["content"]).hexdigest() == packed["sha256"]
        inside = members(packed["content"])
        assert inside == {"sub/deep": None, "sub/deep/data.txt": b"x" * 100, "run.py": b"print(6 * 7)"}
        assert packed["members"] == ["sub/deep", "sub/deep/data.txt", "run.py"]
    finally:
        await backend.release(slot, reset_workspace=True)


async def test_rollout_of_16_trajectories_on_8_slots_then_stop_purge_cancels_the_job(state_dir, no_user_config):
    backend = HpcSandboxBackend(scheduler="local", slots=8, state_dir=state_dir, port_range=free_port_range(),
                                wait_timeout=60, acquire_timeout=60)
    assert backend.list_profiles() == ["default"] and backend.jobs == []
    await backend.start()
    [job] = backend.jobs
    try:
        assert pids_matching(job.id)
        before = await backend.get_status()
        assert sum(place["slots"] for place in before["slots"].values()) == 8
        assert before["profiles"]["default"]["jobs"] == [job.id] and before["held"] == 0

        seen: list[str] = []
        await asyncio.wait_for(asyncio.gather(*(one_trajectory(backend, n, seen) for n in range(16))), 120)
        assert len(seen) == 16 and len(set(seen)) <= 8 and max(Counter(seen).values()) >= 2

        after = await backend.get_status()
        assert after["held"] == 0 and after["waiting"] == 0
        assert sum(place["free"] for place in after["slots"].values()) == 8

        # stop() without purge leaves the job running; start() attaches to it again.
        await backend.stop()
        assert backend.jobs == [job] and pids_matching(job.id)
        await backend.start()
        slot = await backend.acquire("after-restart")
        assert (await backend.execute(slot, "bash", {"command": "echo back"})).output == "back\n"
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


async def test_result_shapes(backend: HpcSandboxBackend):
    slot = await backend.acquire("t")
    assert isinstance(slot, BackendSlot) and slot.slot_id == slot.slot.id
    both, only_err, timed, missing, unknown, bad_json = await backend.execute_batch([
        (slot, "bash", {"command": "printf out; echo err >&2"}),
        (slot, "bash", {"command": "echo err >&2"}),
        (slot, "bash", {"command": "sleep 20"}, 1),
        (slot, "read_file", {"path": "nope.txt"}),
        (slot, "no_such_tool", {}),
        {"slot": slot, "tool": "bash", "args": "{not json"},
    ], timeout_s=30)
    assert (both.success, both.output, both.error) == (True, "out\n[stderr]\nerr\n", None)
    assert only_err.output == "\n[stderr]\nerr\n"
    assert (timed.success, timed.error, timed.metadata["timed_out"]) == (False, "command timed out after 1s", True)
    assert (missing.success, missing.metadata["error_kind"]) == (False, "not_found") and "nope.txt" in missing.error
    assert unknown.success is False and "no_such_tool" in unknown.error
    assert (bad_json.success, bad_json.metadata["error_kind"]) == (False, "bad_request")
    for result in (both, only_err, timed, missing):
        assert isinstance(result, ExecutionResult)
        assert set(result.to_dict()) == {"success", "output", "error", "metadata", "execution_id"}
        assert {"exit_code", "duration", "truncated", "location", "slot"} <= set(result.metadata)
    assert both.metadata["slot"] == slot.slot_id and both.metadata["location"] == slot.location
    assert json.loads(json.dumps(both.to_dict()))["output"] == "out\n[stderr]\nerr\n"

    # The calls of one slot run in request order; another slot's run beside them.
    other = await backend.acquire("u")
    ordered = await backend.execute_batch([
        (slot, "write_file", {"path": "a.txt", "content": "first"}),
        (other, "bash", {"command": "sleep 0.5; echo other"}),
        (slot, "bash", {"command": "cat a.txt"}),
        (slot, "write_file", {"path": "a.txt", "content": "second"}),
        (slot, "read_file", {"path": "a.txt"}),
    ])
    assert [r.output for r in ordered[1:3]] + [ordered[4].output] == ["other\n", "first", "second"]
    assert ToolBackend is HpcSandboxBackend


async def test_bash_stateful_session_edges(backend: HpcSandboxBackend):
    slot = await backend.acquire("t")
    first, ended, fresh, named = await backend.execute_batch([
        (slot, "bash_stateful", {"command": "export KEEP=1; cat <<'EOF'\nheredoc $KEEP\nEOF"}),
        (slot, "bash_stateful", {"command": "exit 3"}),
        (slot, "bash_stateful", {"command": "echo ${KEEP:-gone}"}),
        (slot, "bash_stateful", {"command": "echo ${KEEP:-other session}", "session": "side"}),
    ])
    assert first.output == "heredoc $KEEP\n" and first.metadata["session"] == "main"
    assert (ended.success, ended.error, ended.metadata["session_ended"]) == (False, "exit code 3", True)
    assert fresh.output == "gone\n" and fresh.metadata["session_started"] is True
    assert named.output == "other session\n"
    slow, still = await backend.execute_batch([
        (slot, "bash_stateful", {"command": "export Y=2; sleep 20"}, 1),
        (slot, "bash_stateful", {"command": "echo $Y"}),
    ])
    assert slow.error == "command timed out after 1s" and still.output == "2\n"  # the session outlived the timeout


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
    assert main.output == "main\n"
    assert stopped.success and stopped.metadata["closed"] is True
    assert bogus.success is False and bogus.metadata["error_kind"] == "bad_request"
    listed = await backend.execute(slot, "session", {"action": "list"})
    assert [s["name"] for s in json.loads(listed.output)["sessions"]] == ["main"]


async def capture_until(backend: HpcSandboxBackend, slot: BackendSlot, session: str, wanted, timeout: float = 15.0):
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
    listing = await backend.list_artifacts(slot, ".", recursive=True)
    assert {e["path"] for e in listing} <= {".python_history"}, list(listing)

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

    async def counting(slot, tool, args=None, timeout=None):
        if tool == "bash" and "tmux -V" in (args or {}).get("command", ""):
            asked.append(slot.id)
        return await execute(slot, tool, args, timeout)

    pool.execute = counting  # type: ignore[method-assign]
    slot = await backend.acquire("t")
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


async def test_artifact_errors_and_archive_to_a_file(backend: HpcSandboxBackend, tmp_path):
    slot = await backend.acquire("t")
    await backend.execute(slot, "write_file", {"path": "out/result.json", "content": '{"ok": true}'})
    with pytest.raises(ArtifactError) as missing:
        await backend.read_artifact(slot, "out/none.json")
    assert missing.value.kind == "not_found"
    with pytest.raises(ArtifactError) as outside:
        await backend.archive_artifacts(slot, "../etc")
    assert outside.value.kind == "path"
    whole = await backend.archive_artifacts(slot, ".", dest=tmp_path / "ws.tar.gz")
    assert whole["content"] is None and whole["path"] == str(tmp_path / "ws.tar.gz")
    data = (tmp_path / "ws.tar.gz").read_bytes()
    assert hashlib.sha256(data).hexdigest() == whole["sha256"] and whole["size"] == len(data)
    assert members(data) == {"out": None, "out/result.json": b'{"ok": true}'}
    art = await backend.read_artifact(slot, "out/result.json")
    assert (art["content"], art["truncated"], art["path"]) == ('{"ok": true}', False, "out/result.json")


# --- profiles ------------------------------------------------------------------------------


async def test_with_profiles_one_pool_each(state_dir, server_factory):
    cpu = server_factory(job_id="cpujob", slots=1)
    gpu = server_factory(job_id="gpujob", slots=1)
    backend = HpcSandboxBackend.with_profiles({"cpu": connect.from_state_dir(state_dir, ["cpujob"]),
                                               "gpu": connect.from_state_dir(state_dir, ["gpujob"])})
    assert backend.list_profiles() == ["cpu", "gpu"] and backend.default_profile == "cpu"
    async with backend:
        on_gpu = await backend.acquire("g", profile="gpu")
        on_cpu = await backend.acquire("c")
        assert (on_gpu.profile, on_gpu.slot.endpoint.url) == ("gpu", gpu.url)
        assert (on_cpu.profile, on_cpu.slot.endpoint.url) == ("cpu", cpu.url)
        both = await backend.execute_batch([(on_gpu, "bash", {"command": "echo g"}),
                                            (on_cpu, "bash", {"command": "echo c"})])
        assert [r.output for r in both] == ["g\n", "c\n"]
        status = await backend.get_status()
        assert {name: row["held"] for name, row in status["profiles"].items()} == {"cpu": 1, "gpu": 1}
        assert sum(place["busy"] for place in status["slots"].values()) == 2
        with pytest.raises(ConfigError, match="unknown profile 'tpu'"):
            await backend.acquire("x", profile="tpu")
        await backend.release(on_gpu)
        assert (await backend.get_status())["profiles"]["gpu"]["held"] == 0


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

    pool.execute = recording  # type: ignore[method-assign]
    slot = await backend.acquire("t")
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
