"""Cloud overflow to Modal, against the Modal SDK double (tests/doubles/modal): where
Modal would start a sandbox, the double starts the sandbox's real entry point (a real
node server) locally, behind a TLS edge whose CA the test trusts via SSL_CERT_FILE.
Every call the adapter makes is checked against the installed modal SDK's signatures.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from doubles.modal._double import install, subprocess_env
from helpers import start_server, wait_until
from hpc_sandbox import connect
from hpc_sandbox.burst.modal import ModalSource
from hpc_sandbox.cloudprofile import CloudProfile
from hpc_sandbox.errors import NoCapacity
from hpc_sandbox.jobfolder import JobFolder, JobInfo
from hpc_sandbox.pool import ClusterSource, SlotPool
from hpc_sandbox.jobstate import JobState, JobStatus

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def modal(monkeypatch, tmp_path):
    """The double as `modal`, and its tunnels trusted as Modal's would be."""
    double = install(monkeypatch, tmp_path / "modal-double")
    monkeypatch.setenv("SSL_CERT_FILE", str(double._double.ca_bundle()))
    return double


def cloud(**settings) -> CloudProfile:
    base = dict(name="test", slots_per_sandbox=3, burst_after=1.0, max_cloud_slots=12, cloud_idle_timeout=60,
                max_creates_per_second=20)
    return CloudProfile(**{**base, **settings})


def creates(double) -> list:
    return [c for c in double._double.calls if c.name == "Sandbox.create"]


def live(double) -> list[dict]:
    return double._double.sandboxes()


async def hold(pool: SlotPool, trajectory: str, seconds: float, results: dict) -> None:
    async with pool.slot(trajectory_id=trajectory) as slot:
        out = await pool.execute(slot, "bash", {"command": f"echo {trajectory}; sleep {seconds}"})
        results[trajectory] = (slot.location, out.stdout.strip(), time.time())


async def test_ten_trajectories_on_four_cluster_slots_burst_six_after_burst_after(modal, state_dir, caplog):
    caplog.set_level(logging.DEBUG)
    server = start_server(state_dir, slots=4)
    try:
        source = ModalSource(cloud(), state_dir=state_dir, sdk=modal)
        pool = connect.from_state_dir(state_dir, overflow=source, acquire_timeout=60)
        results: dict = {}
        async with pool:
            started = time.time()
            # The first four (the node server's) hold their slots until well after the
            # sandboxes are up: every other caller must be served by the cloud.
            await asyncio.gather(*(hold(pool, f"t{i}", 8 if i < 4 else 1, results) for i in range(10)))
            report = await pool.report()
            seen = live(modal)
        places = [where for where, _, _ in results.values()]
        assert places.count("cloud") == 6 and len(places) == 10, results
        assert all(out == name for name, (_, out, _) in results.items())
        made = creates(modal)
        assert len(made) == math.ceil(6 / 3) == source.created
        # None before burst_after: the first sandbox came after the callers had waited 1 s.
        assert min(s.created for s in source.usage().sandboxes) - started >= 1.0 - 0.05
        assert report.sandbox_seconds > 0 and report.sandboxes_alive == 2
        assert [(p.place, p.slots) for p in report.places] == [("cluster", 4), ("cloud", 6)]
        assert not live(modal)
        modal._double.check_against_real_sdk(modal._double.calls)
        token = source._token
        # Only in the Secret (how Modal delivers it): never in an argv, a tag, a name or the env.
        assert [c.name for c in modal._double.calls if token in repr(c.args) + repr(c.kwargs)] == ["Secret.from_dict"] * 2
        assert len(seen) == 2 and token not in repr([(s["requested_argv"], s["argv"], s["name"], s["tags"])
                                                     for s in seen])
        assert all(s["env"].get("HPC_SANDBOX_TOKEN") == token for s in seen)  # the Secret, as Modal passes it
        assert token not in caplog.text
    finally:
        server.stop()


async def test_slots_see_no_token_and_the_server_log_has_none(modal, state_dir):
    source = ModalSource(cloud(burst_after=0), state_dir=state_dir, sdk=modal)
    async with SlotPool([], overflow=source, acquire_timeout=60) as pool:
        async with pool.slot() as slot:
            assert slot.location == "cloud"
            env = await pool.execute(slot, "bash", {"command": "env; cat /proc/$PPID/environ | tr '\\0' '\\n'; "
                                                               "ps -eo args"})
            assert env.success, env.error
            assert source._token not in env.stdout + env.stderr
            assert "HPC_SANDBOX_TOKEN" not in env.stdout
        logs = "".join(p.read_text(errors="replace") for p in (Path(os.environ["MODAL_DOUBLE_DIR"]) / "sandboxes")
                       .glob("*.log"))
        assert "ready:" in logs and source._token not in logs
        [state_file] = (state_dir / "cloud" / source.pool_id).glob("pool-*.json")
        assert source._token not in state_file.read_text()


def pending_job(state_dir: Path, job_id: str, servers: int = 1) -> None:
    folder = JobFolder(state_dir, job_id)
    folder.create_credentials(tls=True)
    folder.write_info(JobInfo(job_id=job_id, scheduler="slurm", submitted_at=time.time(), servers=servers,
                              slots_per_server=2, runtime="none", scheduler_ids=("4242",)))


def squeue_says(expected_in: float | None):
    """Job states as squeue --start gives them: pending, expected to start in N seconds."""
    def states(infos):
        start = None if expected_in is None else time.time() + expected_in
        return {i.job_id: JobStatus(i.job_id, JobState.PENDING, "Resources", expected_start=start) for i in infos}
    return states


@pytest.mark.parametrize("expected_in, bursts", [(3600.0, True), (5.0, False), (None, False)])
async def test_a_pending_job_bursts_at_once_only_when_its_expected_start_is_far(modal, state_dir, expected_in,
                                                                                 bursts):
    pending_job(state_dir, "queued")
    source = ModalSource(cloud(burst_after=30), state_dir=state_dir, sdk=modal)
    cluster = ClusterSource(state_dir, job_states=squeue_says(expected_in))
    async with SlotPool([cluster], overflow=source) as pool:
        if bursts:
            started = time.monotonic()
            slot = await pool.acquire(timeout=25)
            assert slot.location == "cloud" and time.monotonic() - started < 25
            await pool.release(slot)
        else:
            with pytest.raises(NoCapacity):
                await pool.acquire(timeout=2)
            assert not creates(modal)


async def test_freed_cluster_slots_take_the_next_callers_and_idle_sandboxes_stop(modal, state_dir):
    server = start_server(state_dir, slots=1)
    try:
        source = ModalSource(cloud(burst_after=0.5, cloud_idle_timeout=1.5), state_dir=state_dir, sdk=modal)
        async with connect.from_state_dir(state_dir, overflow=source, acquire_timeout=60) as pool:
            first = await pool.acquire("a")
            second = await pool.acquire("b")  # waits 0.5 s, then a sandbox
            assert (first.location, second.location) == ("local", "cloud")  # a node server started by hand
            await pool.release(first)
            again = await pool.acquire("c")  # a free cluster slot beats a free cloud one
            assert again.location == "local"
            await pool.release(second)
            await pool.release(again)
            assert await asyncio.to_thread(wait_until, lambda: not live(modal), 15), "idle sandbox not stopped"
            assert source.created == 1
    finally:
        server.stop()


async def test_max_cloud_slots_is_a_ceiling_and_the_timeout_says_so(modal, state_dir):
    source = ModalSource(cloud(burst_after=0, max_cloud_slots=3), state_dir=state_dir, sdk=modal)
    async with SlotPool([], overflow=source) as pool:
        held = await asyncio.gather(*(pool.acquire(f"t{i}", timeout=30) for i in range(3)))
        with pytest.raises(NoCapacity, match="max_cloud_slots 3"):
            await pool.acquire("t4", timeout=3)
        assert source.created == 1 and len(live(modal)) == 1
        for slot in held:
            await pool.release(slot)


async def test_throttled_creates_are_retried_without_losing_the_caller(modal, state_dir, monkeypatch):
    import hpc_sandbox.burst.modal as adapter

    monkeypatch.setattr(adapter, "THROTTLE_BACKOFF", (0.1, 0.5))
    modal._double.throttle(2)
    source = ModalSource(cloud(burst_after=0), state_dir=state_dir, sdk=modal)
    async with SlotPool([], overflow=source) as pool:
        slot = await pool.acquire(timeout=30)
        assert slot.location == "cloud"
        await pool.release(slot)
    assert len(creates(modal)) == 3 and source.created == 1


async def test_a_failing_cloud_is_said_once_and_callers_get_what_was_tried(modal, state_dir, caplog):
    modal._double.fail("Sandbox.create", modal.exception.ImageBuildError("pip install failed"), times=5)
    source = ModalSource(cloud(burst_after=0), state_dir=state_dir, sdk=modal)
    async with SlotPool([], overflow=source) as pool:
        outcomes = await asyncio.gather(*(pool.acquire(f"t{i}", timeout=2) for i in range(3)),
                                        return_exceptions=True)
    assert all(isinstance(o, NoCapacity) for o in outcomes)
    assert "ImageBuildError: pip install failed" in str(outcomes[0])
    said = [r for r in caplog.records if r.levelno >= logging.ERROR and "ImageBuildError" in r.getMessage()]
    assert len(said) == 1
    assert len(creates(modal)) == 1  # off after a failure no retry mends


async def test_a_sandbox_that_dies_under_a_call_ends_it_as_server_gone(modal, state_dir):
    source = ModalSource(cloud(burst_after=0), state_dir=state_dir, sdk=modal)
    async with SlotPool([], overflow=source) as pool:
        slot = await pool.acquire(timeout=30)
        call = asyncio.ensure_future(pool.execute(slot, "bash", {"command": "sleep 60"}, timeout=90))
        await asyncio.sleep(1.0)
        modal._double.kill(slot.endpoint.name)
        result = await asyncio.wait_for(call, 30)
        assert not result.success and result.error_kind == "server_gone", result


async def test_stopping_the_pool_leaves_no_sandbox_even_one_being_created(modal, state_dir):
    modal._double.create_delay(1.0)
    source = ModalSource(cloud(burst_after=0), state_dir=state_dir, sdk=modal)
    pool = SlotPool([], overflow=source)
    await pool.start()
    waiting = asyncio.ensure_future(pool.acquire(timeout=30))
    await asyncio.sleep(0.3)  # the create is on its way
    await pool.stop()
    with pytest.raises(NoCapacity):
        await waiting
    assert await asyncio.to_thread(wait_until, lambda: not live(modal), 10)


POOL_SCRIPT = """
import asyncio, sys
from hpc_sandbox.burst.modal import ModalSource
from hpc_sandbox.cloudprofile import CloudProfile
from hpc_sandbox.pool import SlotPool

async def main():
    source = ModalSource(CloudProfile(name="test", burst_after=0, slots_per_sandbox=2), state_dir=sys.argv[1])
    async with SlotPool([], overflow=source) as pool:
        slot = await pool.acquire(timeout=60)
        print("holding", slot.location, flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def kill_a_pool_holding_a_cloud_slot(state_dir: Path, env: dict[str, str]) -> None:
    """A pool in another process takes a cloud slot and is SIGKILLed: its sandbox stays."""
    child = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT, str(state_dir)], env=env, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "holding cloud"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()


async def test_a_killed_pool_leaves_sandboxes_the_next_start_and_cloud_cleanup_stop(modal, state_dir, cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("cloud:\n  test: {}\n")
    env = {**subprocess_env(os.environ["MODAL_DOUBLE_DIR"]), "SSL_CERT_FILE": os.environ["SSL_CERT_FILE"],
           "HPC_SANDBOX_SITE_CONFIG": str(config)}
    kill_a_pool_holding_a_cloud_slot(state_dir, env)
    assert len(live(modal)) == 1  # the SIGKILLed pool could not stop it
    shown = cli("cloud", "list", "--cloud-profile", "test", extra_env=env)
    assert shown.returncode == 0, shown.stderr
    assert "left behind" in shown.stdout
    # The next pool of the same profile, user and state dir finds it by tag and stops it.
    source = ModalSource(CloudProfile(name="test"), state_dir=state_dir, sdk=modal)
    async with SlotPool([], overflow=source):
        assert await asyncio.to_thread(wait_until, lambda: not live(modal), 15)
    # And by hand: a second leftover, stopped by `hpc-sandbox cloud cleanup`.
    kill_a_pool_holding_a_cloud_slot(state_dir, env)
    stopped = cli("cloud", "cleanup", "--cloud-profile", "test", extra_env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert "1 sandbox stopped" in stopped.stdout
    assert await asyncio.to_thread(wait_until, lambda: not live(modal), 10)
    shown = cli("status", extra_env=env)  # the dead pools are forgotten once their sandboxes are stopped
    assert shown.returncode == 0 and "cloud pool" not in shown.stdout, shown.stdout


def test_exec_overflow_modal_runs_in_a_cloud_sandbox_when_no_cluster_exists(modal, state_dir, cli, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("cloud:\n  default: {burst_after: 0, slots_per_sandbox: 1}\n")
    env = {**subprocess_env(os.environ["MODAL_DOUBLE_DIR"]), "SSL_CERT_FILE": os.environ["SSL_CERT_FILE"],
           "HPC_SANDBOX_SITE_CONFIG": str(config)}
    done = cli("exec", "--overflow", "modal", "--", "echo in the cloud; exit 3", extra_env=env)
    assert done.returncode == 3, done.stderr
    assert done.stdout.strip() == "in the cloud"
    assert not live(modal)  # stopped with the command's pool


async def test_a_sandbox_that_comes_up_serves_callers_while_requests_wait_on_full_ones(modal, state_dir):
    # Three sandboxes of one slot each: requests parked on the first two (full) must not
    # keep the third caller from the third sandbox until a long poll (10 s) times out.
    source = ModalSource(cloud(burst_after=0, slots_per_sandbox=1, max_cloud_slots=3), state_dir=state_dir,
                         sdk=modal)
    async with SlotPool([], overflow=source) as pool:
        held = await asyncio.wait_for(asyncio.gather(*(pool.acquire(f"t{i}", timeout=8) for i in range(3))), 9)
        assert {s.endpoint.name for s in held} == {s["id"] for s in live(modal)} and source.created == 3


async def test_a_caller_within_burst_after_does_not_take_an_idle_cloud_slot(modal, state_dir):
    server = start_server(state_dir, slots=1)
    try:
        source = ModalSource(cloud(burst_after=1.0, slots_per_sandbox=2), state_dir=state_dir, sdk=modal)
        async with connect.from_state_dir(state_dir, overflow=source, acquire_timeout=30) as pool:
            cluster = await pool.acquire("holds the node server")
            first = await pool.acquire("waited 1 s: cloud")
            assert first.location == "cloud"
            arrived = time.monotonic()
            second = await pool.acquire("also waits its 1 s")  # a cloud slot is free, but the cluster comes first
            assert second.location == "cloud" and time.monotonic() - arrived >= 0.95
            for slot in (cluster, first, second):
                await pool.release(slot)
    finally:
        server.stop()


async def test_slots_get_the_profiles_env_and_the_secret_variables_named_in_pass_env(modal, state_dir):
    modal._double.named_secret("api-keys", {"API_KEY": "k-123", "OTHER_KEY": "not for slots"})
    profile = cloud(burst_after=0, env={"GREETING": "hi there"}, secrets=("api-keys",), pass_env=("API_KEY",))
    source = ModalSource(profile, state_dir=state_dir, sdk=modal)
    async with SlotPool([], overflow=source) as pool:
        async with pool.slot() as slot:
            seen = await pool.execute(slot, "bash", {"command": 'echo "$GREETING|$API_KEY|${OTHER_KEY:-unset}"'})
    assert seen.stdout == "hi there|k-123|unset\n", seen
    [create] = creates(modal)
    assert "k-123" not in repr(create.args) + repr(create.kwargs.get("env"))  # names travel, never values
