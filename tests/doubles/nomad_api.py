"""A DOUBLE of HashiCorp Nomad's HTTP API (the /v1 endpoints hpc-sandbox uses), for tests only.
It is not Nomad, and no Nomad code is in it.

No Nomad agent can be installed here, so the Nomad half of hpc-sandbox is tested against
this: a real aiohttp server on 127.0.0.1 (a free port, optionally HTTPS with a CA it makes),
run in a background thread with its own event loop, so blocking python-nomad calls from the
test thread and from subprocesses reach it like a real agent.

    with NomadDouble(tmp_path) as nomad:            # or NomadDouble(tmp_path, tls=True, acl_token="s3cret")
        client = nomad_sdk.Nomad(host="127.0.0.1", port=nomad.port, token=...)
        ... nomad.requests, nomad.variables, nomad.allocs("job"), nomad.lose_node("node-1") ...

Endpoints (bodies shaped like https://developer.hashicorp.com/nomad/api-docs; the JSON keys
are Nomad's):
  GET  /v1/agent/self, /v1/agent/members, /v1/status/leader, /v1/status/peers, /v1/regions
  GET  /v1/namespaces, /v1/namespace/:name; POST /v1/namespace[/:name]; DELETE /v1/namespace/:name
  POST /v1/jobs/parse {JobHCL, Canonicalize}   the HCL parsed for real (python-hcl2)
  POST /v1/jobs {Job} | POST /v1/job/:id {Job}  register + evaluation + placement
  GET  /v1/jobs, /v1/job/:id, /v1/job/:id/{evaluations,allocations,summary}
  DELETE /v1/job/:id [?purge=true]
  GET  /v1/evaluations, /v1/evaluation/:id, /v1/evaluation/:id/allocations
  GET  /v1/allocations, /v1/allocation/:id
  GET  /v1/nodes, /v1/node/:id, /v1/node/:id/allocations
  GET|PUT|DELETE /v1/var/:path [?cas=N], GET /v1/vars?prefix=
Every endpoint reads ?namespace= (default "default"; "*" lists all) and ?region= (another
region than the double's answers 500 "No path to region"); blocking queries (?index=&wait=)
are honoured. Errors are plain-text bodies with Nomad's status codes and wording ("job not
found", "Permission denied", "variable not found", ...). Every request is recorded in
`nomad.requests` (method, path, query, headers, JSON body, status) with Variable Items
values replaced by "REDACTED"; the Items themselves are only in `nomad.variables`.

Scheduling: a register runs a small placement over the double's nodes, in node-name order:
a node is evaluated when it is ready, eligible and in the job's datacenters and node pool;
it is filtered when a task's driver is not detected and healthy ("missing drivers"), a
constraint fails ("${attr.kernel.name} = linux"), a device is missing ("missing devices")
or distinct_hosts forbids it; it is exhausted when a static port is taken ("network:
reserved port collision http=9100"), or cores/memory/cpu run out. Unplaced allocations give
the evaluation FailedTGAllocs (AllocMetric fields), QueuedAllocations and a BlockedEval, as
Nomad does; the blocked evaluation is retried when capacity changes (an allocation ends, a
node is added or altered). Allocations go ClientStatus "pending" then "running" (at once, or
after `start_delay` seconds); `placement_delay` keeps the evaluation "pending" that long.

Running the tasks for real (run_tasks=True | "all"): raw_exec means "run this command as the
Nomad client's user", so the double does: per allocation a folder like a Nomad client's
(<alloc>/alloc, <alloc>/<task>/{local,secrets,tmp}, logs in alloc/logs/<task>.stdout.0),
the task's templates rendered first (just enough consul-template for `{{ with nomadVar
"PATH" }}{{ .KEY }}{{ end }}`, `{{ env "X" }}` and trim markers; a missing Variable keeps
the task pending and is retried, as consul-template blocks), then command + args with
${NOMAD_*}, ${attr.*}, ${node.*} interpolated, and the NOMAD_* environment (ALLOC_DIR,
TASK_DIR, SECRETS_DIR, ALLOC_ID, ALLOC_INDEX, JOB_ID, ..., and per port label IP/PORT/ADDR/
HOST_*). The process's exit becomes the allocation's end (0: complete, else failed).
Deregistering (or a lost node, a failed allocation, close()) sends the task's kill_signal to
its process group, then SIGKILL after kill_timeout capped at 5 s.

Constructor: NomadDouble(tmp_path, *, tls=False, verify_client=False, acl_token=None,
nodes=("node-1", "node-2"), run_tasks=False, start_delay=0.0, placement_delay=0.0,
region="global", datacenter="dc1", namespaces=()). Use it as a context manager (or
start()/close()). Attributes: address, host, port, region, datacenter, acl_token, ca_file,
client_cert_file/client_key_file (tls), requests, variables, state_dir; env() gives the
NOMAD_* variables a CLI subprocess needs (NOMAD_ADDR, NOMAD_TOKEN, NOMAD_CACERT, ...).
Controls: add_node(name, raw_exec=, ready=, eligible=, address=, datacenter=, node_pool=,
node_class=, attributes=, cores=, memory_mb=, devices={"nvidia/gpu": 2}, reserved_ports=),
alter_node(name, raw_exec=, ready=, eligible=, attributes=, reserved_ports=),
occupy_port(port, nodes=None), lose_node(name), fail_alloc(alloc_id, message,
event_type="Driver Failure"), finish_alloc(alloc_id, exit_code=0), hang(seconds),
fail_requests(times=1, status=500, message="No cluster leader", path=None, method=None),
clear_faults(), put_variable(path, items, namespace), add_namespace(name).
Inspection: requests_to(prefix, method), job(id, namespace), allocs(job_id, namespace),
evals(job_id), node(name), alloc_dir(alloc_id), task_log(alloc_id, task, stream),
task_pid(alloc_id, task), wait_for(predicate, timeout, what).

Where Nomad's rules matter to a client, the double keeps them: a registered job's namespace
is ?namespace=, else the request body's Namespace, else the job's own (so a job parsed with
Canonicalize=true carries "default"); a Variable written with a Namespace in its body lives
there, while reads and deletes use ?namespace= only; a re-registered unchanged job gets an
evaluation but no new allocations, a changed one replaces them; deregistering an unknown
job answers an empty success; DELETE /v1/var answers 204, a check-and-set conflict 409 with
the current variable.

Liberties (what a real Nomad would do differently):
- All the double's "nodes" are this machine (default node-1 and node-2, Address 127.0.0.1).
  Their static ports are therefore one loopback: with run_tasks=True only the first
  allocation of a group (index 0) runs its command; the others are placed and reported
  running without a process. run_tasks="all" runs every allocation (for jobs without
  colliding static ports).
- No restarts and no rescheduling: a failed, lost or finished allocation stays so; the
  restart and reschedule policies are kept in the job but not applied.
- The placement is deterministic (nodes in name order, no scoring, no preemption, no
  spread/affinity, no deployments); constraint operators: =, ==, is, !=, not, regexp,
  set_contains[_all|_any], is_set, is_not_set, distinct_hosts (version/semver and
  distinct_property always pass).
- HCL: python-hcl2 parses the text (a syntax error answers 400 "error parsing:
  input.hcl:LINE,COL: ..."; real Nomad answers the bare HCL diagnostic); the known blocks
  are converted to Nomad's JSON field names with Go durations in nanoseconds; unknown
  arguments or blocks are rejected like Nomad's decoder does; rarely used blocks (update,
  service, affinity, ...) are converted generically (CamelCase keys, values as written).
  ${...} expressions are kept as strings (as Nomad keeps runtime interpolations); HCL
  `variable`/`locals` and functions are not evaluated.
- Variables are plain in memory (no encryption, no locks); path rules are checked loosely.
- Periodic and parameterized jobs are placed like plain ones (no dispatch, no cron).
- ACL: one management token (`acl_token`); no policies. status/leader and status/peers need
  no token, like Nomad's.
- Evaluations/allocations by ID are found whatever ?namespace= says (Nomad looks them up
  by ID too); job lookups are per namespace. Writes into a namespace that does not exist
  answer 500 with Nomad's "nonexistent namespace" wording.
"""
from __future__ import annotations

import asyncio
import copy
import datetime
import fnmatch
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import hcl2
from aiohttp import web

log = logging.getLogger(__name__)

NOMAD_VERSION = "1.8.4"  # the version the double says it is (agent/self, node attributes)
SECOND = 1_000_000_000  # Go time.Duration is in nanoseconds
ZERO_TIME = "0001-01-01T00:00:00Z"  # Go's zero time.Time, as Nomad serialises unset times
KILL_TIMEOUT_CAP = 5.0  # the double never waits longer than this before SIGKILL
DYNAMIC_PORTS = range(20000, 32000)  # Nomad's default dynamic port range


# ---------------------------------------------------------------------------------------
# small helpers


def _now_ns() -> int:
    return time.time_ns()


def _rfc3339(ns: int | None = None) -> str:
    if ns is None:
        ns = _now_ns()
    when = datetime.datetime.fromtimestamp(ns / SECOND, tz=datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    return str(uuid.uuid4())


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": SECOND, "m": 60 * SECOND,
            "h": 3600 * SECOND}


def go_duration_ns(value: Any, what: str = "duration") -> int:
    """A Go duration string ("30s", "1h30m", "500ms") in nanoseconds, as Nomad's decoder
    turns HCL durations into time.Duration. A bare number is taken as nanoseconds."""
    if isinstance(value, bool):
        raise HCLError(f"input.hcl: Unsuitable value type; {what}: a duration is required")
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body == "0":
        return 0
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(body):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_NS[match.group(2)]
        pos = match.end()
    if pos != len(body) or not body:
        raise HCLError(f'input.hcl: Invalid duration; {what}: time: invalid duration "{text}"')
    return sign * int(total)


def _go_duration_text(ns: int) -> str:
    """Nanoseconds as Go prints a time.Duration ("30m0s"), for Nomad-worded messages."""
    seconds = ns // SECOND
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# ---------------------------------------------------------------------------------------
# HCL job file -> Nomad's JSON job (what POST /v1/jobs/parse answers)


class HCLError(Exception):
    """A job file Nomad's parser would reject; the text is the 400 body."""


# python-hcl2 options: quotes stripped (plain values), heredocs kept as written so that we
# can apply HCL's own heredoc rules (hcl2's conversion leaves \" escapes and drops the
# final newline), no comments, explicit block markers (to tell blocks from objects).
_HCL_OPTIONS = hcl2.SerializationOptions(with_comments=False, with_meta=False, explicit_blocks=True,
                                         preserve_heredocs=True, strip_string_quotes=True)
_META_KEYS = frozenset({"__is_block__", "__comments__", "__inline_comments__", "__start_line__",
                        "__end_line__"})
_HEREDOC_START = re.compile(r"<<(-?)([A-Za-z_][A-Za-z0-9_-]*)\n")

# What Nomad's decoder accepts in each block this double converts (attributes, blocks).
# A name outside these answers "Unsupported argument"/"Unsupported block type", as Nomad
# does, so that a template change that breaks the job file shows up in the tests.
_SCHEMA: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "job": (frozenset({"name", "type", "datacenters", "namespace", "node_pool", "region", "priority",
                       "all_at_once", "consul_token", "vault_token", "meta"}),
            frozenset({"group", "constraint", "affinity", "spread", "meta", "update", "periodic",
                       "parameterized", "multiregion", "reschedule", "migrate", "vault", "consul",
                       "ui"})),
    "group": (frozenset({"count", "shutdown_delay", "stop_after_client_disconnect",
                         "max_client_disconnect", "prevent_reschedule_on_lost", "meta"}),
              frozenset({"task", "constraint", "affinity", "spread", "network", "restart", "reschedule",
                         "ephemeral_disk", "update", "migrate", "meta", "service", "volume", "scaling",
                         "consul", "vault", "disconnect"})),
    "network": (frozenset({"mode", "hostname", "mbits"}), frozenset({"port", "dns"})),
    "port": (frozenset({"static", "to", "host_network"}), frozenset()),
    "restart": (frozenset({"attempts", "interval", "delay", "mode", "render_templates"}), frozenset()),
    "task": (frozenset({"driver", "user", "kill_timeout", "kill_signal", "leader", "kind",
                        "shutdown_delay", "meta", "env"}),
             frozenset({"config", "template", "resources", "env", "meta", "constraint", "affinity",
                        "artifact", "logs", "lifecycle", "restart", "service", "vault", "consul",
                        "volume_mount", "dispatch_payload", "identity", "scaling", "csi_plugin",
                        "action", "schedule"})),
    "resources": (frozenset({"cpu", "cores", "memory", "memory_max", "disk", "iops", "secrets"}),
                  frozenset({"device", "network", "numa"})),
    "device": (frozenset({"count"}), frozenset({"constraint", "affinity"})),
    "template": (frozenset({"data", "destination", "source", "perms", "uid", "gid", "change_mode",
                            "change_signal", "splay", "left_delimiter", "right_delimiter", "env",
                            "error_on_missing_key", "vault_grace", "once"}),
                 frozenset({"wait", "change_script"})),
    "constraint": (frozenset({"attribute", "operator", "value", "distinct_hosts", "distinct_property",
                              "regexp", "version", "semver", "set_contains", "set_contains_all",
                              "set_contains_any"}), frozenset()),
    "logs": (frozenset({"max_files", "max_file_size", "disabled", "enabled"}), frozenset()),
}
_LABELS = {"job": 1, "group": 1, "task": 1, "port": 1, "device": 1}


@dataclass
class _Block:
    """One HCL block: its labels, attributes and nested blocks (by type, in order)."""

    kind: str
    labels: list[str]
    attrs: dict[str, Any]
    blocks: dict[str, list["_Block"]]

    def one(self, kind: str) -> "_Block | None":
        found = self.blocks.get(kind, [])
        if len(found) > 1:
            raise HCLError(f'input.hcl: Duplicate {kind} block; Only one block of type "{kind}" '
                           f"is allowed in a {self.kind} block.")
        return found[0] if found else None

    def all(self, kind: str) -> list["_Block"]:
        return self.blocks.get(kind, [])


def _heredoc(text: str) -> str | None:
    """HCL heredoc semantics on hcl2's verbatim heredoc: the lines between the markers,
    with a final newline; <<- removes the smallest indentation of the non-blank lines."""
    match = _HEREDOC_START.match(text)
    if not match:
        return None
    lines = text[match.end():].split("\n")
    if not lines or lines[-1].strip() != match.group(2):
        return None
    content = lines[:-1]
    if match.group(1):
        indents = [len(line) - len(line.lstrip(" \t")) for line in content if line.strip()]
        cut = min(indents, default=0)
        content = [line[cut:] for line in content]
    return "".join(line + "\n" for line in content)


def _value(value: Any) -> Any:
    """hcl2's attribute value -> the value Nomad's decoder sees (strings unescaped)."""
    if isinstance(value, str):
        doc = _heredoc(value)
        if doc is not None:
            return doc
        # $${ and %%{ are HCL's escapes for a literal ${ and %{.
        return value.replace("$${", "${").replace("%%{", "%{")
    if isinstance(value, list):
        return [_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _value(item) for key, item in value.items() if key not in _META_KEYS}
    return value


def _is_block_entry(entry: Any) -> bool:
    # hcl2 gives a labelled block as {label: {label2: body}}; the body has __is_block__.
    while isinstance(entry, dict):
        if entry.get("__is_block__"):
            return True
        if len(entry) != 1:
            return False
        entry = next(iter(entry.values()))
    return False


def _to_block(kind: str, entry: dict) -> _Block:
    labels: list[str] = []
    node = entry
    while not node.get("__is_block__"):
        label, node = next(iter(node.items()))
        labels.append(label)
    want = _LABELS.get(kind, 0)
    if len(labels) < want:
        raise HCLError(f"input.hcl: Missing name for {kind}; All {kind} blocks must have {want} label (name).")
    if len(labels) > want and kind in _SCHEMA:
        raise HCLError(f"input.hcl: Extraneous label for {kind}; Only {want} label(s) expected.")
    attrs: dict[str, Any] = {}
    blocks: dict[str, list[_Block]] = {}
    for key, value in node.items():
        if key in _META_KEYS:
            continue
        if isinstance(value, list) and value and all(_is_block_entry(item) for item in value):
            blocks[key] = [_to_block(key, item) for item in value]
        else:
            attrs[key] = _value(value)
    schema = _SCHEMA.get(kind)
    if schema is not None:
        for key in attrs:
            if key not in schema[0]:
                hint = " Did you mean to define a block of this type?" if key in schema[1] else ""
                raise HCLError(f'input.hcl: Unsupported argument; An argument named "{key}" is not '
                               f"expected here.{hint}")
        for key in blocks:
            if key not in schema[1]:
                raise HCLError(f'input.hcl: Unsupported block type; Blocks of type "{key}" are not '
                               f"expected here.")
    return _Block(kind, labels, attrs, blocks)


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _generic(block: _Block) -> dict[str, Any]:
    """A block the double does not model, in Nomad's key style (CamelCase), values as written."""
    out: dict[str, Any] = {_camel(key): value for key, value in block.attrs.items()}
    for kind, items in block.blocks.items():
        out[_camel(kind)] = [dict(_generic(item), **({"Name": item.labels[0]} if item.labels else {}))
                             for item in items]
    return out


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)  # HCL converts a numeric string where a number is wanted
        raise HCLError(f"input.hcl: Unsuitable value type; Unsuitable value for {what}: a number is "
                       f"required")
    return int(value)


def _str(value: Any, what: str) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise HCLError(f"input.hcl: Unsuitable value type; Unsuitable value for {what}: a string is "
                       f"required")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    raise HCLError(f"input.hcl: Unsuitable value type; Unsuitable value for {what}: a bool is required")


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list):
        raise HCLError(f"input.hcl: Unsuitable value type; Unsuitable value for {what}: a list of "
                       f"string is required")
    return [_str(item, what) for item in value]


def _string_map(block_or_value: Any, what: str) -> dict[str, str]:
    attrs = block_or_value.attrs if isinstance(block_or_value, _Block) else block_or_value
    if not isinstance(attrs, dict):
        raise HCLError(f"input.hcl: Unsuitable value type; Unsuitable value for {what}: a map of "
                       f"string is required")
    return {str(key): _str(value, f"{what}.{key}") for key, value in attrs.items()}


def _meta(block: _Block) -> dict[str, str] | None:
    meta: dict[str, str] = {}
    if "meta" in block.attrs:
        meta.update(_string_map(block.attrs["meta"], "meta"))
    for item in block.all("meta"):
        meta.update(_string_map(item, "meta"))
    return meta or None


_CONSTRAINT_SHORTHANDS = ("distinct_hosts", "distinct_property", "regexp", "version", "semver",
                          "set_contains", "set_contains_all", "set_contains_any")


def _constraints(block: _Block) -> list[dict[str, Any]] | None:
    out = []
    for item in block.all("constraint"):
        attrs = item.attrs
        ltarget = _str(attrs.get("attribute", ""), "attribute")
        rtarget = _str(attrs.get("value", ""), "value")
        operand = _str(attrs.get("operator", ""), "operator")
        for short in _CONSTRAINT_SHORTHANDS:
            if short in attrs:
                # The shorthand forms: `distinct_hosts = true`, `regexp = "..."`, ...
                operand = short
                if short == "distinct_hosts":
                    rtarget = "true" if _bool(attrs[short], short) else "false"
                elif short == "distinct_property":
                    ltarget = _str(attrs[short], short)
                else:
                    rtarget = _str(attrs[short], short)
        out.append({"LTarget": ltarget, "RTarget": rtarget, "Operand": operand or "="})
    return out or None


def _restart(block: _Block | None) -> dict[str, Any] | None:
    if block is None:
        return None
    attrs = block.attrs
    return {
        "Attempts": _int(attrs["attempts"], "attempts") if "attempts" in attrs else None,
        "Interval": go_duration_ns(attrs["interval"], "interval") if "interval" in attrs else None,
        "Delay": go_duration_ns(attrs["delay"], "delay") if "delay" in attrs else None,
        "Mode": _str(attrs["mode"], "mode") if "mode" in attrs else None,
        "RenderTemplates": _bool(attrs["render_templates"], "render_templates")
        if "render_templates" in attrs else None,
    }


def _port(item: _Block) -> dict[str, Any]:
    return {"Label": item.labels[0], "Value": _int(item.attrs.get("static", 0), "static"),
            "To": _int(item.attrs.get("to", 0), "to"),
            "HostNetwork": _str(item.attrs.get("host_network", ""), "host_network")}


def _networks(block: _Block) -> list[dict[str, Any]] | None:
    out = []
    for net in block.all("network"):
        reserved, dynamic = [], []
        for item in net.all("port"):
            (reserved if "static" in item.attrs else dynamic).append(_port(item))
        dns = net.one("dns")
        out.append({
            "Mode": _str(net.attrs.get("mode", ""), "mode"),
            "Device": "", "CIDR": "", "IP": "",
            "Hostname": _str(net.attrs.get("hostname", ""), "hostname"),
            "MBits": _int(net.attrs["mbits"], "mbits") if "mbits" in net.attrs else None,
            "DNS": _generic(dns) if dns else None,
            "ReservedPorts": reserved or None,
            "DynamicPorts": dynamic or None,
        })
    return out or None


def _resources(block: _Block | None) -> dict[str, Any] | None:
    if block is None:
        return None
    attrs = block.attrs
    devices = [{"Name": item.labels[0],
                "Count": _int(item.attrs["count"], "count") if "count" in item.attrs else None,
                "Constraints": _constraints(item), "Affinities": None}
               for item in block.all("device")]
    return {
        "CPU": _int(attrs["cpu"], "cpu") if "cpu" in attrs else None,
        "Cores": _int(attrs["cores"], "cores") if "cores" in attrs else None,
        "MemoryMB": _int(attrs["memory"], "memory") if "memory" in attrs else None,
        "MemoryMaxMB": _int(attrs["memory_max"], "memory_max") if "memory_max" in attrs else None,
        "DiskMB": _int(attrs["disk"], "disk") if "disk" in attrs else None,
        "Networks": _networks(block),
        "Devices": devices or None,
        "IOPS": _int(attrs["iops"], "iops") if "iops" in attrs else None,
        "SecretsMB": _int(attrs["secrets"], "secrets") if "secrets" in attrs else None,
        "NUMA": _generic(block.one("numa")) if block.one("numa") else None,
    }


def _template(item: _Block) -> dict[str, Any]:
    attrs = item.attrs
    text = (lambda key: _str(attrs[key], key) if key in attrs else None)
    return {
        "SourcePath": text("source"),
        "DestPath": text("destination"),
        "EmbeddedTmpl": text("data"),
        "ChangeMode": text("change_mode"),
        "ChangeScript": _generic(item.one("change_script")) if item.one("change_script") else None,
        "ChangeSignal": text("change_signal"),
        "Splay": go_duration_ns(attrs["splay"], "splay") if "splay" in attrs else None,
        "Perms": text("perms"),
        "Uid": _int(attrs["uid"], "uid") if "uid" in attrs else None,
        "Gid": _int(attrs["gid"], "gid") if "gid" in attrs else None,
        "LeftDelim": text("left_delimiter"),
        "RightDelim": text("right_delimiter"),
        "Envvars": _bool(attrs["env"], "env") if "env" in attrs else None,
        "VaultGrace": go_duration_ns(attrs["vault_grace"], "vault_grace") if "vault_grace" in attrs else None,
        "Wait": _generic(item.one("wait")) if item.one("wait") else None,
        "ErrMissingKey": _bool(attrs["error_on_missing_key"], "error_on_missing_key")
        if "error_on_missing_key" in attrs else None,
        "Once": _bool(attrs["once"], "once") if "once" in attrs else None,
    }


def _config(block: _Block | None) -> dict[str, Any] | None:
    """A driver's config block: free-form for the decoder (each driver checks its own)."""
    if block is None:
        return None
    out: dict[str, Any] = dict(block.attrs)
    for kind, items in block.blocks.items():
        out[kind] = [_config(item) for item in items]
    return out


def _task(item: _Block) -> dict[str, Any]:
    attrs = item.attrs
    env: dict[str, str] = {}
    if "env" in attrs:
        env.update(_string_map(attrs["env"], "env"))
    for block in item.all("env"):
        env.update(_string_map(block, "env"))
    logs = item.one("logs")
    identity = item.all("identity")
    return {
        "Name": item.labels[0],
        "Driver": _str(attrs["driver"], "driver") if "driver" in attrs else "",
        "User": _str(attrs.get("user", ""), "user"),
        "Lifecycle": _generic(item.one("lifecycle")) if item.one("lifecycle") else None,
        "Config": _config(item.one("config")),
        "Constraints": _constraints(item),
        "Affinities": [_generic(a) for a in item.all("affinity")] or None,
        "Env": env or None,
        "Services": [_generic(s) for s in item.all("service")] or None,
        "Resources": _resources(item.one("resources")),
        "RestartPolicy": _restart(item.one("restart")),
        "Meta": _meta(item),
        "KillTimeout": go_duration_ns(attrs["kill_timeout"], "kill_timeout") if "kill_timeout" in attrs else None,
        "LogConfig": ({"MaxFiles": _int(logs.attrs["max_files"], "max_files") if "max_files" in logs.attrs else None,
                       "MaxFileSizeMB": _int(logs.attrs["max_file_size"], "max_file_size")
                       if "max_file_size" in logs.attrs else None,
                       "Disabled": _bool(logs.attrs["disabled"], "disabled") if "disabled" in logs.attrs else None}
                      if logs else None),
        "Artifacts": [_generic(a) for a in item.all("artifact")] or None,
        "Vault": _generic(item.one("vault")) if item.one("vault") else None,
        "Consul": _generic(item.one("consul")) if item.one("consul") else None,
        "Templates": [_template(t) for t in item.all("template")] or None,
        "DispatchPayload": _generic(item.one("dispatch_payload")) if item.one("dispatch_payload") else None,
        "VolumeMounts": [_generic(v) for v in item.all("volume_mount")] or None,
        "Leader": _bool(attrs.get("leader", False), "leader"),
        "ShutdownDelay": go_duration_ns(attrs.get("shutdown_delay", 0), "shutdown_delay"),
        "KillSignal": _str(attrs.get("kill_signal", ""), "kill_signal"),
        "Kind": _str(attrs.get("kind", ""), "kind"),
        "ScalingPolicies": [_generic(s) for s in item.all("scaling")] or None,
        # The workload identity block: Env/File say whether the token reaches the task.
        "Identity": _generic(identity[0]) if len(identity) == 1 and not identity[0].labels else None,
        "Identities": [_generic(i) for i in identity if i.labels] or None,
    }


def _group(item: _Block) -> dict[str, Any]:
    attrs = item.attrs
    disk = item.one("ephemeral_disk")
    tasks = [_task(task) for task in item.all("task")]
    return {
        "Name": item.labels[0],
        "Count": _int(attrs["count"], "count") if "count" in attrs else None,
        "Constraints": _constraints(item),
        "Affinities": [_generic(a) for a in item.all("affinity")] or None,
        "Tasks": tasks or None,
        "Spreads": [_generic(s) for s in item.all("spread")] or None,
        "Volumes": {v.labels[0] if v.labels else str(i): _generic(v) for i, v in enumerate(item.all("volume"))}
        or None,
        "RestartPolicy": _restart(item.one("restart")),
        "ReschedulePolicy": _generic(item.one("reschedule")) if item.one("reschedule") else None,
        "EphemeralDisk": ({"Sticky": disk.attrs.get("sticky"), "Migrate": disk.attrs.get("migrate"),
                           "SizeMB": disk.attrs.get("size")} if disk else None),
        "Update": _generic(item.one("update")) if item.one("update") else None,
        "Migrate": _generic(item.one("migrate")) if item.one("migrate") else None,
        "Networks": _networks(item),
        "Meta": _meta(item),
        "Services": [_generic(s) for s in item.all("service")] or None,
        "ShutdownDelay": go_duration_ns(attrs["shutdown_delay"], "shutdown_delay")
        if "shutdown_delay" in attrs else None,
        "Scaling": _generic(item.one("scaling")) if item.one("scaling") else None,
        "Consul": _generic(item.one("consul")) if item.one("consul") else None,
    }


def _syntax_error(exc: Exception) -> HCLError:
    line = getattr(exc, "line", None)
    column = getattr(exc, "column", None)
    where = f"input.hcl:{line},{column}" if isinstance(line, int) and line > 0 else "input.hcl"
    summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return HCLError(f"error parsing: {where}: Invalid syntax; {summary}")


def parse_job_hcl(text: str, canonicalize: bool = False) -> dict[str, Any]:
    """The JSON job (api.Job's field names) that Nomad's /v1/jobs/parse gives for `text`.
    Raises HCLError with the 400 body."""
    try:
        tree = hcl2.loads(text, serialization_options=_HCL_OPTIONS)
    except Exception as exc:  # lark's errors carry line/column; anything else is a syntax error too
        raise _syntax_error(exc) from None
    if not isinstance(tree, dict):
        raise HCLError("error parsing: input.hcl: Invalid syntax; not a job file")
    root = _to_block("file", {**tree, "__is_block__": True})
    for key in root.attrs:
        raise HCLError(f'input.hcl: Unsupported argument; An argument named "{key}" is not expected here.')
    for key in root.blocks:
        if key not in ("job", "variable", "variables", "locals"):
            raise HCLError(f'input.hcl: Unsupported block type; Blocks of type "{key}" are not expected here.')
        if key != "job":
            log.warning("nomad double: HCL %s blocks are not evaluated", key)
    jobs = root.all("job")
    if len(jobs) != 1:
        raise HCLError('input.hcl: Missing job block; A job block is required' if not jobs else
                       'input.hcl: Duplicate job block; Only one block of type "job" is allowed.')
    item = jobs[0]
    attrs = item.attrs
    job_id = item.labels[0]
    opt = (lambda key, conv: conv(attrs[key], key) if key in attrs else None)
    job: dict[str, Any] = {
        "Region": opt("region", _str),
        "Namespace": opt("namespace", _str),
        "ID": job_id,
        # Nomad's HCL2 parser names the job after its label when `name` is not given.
        "Name": opt("name", _str) or job_id,
        "Type": opt("type", _str),
        "Priority": opt("priority", _int),
        "AllAtOnce": opt("all_at_once", _bool),
        "Datacenters": opt("datacenters", _str_list),
        "NodePool": opt("node_pool", _str),
        "Constraints": _constraints(item),
        "Affinities": [_generic(a) for a in item.all("affinity")] or None,
        "TaskGroups": [_group(group) for group in item.all("group")] or None,
        "Update": _generic(item.one("update")) if item.one("update") else None,
        "Multiregion": _generic(item.one("multiregion")) if item.one("multiregion") else None,
        "Spreads": [_generic(s) for s in item.all("spread")] or None,
        "Periodic": _generic(item.one("periodic")) if item.one("periodic") else None,
        "ParameterizedJob": _generic(item.one("parameterized")) if item.one("parameterized") else None,
        "Reschedule": _generic(item.one("reschedule")) if item.one("reschedule") else None,
        "Migrate": _generic(item.one("migrate")) if item.one("migrate") else None,
        "Meta": _meta(item),
        "ConsulToken": opt("consul_token", _str),
        "VaultToken": opt("vault_token", _str),
        "UI": _generic(item.one("ui")) if item.one("ui") else None,
        "Stop": None, "ParentID": None, "Dispatched": False, "DispatchIdempotencyToken": None,
        "Payload": None, "ConsulNamespace": None, "VaultNamespace": None, "NomadTokenID": None,
        "Status": None, "StatusDescription": None, "Stable": None, "Version": None,
        "SubmitTime": None, "CreateIndex": None, "ModifyIndex": None, "JobModifyIndex": None,
    }
    return canonicalize_job(job) if canonicalize else job


def _fill(target: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, value in defaults.items():
        if target.get(key) is None:
            target[key] = copy.deepcopy(value)


def canonicalize_job(job: dict[str, Any]) -> dict[str, Any]:
    """Nomad's api.Job.Canonicalize: unset fields get their defaults (a copy is returned)."""
    job = copy.deepcopy(job)
    _fill(job, {"ID": "", "Region": "global", "Namespace": "default", "Type": "service", "Priority": 50,
                "AllAtOnce": False, "Datacenters": ["*"], "ConsulToken": "", "VaultToken": "",
                "ConsulNamespace": "", "VaultNamespace": "", "NomadTokenID": "", "Stop": False,
                "ParentID": "", "Dispatched": False, "DispatchIdempotencyToken": "", "Status": "",
                "StatusDescription": "", "Stable": False, "Version": 0, "CreateIndex": 0,
                "ModifyIndex": 0, "JobModifyIndex": 0})
    if not job.get("Name"):
        job["Name"] = job["ID"]
    batch = job["Type"] in ("batch", "sysbatch")
    restart_default = ({"Attempts": 3, "Interval": 24 * 3600 * SECOND, "Delay": 15 * SECOND, "Mode": "fail"}
                       if batch else
                       {"Attempts": 2, "Interval": 30 * 60 * SECOND, "Delay": 15 * SECOND, "Mode": "fail"})
    reschedule_default = ({"Attempts": 1, "Interval": 24 * 3600 * SECOND, "Delay": 5 * SECOND,
                           "DelayFunction": "constant", "MaxDelay": 0, "Unlimited": False}
                          if batch else
                          {"Attempts": 0, "Interval": 0, "Delay": 30 * SECOND, "DelayFunction": "exponential",
                           "MaxDelay": 3600 * SECOND, "Unlimited": True})
    for group in job.get("TaskGroups") or []:
        _fill(group, {"Count": 1, "RestartPolicy": {}, "ReschedulePolicy": {}, "EphemeralDisk": {}})
        _fill(group["RestartPolicy"], dict(restart_default, RenderTemplates=False))
        if job["Type"] in ("service", "batch"):
            _fill(group["ReschedulePolicy"], reschedule_default)
        _fill(group["EphemeralDisk"], {"Sticky": False, "Migrate": False, "SizeMB": 300})
        for net in group.get("Networks") or []:
            _fill(net, {"Mode": "host"})
        for task in group.get("Tasks") or []:
            _fill(task, {"Config": {}, "KillTimeout": 5 * SECOND, "LogConfig": {}, "Resources": {},
                         "RestartPolicy": copy.deepcopy(group["RestartPolicy"]), "Leader": False,
                         "KillSignal": "", "User": "", "ShutdownDelay": 0, "Kind": ""})
            _fill(task["LogConfig"], {"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False})
            resources = task["Resources"]
            if resources.get("Cores") is None:
                resources["Cores"] = 0
                _fill(resources, {"CPU": 100})
            else:
                _fill(resources, {"CPU": 0})
            _fill(resources, {"MemoryMB": 300, "MemoryMaxMB": 0, "DiskMB": 0, "IOPS": 0, "SecretsMB": 0})
            for device in resources.get("Devices") or []:
                _fill(device, {"Count": 1})
            for template in task.get("Templates") or []:
                _fill(template, {"SourcePath": "", "DestPath": "", "EmbeddedTmpl": "", "ChangeMode": "restart",
                                 "ChangeSignal": "", "Splay": 5 * SECOND, "Perms": "0644", "LeftDelim": "{{",
                                 "RightDelim": "}}", "Envvars": False, "VaultGrace": 0, "ErrMissingKey": False,
                                 "Once": False})
    return job


# ---------------------------------------------------------------------------------------
# Just enough consul-template for the templates Nomad renders from Variables


class TemplateMissing(Exception):
    """A template reads a Variable that does not exist yet: consul-template blocks."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class TemplateError(Exception):
    """A template the double cannot render (or consul-template would reject)."""


# {{ action }} with Go's trim markers "{{- " and " -}}".
_ACTION = re.compile(r"\{\{(- )?\s*(.*?)\s*( -)?\}\}", re.S)
_WITH_VAR = re.compile(r'with\s+nomadVar\s+"([^"]+)"')
_FIELD = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)")
_ENV = re.compile(r'env\s+"([^"]+)"')


def render_template(text: str, read_var: Callable[[str], dict[str, str] | None], env: dict[str, str]) -> str:
    """Render `text` like consul-template would for the subset hpc-sandbox uses:
    `{{ with nomadVar "PATH" }}...{{ .KEY }}...{{ end }}`, `{{ env "NAME" }}`, comments and
    trim markers. A missing Variable raises TemplateMissing (consul-template waits for it);
    a missing key renders "<no value>", like Go templates on a map."""
    pieces: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(text):
        literal = text[pos:match.start()]
        if trim_next:
            literal = literal.lstrip()
        if match.group(1):
            literal = literal.rstrip()
        pieces.append(("text", literal))
        pieces.append(("action", match.group(2)))
        pos, trim_next = match.end(), bool(match.group(3))
    tail = text[pos:]
    pieces.append(("text", tail.lstrip() if trim_next else tail))

    out: list[str] = []
    # Each open `with` pushes (its dot, whether its body renders).
    stack: list[tuple[dict[str, str] | None, bool]] = [(None, True)]
    for kind, value in pieces:
        dot, active = stack[-1]
        if kind == "text":
            if active:
                out.append(value)
            continue
        if value.startswith("/*") and value.endswith("*/"):
            continue
        if match := _WITH_VAR.fullmatch(value):
            if not active:
                stack.append((None, False))
                continue
            items = read_var(match.group(1))
            if items is None:
                raise TemplateMissing(match.group(1))
            stack.append((items, bool(items)))
        elif value == "end":
            if len(stack) == 1:
                raise TemplateError('template: unexpected {{end}}')
            stack.pop()
        elif match := _FIELD.fullmatch(value):
            if active:
                if dot is None:
                    raise TemplateError(f"template: can't evaluate field {match.group(1)} outside a with block")
                out.append(str(dot.get(match.group(1), "<no value>")))
        elif match := _ENV.fullmatch(value):
            if active:
                out.append(env.get(match.group(1), ""))
        else:
            raise TemplateError(f"template: the Nomad double does not implement {{{{ {value} }}}}")
    if len(stack) != 1:
        raise TemplateError("template: unexpected EOF (a {{with}} has no {{end}})")
    return "".join(out)


# ---------------------------------------------------------------------------------------
# TLS material: a CA of the double's own, a server certificate for 127.0.0.1/localhost,
# and a client certificate (for agents that verify HTTPS clients)


@dataclass(frozen=True)
class TLSFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert_file: Path
    client_key_file: Path


def make_tls(folder: Path) -> TLSFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Nomad double test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage: Any, sans: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    # Nomad's own certificates name the agent "server.<region>.nomad"; the IP SAN is what
    # a client connecting to 127.0.0.1 checks.
    server_cert, server_key = leaf("server.global.nomad", ExtendedKeyUsageOID.SERVER_AUTH,
                                   [x509.DNSName("server.global.nomad"), x509.DNSName("localhost"),
                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = leaf("cli.global.nomad", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files = TLSFiles(folder / "nomad-agent-ca.pem", folder / "global-server-nomad.pem",
                     folder / "global-server-nomad-key.pem", folder / "global-cli-nomad.pem",
                     folder / "global-cli-nomad-key.pem")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server_cert)
    files.client_cert_file.write_bytes(client_cert)
    for path, data in ((files.key_file, server_key), (files.client_key_file, client_key)):
        path.write_bytes(data)
        path.chmod(0o600)
    return files


# ---------------------------------------------------------------------------------------
# The double


@dataclass
class RecordedRequest:
    """One request as the double received it (Variable Items values REDACTED)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    status: int | None = None

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None

    @property
    def token(self) -> str | None:
        return self.header("X-Nomad-Token")

    @property
    def namespace(self) -> str | None:
        return self.query.get("namespace")

    @property
    def region(self) -> str | None:
        return self.query.get("region")


@dataclass
class _Node:
    id: str
    name: str
    address: str
    datacenter: str
    node_pool: str
    node_class: str
    ready: bool
    eligible: bool
    drivers: dict[str, dict[str, bool]]
    attributes: dict[str, str]
    cores: int
    memory_mb: int
    devices: dict[str, int]
    reserved_ports: set[int]
    create_index: int
    modify_index: int
    status: str = "ready"


@dataclass
class _Proc:
    """A task process the double started for an allocation."""

    proc: subprocess.Popen
    files: list[Any]
    kill_signal: int
    kill_timeout: float
    done: threading.Event = field(default_factory=threading.Event)
    watcher: threading.Thread | None = None
    stopping: bool = False  # the double asked it to stop (deregister, lost node, failed alloc)


@dataclass
class _AllocRuntime:
    index: int
    folder: Path | None = None
    procs: dict[str, _Proc] = field(default_factory=dict)
    waiting_template: bool = False


@dataclass
class _Fault:
    status: int
    message: str
    times: int | None
    path: str | None
    method: str | None


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_TERMINAL = frozenset({"complete", "failed", "lost"})
_BODY = web.RequestKey("nomad_double_body", object)  # the request's JSON body, parsed once
_RAW = web.RequestKey("nomad_double_raw", bytes)
_VAR_PATH = re.compile(r"^[a-zA-Z0-9\-_~/]{1,128}$")


def _constraint_key(constraint: dict[str, Any]) -> str:
    # Nomad's Constraint.String(), the key of AllocMetric.ConstraintFiltered.
    return f"{constraint.get('LTarget', '')} {constraint.get('Operand', '=')} {constraint.get('RTarget', '')}"


def _multierror(errors: list[str]) -> str:
    # Nomad's validation errors are go-multierror texts.
    head = "1 error occurred:" if len(errors) == 1 else f"{len(errors)} errors occurred:"
    return head + "\n" + "".join(f"\t* {error}\n" for error in errors) + "\n"


def _event(kind: str, display: str, **extra: Any) -> dict[str, Any]:
    event = {"Type": kind, "Time": _now_ns(), "DisplayMessage": display, "Message": "", "Details": {},
             "FailsTask": False, "RestartReason": "", "SetupError": "", "DriverError": "", "ExitCode": 0,
             "Signal": 0, "KillTimeout": 0, "KillError": "", "KillReason": "", "StartDelay": 0,
             "DownloadError": "", "ValidationError": "", "DiskLimit": 0, "FailedSibling": "",
             "VaultError": "", "TaskSignalReason": "", "TaskSignal": "", "DriverMessage": "",
             "GenericSource": ""}
    event.update(extra)
    return event


def _free_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class NomadDouble:
    """A Nomad HTTP API double on 127.0.0.1 (see the module docstring).

    Attributes: address ("http[s]://127.0.0.1:PORT"), host, port, region, datacenter,
    acl_token, ca_file / client_cert_file / client_key_file (with tls=True), requests
    (list of RecordedRequest), variables ({(namespace, path): items}), state_dir."""

    def __init__(self, tmp_path: Path, *, tls: bool = False, verify_client: bool = False,
                 acl_token: str | None = None, nodes: Iterable[str] = ("node-1", "node-2"),
                 run_tasks: bool | str = False, start_delay: float = 0.0, placement_delay: float = 0.0,
                 region: str = "global", datacenter: str = "dc1", namespaces: Iterable[str] = ()) -> None:
        if run_tasks not in (True, False, "all"):
            raise ValueError('run_tasks is False, True (first allocation of a group) or "all"')
        self.state_dir = Path(tmp_path) / "nomad-double"
        self.tls = tls or verify_client
        self.verify_client = verify_client
        self.acl_token = acl_token
        self.run_tasks = run_tasks
        self.start_delay = start_delay
        self.placement_delay = placement_delay
        self.region = region
        self.datacenter = datacenter
        self.host = "127.0.0.1"
        self.port = 0
        self.requests: list[RecordedRequest] = []
        self._tls_files: TLSFiles | None = None
        self._lock = threading.RLock()
        self._index = 1
        self._nodes: dict[str, _Node] = {}
        self._namespaces: dict[str, dict[str, Any]] = {}
        self._jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self._evals: dict[str, dict[str, Any]] = {}
        self._allocs: dict[str, dict[str, Any]] = {}
        self._runtime: dict[str, _AllocRuntime] = {}
        self._vars: dict[tuple[str, str], dict[str, Any]] = {}
        self._queued: dict[tuple[str, str], dict[str, int]] = {}
        self._blocked: dict[tuple[str, str], str] = {}
        self._faults: list[_Fault] = []
        self._hang_until = 0.0
        self._closing = False
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._killers: list[threading.Thread] = []
        self.add_namespace("default", "Default shared namespace")
        for name in namespaces:
            self.add_namespace(name)
        for name in nodes:
            self.add_node(name)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        return self._tls_files.ca_file if self._tls_files else None

    @property
    def client_cert_file(self) -> Path | None:
        return self._tls_files.client_cert_file if self._tls_files else None

    @property
    def client_key_file(self) -> Path | None:
        return self._tls_files.client_key_file if self._tls_files else None

    def start(self) -> "NomadDouble":
        if self._started:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ssl_context = None
        if self.tls:
            self._tls_files = make_tls(self.state_dir / "tls")
            ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ssl_context.load_cert_chain(self._tls_files.cert_file, self._tls_files.key_file)
            if self.verify_client:
                ssl_context.verify_mode = ssl.CERT_REQUIRED
                ssl_context.load_verify_locations(self._tls_files.ca_file)
        sock = _free_port()
        self.port = sock.getsockname()[1]
        # The server lives in its own thread and loop, so that blocking clients (python-nomad
        # in the test thread, subprocesses) can call it while the test waits on them.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"nomad-double:{self.port}",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(sock, ssl_context), self._loop).result(10)
        self._started = True
        log.info("nomad double listening on %s (tls=%s, acl=%s, nodes=%s)", self.address, self.tls,
                 bool(self.acl_token), ", ".join(n.name for n in self._sorted_nodes()))
        return self

    async def _serve(self, sock: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024 * 1024)
        self._routes(app)
        # handler_cancellation: a client that gives up (timeout) cancels its stalled handler.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()

    def close(self) -> None:
        """Stop every process the double started, then the server and its thread."""
        if self._closing:
            return
        self._closing = True
        with self._lock:
            procs = [(alloc_id, proc) for alloc_id, rt in self._runtime.items() for proc in rt.procs.values()]
        for alloc_id, proc in procs:
            if not proc.done.is_set():
                proc.stopping = True
                self._spawn_killer(proc)
        for thread in list(self._killers):
            thread.join(KILL_TIMEOUT_CAP + 6)
        for _, proc in procs:
            if proc.watcher is not None:
                proc.watcher.join(5)
            # Anything the task left in its process group goes too: no process left behind.
            try:
                os.killpg(proc.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._loop is not None and self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            except Exception:  # the loop is going away anyway; say why in the log
                log.exception("nomad double: server cleanup failed")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
        log.info("nomad double on port %s closed", self.port)

    def __enter__(self) -> "NomadDouble":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """The NOMAD_* environment a CLI would use to reach this double."""
        env = {"NOMAD_ADDR": self.address, "NOMAD_REGION": self.region}
        if self.acl_token:
            env["NOMAD_TOKEN"] = self.acl_token
        if self._tls_files:
            env["NOMAD_CACERT"] = str(self._tls_files.ca_file)
            if self.verify_client:
                env["NOMAD_CLIENT_CERT"] = str(self._tls_files.client_cert_file)
                env["NOMAD_CLIENT_KEY"] = str(self._tls_files.client_key_file)
        return env

    # -- controls (call from the test thread) ----------------------------------------

    def add_namespace(self, name: str, description: str = "") -> None:
        with self._lock:
            index = self._bump()
            self._namespaces[name] = {"Name": name, "Description": description, "Quota": "", "Meta": None,
                                      "Capabilities": None, "NodePoolConfiguration": None,
                                      "VaultConfiguration": None, "ConsulConfiguration": None,
                                      "CreateIndex": index, "ModifyIndex": index}

    def add_node(self, name: str, *, raw_exec: bool = True, ready: bool = True, eligible: bool = True,
                 address: str = "127.0.0.1", datacenter: str | None = None, node_pool: str = "default",
                 node_class: str = "", attributes: dict[str, str] | None = None, cores: int = 64,
                 memory_mb: int = 262144, devices: dict[str, int] | None = None,
                 reserved_ports: Iterable[int] = (), drivers: dict[str, bool] | None = None) -> str:
        """Add a client node; returns its ID. `drivers` maps other driver names to healthy."""
        with self._lock:
            index = self._bump()
            node_drivers = {"raw_exec": {"Detected": raw_exec, "Healthy": raw_exec}}
            for driver, healthy in (drivers or {}).items():
                node_drivers[driver] = {"Detected": True, "Healthy": healthy}
            attrs = {"kernel.name": "linux", "os.name": "debian", "arch": "amd64", "cpu.arch": "amd64",
                     "unique.hostname": name, "unique.network.ip-address": address,
                     "nomad.version": NOMAD_VERSION, "cpu.numcores": str(cores),
                     "memory.totalbytes": str(memory_mb * 1024 * 1024),
                     "os.signals": "SIGHUP,SIGINT,SIGKILL,SIGQUIT,SIGTERM,SIGUSR1,SIGUSR2"}
            node = _Node(id=_new_id(), name=name, address=address, datacenter=datacenter or self.datacenter,
                         node_pool=node_pool, node_class=node_class, ready=ready, eligible=eligible,
                         drivers=node_drivers, attributes=attrs, cores=cores, memory_mb=memory_mb,
                         devices=dict(devices or {}), reserved_ports=set(reserved_ports),
                         create_index=index, modify_index=index, status="ready" if ready else "down")
            self._refresh_driver_attrs(node)
            node.attributes.update(attributes or {})
            self._nodes[node.id] = node
            self._capacity_changed()
            return node.id

    def alter_node(self, name: str, *, raw_exec: bool | None = None, ready: bool | None = None,
                   eligible: bool | None = None, attributes: dict[str, str] | None = None,
                   reserved_ports: Iterable[int] | None = None) -> None:
        with self._lock:
            node = self._node_by_name(name)
            if raw_exec is not None:
                node.drivers["raw_exec"] = {"Detected": raw_exec, "Healthy": raw_exec}
                self._refresh_driver_attrs(node)
            if ready is not None:
                node.ready = ready
                node.status = "ready" if ready else "down"
            if eligible is not None:
                node.eligible = eligible
            if attributes:
                node.attributes.update(attributes)
            if reserved_ports is not None:
                node.reserved_ports = set(reserved_ports)
            node.modify_index = self._bump()
            self._capacity_changed()

    def occupy_port(self, port: int, nodes: Iterable[str] | None = None) -> None:
        """Mark a host port as taken (as a node's reserved ports) on the named nodes, or all."""
        with self._lock:
            names = set(nodes) if nodes is not None else {n.name for n in self._nodes.values()}
            for node in self._nodes.values():
                if node.name in names:
                    node.reserved_ports.add(port)
                    node.modify_index = self._bump()

    def lose_node(self, name: str) -> None:
        """The node stops heartbeating: Status "down", its allocations "lost", their
        processes (if the double runs them) killed, as if the machine went away."""
        with self._lock:
            node = self._node_by_name(name)
            node.ready = False
            node.status = "down"
            node.modify_index = self._bump()
            touched: set[tuple[str, str]] = set()
            for alloc in self._allocs.values():
                if alloc["NodeID"] != node.id or alloc["ClientStatus"] in _TERMINAL:
                    continue
                alloc["ClientStatus"] = "lost"
                alloc["ClientDescription"] = "alloc is lost since its node is down"
                alloc["DesiredStatus"] = "stop"
                alloc["DesiredDescription"] = "alloc is lost since its node is down"
                self._touch_alloc(alloc)
                self._stop_processes(alloc["ID"])
                touched.add((alloc["Namespace"], alloc["JobID"]))
            for key in touched:
                job = self._jobs.get(key)
                if job is not None:
                    self._new_eval(job, "node-update", status="complete", NodeID=node.id,
                                   NodeModifyIndex=node.modify_index)
            log.info("nomad double: node %s lost (%d jobs touched)", name, len(touched))

    def fail_alloc(self, alloc_id: str, message: str, event_type: str = "Driver Failure") -> None:
        """The allocation fails: ClientStatus "failed", each task dead with Failed true and a
        last event `event_type` ("Driver Failure", "Terminated", ...) saying `message`."""
        with self._lock:
            alloc = self._alloc_or_raise(alloc_id)
            extra = {"FailsTask": True, "Message": message}
            if event_type == "Driver Failure":
                extra["DriverError"] = message
            for state in alloc["TaskStates"].values():
                state.update(State="dead", Failed=True, FinishedAt=_rfc3339())
                state["Events"].append(_event(event_type, message, **extra))
            alloc["ClientStatus"] = "failed"
            alloc["ClientDescription"] = "Failed tasks"
            self._touch_alloc(alloc)
            self._stop_processes(alloc_id)
            self._capacity_changed()

    def finish_alloc(self, alloc_id: str, exit_code: int = 0) -> None:
        """Every task of the allocation exits with `exit_code` (0: complete, else failed)."""
        with self._lock:
            alloc = self._alloc_or_raise(alloc_id)
            for task in list(alloc["TaskStates"]):
                self._task_ended(alloc, task, exit_code, 0)
            self._stop_processes(alloc_id)

    def hang(self, seconds: float) -> None:
        """Every request received in the next `seconds` stalls until then (0 ends it)."""
        self._hang_until = time.monotonic() + seconds if seconds > 0 else 0.0

    def fail_requests(self, times: int | None = 1, *, status: int = 500, message: str = "No cluster leader",
                      path: str | None = None, method: str | None = None) -> None:
        """The next `times` requests (None: all, until clear_faults) whose path starts with
        `path` (and whose method is `method`) answer `status` with `message`."""
        with self._lock:
            self._faults.append(_Fault(status, message, times, path, method.upper() if method else None))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
        self._hang_until = 0.0

    def put_variable(self, path: str, items: dict[str, str], namespace: str = "default") -> None:
        """Seed a Variable as if an operator had written it."""
        with self._lock:
            self._store_var(namespace, path, dict(items))

    # -- inspection ------------------------------------------------------------------

    @property
    def variables(self) -> dict[tuple[str, str], dict[str, str]]:
        """{(namespace, path): items}: the only place the Items can be read back."""
        with self._lock:
            return {key: dict(var["Items"]) for key, var in self._vars.items()}

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if r.path.startswith(path_prefix) and (method is None or r.method == method.upper())]

    def job(self, job_id: str, namespace: str = "default") -> dict[str, Any] | None:
        with self._lock:
            job = self._jobs.get((namespace, job_id))
            return self._job_view(job) if job else None

    def allocs(self, job_id: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
        """Full allocations (the GET /v1/allocation/:id shape), oldest first."""
        with self._lock:
            return [copy.deepcopy(a) for a in self._sorted_allocs()
                    if (job_id is None or a["JobID"] == job_id)
                    and (namespace is None or a["Namespace"] == namespace)]

    def evals(self, job_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(e) for e in sorted(self._evals.values(), key=lambda e: e["CreateIndex"])
                    if job_id is None or e["JobID"] == job_id]

    def node(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self._node_full(self._node_by_name(name))

    def alloc_dir(self, alloc_id: str) -> Path:
        """The allocation's folder (<alloc>/alloc, <alloc>/<task>/{local,secrets,tmp})."""
        return self.state_dir / "allocs" / alloc_id

    def task_log(self, alloc_id: str, task: str, stream: str = "stdout") -> str:
        path = self.alloc_dir(alloc_id) / "alloc" / "logs" / f"{task}.{stream}.0"
        return path.read_text(errors="replace") if path.exists() else ""

    def task_pid(self, alloc_id: str, task: str) -> int | None:
        with self._lock:
            runtime = self._runtime.get(alloc_id)
            proc = runtime.procs.get(task) if runtime else None
            return proc.proc.pid if proc else None

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
        """Poll `predicate` until it returns something true; its value, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"nomad double: timed out after {timeout}s waiting for {what}")
            time.sleep(0.02)

    # -- state helpers (callers hold self._lock) -------------------------------------

    def _bump(self) -> int:
        # One raft-like index for everything: each write gets the next one.
        self._index += 1
        return self._index

    def _sorted_nodes(self) -> list[_Node]:
        return sorted(self._nodes.values(), key=lambda n: n.name)

    def _sorted_allocs(self) -> list[dict[str, Any]]:
        return sorted(self._allocs.values(), key=lambda a: (a["CreateIndex"], a["Name"]))

    def _node_by_name(self, name: str) -> _Node:
        for node in self._nodes.values():
            if node.name == name:
                return node
        raise KeyError(f"nomad double: no node named {name!r}")

    def _alloc_or_raise(self, alloc_id: str) -> dict[str, Any]:
        alloc = self._allocs.get(alloc_id)
        if alloc is None:
            raise KeyError(f"nomad double: no allocation {alloc_id!r}")
        return alloc

    @staticmethod
    def _refresh_driver_attrs(node: _Node) -> None:
        for driver, info in node.drivers.items():
            if info["Detected"]:
                node.attributes[f"driver.{driver}"] = "1"
            else:
                node.attributes.pop(f"driver.{driver}", None)

    def _touch_alloc(self, alloc: dict[str, Any]) -> None:
        alloc["ModifyIndex"] = self._bump()
        alloc["ModifyTime"] = _now_ns()

    def _node_pools(self) -> set[str]:
        return {"default", "all"} | {node.node_pool for node in self._nodes.values()}

    def _store_var(self, namespace: str, path: str, items: dict[str, str]) -> dict[str, Any]:
        index, now = self._bump(), _now_ns()
        old = self._vars.get((namespace, path))
        var = {"Namespace": namespace, "Path": path,
               "CreateIndex": old["CreateIndex"] if old else index, "ModifyIndex": index,
               "CreateTime": old["CreateTime"] if old else now, "ModifyTime": now, "Items": items}
        self._vars[(namespace, path)] = var
        return var

    def _after(self, delay: float, action: Callable[[], None]) -> None:
        """Run `action` (under the lock) after `delay` seconds on the server's loop."""
        def run() -> None:
            if self._closing:
                return
            try:
                with self._lock:
                    action()
            except Exception:  # a timer has no caller to raise to; the log says what broke
                log.exception("nomad double: timed action failed")

        if delay <= 0:
            with self._lock:
                action()
            return
        if self._closing or self._loop is None or self._loop.is_closed():
            return  # closing: nothing more is scheduled
        self._loop.call_soon_threadsafe(self._loop.call_later, delay, run)

    # -- jobs, evaluations, placement ------------------------------------------------

    def _new_eval(self, job: dict[str, Any], triggered_by: str, status: str = "pending",
                  **fields: Any) -> dict[str, Any]:
        index, now = self._bump(), _now_ns()
        evaluation = {"ID": _new_id(), "Namespace": job["Namespace"], "Priority": job.get("Priority", 50),
                      "Type": job.get("Type", "service"), "TriggeredBy": triggered_by, "JobID": job["ID"],
                      "JobModifyIndex": job.get("JobModifyIndex", 0), "NodeID": "", "NodeModifyIndex": 0,
                      "DeploymentID": "", "Status": status, "StatusDescription": "", "Wait": 0,
                      "WaitUntil": ZERO_TIME, "NextEval": "", "PreviousEval": "", "BlockedEval": "",
                      "RelatedEvals": None, "FailedTGAllocs": None, "ClassEligibility": None,
                      "QuotaLimitReached": "", "EscapedComputedClass": False, "AnnotatePlan": False,
                      "QueuedAllocations": None, "LeaderACL": "", "SnapshotIndex": index,
                      "CreateIndex": index, "ModifyIndex": index, "CreateTime": now, "ModifyTime": now}
        evaluation.update(fields)
        self._evals[evaluation["ID"]] = evaluation
        return evaluation

    def _job_allocs(self, key: tuple[str, str]) -> list[dict[str, Any]]:
        return [a for a in self._sorted_allocs() if (a["Namespace"], a["JobID"]) == key]

    def _job_status(self, job: dict[str, Any]) -> str:
        key = (job["Namespace"], job["ID"])
        allocs = self._job_allocs(key)
        if any(a["ClientStatus"] in ("pending", "running") for a in allocs):
            return "running"
        if job.get("Stop"):
            return "dead"
        if any(self._queued.get(key, {}).values()) or any(
                e["Status"] in ("pending", "blocked") for e in self._evals.values()
                if (e["Namespace"], e["JobID"]) == key):
            return "pending"
        return "dead" if allocs else "pending"

    def _job_view(self, job: dict[str, Any]) -> dict[str, Any]:
        view = copy.deepcopy(job)
        view["Status"] = self._job_status(job)
        return view

    def _summary(self, job: dict[str, Any]) -> dict[str, Any]:
        key = (job["Namespace"], job["ID"])
        summary: dict[str, dict[str, int]] = {}
        for group in job.get("TaskGroups") or []:
            counts = {"Queued": self._queued.get(key, {}).get(group["Name"], 0), "Complete": 0, "Failed": 0,
                      "Running": 0, "Starting": 0, "Lost": 0, "Unknown": 0}
            for alloc in self._job_allocs(key):
                if alloc["TaskGroup"] == group["Name"]:
                    status = alloc["ClientStatus"]
                    counts[{"pending": "Starting"}.get(status, status.capitalize())] += 1
            summary[group["Name"]] = counts
        return {"JobID": job["ID"], "Namespace": job["Namespace"], "Summary": summary,
                "Children": {"Pending": 0, "Running": 0, "Dead": 0},
                "CreateIndex": job["CreateIndex"], "ModifyIndex": job["ModifyIndex"]}

    @staticmethod
    def _validate(job: dict[str, Any]) -> list[str]:
        errors = []
        if job["Type"] not in ("service", "batch", "system", "sysbatch"):
            errors.append(f"Invalid job type: {job['Type']!r}")
        if not 1 <= int(job["Priority"]) <= 100:
            errors.append("job priority must be between [1, 100]")
        if not job.get("Datacenters"):
            errors.append("Missing job datacenters")
        groups = job.get("TaskGroups") or []
        if not groups:
            errors.append("Missing job task groups")
        seen: set[str] = set()
        for group in groups:
            name = group.get("Name") or ""
            if name in seen:
                errors.append(f"Job task group {len(seen) + 1} redefines '{name}' from group 1")
            seen.add(name)
            problems = []
            if (group.get("Count") or 0) < 0:
                problems.append("Task group count can't be negative")
            tasks = group.get("Tasks") or []
            if not tasks:
                problems.append("Missing tasks for task group")
            for task in tasks:
                if not task.get("Name"):
                    problems.append("Missing task name")
                if not task.get("Driver"):
                    problems.append(f"Task {task.get('Name')} validation failed: Missing task driver")
            if problems:
                errors.append(f"Task group {name} validation failed: " + _multierror(problems).strip())
        return errors

    @staticmethod
    def _spec(job: dict[str, Any]) -> dict[str, Any]:
        # What makes a re-registration a change (Nomad's Job.SpecChanged ignores these).
        ignored = {"Status", "StatusDescription", "Stable", "Version", "SubmitTime", "CreateIndex",
                   "ModifyIndex", "JobModifyIndex", "Stop", "NomadTokenID"}
        return {k: v for k, v in job.items() if k not in ignored}

    def _register(self, job: dict[str, Any]) -> dict[str, Any]:
        key = (job["Namespace"], job["ID"])
        existing = self._jobs.get(key)
        now, index = _now_ns(), self._bump()
        changed = existing is None or existing.get("Stop") or self._spec(existing) != self._spec(job)
        if changed:
            job.update(Stop=False, Status="pending", StatusDescription="", Stable=False, SubmitTime=now,
                       Version=(existing["Version"] + 1) if existing else 0,
                       CreateIndex=existing["CreateIndex"] if existing else index, ModifyIndex=index,
                       JobModifyIndex=index)
            self._jobs[key] = job
            if existing is not None:
                # A changed job replaces its allocations (Nomad's destructive update).
                for alloc in self._job_allocs(key):
                    if alloc["DesiredStatus"] == "run" and alloc["ClientStatus"] not in _TERMINAL:
                        self._stop_alloc(alloc, "alloc not needed due to job update")
            self._queued[key] = {g["Name"]: int(g["Count"]) for g in job["TaskGroups"]}
        else:
            job = existing
            live = {}
            for alloc in self._job_allocs(key):
                if alloc["DesiredStatus"] == "run" and alloc["ClientStatus"] in ("pending", "running", "complete"):
                    live[alloc["TaskGroup"]] = live.get(alloc["TaskGroup"], 0) + 1
            self._queued[key] = {g["Name"]: max(0, int(g["Count"]) - live.get(g["Name"], 0))
                                 for g in job["TaskGroups"]}
        self._cancel_blocked(key, "evaluation superseded by a new job registration")
        evaluation = self._new_eval(job, "job-register", JobModifyIndex=job["JobModifyIndex"])
        eval_id = evaluation["ID"]
        self._after(self.placement_delay, lambda: self._evaluate(key, eval_id))
        return {"EvalID": eval_id, "EvalCreateIndex": evaluation["CreateIndex"],
                "JobModifyIndex": job["JobModifyIndex"], "Warnings": "", "Index": evaluation["CreateIndex"],
                "LastContact": 0, "KnownLeader": False, "NextToken": ""}

    def _deregister(self, key: tuple[str, str], purge: bool) -> dict[str, Any]:
        job = self._jobs.get(key)
        if job is None:
            # Nomad answers a deregister of an unknown job with an empty success.
            return {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0, "VolumeEvalID": "",
                    "VolumeEvalIndex": 0, "Index": 0, "LastContact": 0, "KnownLeader": False, "NextToken": ""}
        index = self._bump()
        job.update(Stop=True, ModifyIndex=index, JobModifyIndex=index, SubmitTime=_now_ns())
        self._queued[key] = {}
        self._cancel_blocked(key, "evaluation canceled since its job was stopped")
        evaluation = self._new_eval(job, "job-deregister", Type="service", JobModifyIndex=index)
        for alloc in self._job_allocs(key):
            if alloc["DesiredStatus"] == "run" and alloc["ClientStatus"] not in _TERMINAL:
                self._stop_alloc(alloc, "alloc not needed since job is stopped")
        evaluation.update(Status="complete", ModifyIndex=self._bump(), ModifyTime=_now_ns())
        if purge:
            del self._jobs[key]
        self._capacity_changed()
        return {"EvalID": evaluation["ID"], "EvalCreateIndex": evaluation["CreateIndex"], "JobModifyIndex": index,
                "VolumeEvalID": "", "VolumeEvalIndex": 0, "Index": evaluation["CreateIndex"], "LastContact": 0,
                "KnownLeader": False, "NextToken": ""}

    def _cancel_blocked(self, key: tuple[str, str], why: str) -> None:
        blocked_id = self._blocked.pop(key, None)
        blocked = self._evals.get(blocked_id or "")
        if blocked is not None and blocked["Status"] == "blocked":
            blocked.update(Status="canceled", StatusDescription=why, ModifyIndex=self._bump(),
                           ModifyTime=_now_ns())

    def _evaluate(self, key: tuple[str, str], eval_id: str) -> None:
        """The scheduler's pass over one evaluation: place what is queued, report the rest."""
        evaluation = self._evals.get(eval_id)
        job = self._jobs.get(key)
        if evaluation is None or evaluation["Status"] not in ("pending", "blocked"):
            return
        if job is None or job.get("Stop"):
            evaluation.update(Status="complete", ModifyIndex=self._bump(), ModifyTime=_now_ns())
            return
        queued = self._queued.setdefault(key, {})
        failed: dict[str, dict[str, Any]] = {}
        placed: list[str] = []
        for group in job["TaskGroups"]:
            want = queued.get(group["Name"], 0)
            for attempt in range(want):
                node, metric = self._select(job, group)
                if node is None:
                    # Nomad reports the first failure's metrics and counts the others.
                    metric["CoalescedFailures"] = want - attempt - 1
                    failed[group["Name"]] = metric
                    break
                placed.append(self._create_alloc(job, group, node, evaluation, metric))
                queued[group["Name"]] -= 1
        evaluation.update(Status="complete", QueuedAllocations={g["Name"]: queued.get(g["Name"], 0)
                                                                for g in job["TaskGroups"]},
                          ModifyIndex=self._bump(), ModifyTime=_now_ns())
        if failed:
            evaluation["FailedTGAllocs"] = failed
            blocked = self._new_eval(job, "queued-allocs", status="blocked", PreviousEval=eval_id,
                                     StatusDescription="created to place remaining allocations",
                                     JobModifyIndex=job["JobModifyIndex"],
                                     ClassEligibility={n.node_class: False for n in self._nodes.values()
                                                       if n.node_class} or None)
            evaluation["BlockedEval"] = blocked["ID"]
            self._blocked[key] = blocked["ID"]
            log.info("nomad double: %s: %d placed, unplaced groups %s", key[1], len(placed), sorted(failed))
        for alloc_id in placed:
            self._after(self.start_delay, lambda alloc_id=alloc_id: self._start_alloc(alloc_id))

    def _capacity_changed(self) -> None:
        """An allocation ended or a node changed: unblock blocked evaluations that can now
        place something (Nomad's blocked-evals tracker does this on capacity changes)."""
        for key, blocked_id in list(self._blocked.items()):
            job = self._jobs.get(key)
            blocked = self._evals.get(blocked_id)
            if job is None or blocked is None or blocked["Status"] != "blocked":
                self._blocked.pop(key, None)
                continue
            if any(self._queued.get(key, {}).get(g["Name"], 0) and self._select(job, g)[0] is not None
                   for g in job["TaskGroups"]):
                del self._blocked[key]
                self._evaluate(key, blocked_id)

    def _usage(self, node: _Node) -> tuple[set[int], int, int, int]:
        """Ports, cores, cpu MHz and memory taken on `node` by allocations that want to run."""
        ports, cores, cpu, memory = set(node.reserved_ports), 0, 0, 0
        for alloc in self._live_on(node):
            shared = alloc["AllocatedResources"]["Shared"]
            ports.update(p["Value"] for p in shared["Ports"] or [])
            for task in alloc["AllocatedResources"]["Tasks"].values():
                cores += len(task["Cpu"]["ReservedCores"] or [])
                cpu += task["Cpu"]["CpuShares"]
                memory += task["Memory"]["MemoryMB"]
        return ports, cores, cpu, memory

    @staticmethod
    def _group_needs(group: dict[str, Any]) -> tuple[int, int, int]:
        cores = cpu = memory = 0
        for task in group.get("Tasks") or []:
            res = task.get("Resources") or {}
            cores += res.get("Cores") or 0
            cpu += (res.get("Cores") or 0) * 1000 or (res.get("CPU") or 0)
            memory += res.get("MemoryMB") or 0
        return cores, cpu, memory

    def _resolve(self, node: _Node, target: str) -> tuple[Any, bool]:
        match = re.fullmatch(r"\$\{(.+)\}", target or "")
        if not match:
            return target, True
        name = match.group(1)
        if name.startswith("attr."):
            value = node.attributes.get(name[5:])
            return value, value is not None
        fixed = {"node.unique.id": node.id, "node.unique.name": node.name, "node.datacenter": node.datacenter,
                 "node.class": node.node_class, "node.pool": node.node_pool, "node.region": self.region}
        if name in fixed:
            return fixed[name], True
        return None, False

    def _constraint_ok(self, node: _Node, constraint: dict[str, Any]) -> bool:
        operand = constraint.get("Operand") or "="
        if operand in ("distinct_hosts", "distinct_property", "version", "semver"):
            return True  # distinct_hosts is checked on its own; the others are not modelled
        lval, lok = self._resolve(node, constraint.get("LTarget", ""))
        rval, rok = self._resolve(node, constraint.get("RTarget", ""))
        if operand in ("=", "==", "is"):
            return lok and rok and lval == rval
        if operand in ("!=", "not"):
            return lval != rval
        if operand == "is_set":
            return lok
        if operand == "is_not_set":
            return not lok
        if operand == "regexp":
            return lok and rok and re.search(str(rval), str(lval)) is not None
        if operand in ("set_contains", "set_contains_all", "set_contains_any"):
            if not (lok and rok):
                return False
            have = {item.strip() for item in str(lval).split(",")}
            want = {item.strip() for item in str(rval).split(",")}
            return bool(have & want) if operand == "set_contains_any" else want <= have
        if operand in ("<", "<=", ">", ">="):
            if not (lok and rok):
                return False
            try:
                left, right = float(lval), float(rval)
            except ValueError:
                left, right = str(lval), str(rval)  # type: ignore[assignment]
            return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[operand]
        return False

    @staticmethod
    def _device_ok(node: _Node, name: str, count: int) -> bool:
        want = name.split("/")
        for have, available in node.devices.items():
            parts = have.split("/")  # vendor/type[/model]
            if len(want) == 1:
                match = len(parts) > 1 and parts[1] == want[0]
            else:
                match = parts[:len(want)] == want
            if match and available >= count:
                return True
        return False

    def _filter_reason(self, node: _Node, job: dict[str, Any], group: dict[str, Any]) -> str | None:
        """Why `node` is infeasible for `group` (Nomad's ConstraintFiltered key), or None."""
        for constraint in job.get("Constraints") or []:
            if not self._constraint_ok(node, constraint):
                return _constraint_key(constraint)
        for task in group.get("Tasks") or []:
            driver = node.drivers.get(task.get("Driver", ""))
            if not driver or not driver["Detected"] or not driver["Healthy"]:
                return "missing drivers"
        constraints = list(group.get("Constraints") or [])
        for task in group.get("Tasks") or []:
            constraints += task.get("Constraints") or []
        for constraint in constraints:
            if not self._constraint_ok(node, constraint):
                return _constraint_key(constraint)
        for task in group.get("Tasks") or []:
            for device in (task.get("Resources") or {}).get("Devices") or []:
                if not self._device_ok(node, device["Name"], int(device.get("Count") or 1)):
                    return "missing devices"
        job_distinct = any(c.get("Operand") == "distinct_hosts" and c.get("RTarget", "true") in ("", "true")
                           for c in job.get("Constraints") or [])
        group_distinct = any(c.get("Operand") == "distinct_hosts" and c.get("RTarget", "true") in ("", "true")
                             for c in group.get("Constraints") or [])
        if job_distinct or group_distinct:
            for alloc in self._allocs.values():
                if (alloc["NodeID"] == node.id and alloc["JobID"] == job["ID"]
                        and alloc["Namespace"] == job["Namespace"] and alloc["DesiredStatus"] == "run"
                        and alloc["ClientStatus"] not in _TERMINAL
                        and (job_distinct or alloc["TaskGroup"] == group["Name"])):
                    return "distinct_hosts"
        return None

    def _exhausted(self, node: _Node, group: dict[str, Any]) -> str | None:
        """The dimension `node` lacks for `group` (Nomad's DimensionExhausted key), or None."""
        ports, cores_used, cpu_used, memory_used = self._usage(node)
        for net in group.get("Networks") or []:
            for port in net.get("ReservedPorts") or []:
                if port["Value"] in ports:
                    return f"network: reserved port collision {port['Label']}={port['Value']}"
        cores, cpu, memory = self._group_needs(group)
        if cores and cores_used + cores > node.cores:
            return "cores"
        if cpu_used + cpu > node.cores * 1000:
            return "cpu"
        if memory_used + memory > node.memory_mb:
            return "memory"
        return None

    def _select(self, job: dict[str, Any], group: dict[str, Any]) -> tuple[_Node | None, dict[str, Any]]:
        """One placement: the first feasible node with room, and the AllocMetric of the try."""
        started = time.perf_counter_ns()
        metric: dict[str, Any] = {"NodesEvaluated": 0, "NodesFiltered": 0, "NodesInPool": 0, "NodesAvailable": {},
                                  "ClassFiltered": {}, "ConstraintFiltered": {}, "NodesExhausted": 0,
                                  "ClassExhausted": {}, "DimensionExhausted": {}, "QuotaExhausted": None,
                                  "ResourcesExhausted": None, "Scores": None, "ScoreMetaData": None,
                                  "AllocationTime": 0, "CoalescedFailures": 0}
        pool = job.get("NodePool") or "default"
        in_pool = [n for n in self._sorted_nodes() if pool == "all" or n.node_pool == pool]
        metric["NodesInPool"] = len(in_pool)
        patterns = job.get("Datacenters") or ["*"]
        ready = [n for n in in_pool if n.status == "ready" and n.eligible
                 and any(fnmatch.fnmatchcase(n.datacenter, p) for p in patterns)]
        for node in ready:
            metric["NodesAvailable"][node.datacenter] = metric["NodesAvailable"].get(node.datacenter, 0) + 1
        chosen = None
        for node in ready:
            metric["NodesEvaluated"] += 1
            reason = self._filter_reason(node, job, group)
            if reason is not None:
                metric["NodesFiltered"] += 1
                metric["ConstraintFiltered"][reason] = metric["ConstraintFiltered"].get(reason, 0) + 1
                if node.node_class:
                    metric["ClassFiltered"][node.node_class] = metric["ClassFiltered"].get(node.node_class, 0) + 1
                continue
            dimension = self._exhausted(node, group)
            if dimension is not None:
                metric["NodesExhausted"] += 1
                metric["DimensionExhausted"][dimension] = metric["DimensionExhausted"].get(dimension, 0) + 1
                if node.node_class:
                    metric["ClassExhausted"][node.node_class] = metric["ClassExhausted"].get(node.node_class, 0) + 1
                continue
            chosen = node
            break
        metric["AllocationTime"] = time.perf_counter_ns() - started
        return chosen, metric

    def _create_alloc(self, job: dict[str, Any], group: dict[str, Any], node: _Node,
                      evaluation: dict[str, Any], metric: dict[str, Any]) -> str:
        key = (job["Namespace"], job["ID"])
        taken = {self._runtime[a["ID"]].index for a in self._job_allocs(key)
                 if a["TaskGroup"] == group["Name"] and a["DesiredStatus"] == "run"
                 and a["ClientStatus"] not in ("failed", "lost")}
        index = next(i for i in range(len(taken) + 1) if i not in taken)
        ports_used, cores_used_set = self._usage(node)[0], self._used_core_ids(node)
        shared_ports, reserved, dynamic = [], [], []
        for net in group.get("Networks") or []:
            for port in net.get("ReservedPorts") or []:
                shared_ports.append({"Label": port["Label"], "Value": port["Value"], "To": port.get("To", 0),
                                     "HostIP": node.address})
                reserved.append({"Label": port["Label"], "Value": port["Value"], "To": port.get("To", 0),
                                 "HostNetwork": "default"})
                ports_used.add(port["Value"])
            for port in net.get("DynamicPorts") or []:
                value = next(p for p in DYNAMIC_PORTS if p not in ports_used)
                ports_used.add(value)
                to = port.get("To", 0)
                shared_ports.append({"Label": port["Label"], "Value": value, "To": to, "HostIP": node.address})
                dynamic.append({"Label": port["Label"], "Value": value, "To": to, "HostNetwork": "default"})
        networks = [{"Mode": "host", "Device": "", "CIDR": "", "IP": node.address, "Hostname": "", "MBits": 0,
                     "DNS": None, "ReservedPorts": reserved or None, "DynamicPorts": dynamic or None}]
        tasks_resources: dict[str, Any] = {}
        task_states: dict[str, Any] = {}
        for task in group.get("Tasks") or []:
            res = task.get("Resources") or {}
            want_cores = res.get("Cores") or 0
            free = [c for c in range(node.cores) if c not in cores_used_set]
            core_ids = free[:want_cores]
            cores_used_set.update(core_ids)
            tasks_resources[task["Name"]] = {
                "Cpu": {"CpuShares": want_cores * 1000 if want_cores else (res.get("CPU") or 0),
                        "ReservedCores": core_ids or None},
                "Memory": {"MemoryMB": res.get("MemoryMB") or 0, "MemoryMaxMB": res.get("MemoryMaxMB") or 0},
                "Networks": None,
                "Devices": [{"Vendor": d["Name"].split("/")[0], "Type": d["Name"].split("/")[-1],
                             "Name": d["Name"], "DeviceIDs": [_new_id() for _ in range(int(d.get("Count") or 1))]}
                            for d in res.get("Devices") or []] or None,
            }
            task_states[task["Name"]] = {"State": "pending", "Failed": False, "Restarts": 0,
                                         "LastRestart": ZERO_TIME, "StartedAt": ZERO_TIME,
                                         "FinishedAt": ZERO_TIME,
                                         "Events": [_event("Received", "Task received by client"),
                                                    _event("Task Setup", "Building Task Directory",
                                                           Message="Building Task Directory")],
                                         "TaskHandle": None}
        now, created = _now_ns(), self._bump()
        alloc_id = _new_id()
        allocated = {"Tasks": tasks_resources, "TaskLifecycles": {t["Name"]: None for t in group.get("Tasks") or []},
                     "Shared": {"DiskMB": (group.get("EphemeralDisk") or {}).get("SizeMB") or 300,
                                "Networks": networks, "Ports": shared_ports or None}}
        alloc = {
            "ID": alloc_id, "Namespace": job["Namespace"], "EvalID": evaluation["ID"],
            "Name": f"{job['ID']}.{group['Name']}[{index}]", "NodeID": node.id, "NodeName": node.name,
            "JobID": job["ID"], "Job": copy.deepcopy(job), "TaskGroup": group["Name"],
            "Resources": {"CPU": sum(t["Cpu"]["CpuShares"] for t in tasks_resources.values()),
                          "MemoryMB": sum(t["Memory"]["MemoryMB"] for t in tasks_resources.values()),
                          "DiskMB": allocated["Shared"]["DiskMB"], "Networks": networks},
            "AllocatedResources": allocated, "Metrics": metric, "DesiredStatus": "run",
            "DesiredDescription": "", "DesiredTransition": {"Migrate": None, "Reschedule": None,
                                                            "ForceReschedule": None, "NoShutdownDelay": None},
            "ClientStatus": "pending", "ClientDescription": "No tasks have started", "TaskStates": task_states,
            "AllocStates": None, "PreviousAllocation": "", "NextAllocation": "", "DeploymentID": "",
            "DeploymentStatus": None, "RescheduleTracker": None, "NetworkStatus": None, "FollowupEvalID": "",
            "PreemptedAllocations": None, "PreemptedByAllocation": "", "SigningKeyID": "",
            "CreateIndex": created, "ModifyIndex": created, "AllocModifyIndex": created,
            "CreateTime": now, "ModifyTime": now,
        }
        self._allocs[alloc_id] = alloc
        self._runtime[alloc_id] = _AllocRuntime(index=index)
        log.info("nomad double: placed %s (%s) on %s", alloc["Name"], alloc_id[:8], node.name)
        return alloc_id

    def _used_core_ids(self, node: _Node) -> set[int]:
        used: set[int] = set()
        for alloc in self._live_on(node):
            for task in alloc["AllocatedResources"]["Tasks"].values():
                used.update(task["Cpu"]["ReservedCores"] or [])
        return used

    def _live_on(self, node: _Node) -> list[dict[str, Any]]:
        """Allocations on `node` that hold resources: wanted running and not ended."""
        return [a for a in self._allocs.values()
                if a["NodeID"] == node.id and a["DesiredStatus"] == "run" and a["ClientStatus"] not in _TERMINAL]

    # -- allocation lifecycle ----------------------------------------------------------

    def _runs_tasks(self, alloc_id: str) -> bool:
        if self.run_tasks == "all":
            return True
        # One loopback for all "nodes": only the first allocation of a group may hold the
        # group's static ports, so only it runs (see the module docstring).
        return bool(self.run_tasks) and self._runtime[alloc_id].index == 0

    def _start_alloc(self, alloc_id: str) -> None:
        alloc = self._allocs.get(alloc_id)
        if alloc is None or alloc["ClientStatus"] != "pending" or alloc["DesiredStatus"] != "run":
            return
        if self._runs_tasks(alloc_id):
            self._launch(alloc)
        else:
            for task in alloc["TaskStates"]:
                self._task_running(alloc, task)

    def _task_running(self, alloc: dict[str, Any], task: str) -> None:
        state = alloc["TaskStates"][task]
        state.update(State="running", StartedAt=_rfc3339())
        state["Events"].append(_event("Started", "Task started by client"))
        alloc["ClientStatus"] = "running"
        alloc["ClientDescription"] = "Tasks are running"
        self._touch_alloc(alloc)

    def _group_of(self, alloc: dict[str, Any]) -> dict[str, Any]:
        return next(g for g in alloc["Job"]["TaskGroups"] if g["Name"] == alloc["TaskGroup"])

    def _task_env(self, alloc: dict[str, Any], task: dict[str, Any], node: _Node, folder: Path) -> dict[str, str]:
        job = alloc["Job"]
        task_dir = folder / task["Name"]
        res = task.get("Resources") or {}
        env = dict(os.environ)  # raw_exec tasks see the client's environment, then Nomad's
        env.update({
            "NOMAD_ALLOC_DIR": str(folder / "alloc"), "NOMAD_TASK_DIR": str(task_dir / "local"),
            "NOMAD_SECRETS_DIR": str(task_dir / "secrets"), "TMPDIR": str(task_dir / "tmp"),
            "NOMAD_ALLOC_ID": alloc["ID"], "NOMAD_ALLOC_NAME": alloc["Name"],
            "NOMAD_ALLOC_INDEX": str(self._runtime[alloc["ID"]].index), "NOMAD_SHORT_ALLOC_ID": alloc["ID"][:8],
            "NOMAD_JOB_ID": job["ID"], "NOMAD_JOB_NAME": job["Name"], "NOMAD_GROUP_NAME": alloc["TaskGroup"],
            "NOMAD_TASK_NAME": task["Name"], "NOMAD_NAMESPACE": job["Namespace"], "NOMAD_REGION": job["Region"],
            "NOMAD_DC": node.datacenter, "NOMAD_CPU_LIMIT": str((res.get("Cores") or 0) * 1000 or res.get("CPU") or 0),
            "NOMAD_MEMORY_LIMIT": str(res.get("MemoryMB") or 0),
        })
        cores = alloc["AllocatedResources"]["Tasks"].get(task["Name"], {}).get("Cpu", {}).get("ReservedCores")
        if cores:
            env["NOMAD_CPU_CORES"] = ",".join(str(c) for c in cores)
        for port in alloc["AllocatedResources"]["Shared"]["Ports"] or []:
            label, value, to = port["Label"], port["Value"], port["To"] or port["Value"]
            env.update({f"NOMAD_IP_{label}": port["HostIP"], f"NOMAD_PORT_{label}": str(value),
                        f"NOMAD_ADDR_{label}": f"{port['HostIP']}:{value}", f"NOMAD_HOST_IP_{label}": port["HostIP"],
                        f"NOMAD_HOST_PORT_{label}": str(value), f"NOMAD_HOST_ADDR_{label}": f"{port['HostIP']}:{value}",
                        f"NOMAD_ALLOC_PORT_{label}": str(to)})
        for name, value in (task.get("Env") or {}).items():
            env[name] = self._interpolate(str(value), env, node)
        return env

    def _interpolate(self, text: str, env: dict[str, str], node: _Node) -> str:
        """Nomad's runtime interpolation: ${NOMAD_*} and task env, ${attr.*}, ${node.*};
        anything unknown stays as written (as Nomad leaves it)."""
        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name in env:
                return env[name]
            value, found = self._resolve(node, match.group(0))
            return str(value) if found else match.group(0)

        return re.sub(r"\$\{([^}]+)\}", replace, text)

    def _launch(self, alloc: dict[str, Any]) -> None:
        """Start the allocation's tasks as local processes (raw_exec), templates first."""
        alloc_id = alloc["ID"]
        runtime = self._runtime[alloc_id]
        node = self._nodes[alloc["NodeID"]]
        group = self._group_of(alloc)
        folder = self.alloc_dir(alloc_id)
        runtime.folder = folder
        for sub in ("alloc/data", "alloc/logs", "alloc/tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        envs: dict[str, dict[str, str]] = {}
        for task in group.get("Tasks") or []:
            for sub in ("local", "secrets", "tmp"):
                (folder / task["Name"] / sub).mkdir(parents=True, exist_ok=True)
            (folder / task["Name"] / "secrets").chmod(0o700)
            env = envs[task["Name"]] = self._task_env(alloc, task, node, folder)
            try:
                self._render_templates(alloc, task, env, node)
            except TemplateMissing as missing:
                # consul-template blocks on a Variable that does not exist yet; so does the task.
                if not runtime.waiting_template:
                    runtime.waiting_template = True
                    path = missing.path if "@" in missing.path else f"{missing.path}@{alloc['Namespace']}"
                    alloc["TaskStates"][task["Name"]]["Events"].append(
                        _event("Template", f"Missing: nomad.var.block({path}.{self.region})"))
                    self._touch_alloc(alloc)
                self._after(0.2, lambda: self._start_alloc(alloc_id))
                return
            except (TemplateError, OSError, ValueError) as exc:
                self._task_failed_to_start(alloc, task["Name"], "Template", f"Template failed: {exc}")
                return
        runtime.waiting_template = False
        for task in group.get("Tasks") or []:
            if task.get("Driver") != "raw_exec":
                self._task_running(alloc, task["Name"])  # only raw_exec is run for real
                continue
            self._spawn(alloc, task, envs[task["Name"]], node, folder)
            if alloc["ClientStatus"] in _TERMINAL:
                return

    def _render_templates(self, alloc: dict[str, Any], task: dict[str, Any], env: dict[str, str],
                          node: _Node) -> None:
        task_dir = self.alloc_dir(alloc["ID"]) / task["Name"]

        def read_var(spec: str) -> dict[str, str] | None:
            path, _, namespace = spec.partition("@")
            var = self._vars.get((namespace or alloc["Namespace"], path))
            return dict(var["Items"]) if var else None

        for template in task.get("Templates") or []:
            if template.get("SourcePath"):
                raise TemplateError("source templates are not implemented by the double")
            text = render_template(template.get("EmbeddedTmpl") or "", read_var, env)
            dest = Path(self._interpolate(template.get("DestPath") or "", env, node))
            if not dest.is_absolute():
                dest = task_dir / dest
            dest.parent.mkdir(parents=True, exist_ok=True)
            mode = int(template.get("Perms") or "0644", 8)
            tmp = dest.with_name(f".{dest.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.chmod(tmp, mode)  # the umask must not widen or narrow what the job asked for
            os.replace(tmp, dest)

    def _spawn(self, alloc: dict[str, Any], task: dict[str, Any], env: dict[str, str], node: _Node,
               folder: Path) -> None:
        config = task.get("Config") or {}
        command = self._interpolate(str(config.get("command") or ""), env, node)
        args = [self._interpolate(str(arg), env, node) for arg in config.get("args") or []]
        task_dir = folder / task["Name"]
        resolved = command if os.path.isabs(command) else (shutil.which(command, path=env.get("PATH")) or
                                                           (str(task_dir / command) if command and
                                                            (task_dir / command).exists() else None))
        if not command or not resolved:
            self._task_failed_to_start(alloc, task["Name"], "Driver Failure",
                                       "failed to launch command with executor: rpc error: code = Unknown desc = "
                                       f'exec: "{command}": executable file not found in $PATH')
            return
        logs = folder / "alloc" / "logs"
        out = open(logs / f"{task['Name']}.stdout.0", "ab")
        err = open(logs / f"{task['Name']}.stderr.0", "ab")
        try:
            proc = subprocess.Popen([resolved, *args], cwd=task_dir, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
        except OSError as exc:
            out.close()
            err.close()
            self._task_failed_to_start(alloc, task["Name"], "Driver Failure",
                                       f"failed to launch command with executor: {exc}")
            return
        kill_name = task.get("KillSignal") or "SIGTERM"
        try:
            kill_signal = int(signal.Signals[kill_name])
        except KeyError:
            kill_signal = int(signal.SIGTERM)
        record = _Proc(proc=proc, files=[out, err], kill_signal=kill_signal,
                       kill_timeout=min(KILL_TIMEOUT_CAP, (task.get("KillTimeout") or 5 * SECOND) / SECOND))
        record.watcher = threading.Thread(target=self._watch, args=(alloc["ID"], task["Name"], record),
                                          name=f"nomad-double-task:{proc.pid}", daemon=True)
        self._runtime[alloc["ID"]].procs[task["Name"]] = record
        record.watcher.start()
        log.info("nomad double: %s task %s started as pid %d: %s", alloc["Name"], task["Name"], proc.pid,
                 " ".join([resolved, *args]))
        self._task_running(alloc, task["Name"])

    def _task_failed_to_start(self, alloc: dict[str, Any], task: str, kind: str, message: str) -> None:
        state = alloc["TaskStates"][task]
        extra: dict[str, Any] = {"FailsTask": True, "Message": message}
        if kind == "Driver Failure":
            extra["DriverError"] = message
        else:
            extra["SetupError"] = message
        state["Events"].append(_event(kind, message, **extra))
        state.update(State="dead", Failed=True, FinishedAt=_rfc3339())
        alloc["ClientStatus"] = "failed"
        alloc["ClientDescription"] = "Failed tasks"
        self._touch_alloc(alloc)
        self._stop_processes(alloc["ID"])
        self._capacity_changed()

    def _watch(self, alloc_id: str, task: str, record: _Proc) -> None:
        code = record.proc.wait()
        for handle in record.files:
            handle.close()
        record.done.set()
        with self._lock:
            alloc = self._allocs.get(alloc_id)
            if alloc is None or alloc["ClientStatus"] in _TERMINAL:
                return  # lost or failed already: the exit does not change the story
            exit_code, sig = (0, -code) if code < 0 else (code, 0)
            if record.stopping:
                state = alloc["TaskStates"][task]
                state["Events"].append(_event("Killed", "Task successfully killed", ExitCode=exit_code, Signal=sig))
                state.update(State="dead", FinishedAt=_rfc3339())
                self._maybe_alloc_done(alloc)
            else:
                self._task_ended(alloc, task, exit_code, sig)
        log.info("nomad double: task %s of %s exited (%s)", task, alloc_id[:8], code)

    def _task_ended(self, alloc: dict[str, Any], task: str, exit_code: int, sig: int) -> None:
        state = alloc["TaskStates"][task]
        if state["State"] == "dead":
            return
        display = f"Exit Code: {exit_code}" + (f", Signal: {sig}" if sig else "")
        state["Events"].append(_event("Terminated", display, ExitCode=exit_code, Signal=sig))
        failed = exit_code != 0 or sig != 0
        if failed:
            # The double does not restart tasks; it says so the way Nomad ends a restart run.
            policy = self._group_of(alloc).get("RestartPolicy") or {}
            state["Events"].append(_event(
                "Not Restarting",
                f"Exceeded allowed attempts {policy.get('Attempts', 0)} in interval "
                f"{_go_duration_text(policy.get('Interval') or 0)} and mode is \"{policy.get('Mode', 'fail')}\"",
                FailsTask=True))
        state.update(State="dead", Failed=failed, FinishedAt=_rfc3339())
        self._maybe_alloc_done(alloc)

    def _maybe_alloc_done(self, alloc: dict[str, Any]) -> None:
        states = alloc["TaskStates"].values()
        if all(s["State"] == "dead" for s in states):
            failed = any(s["Failed"] for s in states)
            alloc["ClientStatus"] = "failed" if failed else "complete"
            alloc["ClientDescription"] = "Failed tasks" if failed else "All tasks have completed"
            self._capacity_changed()
        self._touch_alloc(alloc)

    def _stop_alloc(self, alloc: dict[str, Any], why: str) -> None:
        """Desired stop: the client kills the tasks; the allocation completes when they end."""
        alloc["DesiredStatus"] = "stop"
        alloc["DesiredDescription"] = why
        runtime = self._runtime[alloc["ID"]]
        for task, state in alloc["TaskStates"].items():
            proc = runtime.procs.get(task)
            if proc is not None and not proc.done.is_set():
                state["Events"].append(_event(
                    "Killing", f"Sent interrupt. Waiting {proc.kill_timeout:g}s before force killing",
                    KillTimeout=int(proc.kill_timeout * SECOND)))
                continue
            if state["State"] != "dead":
                if state["State"] == "running":
                    state["Events"].append(_event("Killing", "Sent interrupt"))
                    state["Events"].append(_event("Killed", "Task successfully killed"))
                state.update(State="dead", FinishedAt=_rfc3339())
        self._touch_alloc(alloc)
        if not any(p for p in runtime.procs.values() if not p.done.is_set()):
            self._maybe_alloc_done(alloc)
        self._stop_processes(alloc["ID"])

    def _stop_processes(self, alloc_id: str) -> None:
        runtime = self._runtime.get(alloc_id)
        for proc in (runtime.procs.values() if runtime else ()):
            if not proc.done.is_set() and not proc.stopping:
                proc.stopping = True
                self._spawn_killer(proc)

    def _spawn_killer(self, proc: _Proc) -> None:
        thread = threading.Thread(target=self._kill, args=(proc,), name=f"nomad-double-kill:{proc.proc.pid}",
                                  daemon=True)
        self._killers = [t for t in self._killers if t.is_alive()] + [thread]
        thread.start()

    @staticmethod
    def _kill(proc: _Proc) -> None:
        """The kill_signal to the task's process group, SIGKILL after kill_timeout."""
        pid = proc.proc.pid
        try:
            os.killpg(pid, proc.kill_signal)
        except (ProcessLookupError, PermissionError):
            return
        if not proc.done.wait(proc.kill_timeout):
            log.info("nomad double: pid %d ignored signal %d for %.1fs; SIGKILL", pid, proc.kill_signal,
                     proc.kill_timeout)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return
            proc.done.wait(5)

    # -- shapes ------------------------------------------------------------------------

    def _node_full(self, node: _Node) -> dict[str, Any]:
        now = _rfc3339()
        reserved_ports = ",".join(str(port) for port in sorted(node.reserved_ports))
        devices = []
        for name, count in node.devices.items():
            parts = name.split("/")
            devices.append({"Vendor": parts[0], "Type": parts[1] if len(parts) > 1 else parts[0],
                            "Name": parts[2] if len(parts) > 2 else "double",
                            "Instances": [{"ID": f"{name}-{i}", "Healthy": True, "HealthDescription": "",
                                           "Locality": None} for i in range(count)],
                            "Attributes": {}})
        return {
            "ID": node.id, "SecretID": "", "Datacenter": node.datacenter, "Name": node.name,
            "HTTPAddr": f"{node.address}:4646", "TLSEnabled": self.tls, "Attributes": dict(node.attributes),
            "NodeResources": {"Cpu": {"CpuShares": node.cores * 1000, "TotalCpuCores": node.cores,
                                      "ReservableCpuCores": list(range(node.cores))},
                              "Memory": {"MemoryMB": node.memory_mb}, "Disk": {"DiskMB": 100_000},
                              "Networks": [{"Mode": "host", "Device": "lo", "CIDR": f"{node.address}/32",
                                            "IP": node.address, "MBits": 1000, "DNS": None,
                                            "ReservedPorts": None, "DynamicPorts": None}],
                              "Devices": devices or None, "MinDynamicPort": DYNAMIC_PORTS.start,
                              "MaxDynamicPort": DYNAMIC_PORTS.stop},
            "ReservedResources": {"Cpu": {"CpuShares": 0, "ReservedCpuCores": None}, "Memory": {"MemoryMB": 0},
                                  "Disk": {"DiskMB": 0},
                                  "Networks": {"ReservedHostPorts": reserved_ports}},
            "Resources": None, "Reserved": None, "Links": {}, "Meta": {}, "NodeClass": node.node_class,
            "NodePool": node.node_pool, "ComputedClass": f"v1:{abs(hash((node.node_class, node.datacenter)))}",
            "Drain": False, "DrainStrategy": None,
            "SchedulingEligibility": "eligible" if node.eligible else "ineligible",
            "Status": node.status, "StatusDescription": "", "StatusUpdatedAt": int(time.time()),
            "Events": [{"Message": "Node registered", "Subsystem": "Cluster", "Details": None,
                        "Timestamp": now, "CreateIndex": node.create_index}],
            "Drivers": self._drivers(node), "HostVolumes": None, "HostNetworks": None,
            "CSIControllerPlugins": None, "CSINodePlugins": None, "LastDrain": None,
            "CreateIndex": node.create_index, "ModifyIndex": node.modify_index,
        }

    @staticmethod
    def _drivers(node: _Node) -> dict[str, Any]:
        return {name: {"Attributes": {f"driver.{name}": "true"} if info["Detected"] else None,
                       "Detected": info["Detected"], "Healthy": info["Healthy"],
                       "HealthDescription": "Healthy" if info["Healthy"] else
                       ("Driver is not detected" if not info["Detected"] else "Driver is unhealthy"),
                       "UpdateTime": _rfc3339()}
                for name, info in node.drivers.items()}

    def _node_stub(self, node: _Node, with_attrs: bool, with_resources: bool) -> dict[str, Any]:
        full = self._node_full(node)
        stub = {"Address": node.address, "ID": node.id, "Datacenter": node.datacenter, "Name": node.name,
                "NodeClass": node.node_class, "NodePool": node.node_pool, "Version": NOMAD_VERSION,
                "Drain": False, "SchedulingEligibility": full["SchedulingEligibility"], "Status": node.status,
                "StatusDescription": "", "Drivers": full["Drivers"], "HostVolumes": None, "LastDrain": None,
                "CreateIndex": node.create_index, "ModifyIndex": node.modify_index}
        if with_attrs:
            stub["Attributes"] = full["Attributes"]
        if with_resources:
            stub["NodeResources"] = full["NodeResources"]
            stub["ReservedResources"] = full["ReservedResources"]
        return stub

    @staticmethod
    def _alloc_stub(alloc: dict[str, Any], resources: bool = False, task_states: bool = True) -> dict[str, Any]:
        keys = ("ID", "EvalID", "Name", "Namespace", "NodeID", "NodeName", "JobID", "TaskGroup", "DesiredStatus",
                "DesiredDescription", "DesiredTransition", "ClientStatus", "ClientDescription", "DeploymentStatus",
                "FollowupEvalID", "NextAllocation", "RescheduleTracker", "PreemptedAllocations",
                "PreemptedByAllocation", "CreateIndex", "ModifyIndex", "CreateTime", "ModifyTime")
        stub = {key: copy.deepcopy(alloc[key]) for key in keys}
        stub["JobType"] = alloc["Job"]["Type"]
        stub["JobVersion"] = alloc["Job"]["Version"]
        stub["TaskStates"] = copy.deepcopy(alloc["TaskStates"]) if task_states else None
        if resources:
            stub["AllocatedResources"] = copy.deepcopy(alloc["AllocatedResources"])
        return stub

    def _job_stub(self, job: dict[str, Any]) -> dict[str, Any]:
        return {"ID": job["ID"], "ParentID": job.get("ParentID", ""), "Name": job["Name"],
                "Namespace": job["Namespace"], "Datacenters": job["Datacenters"], "NodePool": job["NodePool"],
                "Multiregion": job.get("Multiregion"), "Type": job["Type"], "Priority": job["Priority"],
                "Periodic": bool(job.get("Periodic")), "ParameterizedJob": bool(job.get("ParameterizedJob")),
                "Stop": job["Stop"], "Status": self._job_status(job), "StatusDescription": "",
                "JobSummary": self._summary(job), "CreateIndex": job["CreateIndex"],
                "ModifyIndex": job["ModifyIndex"], "JobModifyIndex": job["JobModifyIndex"],
                "SubmitTime": job["SubmitTime"], "Meta": job.get("Meta")}

    @staticmethod
    def _var_meta(var: dict[str, Any]) -> dict[str, Any]:
        return {k: var[k] for k in ("Namespace", "Path", "CreateIndex", "ModifyIndex", "CreateTime", "ModifyTime")}

    # -- HTTP --------------------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        get, post, put, delete = "GET", "POST", "PUT", "DELETE"
        table: list[tuple[tuple[str, ...], str, Callable]] = [
            ((get,), "/v1/agent/self", self._h_agent_self),
            ((get,), "/v1/agent/members", self._h_agent_members),
            ((get,), "/v1/status/leader", self._h_leader),
            ((get,), "/v1/status/peers", self._h_peers),
            ((get,), "/v1/regions", self._h_regions),
            ((get,), "/v1/namespaces", self._h_namespaces),
            ((post, put), "/v1/namespace", self._h_namespace_write),
            ((get,), "/v1/namespace/{name}", self._h_namespace),
            ((post, put), "/v1/namespace/{name}", self._h_namespace_write),
            ((delete,), "/v1/namespace/{name}", self._h_namespace_delete),
            ((post, put), "/v1/jobs/parse", self._h_parse),
            ((get,), "/v1/jobs", self._h_jobs),
            ((post, put), "/v1/jobs", self._h_register),
            ((get,), "/v1/job/{job_id}", self._h_job),
            ((post, put), "/v1/job/{job_id}", self._h_register),
            ((delete,), "/v1/job/{job_id}", self._h_deregister),
            ((get,), "/v1/job/{job_id}/evaluations", self._h_job_evals),
            ((get,), "/v1/job/{job_id}/allocations", self._h_job_allocs),
            ((get,), "/v1/job/{job_id}/summary", self._h_job_summary),
            ((get,), "/v1/evaluations", self._h_evals),
            ((get,), "/v1/evaluation/{eval_id}", self._h_eval),
            ((get,), "/v1/evaluation/{eval_id}/allocations", self._h_eval_allocs),
            ((get,), "/v1/allocations", self._h_allocs),
            ((get,), "/v1/allocation/{alloc_id}", self._h_alloc),
            ((get,), "/v1/nodes", self._h_nodes),
            ((get,), "/v1/node/{node_id}", self._h_node),
            ((get,), "/v1/node/{node_id}/allocations", self._h_node_allocs),
            ((get,), "/v1/vars", self._h_vars),
            ((get,), "/v1/var/{path:.+}", self._h_var_get),
            ((post, put), "/v1/var/{path:.+}", self._h_var_put),
            ((delete,), "/v1/var/{path:.+}", self._h_var_delete),
        ]
        for methods, path, handler in table:
            for method in methods:
                app.router.add_route(method, path, handler)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        request[_BODY] = body
        request[_RAW] = raw
        recorded_body = copy.deepcopy(body)
        if request.path.startswith("/v1/var/") and isinstance(recorded_body, dict) and isinstance(
                recorded_body.get("Items"), dict):
            recorded_body["Items"] = {key: "REDACTED" for key in recorded_body["Items"]}
        record = RecordedRequest(method=request.method, path=request.path, query=dict(request.query),
                                 headers=dict(request.headers), json=recorded_body)
        with self._lock:
            self.requests.append(record)
        try:
            await self._stall()
            fault = self._take_fault(request)
            if fault is not None:
                response: web.StreamResponse = web.Response(status=fault.status, text=fault.message)
            else:
                self._check_acl(request)
                region = request.query.get("region")
                if region and region != self.region:
                    raise _HttpError(500, "No path to region")
                await self._blocking_query(request)
                response = await handler(request)
        except _HttpError as err:
            response = web.Response(status=err.status, text=err.message)
        except web.HTTPException as exc:  # unknown route (404) or method (405)
            response = web.Response(status=exc.status, text=exc.text or exc.reason)
        record.status = response.status
        response.headers["X-Nomad-Index"] = str(self._index)
        response.headers["X-Nomad-KnownLeader"] = "true"
        response.headers["X-Nomad-LastContact"] = "0"
        return response

    async def _stall(self) -> None:
        # An unresponsive agent: the request waits until the hang ends (or the double closes).
        while not self._closing and time.monotonic() < self._hang_until:
            await asyncio.sleep(min(0.05, max(0.0, self._hang_until - time.monotonic())))

    def _take_fault(self, request: web.Request) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path and not request.path.startswith(fault.path):
                    continue
                if fault.method and request.method != fault.method:
                    continue
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    def _check_acl(self, request: web.Request) -> None:
        if not self.acl_token or request.path.startswith("/v1/status/"):
            return  # the status endpoints need no token in Nomad either
        token = request.headers.get("X-Nomad-Token")
        auth = request.headers.get("Authorization", "")
        if not token and auth.startswith("Bearer "):
            token = auth[len("Bearer "):]
        if not token:
            raise _HttpError(403, "Permission denied")
        if token != self.acl_token:
            raise _HttpError(403, "ACL token not found")

    async def _blocking_query(self, request: web.Request) -> None:
        """?index=N&wait=D: wait until something changes past N (at most D, default 5m)."""
        if request.method != "GET" or "index" not in request.query:
            return
        try:
            index = int(request.query["index"])
            wait = go_duration_ns(request.query.get("wait", "5m")) / SECOND
        except (ValueError, HCLError):
            raise _HttpError(400, "Invalid index or wait") from None
        deadline = time.monotonic() + min(wait, 600)
        while not self._closing and self._index <= index and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    @staticmethod
    def _ns(request: web.Request) -> str:
        return request.query.get("namespace") or "default"

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, text=json.dumps(data), content_type="application/json")

    @staticmethod
    def _body(request: web.Request) -> Any:
        if request[_RAW] and request[_BODY] is None:
            raise _HttpError(400, "invalid character looking for beginning of value")
        return request[_BODY]

    @staticmethod
    def _flag(request: web.Request, name: str) -> bool:
        return request.query.get(name, "").lower() in ("1", "true", "t")

    # agent, status, namespaces

    async def _h_agent_self(self, request: web.Request) -> web.Response:
        member = self._member()
        return self._json({
            "config": {"Region": self.region, "Datacenter": self.datacenter, "NodeName": "nomad-double",
                       "DataDir": str(self.state_dir), "BindAddr": self.host,
                       "Version": {"Version": NOMAD_VERSION, "VersionPrerelease": "", "VersionMetadata": "",
                                   "Revision": "double"},
                       "ACL": {"Enabled": bool(self.acl_token)}, "Client": {"Enabled": True},
                       "Server": {"Enabled": True},
                       "TLSConfig": {"EnableHTTP": self.tls, "EnableRPC": self.tls,
                                     "VerifyHTTPSClient": self.verify_client},
                       "Ports": {"HTTP": self.port, "RPC": 4647, "Serf": 4648}},
            "member": member,
            "stats": {"nomad": {"server": "true", "leader": "true", "known_regions": "1"},
                      "client": {"known_servers": f"{self.host}:4647", "node_id": "nomad-double"}},
        })

    def _member(self) -> dict[str, Any]:
        return {"Name": f"nomad-double.{self.region}", "Addr": self.host, "Port": 4648,
                "Tags": {"role": "nomad", "region": self.region, "dc": self.datacenter, "build": NOMAD_VERSION,
                         "port": "4647", "rpc_addr": self.host, "vsn": "1", "mvn": "1", "bootstrap": "1"},
                "Status": "alive", "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2, "DelegateMin": 2,
                "DelegateMax": 5, "DelegateCur": 4}

    async def _h_agent_members(self, request: web.Request) -> web.Response:
        return self._json({"ServerName": "nomad-double", "ServerRegion": self.region,
                           "ServerDC": self.datacenter, "Members": [self._member()]})

    async def _h_leader(self, request: web.Request) -> web.Response:
        return self._json(f"{self.host}:4647")

    async def _h_peers(self, request: web.Request) -> web.Response:
        return self._json([f"{self.host}:4647"])

    async def _h_regions(self, request: web.Request) -> web.Response:
        return self._json([self.region])

    async def _h_namespaces(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        with self._lock:
            return self._json([copy.deepcopy(ns) for name, ns in sorted(self._namespaces.items())
                               if name.startswith(prefix)])

    async def _h_namespace(self, request: web.Request) -> web.Response:
        with self._lock:
            namespace = self._namespaces.get(request.match_info["name"])
            if namespace is None:
                raise _HttpError(404, "Namespace not found")
            return self._json(copy.deepcopy(namespace))

    async def _h_namespace_write(self, request: web.Request) -> web.Response:
        body = self._body(request) or {}
        name = request.match_info.get("name") or body.get("Name")
        if not name:
            raise _HttpError(400, "Namespace name required")
        self.add_namespace(name, body.get("Description", ""))
        return web.Response(status=200)

    async def _h_namespace_delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        with self._lock:
            if name == "default":
                raise _HttpError(500, "default namespace can not be deleted")
            if any(key[0] == name for key in self._jobs):
                raise _HttpError(500, f'namespace "{name}" has non-terminal jobs in regions: [{self.region}]')
            self._namespaces.pop(name, None)
            self._bump()
        return web.Response(status=200)

    # jobs

    async def _h_parse(self, request: web.Request) -> web.Response:
        body = self._body(request)
        if not isinstance(body, dict) or not body.get("JobHCL"):
            raise _HttpError(400, "Job spec is empty")
        try:
            job = parse_job_hcl(str(body["JobHCL"]), canonicalize=bool(body.get("Canonicalize")))
        except HCLError as exc:
            raise _HttpError(400, str(exc)) from None
        return self._json(job)

    async def _h_jobs(self, request: web.Request) -> web.Response:
        ns, prefix = self._ns(request), request.query.get("prefix", "")
        with self._lock:
            jobs = [self._job_stub(job) for (job_ns, job_id), job in sorted(self._jobs.items())
                    if (ns == "*" or job_ns == ns) and job_id.startswith(prefix)]
        return self._json(jobs)

    async def _h_register(self, request: web.Request) -> web.Response:
        body = self._body(request)
        if not isinstance(body, dict) or not isinstance(body.get("Job"), dict):
            raise _HttpError(400, "Job must be specified")
        submitted = body["Job"]
        if not submitted.get("ID"):
            raise _HttpError(400, "Job ID hasn't been provided")
        url_id = request.match_info.get("job_id")
        if url_id and submitted["ID"] != url_id:
            raise _HttpError(400, "Job ID does not match name")
        # Nomad's precedence: ?namespace=, then the request body's, then the job's own.
        namespace = request.query.get("namespace") or body.get("Namespace") or submitted.get("Namespace") or "default"
        region = request.query.get("region") or body.get("Region") or submitted.get("Region") or self.region
        if region == "global":
            region = self.region
        if region != self.region:
            raise _HttpError(500, "No path to region")
        job = canonicalize_job(submitted)
        job.update(Namespace=namespace, Region=region, NodePool=job.get("NodePool") or "default")
        for secret in ("VaultToken", "ConsulToken"):
            job[secret] = ""  # Nomad clears these before storing the job
        with self._lock:
            if namespace not in self._namespaces:
                raise _HttpError(500, f'job "{job["ID"]}" is in nonexistent namespace "{namespace}"')
            if job["NodePool"] not in self._node_pools():
                raise _HttpError(500, f'job "{job["ID"]}" is in nonexistent node pool "{job["NodePool"]}"')
            errors = self._validate(job)
            if errors:
                raise _HttpError(500, _multierror(errors))
            existing = self._jobs.get((namespace, job["ID"]))
            if body.get("EnforceIndex"):
                want = int(body.get("JobModifyIndex") or 0)
                prefix = "Enforcing job modify index"
                if existing is not None and want == 0:
                    raise _HttpError(500, f"{prefix} 0: job already exists")
                if existing is not None and want != existing["JobModifyIndex"]:
                    raise _HttpError(500, f"{prefix} {want}: job exists with conflicting job modify index: "
                                          f"{existing['JobModifyIndex']}")
                if existing is None and want != 0:
                    raise _HttpError(500, f"{prefix} {want}: job does not exist")
            reply = self._register(job)
        log.info("nomad double: registered %s/%s (eval %s)", namespace, job["ID"], reply["EvalID"][:8])
        return self._json(reply)

    async def _h_job(self, request: web.Request) -> web.Response:
        with self._lock:
            job = self._jobs.get((self._ns(request), request.match_info["job_id"]))
            if job is None:
                raise _HttpError(404, "job not found")
            return self._json(self._job_view(job))

    async def _h_deregister(self, request: web.Request) -> web.Response:
        purge = request.query.get("purge", "")
        if purge and purge.lower() not in ("true", "false", "1", "0", "t", "f"):
            raise _HttpError(500, f'Failed to parse value of "purge" ({purge}) as a bool: invalid syntax')
        with self._lock:
            reply = self._deregister((self._ns(request), request.match_info["job_id"]), self._flag(request, "purge"))
        return self._json(reply)

    async def _h_job_evals(self, request: web.Request) -> web.Response:
        key = (self._ns(request), request.match_info["job_id"])
        with self._lock:
            return self._json([copy.deepcopy(e) for e in sorted(self._evals.values(), key=lambda e: e["CreateIndex"])
                               if (e["Namespace"], e["JobID"]) == key])

    async def _h_job_allocs(self, request: web.Request) -> web.Response:
        key = (self._ns(request), request.match_info["job_id"])
        with self._lock:
            return self._json([self._alloc_stub(a, self._flag(request, "resources"))
                               for a in self._job_allocs(key)])

    async def _h_job_summary(self, request: web.Request) -> web.Response:
        with self._lock:
            job = self._jobs.get((self._ns(request), request.match_info["job_id"]))
            if job is None:
                raise _HttpError(404, "job not found")
            return self._json(self._summary(job))

    # evaluations, allocations, nodes

    async def _h_evals(self, request: web.Request) -> web.Response:
        ns, prefix = self._ns(request), request.query.get("prefix", "")
        with self._lock:
            return self._json([copy.deepcopy(e) for e in sorted(self._evals.values(), key=lambda e: e["CreateIndex"])
                               if (ns == "*" or e["Namespace"] == ns) and e["ID"].startswith(prefix)])

    async def _h_eval(self, request: web.Request) -> web.Response:
        with self._lock:
            evaluation = self._evals.get(request.match_info["eval_id"])
            if evaluation is None:
                raise _HttpError(404, "eval not found")
            return self._json(copy.deepcopy(evaluation))

    async def _h_eval_allocs(self, request: web.Request) -> web.Response:
        eval_id = request.match_info["eval_id"]
        with self._lock:
            return self._json([self._alloc_stub(a) for a in self._sorted_allocs() if a["EvalID"] == eval_id])

    async def _h_allocs(self, request: web.Request) -> web.Response:
        ns, prefix = self._ns(request), request.query.get("prefix", "")
        task_states = request.query.get("task_states", "true").lower() not in ("false", "0", "f")
        with self._lock:
            return self._json([self._alloc_stub(a, self._flag(request, "resources"), task_states)
                               for a in self._sorted_allocs()
                               if (ns == "*" or a["Namespace"] == ns) and a["ID"].startswith(prefix)])

    async def _h_alloc(self, request: web.Request) -> web.Response:
        with self._lock:
            alloc = self._allocs.get(request.match_info["alloc_id"])
            if alloc is None:
                raise _HttpError(404, "alloc not found")
            return self._json(copy.deepcopy(alloc))

    async def _h_nodes(self, request: web.Request) -> web.Response:
        prefix = request.query.get("prefix", "")
        with self._lock:
            return self._json([self._node_stub(n, self._flag(request, "os"), self._flag(request, "resources"))
                               for n in self._sorted_nodes() if n.id.startswith(prefix)])

    async def _h_node(self, request: web.Request) -> web.Response:
        with self._lock:
            node = self._nodes.get(request.match_info["node_id"])
            if node is None:
                raise _HttpError(404, "node not found")
            return self._json(self._node_full(node))

    async def _h_node_allocs(self, request: web.Request) -> web.Response:
        node_id = request.match_info["node_id"]
        with self._lock:
            return self._json([copy.deepcopy(a) for a in self._sorted_allocs() if a["NodeID"] == node_id])

    # variables

    @staticmethod
    def _check_var_path(path: str) -> None:
        if not _VAR_PATH.match(path) or path.startswith("/") or path.endswith("/") or "//" in path:
            raise _HttpError(500, f'invalid path "{path}"')
        parts = path.split("/")
        if parts[0] == "nomad" and not (len(parts) >= 2 and parts[1] == "jobs"):
            raise _HttpError(500, 'only paths at "nomad/jobs" or below are valid paths under the top-level '
                                  '"nomad" directory')

    def _cas_conflict(self, namespace: str, path: str, cas: str | None) -> web.Response | None:
        if cas is None:
            return None
        try:
            want = int(cas)
        except ValueError:
            raise _HttpError(400, f'can not parse cas: strconv.ParseUint: parsing "{cas}": invalid syntax') from None
        current = self._vars.get((namespace, path))
        have = current["ModifyIndex"] if current else 0
        if want == have:
            return None
        conflict = copy.deepcopy(current) if current else {
            "Namespace": namespace, "Path": path, "CreateIndex": 0, "ModifyIndex": 0, "CreateTime": 0,
            "ModifyTime": 0, "Items": None}
        return self._json(conflict, status=409)

    async def _h_vars(self, request: web.Request) -> web.Response:
        ns, prefix = self._ns(request), request.query.get("prefix", "")
        with self._lock:
            return self._json([self._var_meta(var) for (var_ns, path), var in sorted(self._vars.items())
                               if (ns == "*" or var_ns == ns) and path.startswith(prefix)])

    async def _h_var_get(self, request: web.Request) -> web.Response:
        with self._lock:
            var = self._vars.get((self._ns(request), request.match_info["path"]))
            if var is None:
                raise _HttpError(404, "variable not found")
            return self._json(copy.deepcopy(var))

    async def _h_var_put(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        body = self._body(request)
        if not isinstance(body, dict) or not body.get("Items"):
            raise _HttpError(400, "variable missing required Items object")
        items = body["Items"]
        if not isinstance(items, dict) or not all(isinstance(v, str) for v in items.values()):
            raise _HttpError(400, "json: cannot unmarshal value into Go struct field "
                                  "VariableDecrypted.Items of type string")
        # Nomad: the variable's own Namespace wins, else the request's (?namespace=).
        namespace = body.get("Namespace") or self._ns(request)
        self._check_var_path(path)
        with self._lock:
            if namespace not in self._namespaces:
                raise _HttpError(500, f'variable "{path}" is in nonexistent namespace "{namespace}"')
            conflict = self._cas_conflict(namespace, path, request.query.get("cas"))
            if conflict is not None:
                return conflict
            var = self._store_var(namespace, path, dict(items))
            return self._json(copy.deepcopy(var))

    async def _h_var_delete(self, request: web.Request) -> web.Response:
        namespace, path = self._ns(request), request.match_info["path"]
        with self._lock:
            conflict = self._cas_conflict(namespace, path, request.query.get("cas"))
            if conflict is not None:
                return conflict
            if self._vars.pop((namespace, path), None) is not None:
                self._bump()
        return web.Response(status=204)
