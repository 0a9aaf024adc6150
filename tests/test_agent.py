"""The slot agent on its own: protocol, bash, file tools, path safety, limits."""
from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import io
import os
import sys
import tarfile
import time
from pathlib import Path

import pytest

from hpc_sandbox import agent as agent_module
from hpc_sandbox.agent import CappedBuffer, ToolError

from helpers import AGENT, AgentDriver, pids_matching, wait_until


@pytest.fixture
async def agent(tmp_path: Path):
    driver = await AgentDriver.start(tmp_path)
    yield driver
    await driver.close()


def test_agent_imports_only_the_standard_library():
    tree = ast.parse(AGENT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the agent must not import from the package"
            imported.add(node.module.split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names)


def test_agent_source_parses_as_python_38():
    # Bound into arbitrary images: no syntax newer than 3.8 (feature_version checks the grammar).
    ast.parse(AGENT.read_text(), feature_version=(3, 8))


async def test_bash_reports_exit_code_and_both_streams(agent):
    answer = await agent.call("bash", command="echo out; echo err >&2; exit 3")
    result = answer["result"]
    assert answer["ok"]
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (3, "out\n", "err\n")
    assert result["timed_out"] is False and result["duration"] > 0


async def test_bash_runs_in_the_workspace_with_extra_env(agent, tmp_path):
    result = (await agent.call("bash", command="pwd; echo $GREETING", env={"GREETING": "hi"}))["result"]
    assert result["stdout"] == f"{tmp_path}\nhi\n"


async def test_requests_are_served_concurrently(agent):
    started = time.monotonic()
    answers = await asyncio.gather(*(agent.call("bash", command="sleep 0.5") for _ in range(4)))
    assert all(a["result"]["exit_code"] == 0 for a in answers)
    assert time.monotonic() - started < 1.5  # one after another would take 2 s


async def test_timeout_kills_the_whole_process_group_and_keeps_output(agent):
    marker = f"hpcsbx-timeout-{os.getpid()}"
    command = f"echo before; (exec -a {marker} sleep 100) & (exec -a {marker} sleep 100) & wait"
    result = (await agent.call("bash", timeout=0.5, command=command))["result"]
    assert result["timed_out"] is True
    assert result["exit_code"] is None and result["signal"] in (15, 9)
    assert result["stdout"] == "before\n"
    assert wait_until(lambda: not pids_matching(marker), timeout=5), "a child of the timed-out command survived"


async def test_timeout_also_kills_what_left_the_process_group(agent):
    marker = f"hpcsbx-setsid-{os.getpid()}"
    command = f"setsid bash -c 'exec -a {marker} sleep 100' & sleep 100"
    result = (await agent.call("bash", timeout=0.5, command=command))["result"]
    assert result["timed_out"] is True
    assert wait_until(lambda: not pids_matching(marker), timeout=5), "a setsid child of the timed-out command survived"


async def test_closing_stdin_kills_background_jobs_that_left_the_group(tmp_path):
    marker = f"hpcsbx-daemon-{os.getpid()}"
    driver = await AgentDriver.start(tmp_path)
    result = (await driver.call("bash", command=f"setsid -f bash -c 'exec -a {marker} sleep 100'; echo ok"))["result"]
    assert result["stdout"] == "ok\n"
    assert wait_until(lambda: bool(pids_matching(marker)), timeout=5)
    await driver.close()
    assert wait_until(lambda: not pids_matching(marker), timeout=5), "a daemonised job outlived its agent"


@pytest.mark.parametrize("tool, args", [
    ("bash", {"command": "true", "output_cap": agent_module.MAX_OUTPUT_CAP + 1}),
    ("read_file", {"path": "f", "limit": agent_module.MAX_READ_LIMIT + 1}),
    ("archive", {"max_bytes": agent_module.MAX_ARCHIVE_CAP + 1}),
    ("list_files", {"max_entries": -1}),
    ("bash", {"command": "true", "output_cap": "lots"}),
])
async def test_caller_chosen_sizes_have_a_ceiling(agent, tool, args):
    answer = await agent.call(tool, **args)
    assert answer["ok"] is False and answer["error"]["kind"] == "bad_request"
    assert (await agent.call("bash", command="echo alive"))["result"]["stdout"] == "alive\n"


async def test_capped_output_keeps_head_and_tail(tmp_path):
    driver = await AgentDriver.start(tmp_path, "--output-cap", "1000")
    try:
        result = (await driver.call("bash", command="echo START; seq 1 100000; echo END"))["result"]
    finally:
        await driver.close()
    assert result["stdout"].startswith("START\n1\n")
    assert result["stdout"].endswith("100000\nEND\n")
    assert result["stdout_dropped"] > 500_000
    assert f"{result['stdout_dropped']} bytes dropped" in result["stdout"]


def test_capped_buffer_keeps_everything_under_the_cap():
    buffer = CappedBuffer(10)
    for piece in (b"abc", b"defg", b"hij"):
        buffer.feed(piece)
    assert (buffer.text(), buffer.dropped) == ("abcdefghij", 0)
    buffer.feed(b"KLMNO")
    assert buffer.dropped == 5
    assert buffer.text().startswith("abcde") and buffer.text().endswith("KLMNO")


async def test_write_then_read_text_with_sha256(agent, tmp_path):
    write = await agent.call("write_file", path="a/b/c.txt", content="héllo\n")
    assert write["ok"] and write["result"]["size"] == len("héllo\n".encode())
    read = (await agent.call("read_file", path="a/b/c.txt", sha256=True))["result"]
    assert read["content"] == "héllo\n"
    assert read["sha256"] == hashlib.sha256("héllo\n".encode()).hexdigest()
    assert (tmp_path / "a/b/c.txt").read_text() == "héllo\n"


async def test_binary_files_round_trip_as_base64_with_offset_and_limit(agent, tmp_path):
    data = bytes(range(256)) * 4
    await agent.call("write_file", path="bin", content=base64.b64encode(data).decode(), encoding="base64")
    read = (await agent.call("read_file", path="bin", encoding="base64", offset=10, limit=20))["result"]
    assert base64.b64decode(read["content"]) == data[10:30]
    assert (read["size"], read["eof"]) == (1024, False)
    text = (await agent.call("read_file", path="bin"))["result"]
    assert text["lossy"] is True  # binary asked for as text is flagged, not an error


async def test_write_file_sets_mode_and_replaces_atomically(agent, tmp_path):
    (tmp_path / "run.sh").write_text("old")
    await agent.call("write_file", path="run.sh", content="#!/bin/sh\necho ran\n", mode="0755")
    assert os.stat(tmp_path / "run.sh").st_mode & 0o777 == 0o755
    assert (await agent.call("bash", command="./run.sh"))["result"]["stdout"] == "ran\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hpc-sandbox-write-")]


async def test_list_files_recursive(agent, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    (tmp_path / "top").write_text("22")
    entries = (await agent.call("list_files", recursive=True))["result"]["entries"]
    assert {(e["path"], e["type"]) for e in entries} == {("d", "dir"), ("d/x", "file"), ("top", "file")}


def _repo_with_a_venv(root: Path, venv_files: int) -> None:
    """A project as a rollout leaves it: a big .venv next to src/ and tests/."""
    for folder in ("src/pkg", "tests", ".git/objects", ".venv/lib/site-packages/dep", "src/pkg/__pycache__"):
        (root / folder).mkdir(parents=True)
    (root / "src/pkg/mod.py").write_text("x = 1")
    (root / "src/pkg/__pycache__/mod.cpython-38.pyc").write_bytes(b"\0")
    (root / "src/pkg/stale.pyc").write_bytes(b"\0")
    (root / "tests/test_mod.py").write_text("def test(): pass")
    (root / ".git/objects/ab").write_text("blob")
    for i in range(venv_files):
        (root / f".venv/lib/site-packages/dep/m{i}.py").write_text("")


async def test_list_files_excludes_by_name_and_path_without_entering_excluded_folders(agent, tmp_path):
    _repo_with_a_venv(tmp_path, venv_files=50)
    everything = (await agent.call("list_files", recursive=True, max_entries=20))["result"]
    assert everything["truncated"] is True
    # Sorted by name, .venv is walked before src/ and tests/: their files drown.
    assert not {"src/pkg/mod.py", "tests/test_mod.py"} & {e["path"] for e in everything["entries"]}

    listing = (await agent.call("list_files", recursive=True, max_entries=20,
                                exclude=[".venv", ".git", "__pycache__", "*.pyc"]))["result"]
    assert listing["truncated"] is False
    assert {e["path"] for e in listing["entries"]} == {"src", "src/pkg", "src/pkg/mod.py", "tests",
                                                       "tests/test_mod.py"}
    # A pattern is matched against the workspace-relative path as well as the name.
    by_path = (await agent.call("list_files", recursive=True, exclude=["src/pkg", ".venv/lib"]))["result"]
    paths = {e["path"] for e in by_path["entries"]}
    assert "src" in paths and ".venv" in paths and not any(p.startswith(("src/", ".venv/")) for p in paths)
    # Listing a subfolder: paths are still the workspace's.
    sub = (await agent.call("list_files", path="src", recursive=True, exclude=["src/pkg/__pycache__"]))["result"]
    assert {e["path"] for e in sub["entries"]} == {"src/pkg", "src/pkg/mod.py", "src/pkg/stale.pyc"}


async def test_archive_excludes_by_name_and_path_but_keeps_what_it_was_named(agent, tmp_path):
    _repo_with_a_venv(tmp_path, venv_files=3)
    packed = (await agent.call("archive", paths=["."], exclude=[".venv", ".git", "__pycache__", "*.pyc"]))["result"]
    assert set(packed["members"]) == {"src", "src/pkg", "src/pkg/mod.py", "tests", "tests/test_mod.py"}
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed["content"]))) as tar:
        assert set(tar.getnames()) == set(packed["members"])
    named = (await agent.call("archive", paths=[".venv/lib"], exclude=[".venv"]))["result"]
    assert ".venv/lib/site-packages/dep/m0.py" in named["members"]  # a path asked for is not excluded itself
    # With `path`, members are named after its last part; patterns still match workspace paths.
    whole = (await agent.call("archive", path=".", exclude=["src/pkg", ".venv", ".git"]))["result"]
    assert set(whole["members"]) == {".", "./src", "./tests", "./tests/test_mod.py"}
    sub = (await agent.call("archive", path="src/pkg", exclude=["src/pkg/__pycache__"]))["result"]
    assert set(sub["members"]) == {"pkg", "pkg/mod.py", "pkg/stale.pyc"}
    refused = await agent.call("archive", exclude="*.pyc")
    assert refused["error"]["kind"] == "bad_request" and "exclude" in refused["error"]["message"]


@pytest.mark.parametrize("exclude", ["*.pyc", [1], [""], ["x" * (agent_module.MAX_EXCLUDE_CHARS + 1)],
                                     ["*"] * (agent_module.MAX_EXCLUDE_PATTERNS + 1)])
async def test_list_files_refuses_a_bad_exclude(agent, exclude):
    answer = await agent.call("list_files", exclude=exclude)
    assert answer["ok"] is False and answer["error"]["kind"] == "bad_request", answer
    assert "exclude" in answer["error"]["message"]


async def test_archive_is_a_tar_gz_of_the_folder(agent, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text("print(1)\n")
    result = (await agent.call("archive", path="src"))["result"]
    data = base64.b64decode(result["content"])
    assert hashlib.sha256(data).hexdigest() == result["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.extractfile("src/m.py").read() == b"print(1)\n"


async def test_archive_over_its_cap_is_refused(agent, tmp_path):
    (tmp_path / "big").write_bytes(os.urandom(200_000))
    answer = await agent.call("archive", path=".", max_bytes=50_000)
    assert answer["error"]["kind"] == "too_large"


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../../x", "link/passwd", "escape"])
async def test_paths_leaving_the_workspace_are_refused(agent, tmp_path, path):
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / "escape").symlink_to("/etc/hostname")
    for tool, args in (("read_file", {}), ("write_file", {"content": "x"})):
        answer = await agent.call(tool, path=path, **args)
        assert answer["ok"] is False and answer["error"]["kind"] == "path", (tool, answer)
    assert (await agent.call("bash", command="true", cwd=path))["error"]["kind"] == "path"


async def test_symlink_inside_the_workspace_is_not_followed_either(agent, tmp_path):
    (tmp_path / "real.txt").write_text("inside")
    (tmp_path / "alias.txt").symlink_to("real.txt")
    answer = await agent.call("read_file", path="alias.txt")
    assert answer["error"]["kind"] == "path" and "symlinks are not followed" in answer["error"]["message"]


def test_workspace_parts_accepts_inside_and_refuses_outside(tmp_path):
    workspace_parts = agent_module.workspace_parts
    roots = agent_module.workspace_roots(str(tmp_path))
    assert workspace_parts("a/./b//c", roots) == ["a", "b", "c"]
    assert workspace_parts(str(tmp_path / "x"), roots) == ["x"]
    assert workspace_parts("/workspace/x/y", roots) == ["x", "y"]
    assert workspace_parts(".", roots) == [] and workspace_parts("/workspace", roots) == []
    for bad, kind in (("..", "path"), ("a/b/../c", "path"), ("/", "path"), ("/etc/passwd", "path"),
                      (str(tmp_path) + "-sibling/x", "path"), ("", "bad_request"), ("a\x00b", "bad_request"),
                      (None, "bad_request")):
        with pytest.raises(ToolError) as caught:
            workspace_parts(bad, roots)
        assert caught.value.kind == kind, bad


async def test_an_explicit_zero_means_zero_not_the_default(agent, tmp_path):
    (tmp_path / "f").write_text("hello")
    read = (await agent.call("read_file", path="f", limit=0))["result"]
    assert (read["content"], read["bytes_read"], read["size"]) == ("", 0, 5)
    bash = (await agent.call("bash", command="echo hello", output_cap=0))["result"]
    assert bash["stdout_dropped"] == 6 and "hello" not in bash["stdout"]
    listing = (await agent.call("list_files", max_entries=0))["result"]
    assert listing == {"entries": [], "truncated": True}


@pytest.mark.parametrize("mode", ["rwx", "0o999", "99", "", " 644", "+644", "0x1ff", -1, 0o10000, 1.5, True, [7]])
async def test_write_file_refuses_a_bad_mode_as_a_bad_request(agent, tmp_path, mode):
    answer = await agent.call("write_file", path="f", content="x", mode=mode)
    assert answer["ok"] is False and answer["error"]["kind"] == "bad_request", answer
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("mode, expected", [("644", 0o644), ("0o600", 0o600), ("0755", 0o755), (0o750, 0o750)])
async def test_write_file_takes_an_octal_string_or_an_int_mode(agent, tmp_path, mode, expected):
    assert (await agent.call("write_file", path="f", content="x", mode=mode))["ok"]
    assert os.stat(tmp_path / "f").st_mode & 0o7777 == expected


async def test_bad_requests_get_errors_and_the_agent_keeps_serving(agent):
    assert (await agent.raw(b"not json\n"))["error"]["kind"] == "bad_request"
    assert (await agent.raw(b"[1, 2]\n"))["error"]["kind"] == "bad_request"
    answer = await agent.call("rm_rf")
    assert answer["error"]["kind"] == "unknown_tool" and "bash" in answer["error"]["message"]
    assert (await agent.call("read_file", path="missing"))["error"]["kind"] == "not_found"
    assert (await agent.call("bash", command=["not", "a", "string"]))["error"]["kind"] == "bad_request"
    assert (await agent.call("bash", command="echo still here"))["result"]["stdout"] == "still here\n"


async def test_closing_stdin_kills_running_commands(tmp_path):
    marker = f"hpcsbx-eof-{os.getpid()}"
    driver = await AgentDriver.start(tmp_path)
    pending = asyncio.ensure_future(driver.call("bash", command=f"exec -a {marker} sleep 100"))
    assert await asyncio.to_thread(wait_until, lambda: bool(pids_matching(marker)), 5)
    await driver.close()
    pending.cancel()
    assert await asyncio.to_thread(wait_until, lambda: not pids_matching(marker), 5)


def test_agent_main_refuses_a_missing_workspace(tmp_path, capsys):
    assert agent_module.main(["--workspace", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


async def test_a_background_job_holding_stdout_does_not_block_the_answer(tmp_path):
    marker = f"hpcsbx-bg-{os.getpid()}"
    driver = await AgentDriver.start(tmp_path)
    started = time.monotonic()
    result = (await driver.call("bash", command=f"(exec -a {marker} sleep 30) & echo started"))["result"]
    assert result["stdout"] == "started\n" and result["exit_code"] == 0
    assert time.monotonic() - started < 5
    assert pids_matching(marker), "a background job of a finished command may keep running"
    await driver.close()  # ...until the agent stops: then nothing it started survives
    assert await asyncio.to_thread(wait_until, lambda: not pids_matching(marker), 5)
