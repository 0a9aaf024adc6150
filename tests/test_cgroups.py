"""A cgroup per slot where the node lets the server make them (issue 17): the slot's
agent starts inside it, its pids.max is the kernel's fence (root included, which
RLIMIT_NPROC exempts), everything in it ends with the server, and a node without a
writable cgroup is no error.

The real ones need a writable cgroup hierarchy (root here: v1 pids, and v2 without
controllers); they skip where there is none. The bomb is BOUNDED (2^12 processes) and
its leftovers are killed by marker whatever happens.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hpc_sandbox.client import NodeClient
from hpc_sandbox.runtime import task_fence
from hpc_sandbox.server import cgroups

from helpers import pids_matching, requires_bwrap, start_server, wait_until
from test_slot_clean import _kill_marked

RUNTIMES = ["none", pytest.param("bwrap", marks=requires_bwrap)]
FENCE = task_fence(64)


def _best() -> cgroups.Hierarchy | None:
    found = cgroups.find(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    return found[0] if found else None


requires_cgroups = pytest.mark.skipif(_best() is None, reason="no writable cgroup hierarchy here (not root, "
                                                              "no delegation)")


def _slot_folder(server, index: int) -> Path:
    best = _best()
    assert best is not None
    return best.own / f"{cgroups.PREFIX}{server.proc.pid}" / f"slot-{index}"


def _listed(folder: Path) -> list[int]:
    try:
        return [int(pid) for pid in (folder / "cgroup.procs").read_text().split()]
    except OSError:
        return []


@requires_cgroups
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_each_slots_agent_runs_in_a_cgroup_of_its_own_which_ends_with_the_server(state_dir, runtime):
    server = start_server(state_dir, job_id=f"cg-{runtime}", slots=2, runtime=runtime, extra=["--slot-procs", "64"])
    try:
        folders = [_slot_folder(server, index) for index in (0, 1)]
        for index, folder in enumerate(folders):
            members = _listed(folder)
            assert members, f"slot {index}'s cgroup {folder} holds nothing"
            for pid in members:  # the agent (and the runtime's own processes): each names it
                lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                assert any(line.endswith(f"/{cgroups.PREFIX}{server.proc.pid}/slot-{index}") for line in lines), \
                    (pid, lines)
            if _best().pids:
                assert (folder / "pids.max").read_text().strip() == str(FENCE)
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("t")
            answer = await client.execute(granted.slot, granted.lease, "bash", {"command": "sleep 30 & echo $!"},
                                          timeout=30)
            assert answer.ok, answer
            assert len(_listed(folders[granted.slot])) > 1  # the command's processes are in it too
    finally:
        assert server.stop() == 0
    assert not folders[0].parent.exists(), f"{folders[0].parent} outlived its server"


@requires_cgroups
@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_a_fork_bomb_stops_at_pids_max_and_is_answered_within_seconds(state_dir, runtime):
    if not _best().pids:
        pytest.skip("the writable cgroup hierarchy here has no pids controller")
    marker = f"hpcsbx-cgbomb-{os.getpid()}-{runtime}"
    server = start_server(state_dir, job_id=f"cgbomb-{runtime}", slots=2, runtime=runtime,
                          extra=["--slot-procs", "64"])
    peak, sampling = [0], threading.Event()
    try:
        async with NodeClient(server.endpoint) as client:
            bomb, neighbour = await client.acquire("bomb"), await client.acquire("neighbour")
            folder = _slot_folder(server, bomb.slot)

            def sample() -> None:  # the cgroup's tasks, as the kernel counts them for pids.max
                while not sampling.is_set():
                    try:
                        peak[0] = max(peak[0], int((folder / "pids.current").read_text()))
                    except (OSError, ValueError):
                        pass
                    time.sleep(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            # BOUNDED: a binary tree of depth 12 (<= 8191 processes), each leaf its own session.
            script = (f"b() {{ if [ $1 = 0 ]; then (setsid bash -c 'exec -a {marker} sleep 60' &); else "
                      f"b $(($1 - 1)) & b $(($1 - 1)) & wait; fi; }}; b 12")
            started = time.monotonic()
            running = asyncio.ensure_future(client.execute(bomb.slot, bomb.lease, "bash", {"command": script},
                                                           timeout=60))
            failures = 0
            while not running.done() and time.monotonic() - started < 30:
                echo = await client.execute(neighbour.slot, neighbour.lease, "bash", {"command": "echo alive"},
                                            timeout=30)
                failures += not (echo.ok and echo.result["stdout"] == "alive\n")
                await asyncio.sleep(0.1)
            answer = await running
            took = time.monotonic() - started
            assert not answer.ok and answer.error_kind == "limit_exceeded", answer
            assert took < 5, f"the fork bomb was answered after {took:.1f}s"
            assert failures == 0, f"the neighbour failed {failures} times while the bomb ran"
            assert await asyncio.to_thread(wait_until, lambda: not pids_matching(marker), 10)
            echo = await client.execute(neighbour.slot, neighbour.lease, "bash", {"command": "echo alive"},
                                        timeout=30)
            assert echo.ok and echo.result["stdout"] == "alive\n"
    finally:
        sampling.set()
        server.stop()
        _kill_marked(marker)
    assert 0 < peak[0] <= FENCE, f"the bomb's cgroup held {peak[0]} tasks, its pids.max is {FENCE}"


@requires_cgroups
@requires_bwrap
async def test_a_bwrap_slot_cannot_move_itself_out_of_its_cgroup(state_dir):
    server = start_server(state_dir, job_id="cg-leave", slots=1, runtime="bwrap", extra=["--slot-procs", "64"])
    try:
        async with NodeClient(server.endpoint) as client:
            granted = await client.acquire("t")
            escape = " ; ".join(f"echo $$ > {path}/cgroup.procs" for path in _mounted_cgroup_roots())
            answer = await client.execute(granted.slot, granted.lease, "bash",
                                          {"command": f"{escape}; sleep 30 & echo $!"}, timeout=30)
            assert answer.ok, answer
            assert "Read-only file system" in answer.result["stderr"]
            inner = int(answer.result["stdout"].split()[-1])  # sleep's pid in the slot's pid namespace
            assert inner in [_pid_inside(pid) for pid in _listed(_slot_folder(server, granted.slot))]
    finally:
        server.stop()


def _pid_inside(pid: int) -> int:
    """A process's pid in its innermost pid namespace (NSpid's last field)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return pid


def _mounted_cgroup_roots() -> list[str]:
    return [mount for mount, _, fstype, _ in cgroups._mounts(Path("/proc/self/mountinfo").read_text())
            if fstype in ("cgroup", "cgroup2")]


def test_a_node_without_a_writable_cgroup_gets_none_and_no_error(tmp_path, caplog):
    # A cgroup2 "mount" and a v1 pids "mount" that are plain folders (no cgroup.procs),
    # writable: not a place to make cgroups.
    for name in ("unified", "pids"):
        (tmp_path / name / "srv").mkdir(parents=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"41 31 0:38 / {tmp_path}/unified rw,relatime - cgroup2 cgroup2 rw\n"
                         f"39 31 0:36 / {tmp_path}/pids rw,relatime - cgroup cgroup rw,pids\n")
    own = tmp_path / "cgroup"
    own.write_text("8:pids:/srv\n0::/srv\n")
    caplog.set_level("INFO", logger=cgroups.__name__)
    assert cgroups.claim(mountinfo, own) is None
    assert "none writable" in caplog.text
    assert cgroups.claim(tmp_path / "missing", own) is None  # no /proc to read: none either


def test_discovery_reads_hybrid_and_pure_v2_nodes_and_ranks_the_fence_first(tmp_path):
    for sub in ("unified/a/b", "pids/a/b", "v2/job/step"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "cgroup.procs").write_text("")
    (tmp_path / "unified/a/b/cgroup.controllers").write_text("\n")
    (tmp_path / "v2/job/step/cgroup.controllers").write_text("cpu memory pids\n")
    hybrid = (f"41 31 0:38 / {tmp_path}/unified rw - cgroup2 cgroup2 rw\n"
              f"39 31 0:36 / {tmp_path}/pids rw - cgroup cgroup rw,pids\n")
    found = cgroups.find(hybrid, "8:pids:/a/b\n0::/a/b\n")
    assert [(h.version, h.pids) for h in found] == [(1, True), (2, False)]
    assert found[0].own == tmp_path / "pids/a/b"
    # A container whose cgroup namespace shows its own cgroup as "/" and a mount rooted there.
    pure = f"30 24 0:27 /job/step {tmp_path}/v2/job/step rw - cgroup2 cgroup2 rw\n"
    found = cgroups.find(pure, "0::/job/step\n")
    assert [(h.own, h.version, h.pids) for h in found] == [(tmp_path / "v2/job/step", 2, True)]


@requires_cgroups
def test_a_dead_servers_empty_cgroups_are_swept_and_a_live_ones_kept():
    best = _best()
    assert best is not None
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = best.own / f"{cgroups.PREFIX}{gone.pid}.test"
    live = best.own / f"{cgroups.PREFIX}{os.getppid()}.test"  # pytest's parent: alive
    for folder in (dead, live):
        (folder / "slot-0").mkdir(parents=True, exist_ok=True)
    place = None
    try:
        place = cgroups.claim()
        assert place is not None
        assert not dead.exists(), "an empty folder of a server that is gone was left"
        assert live.exists(), "a live server's folder was swept"
    finally:
        if place is not None:
            place.close()
        for folder in (dead, live):
            for child in (folder / "slot-0", folder):
                if child.exists():
                    child.rmdir()
    assert place is not None and not place.base.exists()


@requires_cgroups
@pytest.mark.parametrize("version", [1, 2])
def test_a_slot_cgroup_is_entered_before_the_command_runs_and_killed_whole(version):
    found = cgroups.find(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    hierarchy = next((h for h in found if h.version == version), None)
    if hierarchy is None:
        pytest.skip(f"no writable cgroup v{version} hierarchy here")
    place = cgroups._make_place(hierarchy)
    try:
        slot = place.slot(0, 16)
        slot.make()
        # The first thing the command does is read its own cgroup: it is already the slot's.
        proc = subprocess.Popen(slot.enter_argv(["sh", "-c", "cat /proc/self/cgroup; sleep 30 & sleep 30 & wait"]),
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert proc.stdout is not None
        first = ""
        for line in proc.stdout:  # what the command saw of its cgroups, up to the v2 line (the last)
            first += line
            if line.startswith("0::"):
                break
        assert wait_until(lambda: len(slot.pids()) >= 3, 5), slot.pids()
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert f"{place.base.name}/slot-0" in lines and f"{place.base.name}/slot-0" in first
        slot.kill()
        assert slot.pids() == []
        assert proc.wait(5) < 0
        if hierarchy.pids:
            assert (slot.path / "pids.max").read_text().strip() == "16"  # restored after the kill
    finally:
        place.close()
    assert not place.base.exists()


_DELEGATED = """
import subprocess, sys, time
from hpc_sandbox.server import cgroups
place = cgroups.claim()
assert place is not None and place.hierarchy.version == 2, place
slot = place.slot(0, 128)
slot.make()
child = subprocess.Popen(slot.enter_argv(["sh", "-c", "sleep 30 & sleep 30 & wait"]))
deadline = time.monotonic() + 5
while len(slot.pids()) < 3 and time.monotonic() < deadline:
    time.sleep(0.02)
assert len(slot.pids()) == 3, slot.pids()
slot.kill()
assert slot.pids() == [] and child.wait() < 0
place.close()
assert not place.base.exists()
print("delegated ok")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not any(fs == "cgroup2" for _, _, fs, _ in
                                                 cgroups._mounts(Path("/proc/self/mountinfo").read_text())),
                    reason="needs root (to delegate a cgroup v2 to an ordinary user) and a cgroup2 mount")
def test_a_cgroup_v2_delegated_to_an_ordinary_user_is_used_by_its_server():
    """As systemd's Delegate=yes hands a unit's cgroup to its user: the folder and its
    cgroup.procs, cgroup.subtree_control and cgroup.threads chowned, the process put in it."""
    mount = next(m for m, _, fs, _ in cgroups._mounts(Path("/proc/self/mountinfo").read_text()) if fs == "cgroup2")
    own = Path(mount) / Path(Path("/proc/self/cgroup").read_text().split("0::", 1)[1].strip()).relative_to("/")
    delegated = own / f"hpcsbx-test-delegated-{os.getpid()}"
    delegated.mkdir()
    try:
        for path in (delegated, *(delegated / name for name in ("cgroup.procs", "cgroup.subtree_control",
                                                                "cgroup.threads"))):
            os.chown(path, 65534, 65534)
        repo = Path(__file__).resolve().parent.parent
        # The node's own python3: the test's may live under /root, which the user cannot
        # enter (cgroups.py needs the standard library only).
        python = "/usr/bin/python3"
        if not os.access(python, os.X_OK):
            pytest.skip("no /usr/bin/python3 for the ordinary user")
        enter = f'echo $$ > {delegated}/cgroup.procs && exec "$@"'
        run = subprocess.run(["sh", "-c", enter, "sh", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "env", f"PYTHONPATH={repo}", python, "-c", _DELEGATED],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "delegated ok" in run.stdout, run.stderr[-2000:]
    finally:
        for child in sorted(delegated.glob("**/"), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                child.rmdir()


@requires_cgroups
def test_two_servers_on_a_node_keep_apart_and_a_killed_ones_cgroups_are_swept(state_dir):
    first = start_server(state_dir, job_id="cg-a", slots=1)
    second = start_server(state_dir, job_id="cg-b", slots=1)
    third = None
    try:
        bases = [_slot_folder(server, 0).parent for server in (first, second)]
        assert bases[0] != bases[1] and all(_listed(base / "slot-0") for base in bases)
        first.proc.kill()  # SIGKILL: it removes nothing; its agent ends when its stdin closes
        first.proc.wait()
        assert wait_until(lambda: not _listed(bases[0] / "slot-0"), 15), _listed(bases[0] / "slot-0")
        assert bases[0].exists()
        third = start_server(state_dir, job_id="cg-c", slots=1)
        assert not bases[0].exists(), "the killed server's empty cgroups were not swept"
        assert _listed(bases[1] / "slot-0"), "a live server's slot cgroup was touched"
    finally:
        for server in (second, third):
            if server is not None:
                server.stop()
    assert not bases[1].exists()
