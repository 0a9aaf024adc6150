"""compat.artifacts over a real node server: what the faces build on."""
from __future__ import annotations

import pytest

from hpc_sandbox import connect
from hpc_sandbox.compat.artifacts import ArtifactError, archive_artifacts, list_artifacts
from hpc_sandbox.errors import ErrorKind


async def test_list_and_archive_artifacts_exclude_what_they_are_asked_to(state_dir, server_factory):
    server_factory(job_id="lists", slots=1)
    async with connect.from_state_dir(state_dir, ["lists"], acquire_timeout=30) as pool:
        async with pool.slot("t") as slot:
            made = await pool.execute(slot, "bash", {"command": (
                "mkdir -p src/pkg/__pycache__ tests .venv/lib && touch src/pkg/mod.py tests/test_mod.py "
                "src/pkg/__pycache__/mod.pyc && for i in $(seq 40); do touch .venv/lib/m$i.py; done")}, timeout=30)
            assert made.success, made
            drowned = await list_artifacts(pool, slot, recursive=True, max_entries=10)
            assert drowned.truncated and "tests/test_mod.py" not in {e["path"] for e in drowned}

            listing = await list_artifacts(pool, slot, recursive=True, max_entries=10,
                                           exclude=[".venv", "__pycache__"])
            assert not listing.truncated
            assert {e["path"] for e in listing} == {"src", "src/pkg", "src/pkg/mod.py", "tests", "tests/test_mod.py"}
            one = await list_artifacts(pool, slot, ".", recursive=True, exclude=".venv")  # one pattern alone
            assert not any(e["path"].startswith(".venv") for e in one) and "src/pkg/__pycache__" in {
                e["path"] for e in one}
            packed = await archive_artifacts(pool, slot, ".", exclude=[".venv", "__pycache__"])
            assert set(packed["members"]) == {"src", "src/pkg", "src/pkg/mod.py", "tests", "tests/test_mod.py"}
            with pytest.raises(ArtifactError) as refused:
                await list_artifacts(pool, slot, exclude=["x" * 1000])
            assert refused.value.kind == ErrorKind.BAD_REQUEST and "exclude" in str(refused.value)
