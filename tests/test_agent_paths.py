"""The agent's path walk: no symlink followed, no resolve-then-open race, no special file opened."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from hpc_sandbox import agent as agent_module

from helpers import AgentDriver

MARKER = "hpc-sandbox race marker: not the host's passwd\n"

# Swaps `d` (a real folder) and `other` (a symlink to /etc) in a tight loop, atomically
# with renameat2(RENAME_EXCHANGE) where the C library has it, else with plain renames.
SWAPPER = r"""
import ctypes, os, sys
os.chdir(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
exchange = getattr(libc, "renameat2", None)
while True:
    if exchange is None or exchange(-100, b"d", -100, b"other", 2) != 0:
        exchange = None
        os.rename("d", "real"); os.rename("other", "d"); os.rename("d", "other"); os.rename("real", "d")
"""


@pytest.fixture
async def agent(tmp_path: Path):
    driver = await AgentDriver.start(tmp_path)
    yield driver
    await driver.close()


def _unblock_fifo(path: Path) -> None:
    """Open a FIFO's write end and close it: a reader stuck in open() gets EOF."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting: nothing is stuck
        pass


async def test_read_file_never_follows_a_folder_swapped_for_a_symlink(agent, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "passwd").write_text(MARKER)
    (tmp_path / "other").symlink_to("/etc")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(tmp_path)])
    seen, leaked = Counter(), []
    try:
        for _ in range(400):
            answer = await agent.call("read_file", path="d/passwd")
            if answer["ok"]:
                seen["read"] += 1
                if answer["result"]["content"] != MARKER:
                    leaked.append(answer["result"]["content"][:40])
            else:
                seen[answer["error"]["kind"]] += 1
    finally:
        swapper.kill()
        swapper.wait()
    assert len(leaked) == 0, f"read_file followed a symlink swapped in, e.g. {leaked[0]!r}"
    assert set(seen) <= {"read", "path", "not_found"}, seen
    assert seen["read"] and seen["path"], seen  # both states were met: the race really ran


@pytest.mark.parametrize("target", ["inside", "/etc"])
async def test_a_symlink_anywhere_in_a_path_is_refused_by_every_tool(agent, tmp_path, target):
    (tmp_path / "inside").mkdir()
    (tmp_path / "inside" / "passwd").write_text("inside\n")
    (tmp_path / "link").symlink_to(target)
    (tmp_path / "flink").symlink_to(f"{target}/passwd")
    calls = [
        ("read_file", {"path": "link/passwd"}),
        ("read_file", {"path": "flink"}),
        ("write_file", {"path": "link/passwd", "content": "x"}),
        ("write_file", {"path": "link/new/file", "content": "x"}),
        ("write_file", {"path": "flink", "content": "x"}),
        ("list_files", {"path": "link"}),
        ("list_files", {"path": "link/sub", "recursive": True}),
        ("archive", {"path": "link"}),
        ("archive", {"path": "flink"}),
        ("bash", {"command": "pwd", "cwd": "link"}),
    ]
    for tool, args in calls:
        answer = await agent.call(tool, **args)
        assert answer["ok"] is False and answer["error"]["kind"] == "path", (tool, args, answer)
        assert "symlinks are not followed" in answer["error"]["message"], (tool, args, answer)
    assert (tmp_path / "inside" / "passwd").read_text() == "inside\n"
    assert (tmp_path / "flink").is_symlink() and not (tmp_path / "inside" / "new").exists()


async def test_symlinks_inside_are_listed_and_archived_as_symlinks_never_followed(agent, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("1")
    (tmp_path / "d" / "etc").symlink_to("/etc")
    entries = (await agent.call("list_files", recursive=True))["result"]["entries"]
    assert {(e["path"], e["type"]) for e in entries} == {("d", "dir"), ("d/x", "file"), ("d/etc", "symlink")}
    result = (await agent.call("archive", path="d"))["result"]
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(result["content"]))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"d", "d/x", "d/etc"}
        assert members["d/etc"].issym() and members["d/etc"].linkname == "/etc"
        assert tar.extractfile("d/x").read() == b"1"


async def test_read_file_of_a_fifo_is_refused_at_once_and_the_agent_keeps_serving(agent, tmp_path):
    fifo = tmp_path / "result.json"
    os.mkfifo(fifo)
    try:
        answer = await asyncio.wait_for(agent.call("read_file", path="result.json"), 5)
    finally:
        _unblock_fifo(fifo)
    assert answer["ok"] is False and answer["error"]["kind"] == "not_a_file", answer
    assert "not a regular file" in answer["error"]["message"]
    assert (await asyncio.wait_for(agent.call("bash", command="echo alive"), 5))["result"]["stdout"] == "alive\n"


async def test_write_file_onto_a_fifo_is_refused(agent, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    try:
        answer = await asyncio.wait_for(agent.call("write_file", path="pipe", content="x"), 5)
    finally:
        _unblock_fifo(fifo)
    assert answer["ok"] is False and answer["error"]["kind"] == "not_a_file", answer
    assert fifo.is_fifo()


async def test_archive_skips_special_files_and_finishes(agent, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "log").write_text("done\n")
    os.mkfifo(tmp_path / "out" / "pipe")
    try:
        result = (await asyncio.wait_for(agent.call("archive", path="out"), 10))["result"]
    finally:
        _unblock_fifo(tmp_path / "out" / "pipe")
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(result["content"]))) as tar:
        assert sorted(tar.getnames()) == ["out", "out/log"]
        assert tar.extractfile("out/log").read() == b"done\n"


async def test_file_tools_do_not_stop_the_agent_answering(agent, tmp_path):
    (tmp_path / "big").write_bytes(os.urandom(24 << 20))  # incompressible: gzip takes a while
    archive = asyncio.ensure_future(agent.call("archive", path="big", max_bytes=64 << 20))
    await asyncio.sleep(0.05)
    pong = await agent.call("ping")
    assert pong["ok"] and not archive.done(), "ping waited for the archive to finish"
    assert (await archive)["ok"]


async def test_absolute_paths_are_taken_under_the_workspace_only(agent, tmp_path):
    (tmp_path / "f").write_text("abs")
    for path in (str(tmp_path / "f"), "/workspace/f", "/workspace/./f"):
        assert (await agent.call("read_file", path=path))["result"]["content"] == "abs", path
    for path in (str(tmp_path) + "-sibling/f", "/workspacex/f", "/etc/passwd", "/"):
        assert (await agent.call("read_file", path=path))["error"]["kind"] == "path", path
    for path in ("a\x00b", "", None, 7):
        assert (await agent.call("read_file", path=path))["error"]["kind"] == "bad_request", path


async def test_intermediate_file_or_missing_folder_get_their_own_kinds(agent, tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    assert (await agent.call("read_file", path="f/x"))["error"]["kind"] == "not_a_directory"
    assert (await agent.call("write_file", path="f/x", content=""))["error"]["kind"] == "not_a_directory"
    assert (await agent.call("list_files", path="f"))["error"]["kind"] == "not_a_directory"
    assert (await agent.call("read_file", path="nope/x"))["error"]["kind"] == "not_found"
    assert (await agent.call("list_files", path="nope"))["error"]["kind"] == "not_found"
    assert (await agent.call("read_file", path="d"))["error"]["kind"] == "is_directory"
    assert (await agent.call("write_file", path="d", content=""))["error"]["kind"] == "is_directory"
    assert (await agent.call("bash", command="pwd", cwd="nope"))["error"]["kind"] == "not_found"
    result = (await agent.call("bash", command="pwd", cwd="d"))["result"]
    assert result["stdout"] == f"{tmp_path / 'd'}\n"


async def test_cwd_without_proc_is_entered_by_descriptor_too(tmp_path):
    # Where /proc is missing the agent fchdirs to the walked folder around the spawn.
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to("d")
    agent = agent_module.Agent(str(tmp_path), 1000)
    agent.fd_paths = False
    here = os.getcwd()
    try:
        result = await agent.tool_bash("r1", {"command": "pwd", "cwd": "d"}, None)
        with pytest.raises(agent_module.ToolError) as refused:
            await agent.tool_bash("r2", {"command": "pwd", "cwd": "link"}, None)
    finally:
        os.close(agent.root_fd)
    assert result["stdout"] == f"{tmp_path / 'd'}\n"
    assert refused.value.kind == "path" and os.getcwd() == here


async def test_walks_stop_at_their_depth_limit_and_say_so(agent, tmp_path):
    deep = tmp_path.joinpath(*["d"] * (agent_module.MAX_WALK_DEPTH + 5))
    deep.mkdir(parents=True)
    listing = (await agent.call("list_files", recursive=True))["result"]
    assert listing["truncated"] is True and len(listing["entries"]) == agent_module.MAX_WALK_DEPTH
    assert (await agent.call("archive"))["error"]["kind"] == "too_large"
    assert (await agent.call("list_files", path="/".join(["d"] * 10)))["result"]["entries"][0]["type"] == "dir"


# --- archive of several paths -------------------------------------------------------------


def _tar_members(result: dict) -> dict[str, bytes | None]:
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(result["content"]))) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isreg() else None) for m in tar}  # type: ignore[union-attr]


async def test_archive_of_several_paths_names_members_from_the_workspace(agent, tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "deep" / "data.txt").write_text("x")
    (tmp_path / "sub" / "notes.txt").write_text("n")
    (tmp_path / "run.py").write_text("print(1)")
    result = (await agent.call("archive", paths=["sub/deep", "/workspace/run.py", "sub"]))["result"]
    # Overlapping paths store a member once; the folders above a path get no entry.
    assert result["members"] == ["sub/deep", "sub/deep/data.txt", "run.py", "sub", "sub/notes.txt"]
    assert _tar_members(result) == {"sub/deep": None, "sub/deep/data.txt": b"x", "run.py": b"print(1)",
                                    "sub": None, "sub/notes.txt": b"n"}
    assert hashlib.sha256(base64.b64decode(result["content"])).hexdigest() == result["sha256"]
    whole = (await agent.call("archive", paths=["."]))["result"]  # the contents, no "." entry
    assert set(_tar_members(whole)) == {"run.py", "sub", "sub/deep", "sub/deep/data.txt", "sub/notes.txt"}
    single = (await agent.call("archive", path="sub/deep"))["result"]  # `path` alone names as before
    assert set(_tar_members(single)) == {"deep", "deep/data.txt"}


@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", "link", "flink", "link/passwd", "missing"])
async def test_archive_refuses_a_bad_path_among_several_as_it_refuses_it_alone(agent, tmp_path, bad):
    (tmp_path / "ok.txt").write_text("ok")
    (tmp_path / "link").symlink_to("/etc")
    (tmp_path / "flink").symlink_to("/etc/passwd")
    alone = await agent.call("archive", path=bad)
    among = await agent.call("archive", paths=["ok.txt", bad])
    assert alone["ok"] is False and among["ok"] is False, (alone, among)
    assert among["error"] == alone["error"], (among, alone)
    assert alone["error"]["kind"] == ("not_found" if bad == "missing" else "path")
    if "link" in bad:
        assert "symlinks are not followed" in among["error"]["message"]


@pytest.mark.parametrize("args", [{"paths": []}, {"paths": "a"}, {"paths": [7]}, {"paths": ["a"], "path": "a"},
                                  {"paths": ["a"] * (agent_module.MAX_ARCHIVE_PATHS + 1)}])
async def test_archive_paths_must_be_a_short_list_of_strings(agent, tmp_path, args):
    (tmp_path / "a").write_text("a")
    assert (await agent.call("archive", **args))["error"]["kind"] == "bad_request"


async def test_archive_of_several_paths_has_one_cap(agent, tmp_path):
    (tmp_path / "one").write_bytes(os.urandom(40_000))
    (tmp_path / "two").write_bytes(os.urandom(40_000))
    assert (await agent.call("archive", paths=["one"], max_bytes=50_000))["ok"]
    answer = await agent.call("archive", paths=["one", "two"], max_bytes=50_000)
    assert answer["error"]["kind"] == "too_large" and "one, two" in answer["error"]["message"]
