"""Nomad live through its HTTP API, against the Nomad API double of tests/doubles
(served on loopback, it parses the HCL it is given with python-hcl2, places
allocations, and with run_tasks runs the task's command for real: a node server).

The gaps of python-nomad 2.1 that hpc-sandbox closes are checked on the wire: TLS
verification with NOMAD_CACERT, the namespace on Variables calls, the ACL token on
every call.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from doubles.nomad_api import NomadDouble
from hpc_sandbox import jobs
from hpc_sandbox.config import load_spec
from hpc_sandbox.errors import SchedulerError
from hpc_sandbox import connect
from hpc_sandbox.jobstate import JobState
from hpc_sandbox.schedulers.nomad import NomadConnection, NomadScheduler, placement_failure

pytestmark = pytest.mark.timeout(120)


def nomad_env(double: NomadDouble, **extra: str) -> dict[str, str]:
    env = {"NOMAD_ADDR": double.address, "HPC_SANDBOX_SCHEDULER": "nomad"}
    if getattr(double, "ca_file", None):
        env["NOMAD_CACERT"] = str(double.ca_file)
    return {**env, **extra}


@pytest.fixture
def set_env(monkeypatch):
    def apply(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    for key in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION", "NOMAD_CACERT", "NOMAD_SKIP_VERIFY",
                "NOMAD_CLIENT_CERT", "NOMAD_CLIENT_KEY"):
        monkeypatch.delenv(key, raising=False)
    return apply


def spec_for(state_dir: Path, **overrides):
    base = {"scheduler": "nomad", "slots": 2, "state_dir": state_dir, "python": os.environ.get("PYTHON", None)}
    return load_spec(overrides={k: v for k, v in {**base, **overrides}.items() if v is not None}, isolated=True)


def test_connection_reads_nomads_own_variables_and_verifies_tls_by_default():
    connection = NomadConnection.from_environment({"NOMAD_ADDR": "https://nomad.example:4646", "NOMAD_TOKEN": "acl-token-77",
                                                   "NOMAD_NAMESPACE": "ml", "NOMAD_REGION": "eu",
                                                   "NOMAD_CACERT": "/etc/nomad/ca.pem"})
    client = connection.client()
    assert client.job.verify == "/etc/nomad/ca.pem"  # python-nomad alone would not verify at all
    assert (client.job.namespace, client.job.region, client.job.token) == ("ml", "eu", "acl-token-77")
    assert NomadConnection.from_environment({}).client().job.verify is True
    assert NomadConnection.from_environment({"NOMAD_SKIP_VERIFY": "true"}).client().job.verify is False
    assert "acl-token-77" not in json.dumps(connection.recorded())  # job.json never keeps the token


def test_placement_failure_names_nomads_reasons():
    said = placement_failure({"FailedTGAllocs": {"servers": {
        "NodesEvaluated": 2, "NodesAvailable": {"dc1": 2},
        "DimensionExhausted": {"network: reserved port collision http=9100": 2}}}})
    assert said == "group 'servers': 2 nodes evaluated; exhausted network: reserved port collision http=9100 on 2 nodes"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def nomad_agent(tmp_path):
    """The Nomad API double with an ACL token, over TLS, running the first allocation's
    task for real (a node server)."""
    with NomadDouble(tmp_path, tls=True, acl_token="acl-secret-1", run_tasks=True) as double:
        yield double


def test_submit_status_exec_cancel_through_the_nomad_api(nomad_agent, cli, state_dir):
    port = free_port()
    env = {**nomad_agent.env(), "HPC_SANDBOX_SCHEDULER": "nomad"}
    submitted = cli("submit", "--slots", "2", "--port-range", f"{port}-{port}", "--wait", "--wait-timeout", "60",
                    extra_env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    token = (state_dir / "jobs" / job_id / "token").read_text().strip()

    status = json.loads(cli("status", job_id, "--json", extra_env=env).stdout)[0]
    assert (status["scheduler"], status["state"], status["free"]) == ("nomad", "running", 2)
    assert status["servers"][0]["url"] == f"https://127.0.0.1:{port}"
    ran = cli("exec", "--job", job_id, "--", "echo from nomad", extra_env=env)
    assert (ran.returncode, ran.stdout) == (0, "from nomad\n"), ran.stderr

    # On the wire: the rendered HCL parsed by the agent, then registered with the static
    # port and the resources; the secrets only in the Variable; token, namespace, region
    # on every call (python-nomad leaves the namespace off Variables calls by itself).
    [parse] = nomad_agent.requests_to("/v1/jobs/parse", "POST")
    assert set(parse.json) <= {"JobHCL", "Canonicalize"} and f'job "{job_id}"' in parse.json["JobHCL"]
    [register] = [r for r in nomad_agent.requests_to("/v1/jobs", "POST") if r.path == "/v1/jobs"]
    group = register.json["Job"]["TaskGroups"][0]
    assert group["Networks"][0]["ReservedPorts"][0]["Value"] == port
    assert group["Tasks"][0]["Resources"]["MemoryMB"] >= 1
    assert token not in json.dumps(register.json) and "PRIVATE KEY" not in json.dumps(register.json)
    assert nomad_agent.variables[("default", f"nomad/jobs/{job_id}")]["token"] == token
    for request in nomad_agent.requests:
        assert request.header("X-Nomad-Token") == "acl-secret-1", request.path
        if request.path.startswith(("/v1/var/", "/v1/evaluation/")):
            assert request.query.get("namespace") == "default", request.path

    cancelled = cli("cancel", job_id, extra_env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert ("default", f"nomad/jobs/{job_id}") not in nomad_agent.variables
    assert nomad_agent.requests_to(f"/v1/job/{job_id}", "DELETE")


def test_a_job_nomad_cannot_place_fails_its_submit_with_the_reasons(tmp_path, cli, state_dir):
    port = free_port()
    with NomadDouble(tmp_path) as double:
        double.occupy_port(port)
        env = {**double.env(), "HPC_SANDBOX_SCHEDULER": "nomad"}
        failed = cli("submit", "--port-range", f"{port}-{port}", extra_env=env)
        assert failed.returncode != 0 and "Traceback" not in failed.stderr
        assert "cannot place" in failed.stderr and f"port collision" in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
        assert not double.variables  # the token went away with the job
        assert not list((state_dir / "jobs").glob("*"))


def test_an_hcl_error_and_an_agent_that_does_not_answer_are_one_line_each(tmp_path, state_dir, set_env):
    with NomadDouble(tmp_path) as double:
        set_env(double.env())
        broken = spec_for(state_dir, extra_directives=("priority = = 50",))
        with pytest.raises(SchedulerError, match=r"Nomad HCL parse .* failed \(HTTP 400\)"):
            jobs.submit(broken)
        assert not double.variables
    set_env({"NOMAD_ADDR": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(SchedulerError, match="cannot reach the agent"):
        jobs.submit(spec_for(state_dir))


def test_without_the_ca_the_agents_certificate_is_refused(tmp_path, state_dir, set_env):
    with NomadDouble(tmp_path, tls=True) as double:
        set_env({"NOMAD_ADDR": double.address})  # no NOMAD_CACERT: the system's CAs do not know it
        with pytest.raises(SchedulerError, match="cannot reach the agent.*(CERTIFICATE|SSL)"):
            jobs.submit(spec_for(state_dir))


def test_failed_and_lost_allocations_are_named_in_the_status(tmp_path, state_dir, set_env):
    with NomadDouble(tmp_path, nodes=("node-1", "node-2")) as double:
        set_env(double.env())
        port = free_port()
        job = jobs.submit(spec_for(state_dir, nodes=2, port_range=f"{port}-{port}"))
        scheduler = NomadScheduler(state_dir)
        double.wait_for(lambda: len([a for a in double.allocs(job.id) if a["ClientStatus"] == "running"]) == 2)
        assert scheduler.status([job.info])[job.id].state is JobState.RUNNING
        first, second = double.allocs(job.id)
        double.fail_alloc(first["ID"], "exit status 1: no python3 here")
        double.lose_node(second["NodeName"])
        status = scheduler.status([job.info])[job.id]
        assert status.state is JobState.FAILED, status
        assert "no python3 here" in status.reason or "lost" in status.reason, status
        jobs.cancel(state_dir, job.id, purge=True)
        assert double.job(job.id) is None  # purged, not left for Nomad's garbage collector
        assert double.requests_to(f"/v1/job/{job.id}", "DELETE")[0].query.get("purge", "").lower() == "true"  # Go's ParseBool takes True


def test_purge_is_asked_of_the_scheduler_not_of_its_name(state_dir):
    # Scheduler.purges, not a scheduler's name, decides: --purge on a job of a scheduler
    # that keeps no ended jobs is an error and cancels nothing; Job.cancel(purge=True) is
    # a plain cancel there.
    from hpc_sandbox.errors import ConfigError
    from hpc_sandbox.jobfolder import JobFolder, JobInfo

    folder = JobFolder(state_dir, "plain")
    folder.create_credentials(tls=False)
    info = JobInfo(job_id="plain", scheduler="local", submitted_at=time.time(), servers=1, slots_per_server=1,
                   runtime="none", scheduler_ids=())
    folder.write_info(info)
    with pytest.raises(ConfigError, match="--purge is for Nomad jobs; plain is a local job"):
        jobs.cancel(state_dir, "plain", purge=True)
    assert folder.exists()
    jobs.Job(state_dir, info).cancel(purge=True)
    assert not folder.exists()
    assert NomadScheduler.purges and not jobs.get_scheduler("local", state_dir).purges


def test_the_pool_uses_a_nomad_job_as_it_uses_a_slurm_job(nomad_agent, state_dir, set_env):
    set_env(nomad_agent.env())
    port = free_port()

    async def scenario() -> None:
        async with connect.launch(scheduler="nomad", slots=2, port_range=f"{port}-{port}", state_dir=state_dir,
                                   wait_timeout=60, acquire_timeout=30) as pool:
            [job] = pool.jobs
            async with pool.slot("t1") as slot:
                assert slot.location == "cluster" and slot.endpoint.url == f"https://127.0.0.1:{port}"
                result = await pool.execute(slot, "bash", {"command": "echo $((6 * 7))"})
                assert result.stdout == "42\n"
                # The node is lost while a command runs: the call ends as job_ended, not a hang.
                running = asyncio.ensure_future(pool.execute(slot, "bash", {"command": "sleep 60"}, timeout=90))
                await asyncio.sleep(0.5)
                [alloc] = [a for a in nomad_agent.allocs(job.id) if a["ClientStatus"] == "running"]
                nomad_agent.lose_node(alloc["NodeName"])
                ended = await asyncio.wait_for(running, 30)
                assert ended.error_kind == "job_ended", ended
        assert nomad_agent.job(job.id) is None or nomad_agent.job(job.id)["Status"] == "dead"

    asyncio.run(scenario())


def test_check_scheduler_nomad_runs_the_preflight(nomad_agent, cli):
    port = free_port()
    env = {**nomad_agent.env()}
    checked = cli("check", "--scheduler", "nomad", "--timeout", "60", extra_env={
        **env, "HPC_SANDBOX_PORT_RANGE": f"{port}-{port}"})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for step in ("agent", "namespace", "raw_exec", "submit", "start", "reach", "token", "exec", "cancel"):
        assert any(line.startswith("ok ") and line.split()[1] == step for line in checked.stdout.splitlines()), \
            (step, checked.stdout)


def test_a_waiting_pool_asks_nomad_for_a_jobs_allocations_about_once_a_second(tmp_path, state_dir, set_env):
    from hpc_sandbox.errors import NoCapacity

    with NomadDouble(tmp_path, start_delay=30.0) as double:  # its allocation stays pending
        set_env(double.env())
        port = free_port()
        job = jobs.submit(spec_for(state_dir, port_range=f"{port}-{port}"))

        async def wait_three_seconds() -> None:
            async with connect.from_state_dir(state_dir, [job.id]) as pool:
                with pytest.raises(NoCapacity):
                    await pool.acquire(timeout=3)

        before = len(double.requests_to(f"/v1/job/{job.id}/allocations", "GET"))
        asyncio.run(wait_three_seconds())
        asked = len(double.requests_to(f"/v1/job/{job.id}/allocations", "GET")) - before
        assert 1 <= asked <= 6, asked  # one allocations call per job per look, a look a second at most
        job.cancel()


def test_an_agent_that_hangs_gives_a_timeout_line_not_a_hang(tmp_path, state_dir, set_env, monkeypatch):
    import hpc_sandbox.schedulers.nomad as nomad_scheduler

    monkeypatch.setattr(nomad_scheduler, "REQUEST_TIMEOUT", 1)
    with NomadDouble(tmp_path) as double:
        set_env(double.env())
        double.hang(10)
        started = time.monotonic()
        with pytest.raises(SchedulerError, match="cannot reach the agent") as failure:
            jobs.submit(spec_for(state_dir))
        assert failure.value.timed_out and time.monotonic() - started < 8
        assert not list((state_dir / "jobs").glob("*"))  # nothing half-made is left
