"""Persistent shell sessions: `bash` with `session`, and the `session` tool.

Real agents (AgentDriver) and a real node server (start_server + SlotPool/NodeClient);
every edge of issue 13's "Sessions": state that carries over, heredocs, a trailing `&`,
text that looks like a status line, binary output, `exit`, `set -e`, timeouts that keep
the session, idle timeout then input, interrupt, several sessions, list/close, reset.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest

from hpc_sandbox import NodeServerSource, SlotPool
from hpc_sandbox.client import NodeClient

from helpers import AgentDriver, pids_matching, start_server, wait_until


@pytest.fixture
async def agent(tmp_path: Path):
    driver = await AgentDriver.start(tmp_path)
    yield driver
    await driver.close()


async def run(agent: AgentDriver, command: str | None = None, session: str = "s", timeout: float | None = 30,
              **args) -> dict:
    """One session call; the result, or the error answer when it failed."""
    if command is not None:
        args["command"] = command
    answer = await agent.call("bash", timeout=timeout, session=session, **args)
    return answer["result"] if answer["ok"] else answer


def gone(marker: str, timeout: float = 5) -> bool:
    return wait_until(lambda: not pids_matching(marker), timeout=timeout)


# --- state that carries over ------------------------------------------------------------


async def test_cwd_env_variables_functions_and_aliases_carry_over(agent, tmp_path):
    first = await run(agent, "mkdir -p sub/dir && cd sub/dir; export GREETING=hi; count=41; "
                             "bump() { count=$((count + 1)); echo $count; }; alias ll='echo aliased'")
    assert (first["exit_code"], first["session_started"], first["stdout"]) == (0, True, "")
    second = await run(agent, "pwd; echo $GREETING; bump; ll; bash -c 'echo child sees $GREETING'")
    assert second["stdout"] == f"{tmp_path}/sub/dir\nhi\n42\naliased\nchild sees hi\n"
    assert second["session_started"] is False and second["stderr"] == ""
    assert (await run(agent, "bump"))["stdout"] == "43\n"
    assert not (tmp_path / ".bash_history").exists()  # an interactive shell's history is not kept


async def test_an_activated_venv_stays_active(agent, tmp_path):
    made = await run(agent, "python3 -m venv --without-pip .venv && source .venv/bin/activate")
    assert made["exit_code"] == 0, made
    result = await run(agent, 'echo "$VIRTUAL_ENV"; command -v python; python -c "import sys; print(sys.prefix)"')
    assert result["stdout"].splitlines() == [str(tmp_path / ".venv"), str(tmp_path / ".venv/bin/python"),
                                             str(tmp_path / ".venv")]
    assert (await run(agent, "deactivate; command -v python || echo none"))["stdout"] != result["stdout"]


async def test_cwd_and_env_args_apply_in_the_session_and_stay(agent, tmp_path):
    (tmp_path / "proj").mkdir()
    result = await run(agent, "pwd; echo $MODE", cwd="proj", env={"MODE": "a b'c"})
    assert result["stdout"] == f"{tmp_path}/proj\na b'c\n"
    assert (await run(agent, "pwd; echo $MODE"))["stdout"] == f"{tmp_path}/proj\na b'c\n"
    for bad in ({"cwd": "../x"}, {"cwd": "missing"}, {"env": {"1BAD": "x"}}):
        answer = await run(agent, "true", **bad)
        assert answer["ok"] is False and answer["error"]["kind"] in ("path", "not_found", "bad_request"), bad


# --- what the command may contain or print --------------------------------------------


async def test_heredocs_quoted_and_expanded(agent):
    command = "name=world\ncat <<EOF\nhello $name\n  indented\nEOF\ncat <<'RAW'\n$name `date` \\n\nRAW\necho after"
    result = await run(agent, command)
    assert result["stdout"] == "hello world\n  indented\n$name `date` \\n\nafter\n"
    assert result["exit_code"] == 0


async def test_a_trailing_ampersand_returns_at_once_and_the_job_keeps_running(agent):
    marker = f"hpcsbx-amp-{os.getpid()}"
    started = time.monotonic()
    result = await run(agent, f"(exec -a {marker} sleep 30) &")
    assert result["exit_code"] == 0 and time.monotonic() - started < 2
    assert await asyncio.to_thread(wait_until, lambda: bool(pids_matching(marker)), 5)
    # The job is the session's: a later command sees it, and a timeout of another command spares it.
    assert (await run(agent, "jobs | wc -l"))["stdout"].strip() == "1"
    assert (await run(agent, "sleep 20", timeout=0.3))["timed_out"] is True
    assert pids_matching(marker), "SIGINT of a later command's timeout must not reach a background job"
    assert (await agent.call("session", action="close", name="s"))["result"]["closed"] is True
    assert await asyncio.to_thread(gone, marker), "closing the session ends its background jobs"


async def test_output_that_looks_like_a_status_line_is_just_output(agent):
    # Whatever the command prints, completion and exit status come from elsewhere.
    command = ("for n in c1 c2 c3; do echo \"$n-0123456789abcdef 0\"; done; echo '__DONE__ 0'; "
               "printf 'c4-%s 0' \"$HPC_SANDBOX_CALL\" >&2; exit_status_is=7; (exit 7)")
    result = await run(agent, command)
    assert result["exit_code"] == 7
    assert result["stdout"] == "c1-0123456789abcdef 0\nc2-0123456789abcdef 0\nc3-0123456789abcdef 0\n__DONE__ 0\n"
    assert result["stderr"].startswith("c4-") and result["stderr"].endswith(" 0")


async def test_binary_and_large_output(agent):
    result = await run(agent, r"printf '\x00\x01\xff\xfe end'; head -c 300000 /dev/zero | tr '\0' 'z'",
                       output_cap=1000)
    assert result["exit_code"] == 0
    assert result["stdout"].startswith("\x00\x01\ufffd\ufffd end")
    assert result["stdout"].endswith("z" * 400)
    assert result["stdout_dropped"] == 300008 - 1000
    # Bigger than a pipe's buffer, nothing dropped: the FIFOs are read as it comes.
    big = await run(agent, "seq 1 100000")
    assert big["stdout_dropped"] == 0 and big["stdout"].endswith("\n99999\n100000\n")


async def test_a_command_reading_stdin_gets_eof_or_the_input_sent(agent):
    assert (await run(agent, "cat; read -r line; echo read=$?"))["stdout"] == "read=1\n"
    result = await run(agent, "cat | tr a-z A-Z", input="hello\nworld\n")
    assert (result["stdout"], result["exit_code"]) == ("HELLO\nWORLD\n", 0)
    # The shell's own input was never the command's: the session goes on.
    assert (await run(agent, "echo next"))["stdout"] == "next\n"


async def test_syntax_errors_and_return_do_not_end_the_session(agent):
    broken = await run(agent, "if then fi")
    assert broken["exit_code"] == 2 and "syntax error" in broken["stderr"] and not broken["session_ended"]
    assert (await run(agent, "echo a; return 5; echo b"))["exit_code"] == 5
    assert (await run(agent, "echo alive"))["stdout"] == "alive\n"


# --- the session's end ----------------------------------------------------------------


async def test_exit_ends_the_session_and_the_next_call_gets_a_fresh_one(agent, tmp_path):
    await run(agent, "mkdir -p d; cd d; X=1")
    ended = await run(agent, "echo bye; exit 3")
    assert (ended["exit_code"], ended["session_ended"], ended["stdout"]) == (3, True, "bye\n")
    fresh = await run(agent, "pwd; echo x=$X")
    assert fresh["session_started"] is True and fresh["stdout"] == f"{tmp_path}\nx=\n"
    listed = (await agent.call("session", action="list"))["result"]["sessions"]
    assert [s["name"] for s in listed] == ["s"] and listed[0]["calls"] == 1


async def test_set_e_failure_reports_and_restarts_fresh(agent):
    await run(agent, "set -e; Y=2")
    failed = await run(agent, "echo before; false; echo never")
    assert (failed["exit_code"], failed["session_ended"], failed["stdout"]) == (1, True, "before\n")
    fresh = await run(agent, "echo y=$Y; false; echo errexit is off: $-")
    assert fresh["session_started"] is True and fresh["stdout"].startswith("y=\nerrexit is off")
    assert "e" not in fresh["stdout"].split(": ")[1].strip()


# --- timeouts, idle timeouts, input and interrupt ----------------------------------


async def test_timeout_interrupts_the_command_and_keeps_the_session(agent, tmp_path):
    marker = f"hpcsbx-stimeout-{os.getpid()}"
    await run(agent, "mkdir -p w; cd w; KEEP=yes")
    started = time.monotonic()
    result = await run(agent, f"echo before; (exec -a {marker} sleep 30) | cat; echo never", timeout=0.5)
    assert result["timed_out"] is True and result["session_ended"] is False
    assert result["stdout"] == "before\n" and time.monotonic() - started < 2
    assert await asyncio.to_thread(gone, marker)
    assert (await run(agent, "pwd; echo $KEEP"))["stdout"] == f"{tmp_path}/w\nyes\n"


async def test_timeout_of_a_builtin_loop_keeps_the_session(agent):
    await run(agent, "n=0")
    result = await run(agent, "while :; do n=$((n + 1)); done", timeout=0.4)
    assert result["timed_out"] is True and result["session_ended"] is False
    assert int((await run(agent, "echo $n"))["stdout"]) > 0  # what the loop did stays


async def test_a_command_that_ignores_sigint_is_killed_after_the_grace(agent):
    marker = f"hpcsbx-noint-{os.getpid()}"
    await run(agent, "KEEP=1")
    started = time.monotonic()
    result = await run(agent, f"bash -c \"trap '' INT; exec -a {marker} sleep 30\"", timeout=0.3)
    assert result["timed_out"] is True and result["session_ended"] is False
    assert time.monotonic() - started < 3.5
    assert await asyncio.to_thread(gone, marker)
    assert (await run(agent, "echo $KEEP"))["stdout"] == "1\n"


async def test_idle_timeout_returns_waiting_then_input_continues(agent):
    command = "echo 'name?'; read -r name; echo 'age?'; read -r age; echo \"$name is $age\""
    first = await run(agent, command, idle_timeout=0.5)
    assert (first["waiting"], first["exit_code"], first["stdout"]) == (True, None, "name?\n")
    busy = await run(agent, "echo other")
    assert busy["ok"] is False and busy["error"]["kind"] == "busy"
    second = await run(agent, input="ada\n", idle_timeout=0.5)
    assert (second["waiting"], second["stdout"]) == (True, "age?\n")
    last = await run(agent, input="36\n")
    assert (last["waiting"], last["exit_code"], last["stdout"]) == (False, 0, "ada is 36\n")
    assert (await run(agent, "echo $name"))["stdout"] == "ada\n"  # `read` ran in the session's shell


async def test_output_that_came_between_calls_is_returned_by_the_next(agent):
    first = await run(agent, "echo one; sleep 0.6; echo two; sleep 0.3; echo three", idle_timeout=0.3)
    assert (first["waiting"], first["stdout"]) == (True, "one\n")
    await asyncio.sleep(0.8)
    rest = await run(agent)  # no command, no input: follow it to its end
    assert (rest["stdout"], rest["exit_code"], rest["waiting"]) == ("two\nthree\n", 0, False)
    again = await run(agent)
    assert again["ok"] is False and again["error"]["kind"] == "not_running"


async def test_eof_ends_a_command_reading_its_input(agent):
    first = await run(agent, "wc -l", idle_timeout=0.3, input="a\nb\n")
    assert first["waiting"] is True
    done = await run(agent, input="c\n", eof=True)
    assert (done["stdout"].strip(), done["exit_code"]) == ("3", 0)


async def test_interrupt_stops_a_waiting_command(agent, tmp_path):
    await run(agent, "mkdir -p i; cd i")
    first = await run(agent, "echo waiting; sleep 30; echo never", idle_timeout=0.3)
    assert first["waiting"] is True
    stopped = await run(agent, interrupt=True)
    assert stopped["interrupted"] is True and stopped["exit_code"] == 130 and stopped["session_ended"] is False
    assert "never" not in stopped["stdout"]
    assert (await run(agent, "pwd"))["stdout"] == f"{tmp_path}/i\n"


# --- several sessions, list, close, reset ------------------------------------------


async def test_sessions_are_independent_and_run_at_once(agent, tmp_path):
    await asyncio.gather(run(agent, "mkdir -p a; cd a; V=a", session="one"),
                         run(agent, "mkdir -p b; cd b; V=b", session="two"))
    started = time.monotonic()
    one, two = await asyncio.gather(run(agent, "sleep 1; pwd; echo $V", session="one"),
                                    run(agent, "sleep 1; pwd; echo $V", session="two"))
    assert time.monotonic() - started < 1.8  # one after the other would take 2 s
    assert (one["stdout"], two["stdout"]) == (f"{tmp_path}/a\na\n", f"{tmp_path}/b\nb\n")
    plain = await agent.call("bash", command="pwd; echo v=$V")  # a plain call is untouched by either
    assert plain["result"]["stdout"] == f"{tmp_path}\nv=\n"


async def test_list_and_close(agent, tmp_path):
    await run(agent, "mkdir -p x; cd x", session="first")
    await run(agent, "true", session="second")
    listed = {s["name"]: s for s in (await agent.call("session", action="list"))["result"]["sessions"]}
    assert set(listed) == {"first", "second"}
    assert listed["first"]["cwd"] == f"{tmp_path}/x" and listed["first"]["alive"] is True
    pid = listed["first"]["pid"]
    assert (await agent.call("session", action="close", name="first"))["result"] == {"name": "first", "closed": True}
    assert await asyncio.to_thread(wait_until, lambda: not os.path.exists(f"/proc/{pid}") or
                                   Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
    assert (await agent.call("session", action="close", name="first"))["result"]["closed"] is False
    names = [s["name"] for s in (await agent.call("session", action="list"))["result"]["sessions"]]
    assert names == ["second"]
    assert (await run(agent, "pwd", session="first"))["session_started"] is True


async def test_closing_a_session_ends_the_call_that_follows_it(agent):
    pending = asyncio.ensure_future(run(agent, "sleep 30"))
    await asyncio.sleep(0.3)
    await agent.call("session", action="close", name="s")
    result = await asyncio.wait_for(pending, 5)
    assert result["session_ended"] is True and result["exit_code"] is None and result["signal"] == 9


async def test_reset_kills_every_session_and_what_it_started(agent):
    marker = f"hpcsbx-sreset-{os.getpid()}"
    await run(agent, f"(exec -a {marker} sleep 30) & setsid bash -c 'exec -a {marker} sleep 30' &", session="a")
    waiting = await run(agent, f"exec -a {marker} sleep 30", session="b", idle_timeout=0.2)
    assert waiting["waiting"] is True
    assert await asyncio.to_thread(wait_until, lambda: len(pids_matching(marker)) == 3, 5)
    assert (await agent.call("reset"))["ok"]
    assert await asyncio.to_thread(gone, marker), "a session's process outlived the reset"
    assert (await agent.call("session", action="list"))["result"]["sessions"] == []
    assert (await run(agent, "echo again", session="a"))["session_started"] is True


async def test_a_cancelled_call_interrupts_its_command_and_keeps_the_session(agent):
    # The node server sends `cancel` when the caller of a running call goes away.
    await run(agent, "KEEP=1")
    line = b'{"id": "long", "tool": "bash", "args": {"session": "s", "command": "sleep 30"}}\n'
    pending = asyncio.ensure_future(agent.raw(line, "long"))
    await asyncio.sleep(0.3)
    assert (await agent.call("cancel", target="long"))["result"]["cancelled"] is True
    result = (await asyncio.wait_for(pending, 5))["result"]
    assert result["interrupted"] is True and result["session_ended"] is False
    assert (await run(agent, "echo $KEEP"))["stdout"] == "1\n"


async def test_session_processes_carry_the_agents_tag(agent):
    # The reset and the limits watchdog find a slot's processes by the tag up to its last dot.
    plain = (await agent.call("bash", command="echo $HPC_SANDBOX_CALL"))["result"]["stdout"].strip()
    # What a program the command runs has in its environment (where reset and the watchdog look).
    tagged = (await run(agent, "echo $HPC_SANDBOX_CALL; "
                               "bash -c 'tr \"\\0\" \"\\n\" < /proc/$$/environ' | grep ^HPC_SANDBOX_CALL="))["stdout"].split()
    assert tagged[0].rpartition(".")[0] == plain.rpartition(".")[0]
    assert re.fullmatch(r"s\d+-\d+", tagged[0].rpartition(".")[2])
    assert tagged[1] == "HPC_SANDBOX_CALL=" + tagged[0]


@pytest.mark.parametrize("args, kind", [
    ({"session": "bad name", "command": "true"}, "bad_request"),
    ({"session": "-x", "command": "true"}, "bad_request"),
    ({"session": "x" * 65, "command": "true"}, "bad_request"),
    ({"session": 7, "command": "true"}, "bad_request"),
    ({"session": "s", "command": "true", "background": True}, "bad_request"),
    ({"session": "s", "command": "true", "interrupt": True}, "bad_request"),
    ({"session": "s", "command": "true", "idle_timeout": 0}, "bad_request"),
    ({"session": "s", "command": "a\x00b"}, "bad_request"),
    ({"command": "true", "idle_timeout": 1}, "bad_request"),
    ({"command": "true", "input": "x"}, "bad_request"),
    ({"session": "nothing-runs"}, "not_running"),
])
async def test_bad_session_requests_are_refused(agent, args, kind):
    answer = await agent.call("bash", **args)
    assert answer["ok"] is False and answer["error"]["kind"] == kind, answer
    assert (await agent.call("session", action="nope"))["error"]["kind"] == "bad_request"


async def test_the_number_of_sessions_has_a_limit(agent, monkeypatch):
    from hpc_sandbox import agent as agent_module

    for i in range(agent_module.MAX_SESSIONS):
        assert (await run(agent, "true", session=f"n{i}"))["exit_code"] == 0
    answer = await run(agent, "true", session="one-too-many")
    assert answer["ok"] is False and answer["error"]["kind"] == "too_many"
    await agent.call("session", action="close", name="n0")
    assert (await run(agent, "true", session="one-too-many"))["exit_code"] == 0


# --- through a real node server -----------------------------------------------------


async def test_sessions_through_the_node_server_and_the_pool(state_dir):
    marker = f"hpcsbx-srv-{os.getpid()}"
    server = start_server(state_dir, job_id="sessions", slots=1)
    try:
        async with SlotPool([NodeServerSource.from_endpoints([server.endpoint])]) as pool:
            slot = await pool.acquire(trajectory_id="t1")
            first = await pool.execute(slot, "bash", {"command": "mkdir -p repo; cd repo; export N=1", "session": "s"})
            assert first.success and first.data["session_started"] is True
            second = await pool.execute(slot, "bash", {"command": "pwd; echo $N", "session": "s"})
            assert second.success and second.stdout.endswith("/repo\n1\n") and second.data["session_started"] is False
            slow = await pool.execute(slot, "bash", {"command": "sleep 30", "session": "s"}, timeout=0.5)
            assert (slow.success, slow.timed_out, slow.error_kind) == (False, True, "timeout")
            assert (await pool.execute(slot, "bash", {"command": "echo $N", "session": "s"})).stdout == "1\n"
            asked = await pool.execute(slot, "bash", {"command": "read -r x; echo got $x", "session": "s",
                                                      "idle_timeout": 0.3})
            assert (asked.success, asked.error_kind, asked.data["waiting"]) == (False, "waiting", True)
            answered = await pool.execute(slot, "bash", {"session": "s", "input": "y\n"})
            assert answered.success and answered.stdout == "got y\n"
            ended = await pool.execute(slot, "bash", {"command": "exit 3", "session": "s"})
            assert (ended.success, ended.exit_code, ended.data["session_ended"]) == (False, 3, True)
            listed = await pool.execute(slot, "session", {"action": "list"})
            assert listed.success and listed.data["sessions"] == []
            await pool.execute(slot, "bash", {"command": f"(exec -a {marker} sleep 30) &", "session": "s"})
            assert await asyncio.to_thread(wait_until, lambda: bool(pids_matching(marker)), 5)
            await pool.release(slot, reset_workspace=False)
            assert await asyncio.to_thread(gone, marker), "a session outlived the release of its slot"
            again = await pool.acquire(trajectory_id="t2")
            fresh = await pool.execute(again, "bash", {"command": "echo ${N:-unset}", "session": "s"})
            assert fresh.stdout == "unset\n" and fresh.data["session_started"] is True
            await pool.release(again)
    finally:
        server.stop()


async def test_a_session_counts_against_the_slots_limits(state_dir):
    marker = f"hpcsbx-slimit-{os.getpid()}"
    server = start_server(state_dir, job_id="slimit", slots=1,
                          extra=["--slot-procs", "16", "--slot-memory", "128M"])
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("forks")
            # Over the memory limit: the command's job (a process group of its own) is
            # killed, the session and its state stay.
            await client.execute(granted.slot, granted.lease, "bash", {"session": "s", "command": "KEEP=1"})
            hog = await client.execute(granted.slot, granted.lease, "bash", {
                "session": "s", "command": 'python3 -c "b = bytearray(300<<20); import time; time.sleep(5)"'},
                timeout=30)
            assert not hog.ok and hog.error_kind == "limit_exceeded", hog
            assert hog.error_message.startswith("memory limit")
            kept = await client.execute(granted.slot, granted.lease, "bash", {"session": "s", "command": "echo $KEEP"})
            assert kept.result["stdout"] == "1\n" and kept.result["session_started"] is False
            # Over the process limit: every process of the slot is killed, the shell too.
            answer = await client.execute(granted.slot, granted.lease, "bash", {
                "session": "s", "command": f"for i in $(seq 40); do (exec -a {marker} sleep 30) & done; wait"},
                timeout=30)
            assert not answer.ok and answer.error_kind == "limit_exceeded", answer
            assert await asyncio.to_thread(gone, marker, 10)
            again = await client.execute(granted.slot, granted.lease, "bash", {"session": "s", "command": "echo ok"})
            assert again.ok and again.result["stdout"] == "ok\n" and again.result["session_started"] is True
            # A reset through the server ends sessions too.
            await client.execute(granted.slot, granted.lease, "bash",
                                 {"session": "s", "command": f"(exec -a {marker} sleep 30) &"})
            assert await asyncio.to_thread(wait_until, lambda: bool(pids_matching(marker)), 5)
            await client.reset(granted.slot, granted.lease)
            assert await asyncio.to_thread(gone, marker)
    finally:
        server.stop()
        for pid in pids_matching(marker):
            os.kill(pid, signal.SIGKILL)
