"""Trees in and out of a slot: pool.upload_tree / download_tree over real node servers
(runtimes none and bwrap), the agent's `extract` tool against hostile archives, the
pool's own unpacking of what a (hostile) slot sends, caps, ownership as root, and the
CLI's `cp`."""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest

from hpc_sandbox import connect
from hpc_sandbox.agent import ToolError
from hpc_sandbox.client import NodeClient
from hpc_sandbox.errors import ErrorKind
from hpc_sandbox.pool import trees

from helpers import AgentDriver, requires_bwrap, start_server

RUNTIMES = ["none", pytest.param("bwrap", marks=requires_bwrap)]


# --- a tree shaped like a real project (attrs 23.2.0: 117 files, 1.47 MB) -------------


def make_project(root: Path, files: int = 118) -> dict[str, bytes]:
    """A synthetic project: text and binary files, a name with a space, empty folders,
    an executable and a read-only file; what each file holds, by name."""
    held: dict[str, bytes] = {}
    root.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        folder = ("src/attrs" if index % 3 == 0 else "tests" if index % 3 == 1 else "docs/_static")
        name = f"{folder}/mod_{index:03d}.py" if index % 10 else f"{folder}/blob_{index:03d}.bin"
        data = os.urandom(12_000 + index * 7) if name.endswith(".bin") else (f"# {index}\n" * 2100).encode()
        held[name] = data
    held["docs/a name with space.txt"] = "spaces and ünïcode\n".encode()
    held["bin/run.sh"] = b"#!/bin/sh\necho run\n"
    held["README.ro"] = b"read only\n"
    for name, data in held.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "bin/run.sh").chmod(0o755)
    (root / "README.ro").chmod(0o444)
    (root / "empty/deeper").mkdir(parents=True)
    (root / "changelog.d").mkdir()
    return held


def tree_of(root: Path) -> dict[str, tuple[str, int, bytes | str | None]]:
    """Every entry under `root`: (kind, mode, content or link target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        name = path.relative_to(root).as_posix()
        if stat.S_ISLNK(st.st_mode):
            found[name] = ("link", 0, os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[name] = ("dir", stat.S_IMODE(st.st_mode), None)
        elif stat.S_ISREG(st.st_mode):
            found[name] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
        else:
            found[name] = ("other", 0, None)
    return found


@pytest.fixture(params=RUNTIMES)
def runtime(request) -> str:
    return request.param


@pytest.fixture
async def pool(state_dir, runtime):
    server = start_server(state_dir, job_id="trees", slots=1, runtime=runtime)
    try:
        async with connect.from_state_dir(state_dir, ["trees"]) as the_pool:
            yield the_pool
    finally:
        server.stop()


async def shell(pool, slot, command: str) -> str:
    result = await pool.execute(slot, "bash", {"command": command}, timeout=60)
    assert result.success, result
    return result.stdout


# --- round trip ------------------------------------------------------------------------


async def test_a_tree_goes_in_and_comes_back_the_same(pool, tmp_path):
    local = tmp_path / "proj"
    held = make_project(local)
    (local / "src/link_inside").symlink_to("attrs/mod_003.py")
    (local / "docs/up_link").symlink_to("../README.ro")
    (local / "abs_link").symlink_to("/etc/passwd")
    (local / "climbing").symlink_to("../../outside")
    os.mkfifo(local / "fifo")
    async with pool.slot() as slot:
        up = await pool.upload_tree(slot, local, "work/proj")
        assert up.success, up
        assert up.data["files"] == len(held) and up.data["links"] == 2
        assert up.data["bytes"] == sum(map(len, held.values()))
        assert sorted(s["path"] for s in up.data["skipped"]) == ["abs_link", "climbing", "fifo"]
        # In the slot: modes kept, content intact, the inside links links, empty folders there.
        listing = await shell(pool, slot, "cd work/proj && stat -c '%a %F %n' bin/run.sh README.ro empty/deeper "
                                          "'docs/a name with space.txt' src/link_inside && "
                                          "sha256sum src/attrs/blob_000.bin && cat src/link_inside | head -1 && "
                                          "ls -A | grep -c hpc-sandbox-tree || true")
        assert "755 regular file bin/run.sh" in listing and "444 regular file README.ro" in listing
        assert "directory empty/deeper" in listing and "symbolic link src/link_inside" in listing
        assert hashlib.sha256(held["src/attrs/blob_000.bin"]).hexdigest() in listing
        assert listing.splitlines()[-2] == "# 3" and listing.splitlines()[-1] == "0"  # the archive is gone
        back = tmp_path / "back"
        down = await pool.download_tree(slot, "work/proj", back)
        assert down.success, down
        assert down.data["files"] == len(held) and down.data["skipped"] == []
    before = {k: v for k, v in tree_of(local).items() if k not in ("abs_link", "climbing", "fifo")}
    assert tree_of(back) == before


async def test_uploading_a_project_tree_takes_two_requests(pool, tmp_path, monkeypatch):
    """The issue's measure: attrs took 117 uploads; a tree of its shape takes two
    requests (one PUT of the archive, one extract). Timed against per-file uploads."""
    local = tmp_path / "proj"
    held = make_project(local, files=116)
    requests: list[str] = []
    for name in ("upload", "download", "execute", "batch", "stream"):
        original = getattr(NodeClient, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            requests.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(NodeClient, name, counted)
    async with pool.slot() as slot:
        await shell(pool, slot, "true")
        requests.clear()
        started = time.perf_counter()
        result = await pool.upload_tree(slot, local, "proj")
        tree_seconds = time.perf_counter() - started
        assert result.success, result
        assert requests == ["upload", "execute"]
        requests.clear()
        started = time.perf_counter()
        for name in held:
            assert (await pool.upload(slot, local / name, f"files/{name}")).success
        file_seconds = time.perf_counter() - started
        assert len(requests) == len(held) == 119
        count = await shell(pool, slot, "find proj -type f | wc -l; find files -type f | wc -l")
        assert count.split() == ["119", "119"]
    print(f"\n{len(held)} files, {sum(map(len, held.values())) / 1e6:.2f} MB: upload_tree 2 requests "
          f"{tree_seconds:.3f}s; per-file upload {len(held)} requests {file_seconds:.3f}s")


async def test_upload_and_download_of_a_file_return_results(pool, tmp_path):
    source = tmp_path / "one.txt"
    source.write_text("one")
    async with pool.slot() as slot:
        up = await pool.upload(slot, source, "d/one.txt")
        assert up.success and up.tool == "upload" and up.data == {"path": "d/one.txt", "size": 3}
        down = await pool.download(slot, "d/one.txt", tmp_path / "copy.txt")
        assert down.success and down.data["size"] == 3 and (tmp_path / "copy.txt").read_text() == "one"
        missing = await pool.download(slot, "d/missing.txt", tmp_path / "x")
        assert not missing.success and missing.error_kind == ErrorKind.NOT_FOUND
        outside = await pool.upload(slot, source, "../escape.txt")
        assert not outside.success and outside.error_kind == ErrorKind.PATH
        gone = await pool.upload(slot, tmp_path / "nope.txt", "x.txt")
        assert not gone.success and gone.error_kind == ErrorKind.NOT_FOUND
        script = tmp_path / "run.sh"
        script.write_text("#!/bin/sh\necho ran\n")
        script.chmod(0o4755)
        assert (await pool.upload(slot, script, "bin/run.sh")).success  # the issue: it lost its x bit
        assert (await pool.upload(slot, script, "bin/private.sh", mode=0o600)).success
        said = await shell(pool, slot, "./bin/run.sh && stat -c %a bin/run.sh bin/private.sh")
        assert said.split() == ["ran", "755", "600"]  # setuid never goes in


async def test_tree_refusals_are_results_with_kinds(pool, tmp_path):
    async with pool.slot() as slot:
        missing = await pool.upload_tree(slot, tmp_path / "nope", "x")
        assert not missing.success and missing.error_kind == ErrorKind.NOT_FOUND and "nope" in missing.error
        (tmp_path / "small").mkdir()
        (tmp_path / "small/a").write_text("a")
        outside = await pool.upload_tree(slot, tmp_path / "small", "../x")
        assert not outside.success and outside.error_kind == ErrorKind.PATH
        no_src = await pool.download_tree(slot, "not/there", tmp_path / "d")
        assert not no_src.success and no_src.error_kind == ErrorKind.NOT_FOUND
        assert (await pool.upload(slot, tmp_path / "small/a", "f.txt")).success
        a_file = await pool.download_tree(slot, "f.txt", tmp_path / "d")
        assert not a_file.success and a_file.error_kind == ErrorKind.NOT_A_DIRECTORY
        for bad in ({"max_bytes": (16 << 30) + 1}, {"exclude": ["*"] * 65}, {"exclude": [""]}):
            refused = await pool.download_tree(slot, ".", tmp_path / "d", **bad)
            assert not refused.success and refused.error_kind == ErrorKind.BAD_REQUEST, (bad, refused)
        assert not (tmp_path / "d").exists()


async def test_tree_caps(pool, tmp_path):
    local = tmp_path / "proj"
    make_project(local, files=20)
    async with pool.slot() as slot:
        many = await pool.upload_tree(slot, local, "p", max_entries=5)
        assert not many.success and many.error_kind == ErrorKind.TOO_LARGE and "5 entries" in many.error
        big = await pool.upload_tree(slot, local, "p", max_bytes=10_000)
        assert not big.success and big.error_kind == ErrorKind.TOO_LARGE and "10000 bytes" in big.error
        assert (await pool.upload_tree(slot, local, "p")).success
        down = await pool.download_tree(slot, "p", tmp_path / "back", max_entries=5)
        assert not down.success and down.error_kind == ErrorKind.TOO_LARGE
        # Stopped by the node server as it streams: the walk's end says so, nothing is unpacked.
        heavy = await pool.download_tree(slot, "p", tmp_path / "back", max_bytes=10_000)
        assert not heavy.success and heavy.error_kind == ErrorKind.TOO_LARGE and "10000 bytes" in heavy.error
        assert not (tmp_path / "back").exists() or not any((tmp_path / "back").iterdir())


# --- down: one stream, made by the node server as it walks ----------------------------


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    """Start VmHWM (peak RSS) over from the current RSS (Linux's clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def test_a_big_tree_comes_down_in_bounded_memory(state_dir, tmp_path):
    """~200 MiB of random data (gzip cannot shrink it): neither the node server nor the
    caller grows by more than a small part of it; the archive lands on disk, and the
    files come back exact. (The agent's archive held it all, base64, on both sides.)"""
    server = start_server(state_dir, job_id="big", slots=1, runtime="none")
    try:
        async with connect.from_state_dir(state_dir, ["big"]) as pool, pool.slot() as slot:
            await shell(pool, slot, "mkdir -p big/sub small && echo hi > small/a && "
                                    "for i in 0 1 2 3 4 5 6 7 8 9; do head -c 20M /dev/urandom > big/sub/f$i; done")
            sums = await shell(pool, slot, "cd big && sha256sum sub/*")
            warm = await pool.download_tree(slot, "small", tmp_path / "small")  # the server's first tree: warm
            assert warm.success, warm
            pids = (server.proc.pid, os.getpid())
            baseline = {pid: memory_kib(pid, "VmRSS") for pid in pids}
            for pid in pids:
                reset_peak(pid)
            down = await pool.download_tree(slot, "big", tmp_path / "back")
            grown = {pid: (memory_kib(pid, "VmHWM") - baseline[pid]) / 1024 for pid in pids}
        assert down.success, down
        assert down.data["files"] == 10 and down.data["bytes"] == 200 << 20
        for line in sums.splitlines():
            digest, name = line.split()
            assert hashlib.sha256((tmp_path / "back" / name).read_bytes()).hexdigest() == digest
        print(f"200 MiB tree down: server RSS +{grown[server.proc.pid]:.0f} MiB, "
              f"caller RSS +{grown[os.getpid()]:.0f} MiB")
        assert grown[server.proc.pid] < 40, f"the node server grew by {grown[server.proc.pid]:.0f} MiB"
        assert grown[os.getpid()] < 40, f"the caller grew by {grown[os.getpid()]:.0f} MiB"
    finally:
        server.stop()


async def test_a_slots_links_and_special_files_come_down_as_the_file_tools_treat_them(pool, tmp_path):
    async with pool.slot() as slot:
        await shell(pool, slot, "mkdir -p t/d t/.venv/bin t/cache && echo a > t/d/a && printf '\\x00\\xff' > t/bin && "
                                "ln -s d/a t/inside && ln -s /etc/passwd t/abs && ln -s ../../x t/climb && "
                                "ln -s /usr/bin/python3 t/.venv/bin/python && echo c > t/cache/x.pyc && "
                                "mkfifo t/fifo && echo s > 't/with space'")
        down = await pool.download_tree(slot, "t", tmp_path / "back")
        assert down.success, down
        assert sorted(s["path"] for s in down.data["skipped"]) == [".venv/bin/python", "abs", "climb", "fifo"]
        found = tree_of(tmp_path / "back")
        assert found["inside"] == ("link", 0, "d/a") and found["bin"][2] == b"\x00\xff"
        assert found["with space"][2] == b"s\n" and found["d/a"][2] == b"a\n"
        assert not {"abs", "climb", "fifo", ".venv/bin/python"} & set(found)
        # exclude: the agent's patterns, matched against names and workspace paths
        thin = await pool.download_tree(slot, "t", tmp_path / "thin", exclude=[".venv", "*.pyc", "t/d"])
        assert thin.success, thin
        assert sorted(tree_of(tmp_path / "thin")) == ["bin", "cache", "inside", "with space"]
        # the whole workspace, by its slot spelling
        whole = await pool.download_tree(slot, "/workspace", tmp_path / "whole", exclude=["fifo", ".venv", "abs",
                                                                                         "climb"])
        assert whole.success, whole
        assert (tmp_path / "whole/t/d/a").read_bytes() == b"a\n"


async def test_download_tree_never_follows_a_symlink_at_or_above_the_source(pool, tmp_path):
    async with pool.slot() as slot:
        await shell(pool, slot, "mkdir -p real/in && echo x > real/in/a && ln -s real link && ln -s / root")
        for src in ("link", "link/in", "root", "root/etc", "../x", "/etc"):
            refused = await pool.download_tree(slot, src, tmp_path / "d")
            assert not refused.success and refused.error_kind == ErrorKind.PATH, (src, refused)
            assert not (tmp_path / "d").exists()


async def test_a_folder_swapped_for_a_symlink_during_the_walk_is_never_followed(pool, tmp_path):
    """Best effort: a slot swaps t/d for a symlink to / and back as fast as it can while
    its tree is downloaded again and again; nothing of / ever comes down."""
    async with pool.slot() as slot:
        await shell(pool, slot, "mkdir -p t/d && for i in $(seq 1 200); do echo $i > t/d/f$i; done")
        await shell(pool, slot, "nohup bash -c 'while true; do mv t/d t/real; ln -s / t/d; rm t/d; mv t/real t/d; "
                                "done' >/dev/null 2>&1 & echo started")
        for round_ in range(15):
            back = tmp_path / f"back{round_}"
            down = await pool.download_tree(slot, "t", back)
            if not down.success:  # the walk met the swap where it refuses: fine, never followed
                assert down.error_kind in (ErrorKind.PATH, ErrorKind.NOT_FOUND), down
                continue
            names = set(tree_of(back))
            assert not any(name.split("/")[-1] in ("etc", "proc", "usr") for name in names), names
            assert all(name.startswith(("d", "real")) for name in names), names


async def test_download_tree_from_a_dead_node_server_is_server_gone(state_dir, tmp_path):
    server = start_server(state_dir, job_id="dead", slots=1, runtime="none")
    try:
        async with connect.from_state_dir(state_dir, ["dead"]) as pool:
            slot = await pool.acquire()
            # Killed while it streams (a body cut short before its end frame), then for good.
            await shell(pool, slot, "mkdir p && head -c 100M /dev/urandom > p/a")
            cut = asyncio.create_task(pool.download_tree(slot, "p", tmp_path / "cut"))
            await asyncio.sleep(0.3)  # well before 100 MiB of random data is gzipped and sent
            server.proc.kill()
            server.proc.wait()
            for gone in (await cut, await pool.download_tree(slot, "p", tmp_path / "back")):
                assert not gone.success and gone.error_kind in (ErrorKind.SERVER_GONE, ErrorKind.JOB_ENDED), gone
            assert not (tmp_path / "back").exists()
    finally:
        server.stop()


# --- hostile archives into a slot (the agent's extract) ---------------------------------


def archive(*members: tuple[str, str, object]) -> bytes:
    """A tar.gz of (name, type, data or link target) members, made by hand."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.uid = info.gid = 4321
            if kind == "file":
                data = value if isinstance(value, bytes) else b"x"
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            info.mode = 0o755 if kind == "dir" else info.mode
            if kind in ("sym", "hard"):
                info.linkname = str(value)
            if kind == "chr":
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info)
    return buffer.getvalue()


HOSTILE = {
    "dotdot": ([("ok.txt", "file", b"ok"), ("../evil.txt", "file", b"evil")], ErrorKind.PATH),
    "dotdot_inside": ([("a/../../evil.txt", "file", b"evil")], ErrorKind.PATH),
    "absolute": ([("ok.txt", "file", b"ok"), ("/tmp/evil.txt", "file", b"evil")], ErrorKind.PATH),
    "symlink_absolute": ([("etc", "sym", "/etc")], ErrorKind.PATH),
    "symlink_climbing": ([("a/up", "sym", "../../..")], ErrorKind.PATH),
    "symlink_dotdot_in_middle": ([("d/l", "sym", ".."), ("x", "sym", "d/l/../..")], ErrorKind.PATH),
    "through_a_symlink": ([("d", "dir", None), ("l", "sym", "d"), ("l/evil.txt", "file", b"evil")], ErrorKind.PATH),
    "under_a_file": ([("f", "file", b"f"), ("f/evil.txt", "file", b"evil")], ErrorKind.PATH),
    "file_then_folder": ([("x", "file", b"x"), ("x", "dir", None)], ErrorKind.PATH),
    "device": ([("ok.txt", "file", b"ok"), ("null", "chr", None)], ErrorKind.NOT_A_FILE),
    "fifo": ([("pipe", "fifo", None)], ErrorKind.NOT_A_FILE),
    "hard_link_out": ([("h", "hard", "../../etc/passwd")], ErrorKind.NOT_A_FILE),
    "hard_link_in": ([("ok.txt", "file", b"ok"), ("h", "hard", "ok.txt")], ErrorKind.NOT_A_FILE),
}


@pytest.fixture
async def agent(tmp_path: Path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    driver = await AgentDriver.start(workspace)
    yield driver, workspace
    await driver.close()


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_extract_refuses_a_hostile_archive_before_writing_anything(agent, tmp_path, case):
    driver, workspace = agent
    members, kind = HOSTILE[case]
    (workspace / "in.tgz").write_bytes(archive(*members))
    answer = await driver.call("extract", path="in.tgz", dest="out", remove=True)
    assert not answer["ok"] and answer["error"]["kind"] == kind, answer
    assert not (workspace / "in.tgz").exists()
    assert not (workspace / "out").exists() or not any((workspace / "out").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]  # nothing beside the workspace


async def test_extract_keeps_modes_and_safe_links_and_never_ownership(agent):
    driver, workspace = agent
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:  # uncompressed: any tar tarfile reads
        for name, mode in (("d", 0o750), ("d/ro", 0o500)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid = tarfile.DIRTYPE, mode, 4321
            tar.addfile(info)
        for name, mode in (("d/x.sh", 0o4755), ("d/ro/f", 0o400)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.mtime = 2, mode, 4321, 1_000_000
            tar.addfile(info, io.BytesIO(b"hi"))
        for name, target in (("d/l", "x.sh"), ("d/up", "../d/x.sh"), ("d/ro/top", "../..")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    (workspace / "in.tar").write_bytes(buffer.getvalue())
    answer = await driver.call("extract", path="in.tar", dest="out")
    assert answer["ok"], answer
    assert answer["result"] == {"dirs": 2, "files": 2, "links": 3, "bytes": 4, "skipped": [], "dest": "out"}
    out = workspace / "out"
    assert stat.S_IMODE((out / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((out / "d/ro").stat().st_mode) == 0o500
    assert stat.S_IMODE((out / "d/x.sh").stat().st_mode) == 0o755  # setuid dropped
    assert (out / "d/x.sh").stat().st_mtime == 1_000_000
    assert os.readlink(out / "d/ro/top") == "../.." and (out / "d/up").read_bytes() == b"hi"
    assert {p.lstat().st_uid for p in out.rglob("*")} == {os.getuid()}
    assert (workspace / "in.tar").exists()  # not asked to remove it
    (out / "d/ro").chmod(0o700)


async def test_extract_caps_and_nonsense(agent):
    driver, workspace = agent
    (workspace / "in.tgz").write_bytes(archive(*[(f"f{i}", "file", b"12345") for i in range(10)]))
    answer = await driver.call("extract", path="in.tgz", dest="o", max_entries=9)
    assert answer["error"]["kind"] == "too_large" and "9 entries" in answer["error"]["message"]
    answer = await driver.call("extract", path="in.tgz", dest="o", max_bytes=49)
    assert answer["error"]["kind"] == "too_large" and "49 bytes" in answer["error"]["message"]
    assert not (workspace / "o").exists() or not any((workspace / "o").iterdir())
    assert (await driver.call("extract", path="in.tgz", dest="o", max_bytes=50))["ok"]
    (workspace / "junk.tgz").write_bytes(b"\x1f\x8b" + os.urandom(200))
    assert (await driver.call("extract", path="junk.tgz", dest="j"))["error"]["kind"] == "bad_request"
    (workspace / "link.tgz").symlink_to("in.tgz")
    assert (await driver.call("extract", path="link.tgz", dest="j"))["error"]["kind"] == "path"
    assert (await driver.call("extract", path="in.tgz", dest="../up"))["error"]["kind"] == "path"
    assert (await driver.call("extract", path="in.tgz", dest="o", max_entries=-1))["error"]["kind"] == "bad_request"


# --- what a hostile slot sends back (the pool's unpacking) -----------------------------


def unpack(data: bytes, local: Path, tmp_path: Path) -> dict:
    """What download_tree does with the archive the node server streamed to a file."""
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(data)
    try:
        return trees.unpack_archive(archive, local, trees.TreeLimits())
    finally:
        archive.unlink()


# Links out are left out of a download, not refused (see the next test).
@pytest.mark.parametrize("case", sorted(set(HOSTILE) - {"symlink_absolute", "symlink_climbing",
                                                        "symlink_dotdot_in_middle"}))
def test_a_hostile_slot_cannot_write_outside_the_local_folder(tmp_path, case):
    members, kind = HOSTILE[case]
    local = tmp_path / "down"
    with pytest.raises(ToolError) as refused:
        unpack(archive(*members), local, tmp_path)
    assert refused.value.kind == kind
    assert list(tmp_path.iterdir()) == []  # not even the folder it would have made


def test_links_out_of_a_downloaded_tree_are_left_out_and_named(tmp_path):
    data = archive(("src", "dir", None), ("src/a.py", "file", b"a"), (".venv/python", "sym", "/usr/bin/python3"),
                   ("up", "sym", "../x"), ("ok", "sym", "src/a.py"))
    made = unpack(data, tmp_path / "down", tmp_path)
    assert [s["path"] for s in made["skipped"]] == [".venv/python", "up"]
    found = tree_of(tmp_path / "down")
    assert sorted(found) == ["ok", "src", "src/a.py"]  # .venv held only the link left out
    assert found["ok"] == ("link", 0, "src/a.py") and found["src/a.py"][2] == b"a"


def test_a_damaged_download_is_corrupt(tmp_path):
    data = archive(("a", "file", os.urandom(100_000)))
    with pytest.raises(ToolError) as refused:
        unpack(data[:len(data) // 2], tmp_path / "d", tmp_path)
    assert refused.value.kind == ErrorKind.CORRUPT


# --- as root: a bwrap slot owns what it unpacks ----------------------------------------


@requires_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="the tar-restores-uids failure (issue 19, item 5) needs a root server")
async def test_as_root_a_bwrap_slot_owns_the_tree_whatever_uid_the_archive_names(state_dir, tmp_path):
    server = start_server(state_dir, job_id="rootjob", slots=1, runtime="bwrap")
    try:
        async with connect.from_state_dir(state_dir, ["rootjob"]) as pool:
            async with pool.slot() as slot:
                source = tmp_path / "foreign.tgz"
                source.write_bytes(archive(("d", "dir", None), ("d/f.txt", "file", b"theirs"), ("d/l", "sym", "f.txt")))
                assert (await pool.upload(slot, source, "foreign.tgz")).success
                # What the issue met: tar restores the archive's owner, which a slot cannot.
                tar = await pool.execute(slot, "bash", {"command": "mkdir t && tar xzf foreign.tgz -C t"})
                assert not tar.success and "Cannot change ownership" in tar.stderr
                result = await pool.execute(slot, "extract", {"path": "foreign.tgz", "dest": "x"})
                assert result.success, result
                owners = await shell(pool, slot, "id -u; stat -c %u x/d x/d/f.txt x/d/l")
                mine, *owned = owners.split()
                assert set(owned) == {mine}
                local = tmp_path / "proj"
                make_project(local, files=5)
                assert (await pool.upload_tree(slot, local, "p")).success
                assert set((await shell(pool, slot, "find p -exec stat -c %u {} +")).split()) == {mine}
                workspace = next(Path(state_dir).rglob("x/d/f.txt"), None)
                if workspace is not None:  # the host's view of the same files: the server's own uid
                    assert workspace.stat().st_uid == os.getuid()
    finally:
        server.stop()


# --- the CLI -----------------------------------------------------------------------------


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_cli_cp_copies_in_runs_and_copies_out(state_dir, tmp_path, cli):
    server = start_server(state_dir, job_id="cpjob", slots=1)
    try:
        local = tmp_path / "proj"
        make_project(local, files=6)
        out, readme = tmp_path / "out", tmp_path / "readme.txt"
        done = cli("cp", str(local), "slot:proj", "--run", "cd proj && mkdir -p out/sub && ./bin/run.sh > out/sub/ran "
                   "&& echo said", "slot:proj/out", str(out), "slot:/workspace/proj/README.ro", str(readme),
                   "slot:proj/bin/run.sh", str(out))  # a file into a local folder: named as in the slot
        assert done.returncode == 0, done.stderr
        assert done.stdout == "said\n"
        assert (out / "sub/ran").read_text() == "run\n" and readme.read_text() == "read only\n"
        assert (out / "run.sh").read_text() == "#!/bin/sh\necho run\n"
        assert f"{local} -> slot:proj (9 files, 9 folders, 0 links" in done.stderr
        failed = cli("cp", str(local / "bin"), "slot:b", "--run", "./b/run.sh > made; exit 3", "slot:made",
                     str(tmp_path / "made"))
        assert failed.returncode == 3 and (tmp_path / "made").read_text() == "run\n"  # copied out all the same
        outside = cli("cp", str(local), "slot:/etc/x")
        assert outside.returncode == 2 and "outside the workspace" in one_line(outside.stderr)
        missing = cli("cp", str(tmp_path / "nope"), "slot:x")
        assert missing.returncode == 2 and "nope: no such file or folder" in one_line(missing.stderr)
        neither = cli("cp", str(local), str(tmp_path / "x"))
        assert neither.returncode == 2 and "exactly one of SRC and DEST" in one_line(neither.stderr)
        absent = cli("cp", "slot:not/there", str(tmp_path / "x"))
        assert absent.returncode == 125 and "not_found" in one_line(absent.stderr)
        no_job = cli("cp", str(local), "slot:x", "--job", "nosuchjob")
        assert no_job.returncode == 125 and "no job 'nosuchjob'" in one_line(no_job.stderr)
    finally:
        server.stop()


def test_cli_cp_without_a_job_says_so_at_once(tmp_path, cli):
    (tmp_path / "d").mkdir()
    started = time.monotonic()
    done = cli("cp", str(tmp_path / "d"), "slot:d")
    assert done.returncode == 125 and "no job in" in one_line(done.stderr)
    assert time.monotonic() - started < 30


def test_the_sync_facade_moves_trees(state_dir, tmp_path):
    from hpc_sandbox.pool import SyncSlotPool

    server = start_server(state_dir, job_id="syncjob", slots=1)
    try:
        local = tmp_path / "proj"
        held = make_project(local, files=4)
        with SyncSlotPool(connect.from_state_dir(state_dir, ["syncjob"])) as pool:
            with pool.slot() as slot:
                up = pool.upload_tree(slot, local, "p", max_entries=50)
                assert up.success and up.data["files"] == len(held)
                down = pool.download_tree(slot, "/workspace/p", tmp_path / "back")
                assert down.success and tree_of(tmp_path / "back") == tree_of(local)
                assert pool.upload(slot, local / "bin/run.sh", "run.sh").success
                assert pool.download(slot, "run.sh", tmp_path / "run.sh").data["size"] == len(held["bin/run.sh"])
    finally:
        server.stop()
