"""The shapes of the Atropos `ToolBackend` face (compat/atropos.py), and how a pool's
ToolResult becomes one: `Slot`, `SlotState`, `ExecutionResult` (with `to_tool_result()`)
and the result conventions of the sandbox server that hpc-sandbox replaces, which the
environments and their tests read word for word (../shared/ATROPOS_TOOLBACKEND.md):

- output: stdout; with stderr, stdout + "\\n[stderr]\\n" + stderr (stderr alone when stdout
  is empty); the whole stripped. Each stream capped at 50,000 characters, a cut one
  ending in "\\n... (output truncated)".
- exit 0: success, error "", metadata exit_code 0; exit N: error "Exit code: N",
  metadata exit_code and returncode N; a timeout: error "Command timed out after {t}s",
  metadata exit_code -1 and timeout True.
- anything else that went wrong (slot, server, a tool's refusal) is success False with
  the error's words and metadata["error_kind"] (an ErrorKind): never an exception.
"""
from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from ..agent import SLOT_WORKSPACE
from ..errors import ErrorKind, NoCapacity
from ..models import Slot as Lease
from ..models import ToolResult as PoolResult

STREAM_CAP = 50_000  # characters of stdout, and of stderr, an ExecutionResult keeps
TRUNCATED = "\n... (output truncated)"
STDERR_JOIN = "\n[stderr]\n"
# Where the environments' own ToolResult lives, tried in order by to_tool_result();
# ExecutionResult.tool_result_class overrides (set it to the class your executor uses).
TOOL_RESULT_CLASSES = ("atropos.tools.base:ToolResult", "atropos.tools:ToolResult")


class AcquireTimeout(NoCapacity, TimeoutError):
    """No slot came within the acquire timeout: a TimeoutError (what the environments
    catch) that is also hpc-sandbox's NoCapacity (kind no_capacity), saying what was tried."""


class SlotState(str, Enum):
    AVAILABLE = "available"
    ACQUIRED = "acquired"
    EXECUTING = "executing"
    RELEASING = "releasing"
    ERROR = "error"


@dataclass
class Slot:
    """A slot as an environment holds it. `workspace_dir` is the workspace as commands
    in the slot see it (/workspace in a bwrap or Apptainer slot; the host folder for
    runtime none); `alloc_id` is the node server that hosts it ("JOB/HOST:PORT"),
    `container_addr` that server's URL. The lease (`lease`, never serialized) is what
    the backend calls with; a Slot rebuilt by from_dict() is matched to the lease the
    backend holds by its slot_id."""

    slot_id: str
    alloc_id: str
    container_addr: str
    workspace_dir: str
    state: SlotState = SlotState.ACQUIRED
    trajectory_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    lease: Lease | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"slot_id": self.slot_id, "alloc_id": self.alloc_id, "container_addr": self.container_addr,
                "workspace_dir": self.workspace_dir, "state": self.state.value, "trajectory_id": self.trajectory_id,
                "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Slot":
        return cls(slot_id=str(data["slot_id"]), alloc_id=str(data.get("alloc_id", "")),
                   container_addr=str(data.get("container_addr", "")),
                   workspace_dir=str(data.get("workspace_dir", "")),
                   state=SlotState(data.get("state", SlotState.ACQUIRED.value)),
                   trajectory_id=data.get("trajectory_id"), metadata=dict(data.get("metadata") or {}))

    @property
    def profile(self) -> str | None:
        return self.metadata.get("profile")

    def __str__(self) -> str:
        return self.slot_id


@dataclass
class CompatToolResult:
    """What to_tool_result() returns where the environment's ToolResult cannot be imported:
    the five attributes the executor reads, and to_dict()."""

    success: bool
    output: str = ""
    error: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    uniq_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "output": self.output, "error": self.error,
                "metadata": dict(self.metadata), "uniq_id": self.uniq_id}


def _environment_tool_result() -> type | None:
    for spec in TOOL_RESULT_CLASSES:
        module, _, name = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


@dataclass
class ExecutionResult:
    """One call of a batch, as the environments read it (see the module's docstring)."""

    success: bool
    output: str = ""
    error: str = ""
    execution_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    slot_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    tool_result_class: ClassVar[Any] = None  # the environment's ToolResult class, when set: see to_tool_result

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "output": self.output, "error": self.error,
                "execution_id": self.execution_id, "slot_id": self.slot_id, "metadata": dict(self.metadata)}

    def to_tool_result(self) -> Any:
        """The environment's ToolResult (ExecutionResult.tool_result_class, else the first
        of TOOL_RESULT_CLASSES that imports), else a CompatToolResult; uniq_id is the
        execution id (the executor overwrites it)."""
        made = type(self).tool_result_class or _environment_tool_result() or CompatToolResult
        return made(success=self.success, output=self.output, error=self.error, metadata=dict(self.metadata),
                    uniq_id=self.execution_id)



# One call when a slot is first acquired: the workspace as commands see it, then the
# network interfaces the slot has (a slot with only `lo` is off the network).
PROBE = "pwd; cat /proc/net/dev 2>/dev/null"
PROBE_TIMEOUT = 30.0
POLICY_FLAGS = ("allow_network", "require_sandbox", "require_stateful_sandbox")


@dataclass(frozen=True)
class SlotFacts:
    """What a slot was found to be at its first acquire (it does not change between leases)."""

    workspace_dir: str
    network: str  # "none" (loopback only), "host", or "unknown" (the probe failed)
    sandboxed: bool  # runs in its own container (bwrap, Apptainer, a cloud sandbox), not as a host process

    @classmethod
    def read(cls, lease: Lease, probe: PoolResult) -> "SlotFacts":
        if not probe.success:
            return cls("", "unknown", lease.location == "cloud")
        lines = probe.stdout.splitlines()
        interfaces = {line.split(":", 1)[0].strip() for line in lines[1:] if ":" in line}
        workspace = lines[0] if lines else ""
        return cls(workspace, "none" if interfaces <= {"lo"} and interfaces else "host",
                   lease.location == "cloud" or workspace == SLOT_WORKSPACE)


def policy_refusal(facts: SlotFacts | None, slot_id: str, tool: str, flags: dict[str, Any]) -> str | None:
    """Why a slot cannot keep the environment's policy for this call, if it cannot."""
    if flags.get("allow_network") is False and (facts is None or facts.network != "none"):
        said = "could not be probed" if facts is None else f"has network interfaces ({facts.network})"
        return (f"{tool} with allow_network=False refused: slot {slot_id} {said}; run its profile with "
                "network: none (runtime bwrap or apptainer) to run commands without network")
    for flag in ("require_sandbox", "require_stateful_sandbox"):
        if flags.get(flag) and not (facts is not None and facts.sandboxed):
            return (f"{tool} with {flag}=True refused: slot {slot_id} runs commands as plain processes "
                    "of its node (runtime none); use a profile with runtime bwrap or apptainer")
    return None


def capped(text: str, truncated: bool = False) -> str:
    """One stream, at most STREAM_CAP characters; a cut one (here, or by the slot's own
    output cap) ends in TRUNCATED."""
    if len(text) > STREAM_CAP:
        return text[:STREAM_CAP] + TRUNCATED
    return text + TRUNCATED if truncated else text


def joined_output(stdout: str, stderr: str, truncated: bool = False) -> str:
    out, err = capped(stdout, truncated and bool(stdout)), capped(stderr, truncated and not stdout)
    if not err:
        return out.strip()
    return (out + STDERR_JOIN + err if out else err).strip()


def timed_out_error(timeout: float | int) -> str:
    return f"Command timed out after {timeout}s"


def command_result(result: PoolResult, timeout: float | int, **extra: Any) -> ExecutionResult:
    """A bash (or session, or tmux) call's result in the environments' conventions."""
    meta: dict[str, Any] = {key: value for key, value in result.data.items() if not isinstance(value, (list, dict))}
    meta.update(duration=result.duration, location=result.location, slot=result.slot, truncated=result.truncated)
    meta.update(extra)
    output = joined_output(result.stdout, result.stderr, result.truncated)
    meta["timed_out"] = result.timed_out
    if result.timed_out:
        meta.update(exit_code=-1, timeout=True, error_kind=ErrorKind.TIMEOUT)
        return ExecutionResult(False, output, timed_out_error(timeout), slot_id=result.slot or "", metadata=meta)
    if result.signal is not None:
        meta["signal"] = result.signal
    if result.success:  # exit 0, or a session/terminal action that did what was asked
        meta.update(exit_code=result.exit_code, returncode=result.exit_code)
        return ExecutionResult(True, output, "", slot_id=result.slot or "", metadata=meta)
    if result.exit_code is not None and result.error_kind is None:
        meta.update(exit_code=result.exit_code, returncode=result.exit_code)
        return ExecutionResult(False, output, f"Exit code: {result.exit_code}", slot_id=result.slot or "",
                               metadata=meta)
    return failed(result, output=output, **meta)


def failed(result: PoolResult, message: str | None = None, *, output: str = "", **meta: Any) -> ExecutionResult:
    """A call that did not come to an exit code (refused, slot or server trouble), or a
    tool's own failure worded as `message`."""
    meta.setdefault("exit_code", result.exit_code)
    meta["error_kind"] = result.error_kind or ErrorKind.ERROR
    if result.signal is not None:
        meta["signal"] = result.signal
    return ExecutionResult(False, output, message or result.error or str(meta["error_kind"]),
                           slot_id=result.slot or "", metadata=meta)


def refused(slot: Slot, kind: ErrorKind, message: str) -> ExecutionResult:
    """An answer given without a call to the slot (a policy the slot cannot keep, bad arguments)."""
    return ExecutionResult(False, "", message, slot_id=slot.slot_id,
                           metadata={"error_kind": kind, "exit_code": None, "slot": slot.slot_id})


__all__ = ["AcquireTimeout", "CompatToolResult", "ExecutionResult", "POLICY_FLAGS", "PROBE", "STREAM_CAP", "Slot",
           "SlotFacts", "SlotState", "TOOL_RESULT_CLASSES", "TRUNCATED", "command_result", "failed", "joined_output",
           "policy_refusal", "refused"]
