"""Opt-in: the burst scenario against the real Modal service (never in CI: it cannot be
reached from here, and it costs money).

    pip install 'hpc-sandbox[modal]' && modal setup       # or MODAL_TOKEN_ID / MODAL_TOKEN_SECRET
    MODAL_TOKEN_ID=... MODAL_TOKEN_SECRET=... python -m pytest tests/test_modal_live.py -v

Two cluster slots (a local node server), four callers that each hold a slot: two go to
the cloud in one sandbox of two slots after burst_after; the pool leaves no sandbox
behind. It uses the Modal app `hpc-sandbox-live-test` and costs about a sandbox-minute.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from helpers import start_server

pytestmark = [
    pytest.mark.skipif(not os.environ.get("MODAL_TOKEN_ID"), reason="opt-in: set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET"),
    pytest.mark.timeout(900),
]


async def test_two_of_four_callers_burst_to_one_real_sandbox(state_dir):
    modal = pytest.importorskip("modal")
    from hpc_sandbox import connect
    from hpc_sandbox.burst.inventory import list_sandboxes
    from hpc_sandbox.burst.modal import ModalSource
    from hpc_sandbox.cloudprofile import CloudProfile

    profile = CloudProfile(name="live", app_name="hpc-sandbox-live-test", image="python:3.11-slim",
                           slots_per_sandbox=2, max_cloud_slots=2, burst_after=5, timeout=900, idle_timeout=300)
    server = start_server(state_dir, slots=2)
    try:
        source = ModalSource(profile, state_dir=state_dir, sdk=modal)
        async with connect.from_state_dir(state_dir, overflow=source, acquire_timeout=600) as pool:
            async def one(i: int) -> str:
                async with pool.slot(trajectory_id=f"t{i}") as slot:
                    result = await pool.execute(slot, "bash", {"command": "python3 -c 'print(6 * 7)'; sleep 20"})
                    assert result.stdout == "42\n", result
                    return slot.location
            places = await asyncio.gather(*(one(i) for i in range(4)))
        assert sorted(places) == ["cloud", "cloud", "local", "local"] and source.created == 1
        left, _ = await list_sandboxes(profile, source.pool_id, sdk=modal)
        assert not [s for s in left if s.owner_alive is not False], left
    finally:
        server.stop()
