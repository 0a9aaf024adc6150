"""The slot contract: what the node server and the agent must agree on is the agent's,
defined once in agent.py and imported by the server, never copied (issue 18).

These tests pin the agreement itself (a server-side name IS the agent's object) and
read the package's source for copies of its facts, so that a second definition fails
here rather than drifting in a later change.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from hpc_sandbox import agent, paths, protocol, runtime
from hpc_sandbox.server import agent_process, limits, slots

PACKAGE = Path(agent.__file__).resolve().parent
# Names the agent defines for the server; no other module of the package may assign them.
CONTRACT = ("SLOT_WORKSPACE", "CALL_ENV", "RESET_SECONDS", "RESET_TIMEOUT", "STREAM_FLUSH_BYTES",
            "MAX_CHUNK_BYTES", "CLIENT_TOOLS", "MAX_CHUNK", "DISK_MAX_DEPTH")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "agent.py" or path.parent != PACKAGE:
            yield path


def test_the_server_side_names_are_the_agents_own_objects():
    assert protocol.TOOLS is agent.CLIENT_TOOLS
    assert paths.SLOT_WORKSPACE is agent.SLOT_WORKSPACE and runtime.SLOT_WORKSPACE is agent.SLOT_WORKSPACE
    assert slots.RESET_TIMEOUT is agent.RESET_TIMEOUT and agent.RESET_TIMEOUT > agent.RESET_SECONDS
    assert agent_process.MAX_CHUNK_BYTES is agent.MAX_CHUNK_BYTES
    assert limits.walk_folder is agent.walk_folder
    assert agent_process.is_ready is agent.is_ready


def test_every_client_tool_is_an_agent_tool_and_the_servers_own_are_not_client_tools():
    assert set(agent.CLIENT_TOOLS) <= set(agent.TOOLS)
    assert set(agent.TOOLS) - set(agent.CLIENT_TOOLS) == {"cancel", "ping", "reset"}


def test_the_ready_line_the_agent_sends_is_the_one_the_server_waits_for():
    message = agent.ready_message(42, "42.abc")
    assert agent.is_ready(message)
    assert not agent.is_ready({"id": "r1", "ok": True, "result": {"ready": True}})
    assert not agent.is_ready({"id": None, "ok": False, "error": {"kind": "bad_request", "message": "x"}})


def test_a_chunk_the_agent_sends_fits_what_the_server_accepts():
    # The agent flushes past STREAM_FLUSH_BYTES, with at most one more read (64 KiB) and
    # a cut-off character carried over.
    assert agent.STREAM_FLUSH_BYTES + (64 << 10) + 4 <= agent.MAX_CHUNK_BYTES


@pytest.mark.parametrize("name", CONTRACT)
def test_no_other_module_assigns_a_contract_name(name):
    copies = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                copies.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not copies, f"{name} is the agent's; defined again at {copies}"


@pytest.mark.parametrize("literal", ["HPC_SANDBOX_CALL", "/workspace"])
def test_no_other_module_spells_a_contract_value(literal):
    spelled = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in _modules()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value == literal]
    assert not spelled, f"{literal!r} is the agent's to spell; also at {spelled}"


def test_the_server_walks_paths_only_with_the_agents_walk():
    """O_NOFOLLOW walks: the agent's, and nowhere else a folder is opened by hand."""
    walkers = [str(path.relative_to(PACKAGE)) for path in _modules()
               if re.search(r"O_DIRECTORY", path.read_text())]
    assert walkers == [], f"a walk of its own in {walkers}: use agent.walk_folder / the agent's openers"
