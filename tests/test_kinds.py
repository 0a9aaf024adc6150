"""One owner for the facts along an exec: error kinds (errors.ErrorKind), slot states
(protocol.SlotState), the shape of a bash result (protocol.BashResult) and the reading
of "killed by a signal, not a timeout". The agent (standard library only) sends its
kinds and its bash results as plain JSON: these tests pin that both sides agree, and
that no module of the package spells a kind or a slot state as a bare string."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import hpc_sandbox
from hpc_sandbox import errors, protocol
from hpc_sandbox.errors import ClientError, ErrorKind, HpcSandboxError
from hpc_sandbox.models import ToolResult
from hpc_sandbox.protocol import BashResult, Call, CallAnswer, SlotState

from helpers import AGENT, AgentDriver

PACKAGE = Path(hpc_sandbox.__file__).parent
KINDS = {kind.value for kind in ErrorKind}
STATES = {state.value for state in SlotState}


def _agent_kinds() -> dict[str, int]:
    """Every error kind agent.py can send, read from its source: the first argument of
    each ToolError(...), each `kind = "..."` it assigns, each {"kind": "..."} it builds
    (kind -> a line it is on)."""
    found: dict[str, int] = {}
    tree = ast.parse(AGENT.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ToolError" and node.args:
            first = node.args[0]
            assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                f"agent.py:{node.lineno}: ToolError's kind must be a literal, for this test to read it"
            found.setdefault(first.value, node.lineno)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (isinstance(key, ast.Constant) and key.value == "kind" and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)):
                    found.setdefault(value.value, node.lineno)
    # A variable `kind` that goes into an answer's {"kind": kind} (the agent's catch-all
    # for OS errors); other variables of that name (a file's type) are not error kinds.
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        sends_kind = any(isinstance(d, ast.Dict) and any(
            isinstance(k, ast.Constant) and k.value == "kind" and isinstance(v, ast.Name) and v.id == "kind"
            for k, v in zip(d.keys, d.values)) for d in ast.walk(function))
        if not sends_kind:
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "kind" for t in node.targets):
                for value in ast.walk(node.value):
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        found.setdefault(value.value, node.lineno)
    return found


def test_every_kind_the_agent_can_send_is_a_member_of_the_enum():
    kinds = _agent_kinds()
    # The reader finds what it should (a refactor of the agent that hides its kinds
    # from it must fail here, not pass with nothing checked).
    assert {"bad_request", "path", "not_found", "io", "is_directory", "unknown_tool", "reset_failed"} <= set(kinds)
    unknown = {kind: f"agent.py:{line}" for kind, line in kinds.items() if kind not in KINDS}
    assert not unknown, f"kinds the agent sends that errors.ErrorKind does not have: {unknown}"


def _package_modules() -> list:
    return [importlib.import_module(info.name)
            for info in pkgutil.walk_packages(hpc_sandbox.__path__, "hpc_sandbox.")
            if not info.name.startswith(("hpc_sandbox.agent", "hpc_sandbox.burst.modal"))]


def test_every_error_class_has_a_kind_of_the_enum():
    _package_modules()  # every error class of the package is defined once they are imported

    def subclasses(cls: type) -> list[type]:
        return [cls, *(c for sub in cls.__subclasses__() for c in subclasses(sub))]

    for cls in subclasses(HpcSandboxError):
        assert isinstance(cls.kind, ErrorKind), f"{cls.__module__}.{cls.__name__}.kind is {cls.kind!r}"


def test_the_status_table_is_keyed_by_the_enum_and_round_trips():
    for kind, (cls, status) in protocol.ERRORS.items():
        assert isinstance(kind, ErrorKind) and issubclass(cls, ClientError) and 400 <= status < 600
        assert protocol.status_of(kind) == status
        raised = protocol.error_for(kind.value, status, "m")  # as a client reads it off the wire
        assert type(raised) is cls and (cls is ClientError or protocol.status_for(raised) == status)
    assert isinstance(protocol.error_for("limit", protocol.BODY_TOO_LARGE, "m"), errors.LimitExceeded)


def test_a_kind_is_its_string_on_the_wire_and_in_results():
    assert json.dumps({"kind": ErrorKind.LEASE_LOST}) == '{"kind": "lease_lost"}'
    assert f"{ErrorKind.TIMEOUT}" == str(ErrorKind.TIMEOUT) == "timeout" == ErrorKind.TIMEOUT
    call = Call(0, "l", "e", "bash", {})
    wire = CallAnswer.failure(call, ErrorKind.AGENT_DIED, "gone").to_json()
    assert wire["error"] == {"kind": "agent_died", "message": "gone"}
    back = CallAnswer.from_json(json.loads(json.dumps(wire)))
    assert back.error_kind is ErrorKind.AGENT_DIED
    # A kind this version does not know (a newer server's) is kept as it came.
    newer = CallAnswer.from_json({**wire, "error": {"kind": "brand_new", "message": "m"}})
    assert newer.error_kind == "brand_new" and ToolResult.from_answer(newer).error_kind == "brand_new"


def test_the_decided_kinds():
    """The two kinds that were decided twice: one each now, as users saw them on the wire."""
    from hpc_sandbox.server.agent_process import AgentDied, AgentStuck

    assert AgentDied.kind == "agent_died" and AgentStuck.kind == "agent_stuck"
    assert errors.LimitExceeded.kind == "limit"  # the node server's own limits: HTTP 429
    assert ErrorKind.LIMIT_EXCEEDED == "limit_exceeded"  # a slot's limit ended the command


def test_slot_states_go_on_the_wire_as_their_strings():
    answer = protocol.SlotsAnswer([{"state": SlotState.LEASED}], {SlotState.FREE: 2, SlotState.EXPIRING: 1}, 0)
    wire = json.loads(json.dumps(answer.to_json()))
    assert wire == {"slots": [{"state": "leased"}], "counts": {"free": 2, "expiring": 1}, "running": 0}
    assert protocol.SlotsAnswer.from_json(wire).free == 2


# --- the bash result -------------------------------------------------------------------


@pytest.fixture
async def agent(tmp_path: Path):
    driver = await AgentDriver.start(tmp_path)
    yield driver
    await driver.close()


async def test_every_field_of_the_agents_bash_results_is_one_of_bash_result(agent):
    """The three forms the agent builds (plain, in a session, a background start) send
    no key that BashResult would drop on its way to ToolResult."""
    fields = {field.name for field in dataclasses.fields(BashResult)}
    forms = {
        "plain": await agent.call("bash", command="echo out; exit 3"),
        "session": await agent.call("bash", timeout=10, command="echo in-session", session="s"),
        "background": await agent.call("bash", command="sleep 0.1", background=True),
    }
    for form, answer in forms.items():
        assert answer["ok"], (form, answer)
        assert set(answer["result"]) <= fields, (form, set(answer["result"]) - fields)
    plain = BashResult.from_json(forms["plain"]["result"])
    assert (plain.exit_code, plain.stdout, plain.timed_out, plain.killed_by_signal) == (3, "out\n", False, False)
    result = ToolResult.from_answer(CallAnswer.success(Call(0, "l", "e", "bash", {}), forms["session"]["result"]))
    assert result.success and result.data["session"] == "s" and result.data["session_started"] is True
    started = ToolResult.from_answer(CallAnswer.success(Call(0, "l", "e", "bash", {}), forms["background"]["result"]))
    assert started.success and started.data["background"] is True and isinstance(started.data["pid"], int)


@pytest.mark.parametrize("fields, killed", [
    ({"signal": 9, "timed_out": False}, True),
    ({"signal": 15, "timed_out": True}, False),  # its timeout sent it
    ({"signal": None, "exit_code": 137}, False),  # a plain exit code is the command's own
    ({}, False),
])
def test_killed_by_a_signal_is_read_the_same_on_both_sides(fields, killed):
    assert BashResult.from_json(fields).killed_by_signal is killed
    answer = CallAnswer.success(Call(0, "l", "e", "bash", {}), fields)
    assert ToolResult.from_answer(answer).killed_by_signal is killed


def test_the_default_timeout_is_applied_in_one_place():
    assert protocol.exec_timeout(None) == protocol.exec_timeout(0) == protocol.DEFAULT_EXEC_TIMEOUT
    assert protocol.exec_timeout(2.5) == 2.5
    # Named only where it is defined, where a node server takes it as its configurable
    # default, and in the CLI's help text.
    allowed = {"protocol.py", "server/app.py", "cli/exec_.py"}
    for path in _modules_but_the_agent():
        if str(path.relative_to(PACKAGE)) not in allowed:
            assert "DEFAULT_EXEC_TIMEOUT" not in path.read_text(), f"{path} applies the default timeout itself"


# --- no bare kinds, no bare slot states --------------------------------------------------

_KIND_NAMES = {"kind", "error_kind"}


def _kind_takers() -> dict[str, int]:
    """Every function of the package (a class: its __init__) with a parameter named
    kind or error_kind -> that parameter's position in a call: a str literal passed
    there is a kind spelled by hand, whatever the function is called."""
    takers: dict[str, int] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        owner = {id(item): node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                 for item in node.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            params = [a.arg for a in node.args.posonlyargs + node.args.args]
            if params[:1] in (["self"], ["cls"]):
                params = params[1:]
            for position, param in enumerate(params):
                if param in _KIND_NAMES:
                    name = owner.get(id(node), node.name) if node.name == "__init__" else node.name
                    takers[name] = position
    return takers


_KIND_TAKERS = _kind_takers()


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return str(node.slice.value)  # metadata["error_kind"]
    return None


def _strings(node: ast.AST) -> list[ast.Constant]:
    """The str literals of an expression, of a tuple or set of them, or of an or/if."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in node.elts for c in _strings(e)]
    if isinstance(node, ast.BoolOp):
        return [c for v in node.values for c in _strings(v)]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    if isinstance(node, ast.Call):  # str(error.get("kind") or "http")
        return [c for arg in node.args for c in _strings(arg)]
    return []


def _bare(tree: ast.AST, names: set[str], values: set[str],
          takers: dict[str, int] | None = None) -> list[tuple[int, str]]:
    """Where a literal of `values` is assigned to, compared with or passed as one of
    `names` (as a keyword, or in the place a function of `takers` takes it)."""
    takers = takers or {}
    found = []
    for node in ast.walk(tree):
        candidates: list[ast.Constant] = []
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(_name(t) in names for t in targets) and node.value is not None:
                candidates = _strings(node.value)
            elif any(isinstance(t, ast.Tuple) and any(_name(e) in names for e in t.elts) for t in targets):
                candidates = _strings(node.value)
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_name(side) in names for side in sides):
                candidates = [c for side in sides for c in _strings(side)]
        elif isinstance(node, ast.keyword) and node.arg in names:
            candidates = _strings(node.value)
        elif isinstance(node, ast.Call) and _name(node.func) in takers:
            position = takers[_name(node.func)]  # type: ignore[index]
            candidates = _strings(node.args[position]) if position < len(node.args) else []
        elif isinstance(node, ast.Call) and _name(node.func) == "get" and node.args \
                and isinstance(node.args[0], ast.Constant) and node.args[0].value in names:
            candidates = [c for arg in node.args[1:] for c in _strings(arg)]  # error.get("kind", "error")
        elif isinstance(node, ast.Call) and _name(node.func) == "get" and node.args \
                and isinstance(node.func, ast.Attribute) and _name(node.func.value) in names:
            candidates = _strings(node.args[0])  # counts.get("free", 0)
        elif isinstance(node, ast.Dict):
            candidates = [c for key, value in zip(node.keys, node.values)
                          if isinstance(key, ast.Constant) and key.value in names for c in _strings(value)]
        found += [(c.lineno, c.value) for c in candidates if c.value in values]
    return found


def _modules_but_the_agent() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "agent.py"]


def test_no_module_but_the_agent_spells_a_kind_as_a_string():
    bare = {f"{path.relative_to(PACKAGE.parent)}:{line}": value
            for path in _modules_but_the_agent() if path.name != "errors.py"
            for line, value in _bare(ast.parse(path.read_text()), _KIND_NAMES, KINDS, _KIND_TAKERS)}
    assert not bare, f"error kinds spelled as strings (use errors.ErrorKind): {bare}"


def test_no_module_spells_a_slot_state_as_a_string():
    bare = {f"{path.relative_to(PACKAGE.parent)}:{line}": value
            for path in _modules_but_the_agent() if path.name != "protocol.py"
            for line, value in _bare(ast.parse(path.read_text()), {"state", "counts"}, STATES)}
    assert not bare, f"slot states spelled as strings (use protocol.SlotState): {bare}"


def test_the_scan_finds_what_it_is_for():
    """The scans above catch the forms a kind or state was spelled in before the enums."""
    sample = ast.parse('''
kind = "timeout"
if result.error_kind == "server_stopping": pass
if result.error_kind in (None, "waiting"): pass
answer = CallAnswer.failure(call, "agent_died", "m")
error_response("auth", "m", 401)
return _refusal(slot, "unavailable", "no tmux")
kind = str(error.get("kind") or "http")
error.get("kind", "error")
failed.metadata["error_kind"] = "not_running"
slot.state = "leased" if keep else "free"
if slot.state in ("restarting", "resetting"): pass
free = s.counts.get("free", 0)
''')
    kinds = {value for _, value in _bare(sample, _KIND_NAMES, KINDS, _KIND_TAKERS)}
    assert kinds == {"timeout", "server_stopping", "waiting", "agent_died", "auth", "http", "error", "not_running",
                     "unavailable"}
    assert {"failure", "error_response", "AgentError", "ArtifactError", "_refusal"} <= set(_KIND_TAKERS)
    assert {value for _, value in _bare(sample, {"state"}, STATES)} == {"leased", "free", "restarting", "resetting"}
