"""The state directory's one owner (jobfolder.py): secret files are written 0600 by one
function, a job's token never overwrites another's, a cloud pool's token is replaced
whole, and a pool's state file reads back as it was written."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from hpc_sandbox.jobfolder import (CloudFolder, JobFolder, PoolState, SandboxEntry, list_pools, read_token,
                                   write_private)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_secret_is_0600_and_never_overwrites_one_that_exists(tmp_path: Path):
    path = tmp_path / "secret"
    write_private(path, b"first\n")
    assert mode(path) == 0o600 and path.read_bytes() == b"first\n"
    with pytest.raises(FileExistsError):
        write_private(path, b"second\n")
    assert path.read_bytes() == b"first\n"


def test_a_secret_is_not_written_through_a_symlink(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "secret").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        write_private(tmp_path / "secret", b"x")
    assert not elsewhere.exists()


def test_a_replaced_secret_is_swapped_whole_and_leaves_no_temporary_file(tmp_path: Path):
    path = tmp_path / "secret"
    write_private(path, b"old\n")
    before = path.stat().st_ino
    write_private(path, b"new\n", replace=True)
    assert path.read_bytes() == b"new\n" and mode(path) == 0o600
    assert path.stat().st_ino != before  # a new file renamed into place, not the old one rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]


def test_a_job_token_can_be_given(tmp_path: Path):
    folder = JobFolder(tmp_path, "cloud")
    path = folder.create_token("a-token-handed-over-by-its-pool")
    assert read_token(path) == "a-token-handed-over-by-its-pool"
    assert mode(folder.path) == 0o700 and mode(path) == 0o600


def test_a_cloud_pool_token_is_kept_only_when_asked(tmp_path: Path):
    folder = CloudFolder(tmp_path, "alice-0123456789")
    assert folder.path == tmp_path / "cloud" / "alice-0123456789"
    first = folder.make_token(reuse=True)
    assert mode(folder.path) == 0o700 and mode(folder.token) == 0o600
    assert folder.make_token(reuse=True) == first
    second = folder.make_token(reuse=False)
    assert second != first and read_token(folder.token) == second
    assert sorted(p.name for p in folder.path.iterdir()) == ["token"]


def test_a_pool_state_file_reads_back_and_lists_its_pool(tmp_path: Path):
    folder = CloudFolder(tmp_path, "alice-0123456789")
    state = PoolState("alice-0123456789", "cpu", f"login1:{os.getpid()}:123", time.time(), cost_per_hour=0.5,
                      sandboxes=[SandboxEntry("sb-1", "hpcsbx-1", 4, "ready", time.time() - 60, url="https://x")])
    folder.write(state)
    assert [p.name for p in folder.state_files()] == [f"pool-login1-{os.getpid()}-123.json"]
    assert folder.read(folder.state_file(state.owner)) == state
    assert list_pools(tmp_path) == [folder]
    assert list_pools(tmp_path / "none") == []
