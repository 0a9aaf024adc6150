"""Nomad through its HTTP API (python-nomad 2.1): the rendered HCL is the job.

- submit: the job's secrets (token, TLS certificate and key) are written to the Nomad
  Variable `nomad/jobs/<job id>` first (a task may read its own job's Variables without
  any ACL policy; the template renders them into the task's secrets dir, nothing secret
  is in the job); then the agent parses the rendered HCL (/v1/jobs/parse), the parsed job
  is registered, and its evaluation read: a placement failure comes back as one line
  with Nomad's reasons, and the job and its Variable are removed again.
- status: the job and its allocations, one call each per job.
- servers: node servers are the job's running allocations, reached at their node's
  address and the job's static port. No shared filesystem is assumed.
- cancel: deregister (purge optional) and delete the Variable.

Where python-nomad 2.1 falls short, this module closes the gap: it reads NOMAD_CACERT
(python-nomad never does) and verifies TLS by default (python-nomad does not unless
given `verify=`), it passes the namespace on every Variables call (python-nomad applies
it to jobs and allocations only), and it sets the parsed job's namespace and region
(`jobs.parse` sends only the HCL).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SchedulerError
from ..jobfolder import JobFolder, JobInfo, ServerRecord
from ..jobspec import NOMAD_SECRET_FILES, render
from ..spec import SandboxSpec
from ..jobstate import JobState, JobStatus
from .base import Scheduler

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:4646"
REQUEST_TIMEOUT = 15  # seconds: a hung agent must not hang hpc-sandbox
EVALUATION_WAIT = 10.0  # seconds to wait for the first evaluation's verdict at submit
NODE_CACHE_SECONDS = 60.0  # node addresses change rarely: one nodes call a minute at most

# Allocation client states, ours.
_ALLOC_STATES = {"pending": JobState.PENDING, "running": JobState.RUNNING, "complete": JobState.DONE,
                 "failed": JobState.FAILED, "lost": JobState.FAILED, "unknown": JobState.UNKNOWN}


@dataclass(frozen=True)
class NomadConnection:
    """How to reach the Nomad agent: NOMAD_* variables as Nomad's own CLI reads them,
    overridden by the profile's nomad_* keys."""

    address: str = DEFAULT_ADDRESS
    token: str | None = field(default=None, repr=False)
    namespace: str = "default"
    region: str | None = None
    cacert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    skip_verify: bool = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "NomadConnection":
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "address": env.get("NOMAD_ADDR") or DEFAULT_ADDRESS,
            "token": env.get("NOMAD_TOKEN") or None,
            "namespace": env.get("NOMAD_NAMESPACE") or "default",
            "region": env.get("NOMAD_REGION") or None,
            "cacert": env.get("NOMAD_CACERT") or None,
            "client_cert": env.get("NOMAD_CLIENT_CERT") or None,
            "client_key": env.get("NOMAD_CLIENT_KEY") or None,
            "skip_verify": (env.get("NOMAD_SKIP_VERIFY") or "").lower() in ("1", "true", "yes"),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    @classmethod
    def for_spec(cls, spec: SandboxSpec) -> "NomadConnection":
        return cls.from_environment(address=spec.nomad_address, namespace=spec.account, region=spec.nomad_region,
                                    cacert=str(spec.nomad_cacert) if spec.nomad_cacert else None)

    @classmethod
    def for_job(cls, info: JobInfo) -> "NomadConnection":
        """The agent a job was submitted to (job.json); the token comes from NOMAD_TOKEN."""
        recorded = dict(info.scheduler_options)
        return cls.from_environment(**{k: recorded.get(k) for k in ("address", "namespace", "region", "cacert")})

    def recorded(self) -> dict[str, str]:
        """What job.json keeps of this connection: never the token."""
        return {k: v for k, v in (("address", self.address), ("namespace", self.namespace),
                                  ("region", self.region), ("cacert", self.cacert)) if v}

    def client(self) -> Any:
        import nomad  # python-nomad; loaded only for Nomad jobs

        if self.skip_verify:
            verify: bool | str = False
        else:
            verify = self.cacert or True  # python-nomad's default is no verification at all
        cert = (self.client_cert, self.client_key) if self.client_cert and self.client_key else ()
        return nomad.Nomad(address=self.address.rstrip("/"), token=self.token, namespace=self.namespace,
                           region=self.region, verify=verify, cert=cert, timeout=REQUEST_TIMEOUT)


def describe_error(exc: BaseException, doing: str) -> SchedulerError:
    """One line quoting Nomad, from a python-nomad exception."""
    response = getattr(exc, "nomad_resp", None)
    status = getattr(response, "status_code", None)
    text = getattr(response, "text", None)
    if text is not None:
        said = " ".join(text.strip().split())[:300] or f"HTTP {status}"
        if status == 403:
            said += " (is NOMAD_TOKEN set, and may it use this namespace?)"
        return SchedulerError(f"Nomad {doing} failed (HTTP {status}): {said}", returncode=status, said=said)
    cause = response if response is not None else exc
    timed_out = "timed out" in str(cause).lower() or "timeout" in type(cause).__name__.lower()
    return SchedulerError(f"Nomad {doing} failed: cannot reach the agent ({_first_line(cause)}); "
                          "check NOMAD_ADDR and that the agent runs", timed_out=timed_out)


def _first_line(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def placement_failure(evaluation: Mapping[str, Any]) -> str | None:
    """Nomad's reasons a task group could not be placed (FailedTGAllocs), in one line."""
    failed = evaluation.get("FailedTGAllocs") or {}
    parts = []
    for group, metric in failed.items():
        reasons = []
        for key, label in (("DimensionExhausted", "exhausted"), ("ConstraintFiltered", "filtered by"),
                           ("ClassExhausted", "class exhausted"), ("ClassFiltered", "class filtered")):
            for what, count in (metric.get(key) or {}).items():
                reasons.append(f"{label} {what} on {count} node{'s' if count != 1 else ''}")
        evaluated = metric.get("NodesEvaluated", 0)
        if not metric.get("NodesAvailable") and not evaluated:
            reasons.append("no node is available in the datacenters/node pool asked for")
        parts.append(f"group {group!r}: {evaluated} nodes evaluated; " + ("; ".join(reasons) or "no reason given"))
    return "; ".join(parts) or None


class NomadScheduler(Scheduler):
    name = "nomad"
    purges = True

    def __init__(self, state_dir, connection: NomadConnection | None = None) -> None:
        super().__init__(state_dir)
        self.connection = connection
        self._nodes: dict[str, dict[str, Any]] = {}
        self._nodes_at = float("-inf")

    def _client(self, info: JobInfo | None = None) -> Any:
        connection = self.connection or (NomadConnection.for_job(info) if info else NomadConnection.from_environment())
        return connection.client()

    # --- submit --------------------------------------------------------------------

    def submit(self, spec: SandboxSpec, folder: JobFolder) -> JobInfo:
        connection = self.connection or NomadConnection.for_spec(spec)
        client = connection.client()
        spec = spec.replace(scheduler=self.name)
        [part] = render(spec, self.name, job_key=folder.job_id)
        folder.submit_dir.mkdir(parents=True, exist_ok=True)
        (folder.submit_dir / part.name).write_text(part.text, encoding="utf-8")
        variable = f"nomad/jobs/{folder.job_id}"
        credentials = folder.credentials()
        items = {"token": credentials.token}
        if spec.tls:
            items.update(tls_cert=folder.tls_cert.read_text(encoding="utf-8"),
                         tls_key=folder.tls_key.read_text(encoding="utf-8"))
        assert set(items) <= {key for key, _ in NOMAD_SECRET_FILES}
        try:
            client.variable.create_variable(variable, {"Namespace": connection.namespace, "Path": variable,
                                                       "Items": items}, namespace=connection.namespace)
        except Exception as exc:
            raise describe_error(exc, f"writing the Variable {variable}") from None
        try:
            job = self._parse(client, part.text)
            job["Namespace"] = connection.namespace
            if connection.region:
                job["Region"] = connection.region
            try:
                answer = client.jobs.register_job({"Job": job})
            except Exception as exc:
                raise describe_error(exc, "job register") from None
            self._check_placement(client, folder.job_id, answer.get("EvalID"))
        except BaseException:
            self._remove(client, connection, folder.job_id, purge=True)
            raise
        log.info("submitted %s as Nomad job %s (evaluation %s)", part.name, folder.job_id, answer.get("EvalID"))
        return JobInfo(job_id=folder.job_id, scheduler=self.name, submitted_at=time.time(), servers=spec.servers,
                       slots_per_server=spec.slots, runtime=spec.runtime, scheduler_ids=(folder.job_id,),
                       image=spec.image, scheduler_options={**connection.recorded(), "port": str(spec.port_range[0]),
                                                            "tls": "true" if spec.tls else "false"})

    @staticmethod
    def _parse(client: Any, hcl: str) -> dict[str, Any]:
        try:
            return client.jobs.parse(hcl, canonicalize=True)
        except Exception as exc:
            raise describe_error(exc, "HCL parse (/v1/jobs/parse)") from None

    def _check_placement(self, client: Any, job_id: str, eval_id: str | None) -> None:
        """Wait briefly for the scheduler's verdict on the first evaluation; a job that
        cannot be placed anywhere fails its submit with Nomad's reasons."""
        if not eval_id:
            return
        deadline = time.monotonic() + EVALUATION_WAIT
        while True:
            try:
                # With the job's namespace: python-nomad leaves it off evaluation calls, and
                # Nomad then also checks read-job in `default`, which a token may lack.
                evaluation = client.evaluation.request(eval_id, method="get",
                                                       params={"namespace": client.evaluation.namespace}).json()
            except Exception as exc:
                raise describe_error(exc, f"reading evaluation {eval_id}") from None
            status = evaluation.get("Status")
            if status in ("complete", "failed", "canceled", "cancelled"):
                break
            if time.monotonic() > deadline:
                log.info("evaluation %s still %s after %.0fs; not waiting for it", eval_id, status, EVALUATION_WAIT)
                return
            time.sleep(0.2)
        reasons = placement_failure(evaluation)
        if status != "complete" or reasons:
            said = reasons or evaluation.get("StatusDescription") or status
            raise SchedulerError(f"Nomad cannot place job {job_id}: {said}", said=said)

    # --- state ---------------------------------------------------------------------

    def status(self, jobs: Sequence[JobInfo]) -> dict[str, JobStatus]:
        return {info.job_id: self._status(info) for info in jobs}

    def _status(self, info: JobInfo) -> JobStatus:
        client = self._client(info)
        try:
            job = client.job.get_job(info.job_id)
            allocations = client.job.get_allocations(info.job_id)
        except Exception as exc:
            if getattr(getattr(exc, "nomad_resp", None), "status_code", None) == 404:
                return JobStatus(info.job_id, JobState.CANCELLED, "not known to Nomad (stopped and purged)")
            raise describe_error(exc, f"status of job {info.job_id}") from None
        live = [a for a in allocations if a.get("DesiredStatus") == "run"]
        states = [_ALLOC_STATES.get(a.get("ClientStatus", ""), JobState.UNKNOWN) for a in live]
        if job.get("Stop") and not any(s in (JobState.RUNNING, JobState.PENDING) for s in states):
            return JobStatus(info.job_id, JobState.CANCELLED, "stopped")
        if JobState.RUNNING in states:
            lost = [a for a in live if a.get("ClientStatus") in ("lost", "failed")]
            detail = f"{states.count(JobState.RUNNING)} of {info.servers} allocations running"
            return JobStatus(info.job_id, JobState.RUNNING, detail + (f"; {_alloc_reason(lost[0])}" if lost else ""))
        if job.get("Status") == "pending" or JobState.PENDING in states or not allocations:
            return JobStatus(info.job_id, JobState.PENDING, _pending_reason(client, info.job_id))
        bad = [a for a in live if a.get("ClientStatus") in ("failed", "lost")]
        if bad:
            return JobStatus(info.job_id, JobState.FAILED, _alloc_reason(bad[-1]))
        if job.get("Status") == "dead":
            return JobStatus(info.job_id, JobState.DONE, "all allocations complete")
        return JobStatus(info.job_id, JobState.UNKNOWN, f"Nomad says {job.get('Status')}")

    def servers(self, info: JobInfo) -> list[ServerRecord]:
        """The job's node servers: its running allocations, at their node's address and
        the static port (one allocations call, and a nodes call a minute at most)."""
        client = self._client(info)
        try:
            allocations = client.job.get_allocations(info.job_id)
        except Exception as exc:
            if getattr(getattr(exc, "nomad_resp", None), "status_code", None) == 404:
                return []
            raise describe_error(exc, f"allocations of job {info.job_id}") from None
        running = [a for a in allocations if a.get("ClientStatus") == "running" and a.get("DesiredStatus") == "run"]
        if not running:
            return []
        nodes = self._node_addresses(client, {a.get("NodeID") for a in running})
        records = []
        port = int(info.scheduler_options.get("port", 0))
        tls = info.scheduler_options.get("tls", "true") == "true"
        for index, alloc in enumerate(sorted(running, key=lambda a: a.get("Name", ""))):
            address = nodes.get(alloc.get("NodeID", ""))
            if not address or not port:
                continue
            records.append(ServerRecord(job_id=info.job_id, host=address, port=port, slots=info.slots_per_server,
                                        pid=0, hostname=alloc.get("NodeName") or address, runtime=info.runtime,
                                        started_at=(alloc.get("CreateTime") or 0) / 1e9, task_index=index, tls=tls))
        return records

    def _node_addresses(self, client: Any, wanted: set[str]) -> dict[str, str]:
        if time.monotonic() - self._nodes_at > NODE_CACHE_SECONDS or not wanted <= set(self._nodes):
            try:
                self._nodes = {n["ID"]: n for n in client.nodes.get_nodes()}
            except Exception as exc:
                raise describe_error(exc, "listing nodes") from None
            self._nodes_at = time.monotonic()
        return {node_id: self._nodes[node_id].get("Address", "") for node_id in wanted if node_id in self._nodes}

    # --- cancel --------------------------------------------------------------------

    def cancel(self, job: JobInfo, purge: bool = False) -> None:
        connection = self.connection or NomadConnection.for_job(job)
        self._remove(connection.client(), connection, job.job_id, purge)

    def _remove(self, client: Any, connection: NomadConnection, job_id: str, purge: bool) -> None:
        problems = []
        try:
            client.job.deregister_job(job_id, purge=purge or None, namespace=connection.namespace)
        except Exception as exc:
            if getattr(getattr(exc, "nomad_resp", None), "status_code", None) != 404:
                problems.append(describe_error(exc, f"deregister of job {job_id}"))
        try:
            client.variable.delete_variable(f"nomad/jobs/{job_id}", namespace=connection.namespace)
        except Exception as exc:
            if getattr(getattr(exc, "nomad_resp", None), "status_code", None) != 404:
                problems.append(describe_error(exc, f"deleting the Variable nomad/jobs/{job_id}"))
        if problems:
            raise problems[0]


def _alloc_reason(alloc: Mapping[str, Any]) -> str:
    """An allocation's end, in Nomad's words: lost node, or its last task event."""
    if alloc.get("ClientStatus") == "lost":
        return f"allocation {str(alloc.get('ID', ''))[:8]} lost (its node {alloc.get('NodeName') or '?'} went down)"
    for task, state in (alloc.get("TaskStates") or {}).items():
        events = state.get("Events") or []
        if events:
            last = events[-1]
            said = last.get("DisplayMessage") or last.get("Message") or last.get("Type")
            return f"allocation {str(alloc.get('ID', ''))[:8]} {alloc.get('ClientStatus')}: task {task}: {said}"
    return f"allocation {str(alloc.get('ID', ''))[:8]} {alloc.get('ClientStatus')}"


def _pending_reason(client: Any, job_id: str) -> str:
    try:
        evaluations = client.job.get_evaluations(job_id)
    except Exception:
        return "pending"
    for evaluation in sorted(evaluations, key=lambda e: e.get("CreateIndex", 0), reverse=True):
        reasons = placement_failure(evaluation)
        if reasons:
            return f"cannot be placed yet: {reasons}"
    return "pending"


def agent_checks(connection: NomadConnection) -> list[tuple[str, bool, str]]:
    """What `hpc-sandbox check --scheduler nomad` proves before it submits: the agent
    answers with the token, the namespace exists, some node can run raw_exec."""
    client = connection.client()
    found: list[tuple[str, bool, str]] = []
    try:
        agent = client.agent.get_agent()
        member = agent.get("member") or agent.get("Member") or {}
        found.append(("agent", True, f"{connection.address} answers ({member.get('Name') or 'agent'}"
                                     f"{', token set' if connection.token else ', no NOMAD_TOKEN'})"))
    except Exception as exc:
        found.append(("agent", False, str(describe_error(exc, f"agent at {connection.address}"))))
        return found
    try:
        client.namespace.get_namespace(connection.namespace)
        found.append(("namespace", True, f"namespace {connection.namespace!r} exists"))
    except Exception as exc:
        found.append(("namespace", False, str(describe_error(exc, f"namespace {connection.namespace!r}"))))
        return found
    try:
        nodes = client.nodes.get_nodes()
    except Exception as exc:
        found.append(("raw_exec", False, str(describe_error(exc, "listing nodes"))))
        return found
    able = [n for n in nodes if n.get("Status") == "ready"
            and ((n.get("Drivers") or {}).get("raw_exec") or {}).get("Healthy")]
    if able:
        found.append(("raw_exec", True, f"{len(able)} of {len(nodes)} nodes ready with raw_exec"))
    else:
        found.append(("raw_exec", False, f"none of {len(nodes)} nodes is ready with a healthy raw_exec driver "
                                         "(enable it in the client config: plugin \"raw_exec\" { config { enabled = true } })"))
    return found
