"""Tests of the Nomad HTTP API double (tests/doubles/nomad_api.py) itself, through the real
python-nomad client over real HTTP(S) on loopback: the shapes hpc-sandbox's Nomad scheduler
reads, the failures the double plays, and the tasks it runs for real."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nomad as python_nomad
import pytest
from nomad.api import exceptions as nomad_errors

from doubles.nomad_api import NomadDouble, parse_job_hcl, render_template, TemplateMissing

REPO = Path(__file__).resolve().parent.parent
SECOND = 1_000_000_000


@pytest.fixture(autouse=True)
def no_nomad_env(monkeypatch):
    """python-nomad reads NOMAD_ADDR/TOKEN/NAMESPACE/REGION: none may leak into these tests."""
    for name in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION", "NOMAD_CACERT",
                 "NOMAD_CLIENT_CERT", "NOMAD_CLIENT_KEY", "NOMAD_SKIP_VERIFY"):
        monkeypatch.delenv(name, raising=False)


def render(tmp: Path, *args: str) -> str:
    """`hpc-sandbox render --scheduler nomad ARGS`, as a user runs it."""
    env = {**os.environ, "HPC_SANDBOX_STATE_DIR": str(tmp / "state")}
    done = subprocess.run([sys.executable, "-m", "hpc_sandbox", "render", "--scheduler", "nomad", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("render")
    return {"one": render(tmp, "--slots", "2"), "two": render(tmp, "--nodes", "2", "--slots", "2")}


def client(double: NomadDouble, **kwargs) -> python_nomad.Nomad:
    return python_nomad.Nomad(host="127.0.0.1", port=double.port, timeout=5, **kwargs)


def register_hcl(api: python_nomad.Nomad, hcl: str) -> dict:
    return api.jobs.register_job({"Job": api.jobs.parse(hcl)})


def test_parse_keeps_the_templates_static_port_resources_and_secret_templates(tmp_path, rendered):
    with NomadDouble(tmp_path) as double:
        job = client(double).jobs.parse(rendered["one"])
    assert (job["ID"], job["Name"], job["Type"], job["Datacenters"]) == ("hpc-sandbox", "hpc-sandbox", "batch", ["*"])
    group, = job["TaskGroups"]
    assert group["Name"] == "servers" and group["Count"] == 1
    assert {"LTarget": "", "RTarget": "true", "Operand": "distinct_hosts"} in group["Constraints"]
    assert {"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="} in group["Constraints"]
    network, = group["Networks"]
    assert network["ReservedPorts"] == [{"Label": "http", "Value": 9100, "To": 0, "HostNetwork": ""}]
    assert group["RestartPolicy"] == {"Attempts": 2, "Interval": 30 * 60 * SECOND, "Delay": 15 * SECOND,
                                      "Mode": "fail", "RenderTemplates": None}
    task, = group["Tasks"]
    assert task["Driver"] == "raw_exec" and task["KillSignal"] == "SIGTERM" and task["KillTimeout"] == 30 * SECOND
    assert (task["Resources"]["Cores"], task["Resources"]["MemoryMB"]) == (1, 1024)
    assert task["Config"]["command"] == "/usr/bin/timeout"
    assert task["Config"]["args"][-2:] == ["--host", "${NOMAD_IP_http}"]  # runtime interpolation kept
    templates = {t["DestPath"]: t for t in task["Templates"]}
    assert set(templates) == {"${NOMAD_SECRETS_DIR}/token", "${NOMAD_SECRETS_DIR}/tls.crt",
                              "${NOMAD_SECRETS_DIR}/tls.key"}
    token = templates["${NOMAD_SECRETS_DIR}/token"]
    # The heredoc as HCL reads it: indentation removed, a final newline.
    assert token["EmbeddedTmpl"] == '{{ with nomadVar "nomad/jobs/hpc-sandbox" }}{{ .token }}{{ end }}\n'
    assert token["Perms"] == "0600"
    recorded, = double.requests_to("/v1/jobs/parse")
    assert recorded.method == "POST" and recorded.json["JobHCL"] == rendered["one"]
    assert recorded.json["Canonicalize"] is False  # python-nomad 2.1.0 sends both keys


def test_every_shipped_nomad_example_converts_and_canonicalizes():
    for path in sorted((REPO / "jobspecs").glob("nomad-*.nomad.hcl")):
        job = parse_job_hcl(path.read_text(), canonicalize=True)
        group = job["TaskGroups"][0]
        task = group["Tasks"][0]
        assert job["Namespace"] == "default" and job["Priority"] == 50 and job["Region"] == "global", path
        assert group["Networks"][0]["ReservedPorts"][0]["Value"] == 9100, path
        assert task["Resources"]["Cores"] == 16 and task["Resources"]["CPU"] == 0, path
        assert all(t["ChangeMode"] == "restart" and t["Perms"] == "0600" for t in task["Templates"]), path
    service = parse_job_hcl((REPO / "jobspecs" / "nomad-service.nomad.hcl").read_text())
    assert service["NodePool"] == "sandbox-pool" and service["Type"] == "service"


def test_register_places_count_allocations_on_distinct_nodes_and_deregister_stops_them(tmp_path, rendered):
    with NomadDouble(tmp_path) as double:
        api = client(double)
        reply = register_hcl(api, rendered["two"])
        assert set(reply) >= {"EvalID", "EvalCreateIndex", "JobModifyIndex", "Warnings"}
        evaluation = api.evaluation.get_evaluation(reply["EvalID"])
        assert (evaluation["Status"], evaluation["TriggeredBy"], evaluation["FailedTGAllocs"]) == \
            ("complete", "job-register", None)
        assert [e["ID"] for e in api.job.get_evaluations("hpc-sandbox")] == [reply["EvalID"]]
        assert api.job.get_job("hpc-sandbox")["Status"] == "running"

        stubs = api.job.get_allocations("hpc-sandbox")
        assert sorted(a["Name"] for a in stubs) == ["hpc-sandbox.servers[0]", "hpc-sandbox.servers[1]"]
        assert sorted(a["NodeName"] for a in stubs) == ["node-1", "node-2"]
        assert {a["ClientStatus"] for a in stubs} == {"running"}
        assert all(a["TaskStates"]["serve"]["State"] == "running" for a in stubs)
        assert [e["Type"] for e in stubs[0]["TaskStates"]["serve"]["Events"]] == ["Received", "Task Setup", "Started"]

        alloc = api.allocation.get_allocation(stubs[0]["ID"])
        assert alloc["AllocatedResources"]["Shared"]["Ports"] == [
            {"Label": "http", "Value": 9100, "To": 0, "HostIP": "127.0.0.1"}]
        assert alloc["AllocatedResources"]["Shared"]["Networks"][0]["ReservedPorts"][0]["Value"] == 9100
        assert alloc["AllocatedResources"]["Tasks"]["serve"]["Memory"]["MemoryMB"] == 1024
        node = api.node.get_node(alloc["NodeID"])
        assert node["Attributes"]["unique.network.ip-address"] == "127.0.0.1"
        assert node["Drivers"]["raw_exec"]["Detected"] and node["Drivers"]["raw_exec"]["Healthy"]
        assert node["Status"] == "ready" and node["HTTPAddr"].startswith("127.0.0.1:")
        assert {n["Address"] for n in api.nodes.get_nodes()} == {"127.0.0.1"}
        assert api.job.get_summary("hpc-sandbox")["Summary"]["servers"]["Running"] == 2

        stopped = api.job.deregister_job("hpc-sandbox", purge=True)
        assert api.evaluation.get_evaluation(stopped["EvalID"])["TriggeredBy"] == "job-deregister"
        with pytest.raises(nomad_errors.URLNotFoundNomadException, match="job not found"):
            api.job.get_job("hpc-sandbox")
        assert {a["ClientStatus"] for a in double.allocs("hpc-sandbox")} == {"complete"}
        assert {a["DesiredStatus"] for a in double.allocs("hpc-sandbox")} == {"stop"}
        assert double.requests_to("/v1/job/hpc-sandbox", "DELETE")[0].query == {"purge": "True"}


def test_a_static_port_taken_on_every_node_fails_placement_until_it_frees(tmp_path, rendered):
    with NomadDouble(tmp_path) as double:
        api = client(double)
        blocker = api.jobs.parse(rendered["two"])
        blocker["ID"] = blocker["Name"] = "blocker"
        api.jobs.register_job({"Job": blocker})
        reply = register_hcl(api, rendered["one"])

        evaluation = api.evaluation.get_evaluation(reply["EvalID"])
        assert evaluation["Status"] == "complete" and evaluation["QueuedAllocations"] == {"servers": 1}
        metric = evaluation["FailedTGAllocs"]["servers"]
        assert (metric["NodesEvaluated"], metric["NodesFiltered"], metric["NodesExhausted"]) == (2, 0, 2)
        assert metric["DimensionExhausted"] == {"network: reserved port collision http=9100": 2}
        assert metric["NodesAvailable"] == {"dc1": 2} and metric["CoalescedFailures"] == 0
        blocked = api.evaluation.get_evaluation(evaluation["BlockedEval"])
        assert (blocked["Status"], blocked["TriggeredBy"], blocked["PreviousEval"]) == \
            ("blocked", "queued-allocs", reply["EvalID"])
        assert api.job.get_job("hpc-sandbox")["Status"] == "pending"
        assert api.job.get_allocations("hpc-sandbox") == []

        # The port frees: the blocked evaluation runs again and places the allocation.
        api.job.deregister_job("blocker")
        assert api.evaluation.get_evaluation(evaluation["BlockedEval"])["Status"] == "complete"
        assert [a["ClientStatus"] for a in api.job.get_allocations("hpc-sandbox")] == ["running"]
        assert api.job.get_job("hpc-sandbox")["Status"] == "running"


def test_nodes_without_raw_exec_or_failing_a_constraint_are_filtered(tmp_path, rendered):
    with NomadDouble(tmp_path) as double:
        api = client(double)
        double.alter_node("node-1", raw_exec=False)
        double.alter_node("node-2", attributes={"kernel.name": "darwin"})
        evaluation = api.evaluation.get_evaluation(register_hcl(api, rendered["one"])["EvalID"])
        metric = evaluation["FailedTGAllocs"]["servers"]
        assert (metric["NodesEvaluated"], metric["NodesFiltered"]) == (2, 2)
        assert metric["ConstraintFiltered"] == {"missing drivers": 1, "${attr.kernel.name} = linux": 1}
        assert api.node.get_node(double.node("node-1")["ID"])["Drivers"]["raw_exec"]["Detected"] is False

        # More servers than eligible nodes: distinct_hosts filters the rest, failures coalesce.
        api.job.deregister_job("hpc-sandbox")  # else its blocked evaluation takes the new room first
        double.alter_node("node-2", attributes={"kernel.name": "linux"})
        double.add_node("node-3")
        wide = api.jobs.parse(rendered["two"])
        wide["ID"], wide["TaskGroups"][0]["Count"] = "wide", 4
        evaluation = api.evaluation.get_evaluation(api.jobs.register_job({"Job": wide})["EvalID"])
        metric = evaluation["FailedTGAllocs"]["servers"]
        assert metric["CoalescedFailures"] == 1 and evaluation["QueuedAllocations"] == {"servers": 2}
        assert metric["ConstraintFiltered"] == {"missing drivers": 1, "distinct_hosts": 2}
        assert sorted(a["NodeName"] for a in api.job.get_allocations("wide")) == ["node-2", "node-3"]


def test_a_lost_node_loses_its_allocations(tmp_path, rendered):
    with NomadDouble(tmp_path) as double:
        api = client(double)
        register_hcl(api, rendered["two"])
        on_node_1 = next(a for a in api.job.get_allocations("hpc-sandbox") if a["NodeName"] == "node-1")
        double.lose_node("node-1")
        allocs = {a["NodeName"]: a for a in api.job.get_allocations("hpc-sandbox")}
        assert allocs["node-1"]["ClientStatus"] == "lost" and allocs["node-1"]["ID"] == on_node_1["ID"]
        assert allocs["node-1"]["DesiredDescription"] == "alloc is lost since its node is down"
        assert allocs["node-2"]["ClientStatus"] == "running"
        assert api.node.get_node(on_node_1["NodeID"])["Status"] == "down"
        assert "node-update" in [e["TriggeredBy"] for e in api.job.get_evaluations("hpc-sandbox")]


def test_a_failed_allocation_reports_its_last_task_event(tmp_path, rendered):
    with NomadDouble(tmp_path) as double:
        api = client(double)
        register_hcl(api, rendered["one"])
        alloc_id = api.job.get_allocations("hpc-sandbox")[0]["ID"]
        double.fail_alloc(alloc_id, "failed to launch command with executor: no such file")
        alloc = api.allocation.get_allocation(alloc_id)
        assert alloc["ClientStatus"] == "failed"
        state = alloc["TaskStates"]["serve"]
        assert state["State"] == "dead" and state["Failed"] is True
        last = state["Events"][-1]
        assert last["Type"] == "Driver Failure" and last["FailsTask"] is True
        assert last["DisplayMessage"] == "failed to launch command with executor: no such file"
        assert api.job.get_job("hpc-sandbox")["Status"] == "dead"


def test_variables_live_per_namespace_and_their_items_are_not_recorded(tmp_path):
    with NomadDouble(tmp_path, namespaces=["team-a"]) as double:
        api = client(double)
        body = {"Namespace": "team-a", "Path": "nomad/jobs/j1", "Items": {"token": "s3cret"}}
        created = api.variable.create_variable("nomad/jobs/j1", body, namespace="team-a")
        assert created["Items"] == {"token": "s3cret"} and created["ModifyIndex"] > 0
        assert api.variable.get_variable("nomad/jobs/j1", namespace="team-a")["Items"] == {"token": "s3cret"}
        with pytest.raises(nomad_errors.URLNotFoundNomadException, match="variable not found"):
            api.variable.get_variable("nomad/jobs/j1")  # python-nomad adds no namespace here
        listed = api.variables.get_variables(prefix="nomad/jobs", namespace="team-a")
        assert [v["Path"] for v in listed] == ["nomad/jobs/j1"] and "Items" not in listed[0]
        with pytest.raises(nomad_errors.VariableConflict):
            api.variable.create_variable("nomad/jobs/j1", body, namespace="team-a", cas=0)

        assert double.variables == {("team-a", "nomad/jobs/j1"): {"token": "s3cret"}}
        put, = double.requests_to("/v1/var/nomad/jobs/j1", "PUT")[:1]
        assert put.json["Items"] == {"token": "REDACTED"} and put.namespace == "team-a"
        assert "s3cret" not in json.dumps([r.json for r in double.requests])

        assert api.variable.delete_variable("nomad/jobs/j1", namespace="team-a").status_code == 204
        assert double.variables == {}


def test_jobs_live_per_namespace(tmp_path, rendered):
    with NomadDouble(tmp_path, namespaces=["team-a"]) as double:
        team = client(double, namespace="team-a")
        register_hcl(team, rendered["one"])
        assert team.job.get_job("hpc-sandbox")["Namespace"] == "team-a"
        assert double.requests_to("/v1/jobs", "POST")[-1].namespace == "team-a"
        with pytest.raises(nomad_errors.URLNotFoundNomadException):
            client(double).job.get_job("hpc-sandbox")
        assert client(double).jobs.get_jobs() == []
        assert [j["ID"] for j in client(double).jobs.get_jobs(namespace="*")] == ["hpc-sandbox"]
        assert client(double).namespace.get_namespace("team-a")["Name"] == "team-a"
        with pytest.raises(nomad_errors.URLNotFoundNomadException, match="Namespace not found"):
            client(double).namespace.get_namespace("nope")
        with pytest.raises(nomad_errors.BaseNomadException, match="nonexistent namespace"):
            register_hcl(client(double, namespace="nope"), rendered["one"])
        with pytest.raises(nomad_errors.BaseNomadException, match="No path to region"):
            client(double, region="mars").agent.get_agent()


def test_acl_token_required_on_every_call(tmp_path):
    with NomadDouble(tmp_path, acl_token="management-secret") as double:
        with pytest.raises(nomad_errors.URLNotAuthorizedNomadException, match="Permission denied"):
            client(double).agent.get_agent()
        with pytest.raises(nomad_errors.URLNotAuthorizedNomadException, match="ACL token not found"):
            client(double, token="wrong").jobs.get_jobs()
        api = client(double, token="management-secret")
        assert api.agent.get_agent()["config"]["ACL"]["Enabled"] is True
        assert api.variables.get_variables() == []
        assert client(double).status.leader.get_leader().endswith(":4647")  # needs no token, as in Nomad
        assert [r.status for r in double.requests] == [403, 403, 200, 200, 200]
        assert [r.token for r in double.requests[2:4]] == ["management-secret"] * 2


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_needs_the_doubles_ca(tmp_path):
    with NomadDouble(tmp_path, tls=True) as double:
        assert double.address.startswith("https://") and double.ca_file.exists()
        assert double.env()["NOMAD_CACERT"] == str(double.ca_file)
        assert client(double, secure=True, verify=str(double.ca_file)).agent.get_agent()["config"]["TLSConfig"][
            "EnableHTTP"] is True
        assert client(double, secure=True, verify=False).status.leader.get_leader()
        with pytest.raises(nomad_errors.BaseNomadException, match="CERTIFICATE_VERIFY_FAILED"):
            client(double, secure=True, verify=True).agent.get_agent()  # the system CAs do not know it
        with pytest.raises(nomad_errors.BaseNomadException):
            client(double).agent.get_agent()  # plain HTTP to a TLS agent


def test_tls_with_client_verification_needs_a_client_certificate(tmp_path):
    with NomadDouble(tmp_path, verify_client=True) as double:
        cert = (str(double.client_cert_file), str(double.client_key_file))
        assert client(double, secure=True, verify=str(double.ca_file), cert=cert).agent.get_agent()
        with pytest.raises(nomad_errors.BaseNomadException):
            client(double, secure=True, verify=str(double.ca_file)).agent.get_agent()


def test_hcl_errors_answer_400_with_the_parse_error(tmp_path, rendered):
    with NomadDouble(tmp_path) as double:
        api = client(double)
        broken = rendered["one"].replace('count = 1', 'count = ')
        with pytest.raises(nomad_errors.BadRequestNomadException) as caught:
            api.jobs.parse(broken)
        text = caught.value.nomad_resp.text
        assert caught.value.nomad_resp.status_code == 400
        assert text.startswith("error parsing: input.hcl:") and "Invalid syntax" in text
        with pytest.raises(nomad_errors.BadRequestNomadException, match='An argument named "walltime"'):
            api.jobs.parse(rendered["one"].replace('type = "batch"', 'type = "batch"\n  walltime = "1h"'))
        with pytest.raises(nomad_errors.BadRequestNomadException, match="Job spec is empty"):
            api.jobs.parse("")


def test_an_unresponsive_agent_and_server_errors(tmp_path):
    with NomadDouble(tmp_path) as double:
        double.hang(1.0)
        started = time.monotonic()
        with pytest.raises(nomad_errors.BaseNomadException):
            python_nomad.Nomad(host="127.0.0.1", port=double.port, timeout=0.3).agent.get_agent()
        assert time.monotonic() - started < 0.9
        double.hang(0)
        double.fail_requests(1, path="/v1/jobs")
        with pytest.raises(nomad_errors.BaseNomadException, match="No cluster leader"):
            client(double).jobs.get_jobs()
        assert client(double).jobs.get_jobs() == []
        assert [r.status for r in double.requests_to("/v1/jobs")] == [500, 200]


def test_placement_and_start_delays_and_blocking_queries(tmp_path, rendered):
    import requests

    with NomadDouble(tmp_path, placement_delay=0.2, start_delay=0.3) as double:
        api = client(double)
        reply = register_hcl(api, rendered["one"])
        assert api.evaluation.get_evaluation(reply["EvalID"])["Status"] == "pending"
        assert api.job.get_job("hpc-sandbox")["Status"] == "pending"
        url = f"{double.address}/v1/job/hpc-sandbox/allocations"
        index = int(requests.get(url, timeout=5).headers["X-Nomad-Index"])
        started = time.monotonic()
        # A blocking query returns when something changed past the index it names.
        blocked = requests.get(url, params={"index": index, "wait": "5s"}, timeout=10)
        assert 0.1 < time.monotonic() - started < 4 and int(blocked.headers["X-Nomad-Index"]) > index
        alloc = double.wait_for(lambda: api.job.get_allocations("hpc-sandbox"), what="the placement")[0]
        assert alloc["ClientStatus"] in ("pending", "running")
        double.wait_for(lambda: api.allocation.get_allocation(alloc["ID"])["ClientStatus"] == "running",
                        what="the allocation to start")
        assert api.evaluation.get_evaluation(reply["EvalID"])["Status"] == "complete"


def test_consul_template_subset():
    items = {"nomad/jobs/j": {"token": "t0k"}}
    read = items.get
    assert render_template('{{ with nomadVar "nomad/jobs/j" }}{{ .token }}{{ end }}\n', read, {}) == "t0k\n"
    assert render_template('{{- with nomadVar "nomad/jobs/j" -}}\n  {{ .nope }}\n{{- end }}', read, {}) == \
        "<no value>"
    assert render_template('{{ env "HOME" }}', read, {"HOME": "/h"}) == "/h"
    with pytest.raises(TemplateMissing):
        render_template('{{ with nomadVar "nomad/jobs/other" }}x{{ end }}', read, {})


TASK_JOB = """
job "runner" {
  type        = "batch"
  datacenters = ["*"]

  group "g" {
    count = 2

    network {
      port "http" {
        static = PORT
      }
    }

    task "t" {
      driver = "raw_exec"

      config {
        command = "PYTHON"
        args    = ["-c", "SCRIPT", "${NOMAD_SECRETS_DIR}/token", "${NOMAD_ADDR_http}"]
      }

      template {
        data        = <<-EOT
        {{ with nomadVar "nomad/jobs/runner" }}{{ .token }}{{ end }}
        EOT
        destination = "${NOMAD_SECRETS_DIR}/token"
        perms       = "0600"
      }

      kill_timeout = "1s"

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
"""

# The task: reports what it got (token file, address, NOMAD_* env), then ignores SIGTERM
# until killed, so the test sees the double's SIGKILL after kill_timeout.
TASK_SCRIPT = ("import json, os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "out = {'token': open(sys.argv[1]).read(), 'addr': sys.argv[2], "
               "'env': {k: v for k, v in os.environ.items() if k.startswith('NOMAD_')}}; "
               "open(os.path.join(os.environ['NOMAD_ALLOC_DIR'], 'report.json'), 'w').write(json.dumps(out)); "
               "print('ready', flush=True); time.sleep(60)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_run_tasks_renders_the_variable_into_secrets_and_runs_the_first_allocation(tmp_path):
    hcl = (TASK_JOB.replace("PORT", str(_free_port())).replace("PYTHON", sys.executable)
           .replace("SCRIPT", TASK_SCRIPT.replace('"', '\\"')))
    with NomadDouble(tmp_path, run_tasks=True) as double:
        api = client(double)
        register_hcl(api, hcl)
        first, second = sorted(api.job.get_allocations("runner"), key=lambda a: a["Name"])
        # No Variable yet: the template blocks, the task waits (as consul-template does).
        assert first["ClientStatus"] == "pending"
        assert first["TaskStates"]["t"]["Events"][-1]["DisplayMessage"] == \
            "Missing: nomad.var.block(nomad/jobs/runner@default.global)"
        assert second["ClientStatus"] == "running" and double.task_pid(second["ID"], "t") is None

        api.variable.create_variable("nomad/jobs/runner", {"Items": {"token": "tok-123"}})
        report_file = double.alloc_dir(first["ID"]) / "alloc" / "report.json"
        double.wait_for(report_file.exists, timeout=10, what="the task's report")
        double.wait_for(lambda: "ready" in double.task_log(first["ID"], "t"), what="the task's stdout")
        report = json.loads(report_file.read_text())
        assert report["token"] == "tok-123\n"
        secret = double.alloc_dir(first["ID"]) / "t" / "secrets" / "token"
        assert secret.stat().st_mode & 0o777 == 0o600
        assert report["env"]["NOMAD_SECRETS_DIR"] == str(secret.parent)
        assert report["addr"] == report["env"]["NOMAD_ADDR_http"] == f"127.0.0.1:{report['env']['NOMAD_PORT_http']}"
        assert report["env"]["NOMAD_ALLOC_INDEX"] == "0" and report["env"]["NOMAD_JOB_ID"] == "runner"
        assert api.allocation.get_allocation(first["ID"])["ClientStatus"] == "running"

        pid = double.task_pid(first["ID"], "t")
        started = time.monotonic()
        api.job.deregister_job("runner")
        double.wait_for(lambda: api.allocation.get_allocation(first["ID"])["ClientStatus"] == "complete",
                        timeout=10, what="the allocation to complete")
        assert 0.9 < time.monotonic() - started < 5  # SIGTERM ignored; SIGKILL after kill_timeout (1s)
        assert _gone(pid)
        events = [e["Type"] for e in api.allocation.get_allocation(first["ID"])["TaskStates"]["t"]["Events"]]
        assert events[-2:] == ["Killing", "Killed"]


def test_a_real_node_server_runs_under_the_double(tmp_path, monkeypatch):
    """The rendered hpc-sandbox job, run for real: the node server gets its token and TLS
    pair from the job's Variable and answers on the static port."""
    from hpc_sandbox.tls import make_self_signed, pinned_context

    # raw_exec tasks inherit the Nomad client's environment: here, this checkout importable.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    port = _free_port()
    config = tmp_path / "profiles.yaml"
    config.write_text(f"profiles:\n  t:\n    runtime: none\n    slots: 1\n    port_range: {port}-{port}\n")
    hcl = render(tmp_path, "--config", str(config), "--profile", "t", "--job-key", "dbl")
    cert, key = make_self_signed("dbl")
    with NomadDouble(tmp_path, run_tasks=True) as double:
        api = client(double)
        token = "node-token-0123456789abcdef"  # the node server wants at least 16 characters
        api.variable.create_variable("nomad/jobs/dbl", {"Items": {"token": token, "tls_cert": cert.decode(),
                                                                  "tls_key": key.decode()}})
        register_hcl(api, hcl)
        alloc, = api.job.get_allocations("dbl")
        request = urllib.request.Request(f"https://127.0.0.1:{port}/v1/slots",
                                         headers={"Authorization": f"Bearer {token}"})
        context = pinned_context(cert.decode())

        def answers() -> bool:
            if double.allocs("dbl")[0]["ClientStatus"] == "failed":
                pytest.fail(f"the node server failed: {double.task_log(alloc['ID'], 'serve', 'stderr')}")
            try:
                with urllib.request.urlopen(request, context=context, timeout=1) as response:
                    return response.status == 200
            except OSError:
                return False

        double.wait_for(answers, timeout=20, what=f"the node server on port {port}")
        pid = double.task_pid(alloc["ID"], "serve")
    assert _gone(pid)  # close() stopped the task and everything in its process group
