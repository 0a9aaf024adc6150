"""A drop-in `ToolBackend` for Atropos-style RL environments, over SlotPool.

    backend = HpcSandboxBackend(profile="gpu", array=4)         # start() submits, stop(purge=True) cancels
    backend = HpcSandboxBackend(connect.from_config("default"))  # or over jobs that already run
    await backend.start()
    slot = await backend.acquire("traj-1")
    results = await backend.execute_batch([(slot, "write_file", {"path": "a.py", "content": "print(1)"}),
                                           (slot, "bash", {"command": "python a.py"})], timeout_s=60)
    results[1].success, results[1].output, results[1].metadata["exit_code"]
    await backend.release(slot, reset_workspace=True)
    await backend.stop(purge=True)

The environments' names and shapes, and what each maps to (nothing here runs a command,
opens a file or keeps a slot: the pool and the slot agent do):

    start()                        submit the profile's job (jobs.submit, wait for its first node
                                   server) and attach a SlotPool to it; or start the pool given
    stop(purge=False)              stop the pools; purge=True also cancels the jobs start() submitted
    acquire(trajectory_id, profile=None)     SlotPool.acquire -> BackendSlot (`slot_id`, `slot`)
    release(slot, reset_workspace=False)     SlotPool.release (sessions end either way)
    execute_batch(requests, timeout_s)       SlotPool.execute_batch, one round per call of a slot
      bash                         agent `bash`
      bash_stateful                agent `bash` with `session` (default "main": one per slot,
                                   so one per trajectory)
      tmux start/send_keys/capture/stop      real tmux in the slot when it has one (`tmux -S` on a
                                   socket of its own, driven by agent `bash` calls: a terminal,
                                   capture returns the pane); else (or with tmux="session") agent
                                   `bash` in the session "tmux-NAME" (idle_timeout and `input`
                                   for send_keys; output kept here until capture), `session`
                                   close for stop
      read_file, write_file, ...   the agent's tool of that name, arguments as they are
    read_artifact                  agent `read_file` with `sha256` and `limit`
    list_artifacts                 agent `list_files`
    archive_artifacts              agent `archive`, one per path, members renamed relative to
                                   the workspace and put in one tar.gz
    get_status()                   SlotPool.report() of every profile's pool

Results are `ExecutionResult`s: `success`, `output` (stdout, then "[stderr]" and stderr
when there is any), `error` ("exit code 3", "command timed out after 30s", or the tool's
own error), `metadata` (exit_code, duration, truncated, location, slot, tool, error_kind
and the tool's own fields), `execution_id` (new for every call).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shlex
import tarfile
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, HpcSandboxError
from ..models import Slot, ToolResult
from ..pool import SlotPool, ToolCall

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds per call of a batch, when execute_batch is given none
STATEFUL_SESSION = "main"  # the session bash_stateful uses (one slot per trajectory: one per trajectory)
TMUX_PREFIX = "tmux-"  # tmux session NAME is the agent session tmux-NAME, apart from bash_stateful's
TMUX_IDLE = 0.5  # send_keys/capture return after this much silence of the command they follow
TMUX_MODES = ("auto", "session", "tmux")  # the constructor's `tmux`: see HpcSandboxBackend.__init__
TMUX_WIDTH, TMUX_HEIGHT = 200, 50  # a real tmux pane's size: wide enough that most lines do not wrap
# Lines of history above the visible pane that a real-tmux capture returns (its `scrollback`
# argument overrides): a command's last couple of hundred lines beyond the 50 on screen,
# without handing the model the whole session's history at every capture.
TMUX_SCROLLBACK = 200
TMUX_POLL = 0.1  # how often a real-tmux send_keys looks at the pane while it waits for quiet
# send-keys -l text is sent in pieces: a tmux command travels in one message to its server,
# which refuses messages over about 16 KiB (4 bytes a character at worst).
TMUX_TEXT_PIECE = 2000
DEFAULT_ARTIFACT_BYTES = 1 << 20
DEFAULT_MAX_ENTRIES = 1000

_UNSAFE_SESSION = re.compile(r"[^A-Za-z0-9_.-]")
# tmux key names that type text; C-c interrupts and C-d ends the input (below).
_NAMED_KEYS = {"Enter": "\n", "C-m": "\n", "C-j": "\n", "KPEnter": "\n", "Tab": "\t", "C-i": "\t", "Space": " "}
_INTERRUPT_KEYS = ("C-c", "^C")
_EOF_KEYS = ("C-d", "^D")
# What real tmux takes as a key name rather than text to type: a modified character
# (C-c, M-x) or a named key with optional modifiers (Enter, S-Tab, C-Left, F5). Anything
# else is typed literally (send-keys -l), so that text such as "Up to you" is never
# read as keys.
_TMUX_KEY = re.compile(r"(?:[CMS]-)+\S\Z|(?:[CMS]-)*(?:Enter|Escape|Tab|BTab|BSpace|Space|Up|Down|Left|Right|Home|"
                       r"End|PageUp|PageDown|PgUp|PgDn|NPage|PPage|IC|DC|Insert|Delete|KPEnter|F(?:[1-9]|1[0-2]))\Z")
_CARET_KEY = re.compile(r"\^([A-Za-z])\Z")  # ^C as C-c, as the fallback reads it
_TMUX_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # tmux forbids '.' and ':' in session names (target syntax)


def _new_execution_id() -> str:
    return uuid.uuid4().hex


# --- shapes ------------------------------------------------------------------------------


@dataclass
class ExecutionResult:
    """What one call of a batch came to, in the shape the environments read.

    `output` is stdout, followed by a "[stderr]" line and stderr when stderr is not
    empty: "out\\n[stderr]\\nerr" (no blank line when stdout already ends with a
    newline). For read_file it is the content; for write_file a line saying what was
    written; for the agent's other tools their answer as JSON. `error` is None on
    success, else "exit code N", "command timed out after Ns", "killed by signal N" or
    the tool's own error message (its kind is metadata["error_kind"]).
    """

    success: bool
    output: str = ""
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    execution_id: str = field(default_factory=_new_execution_id)

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "output": self.output, "error": self.error,
                "metadata": dict(self.metadata), "execution_id": self.execution_id}


@dataclass(frozen=True)
class BackendSlot:
    """A slot as an environment holds it: `slot_id`, and the hpc-sandbox Slot (its
    lease) with the profile whose pool it came from."""

    slot: Slot
    profile: str
    trajectory_id: str | None = None

    @property
    def slot_id(self) -> str:
        return self.slot.id

    @property
    def location(self) -> str:
        return self.slot.location

    def __str__(self) -> str:
        return self.slot_id


class ArtifactListing(list):
    """The entries of list_artifacts (dicts with path, is_dir, size, mtime, type): a
    plain list, with `truncated` True when max_entries (or the depth limit) cut it."""

    truncated: bool = False


class ArtifactError(HpcSandboxError):
    """An artifact helper failed: `kind` is the agent's (not_found, path, too_large, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- result mapping ----------------------------------------------------------------------


def _output(stdout: str, stderr: str) -> str:
    if not stderr:
        return stdout
    return stdout + ("" if stdout.endswith("\n") else "\n") + "[stderr]\n" + stderr


def _error(result: ToolResult, timeout: float) -> str | None:
    if result.success:
        return None
    if result.timed_out:
        return f"command timed out after {timeout:g}s"
    if result.error_kind is None and result.exit_code not in (None, 0):
        return f"exit code {result.exit_code}"
    if result.error_kind is None and result.signal:
        return f"killed by signal {result.signal}"
    return result.error or result.error_kind or "failed"


def _metadata(result: ToolResult, tool: str) -> dict[str, Any]:
    data = result.data
    # The tool's own scalar fields (path, size, sha256, session, waiting, handle, ...); its
    # content and lists (entries, sessions) are the output's, not the metadata's.
    meta: dict[str, Any] = {key: value for key, value in data.items()
                            if key not in ("content", "output") and not isinstance(value, (list, dict))}
    meta.update(tool=tool, exit_code=result.exit_code, duration=result.duration, location=result.location,
                slot=result.slot, timed_out=result.timed_out, error_kind=result.error_kind,
                truncated=bool(result.truncated or data.get("truncated") or data.get("eof") is False))
    if result.signal is not None:
        meta["signal"] = result.signal
    return meta


def _tool_output(result: ToolResult) -> str:
    if result.exit_code is not None or result.tool == "bash":
        return _output(result.stdout, result.stderr)
    data = result.data
    if not result.success:
        return ""
    if isinstance(data.get("content"), str):
        return data["content"]
    if isinstance(data.get("output"), str):  # process output
        return data["output"]
    if result.tool == "write_file":
        return f"wrote {data.get('size', 0)} bytes to {data.get('path', '?')}"
    return json.dumps(data, sort_keys=True, default=str)


def to_execution_result(result: ToolResult, tool: str, timeout: float, *, output: str | None = None,
                        **extra: Any) -> ExecutionResult:
    """An ExecutionResult of the pool's ToolResult; `tool` is the name the environment used."""
    meta = _metadata(result, tool)
    meta.update(extra)
    return ExecutionResult(success=result.success, output=_tool_output(result) if output is None else output,
                           error=_error(result, timeout), metadata=meta)


def _no_call_metadata(slot: BackendSlot, tool: str, error_kind: str | None = None) -> dict[str, Any]:
    """The metadata of an answer given without a call to the slot."""
    return {"tool": tool, "exit_code": None, "duration": 0.0, "truncated": False, "location": slot.location,
            "slot": slot.slot_id, "timed_out": False, "error_kind": error_kind}


def _refused(slot: BackendSlot, tool: str, kind: str, message: str) -> ExecutionResult:
    return ExecutionResult(success=False, error=message, metadata=_no_call_metadata(slot, tool, kind))


def _session_name(name: object) -> str:
    """A session name the agent takes (1-64 of letters, digits, '_', '.', '-')."""
    cleaned = _UNSAFE_SESSION.sub("_", str(name))
    if not cleaned[:1].isalnum():
        cleaned = "s" + cleaned
    return cleaned[:64]


def _workspace_relative(path: object) -> str:
    """A path as the archive members will name it: relative to the workspace."""
    if not isinstance(path, str) or not path:
        raise ArtifactError("bad_request", f"an artifact path must be a non-empty string, got {path!r}")
    if path.startswith("/"):
        raise ArtifactError("path", f"{path}: artifact paths are relative to the workspace")
    norm = posixpath.normpath(path)
    if norm == ".." or norm.startswith("../"):
        raise ArtifactError("path", f"{path}: outside the workspace")
    return norm


def _repack(parts: Sequence[tuple[str, bytes]]) -> tuple[bytes, list[str]]:
    """One tar.gz of the agent's archives, member names relative to the workspace.

    The agent names a member after the archived path's last part ("b/x" for "a/b",
    "./x" for "."): here they get the path's folder in front ("a/b/x") or lose the "./".
    A member met twice (overlapping paths) is kept once."""
    out = io.BytesIO()
    seen: set[str] = set()
    names: list[str] = []
    with tarfile.open(fileobj=out, mode="w:gz") as packed:
        for path, raw in parts:
            folder = "" if path == "." else posixpath.dirname(path)
            with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as source:
                for member in source:
                    name = member.name
                    if path == ".":
                        if name in (".", "./"):
                            continue
                        name = name[2:] if name.startswith("./") else name
                    elif folder:
                        name = f"{folder}/{name}"
                    if name in seen:
                        continue
                    seen.add(name)
                    names.append(name)
                    member.name = name
                    packed.addfile(member, source.extractfile(member) if member.isreg() else None)
    return out.getvalue(), names


def _key_segments(keys: object, enter: bool) -> list[tuple[str, str]]:
    """tmux send-keys arguments as ("text", s), ("interrupt", ""), ("eof", "") steps.
    A string is typed as it is unless it is a key name (Enter, C-c, ...); a list holds
    several; `enter` ends the typed text with a newline, as tmux's trailing Enter would."""
    tokens = [keys] if isinstance(keys, str) else list(keys) if isinstance(keys, (list, tuple)) else [str(keys)]
    segments: list[tuple[str, str]] = []
    for token in map(str, tokens):
        if token in _INTERRUPT_KEYS:
            segments.append(("interrupt", ""))
        elif token in _EOF_KEYS:
            segments.append(("eof", ""))
        else:
            text = _NAMED_KEYS.get(token, token)
            if segments and segments[-1][0] == "text":
                segments[-1] = ("text", segments[-1][1] + text)
            elif text:
                segments.append(("text", text))
    if enter and segments and segments[-1][0] == "text" and not segments[-1][1].endswith("\n"):
        segments[-1] = ("text", segments[-1][1] + "\n")
    return segments


def _tmux_steps(keys: object, enter: bool) -> list[tuple[str, str]]:
    """send_keys arguments as real tmux steps: ("keys", "C-c Enter") sent as key names,
    ("text", s) typed literally (send-keys -l). Same argument shapes as the fallback's:
    a string or a list of them, each a key name (Enter, C-c, ^C, Tab, Up, ...) or text;
    `enter` presses Enter after text that does not already end with a newline."""
    tokens = [keys] if isinstance(keys, str) else list(keys) if isinstance(keys, (list, tuple)) else [str(keys)]
    steps: list[tuple[str, str]] = []
    for token in map(str, tokens):
        caret = _CARET_KEY.match(token)
        if caret:
            token = "C-" + caret.group(1).lower()
        if not token:
            continue
        kind = "keys" if _TMUX_KEY.match(token) else "text"
        if steps and steps[-1][0] == kind:  # one send-keys per run of keys or of text
            steps[-1] = (kind, steps[-1][1] + (" " if kind == "keys" else "") + token)
        else:
            steps.append((kind, token))
    if enter and steps and steps[-1][0] == "text" and not steps[-1][1].endswith("\n"):
        steps.append(("keys", "Enter"))
    return steps


def _tmux_name(name: str) -> str:
    """The tmux session name of an environment's session_name: letters, digits, '_', '-'
    (tmux reads '.' and ':' in a target as window and pane), at most 64 characters. The
    socket is the slot's own (see _tmux_script), so the name needs no trajectory in it."""
    cleaned = _TMUX_UNSAFE.sub("_", name)
    return (cleaned if cleaned[:1].isalnum() else "s" + cleaned)[:64]


def _tmux_script(folder: str | None, name: str, body: str, create: bool) -> str:
    """A bash script that drives the slot's tmux server through `t` (tmux -S SOCKET) for
    session `T`, run by the slot's `bash` tool so it works in the slot's runtime.

    The socket lives in a folder of this lease, made by mktemp -d under the slot's
    $TMPDIR or /tmp (0700, a random name; its path goes first in stdout, the backend
    keeps it). Not tmux's default /tmp/tmux-UID/default: under runtime none every slot of
    a node shares /tmp and the uid, so their sessions and `kill-server` would meet. Not
    a folder in the workspace either: list_artifacts and archive_artifacts would show
    the socket, a wipe of the workspace is the reset's own business, and a deep
    workspace path can pass the 107 bytes a socket path may have."""
    lines = [f"d={shlex.quote(folder or '')}", f"T={shlex.quote(name)}"]
    if create:
        lines += ['if [ -z "$d" ] || [ ! -d "$d" ]; then',
                  '  d=$(mktemp -d "${TMPDIR:-/tmp}/hpc-sandbox-tmux.XXXXXX") || exit 4',
                  'fi',
                  'printf "%s\\n" "$d"']
    lines += ['t() { tmux -S "$d/sock" "$@"; }', body]
    return "\n".join(lines)


# Starts session $T on the slot's server (the server too, when it is the first). The
# environment's defaults, not a user's: no ~/.tmux.conf or /etc/tmux.conf (-f /dev/null),
# bash as the pane's shell when the slot has it (the slot's clean environment has no
# SHELL, and tmux would fall back to the passwd entry's), and HISTFILE empty, so that the
# pane's shell leaves no .bash_history in $HOME, which is the workspace. The server
# inherits this environment, with the agent's tag of the call that started it: that tag
# is how the slot's reset finds the server, which has left the call's process group.
# Tried up to 5 times: a server whose last session was just killed is still exiting, and
# a client that reaches it then fails ("server exited unexpectedly"); the next try starts
# a fresh server. Then it waits (up to 5 s) for the shell's first prompt: keys sent before
# it are typed ahead, but a pane still blank would look quiet to _tmux_settle, whose
# send_keys would then return before the shell had even read them (a loaded node starts a
# shell slowly).
_TMUX_NEW = ('sh=$(command -v bash || command -v sh); n=0\n'
             'until t has-session -t "=$T" 2>/dev/null || HISTFILE= SHELL="$sh" t -f /dev/null new-session -d '
             f'-s "$T" -x {TMUX_WIDTH} -y {TMUX_HEIGHT} -c "$PWD"; do\n'
             '  n=$((n + 1)); [ $n -ge 5 ] && exit 4; sleep 0.1\n'
             'done\n'
             'i=0; while [ $i -lt 50 ] && [ -z "$(t capture-pane -p -t "=$T:" 2>/dev/null)" ]; do '
             'sleep 0.1; i=$((i + 1)); done')
# Tells the backend what runs in the pane now (the shell, or the program it waits on).
_TMUX_PANE_COMMAND = """t display-message -p -t "=$T:" '#{pane_current_command}' 2>/dev/null || echo"""


def _tmux_settle(idle: float, most: float) -> str:
    """Shell lines that wait until the pane has not changed for `idle` seconds, for at
    most `most`, and print "quiet" or "busy". In the slot, one call: polling from here
    would cost a round trip per look."""
    need = max(1, round(idle / TMUX_POLL))
    polls = max(need + 1, int(most / TMUX_POLL))
    # Each look costs a tmux call on top of its sleep, so the count of looks alone would
    # overrun `most` (and the call's timeout behind it) on a pane that never goes quiet:
    # bash's SECONDS (whole seconds since the script began) bounds the wall time too.
    return "\n".join([
        "n=0; same=0; prev=; state=busy",
        f"while [ $n -lt {polls} ] && [ $SECONDS -lt {max(1, int(most))} ]; do",
        f"  sleep {TMUX_POLL}",
        '  cur=$(t capture-pane -p -t "=$T:" 2>/dev/null) || { state=gone; break; }',
        f'  if [ "$cur" = "$prev" ]; then same=$((same + 1)); [ $same -ge {need} ] && {{ state=quiet; break; }}',
        '  else same=0; prev=$cur; fi',
        "  n=$((n + 1))",
        "done",
        'echo "$state"'])


def _pane_text(lines: Sequence[str]) -> str:
    """The captured pane as text: each line without its trailing blanks (a pane row is
    padded to its width) and without the empty rows below the last line written."""
    rows = [line.rstrip() for line in lines]
    while rows and not rows[-1]:
        rows.pop()
    return "".join(row + "\n" for row in rows)


# --- the backend -------------------------------------------------------------------------


@dataclass
class _Profile:
    """One profile: its own pool (given, or over the job start() submits)."""

    name: str
    config_profile: str | None = None  # the config profile its job is submitted from
    overrides: dict[str, Any] = field(default_factory=dict)  # SandboxSpec fields over the profile
    pool: SlotPool | None = None
    own_pool: bool = False  # made by start(): stopped and dropped by stop()
    job: Any = None  # the jobs.Job start() submitted, until cancelled


@dataclass
class _TmuxState:
    """A tmux session's side kept here: output not captured yet, a line typed without
    Enter, and whether a command of the session waits (runs, silent) for more."""

    buffer: list[str] = field(default_factory=list)
    line: str = ""
    waiting: bool = False


@dataclass
class _Request:
    slot: BackendSlot
    tool: str
    args: dict[str, Any]
    timeout: float
    invalid: str | None = None  # arguments that could not be read (bad JSON): answered, not sent


@dataclass
class _Plan:
    """How one request is served in its round: one pool call batched with the round's
    others (`call` + `finish`), several calls of its own in order (`run`), or none (`done`)."""

    call: ToolCall | None = None
    finish: Callable[[ToolResult], ExecutionResult] | None = None
    run: Callable[[], Awaitable[ExecutionResult]] | None = None
    done: ExecutionResult | None = None


def _cancel_job(job: Any) -> None:
    """Cancel a job start() submitted: purged where its scheduler keeps ended jobs (Nomad)."""
    job.cancel(purge=True)


class HpcSandboxBackend:
    """The `ToolBackend` of Atropos-style environments, served by hpc-sandbox slots.

    Either over a SlotPool given (`HpcSandboxBackend(pool)`: its jobs are not ours to
    cancel), or over a job submitted by start() for a config profile with SandboxSpec
    fields as overrides (`HpcSandboxBackend(profile="gpu", array=16)`, cancelled by
    `stop(purge=True)`). Several profiles: `with_profiles`. Also an async context
    manager: `async with HpcSandboxBackend(...) as backend:` (exit = stop(purge=True)).
    """

    def __init__(self, pool: SlotPool | None = None, *, profile: str | None = None,
                 config_file: str | Path | None = None, wait_timeout: float = 600.0,
                 acquire_timeout: float = 300.0, lease_ttl: float | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT, stateful_session: str = STATEFUL_SESSION,
                 tmux_idle: float = TMUX_IDLE, tmux: str = "auto", overflow: str | None = None,
                 cloud_settings: Mapping[str, Any] | None = None, **job_overrides: Any) -> None:
        """`pool`: serve from it; else submit `profile` (the config's; "default") with
        `job_overrides` (SandboxSpec fields: scheduler, slots, array, state_dir, ...) at
        start(). `wait_timeout` bounds the wait for the job's first node server;
        `default_timeout` is execute_batch's timeout_s when none is given; `tmux_idle` is
        how long send_keys/capture wait for more output of a command before returning.
        `tmux` says what serves the tmux tool: "auto" (real tmux in a slot that has it,
        asked once per slot; else a session without a terminal), "session" (always the
        session), "tmux" (real tmux; a slot without it answers error_kind "unavailable")."""
        if pool is not None and (job_overrides or overflow):
            raise ConfigError("give a SlotPool, or a profile with job overrides to submit, not both")
        entry = _Profile(profile or "default", config_profile=profile, overrides=dict(job_overrides), pool=pool)
        self._configure({entry.name: entry}, entry.name, config_file=config_file, wait_timeout=wait_timeout,
                        acquire_timeout=acquire_timeout, lease_ttl=lease_ttl, default_timeout=default_timeout,
                        stateful_session=stateful_session, tmux_idle=tmux_idle, tmux=tmux, overflow=overflow,
                        cloud_settings=cloud_settings)

    def _configure(self, profiles: dict[str, _Profile], default: str, *, config_file: str | Path | None = None,
                   wait_timeout: float = 600.0, acquire_timeout: float = 300.0, lease_ttl: float | None = None,
                   default_timeout: float = DEFAULT_TIMEOUT, stateful_session: str = STATEFUL_SESSION,
                   tmux_idle: float = TMUX_IDLE, tmux: str = "auto", overflow: str | None = None,
                   cloud_settings: Mapping[str, Any] | None = None) -> None:
        if default not in profiles:
            raise ConfigError(f"default profile {default!r} is not one of {', '.join(profiles)}")
        if tmux not in TMUX_MODES:
            raise ConfigError(f"tmux must be one of {', '.join(TMUX_MODES)}; got {tmux!r}")
        self._profiles = profiles
        self.default_profile = default
        self.config_file = Path(config_file).expanduser() if config_file is not None else None
        self.wait_timeout = wait_timeout
        self.acquire_timeout = acquire_timeout
        self.lease_ttl = lease_ttl
        self.default_timeout = default_timeout
        self.stateful_session = _session_name(stateful_session)
        self.tmux_idle = tmux_idle
        self.tmux = tmux
        self.overflow = overflow
        self.cloud_settings = dict(cloud_settings) if cloud_settings else None
        self._held: dict[str, BackendSlot] = {}
        self._tmux: dict[tuple[str, str], _TmuxState] = {}  # the session fallback's, per (slot, session)
        # Whether a slot has a tmux that runs, asked once per slot id (a slot's image does
        # not change between leases); and the socket folder of the lease that holds it.
        self._tmux_found: dict[str, bool] = {}
        self._tmux_dirs: dict[str, str] = {}
        self._started = False
        self._lock = asyncio.Lock()

    @classmethod
    def with_profiles(cls, profiles: Mapping[str, SlotPool | Mapping[str, Any] | None], *,
                      default: str | None = None, **options: Any) -> "HpcSandboxBackend":
        """Several profiles, one SlotPool each: `acquire(..., profile=NAME)` takes a slot
        of that profile's pool.

        A value is a SlotPool to serve from, or the job overrides to submit config
        profile NAME with at start() (None: no overrides; a "profile" key names another
        config profile). One pool per profile because a pool hands out any slot of its
        jobs (its node servers do not tell profiles apart): a pool shared by two
        profiles' jobs would give a GPU trajectory a CPU slot. `default` (else the
        first) serves acquire() without a profile; `options` are the constructor's."""
        if not profiles:
            raise ConfigError("with_profiles needs at least one profile")
        entries: dict[str, _Profile] = {}
        for name, value in profiles.items():
            if isinstance(value, SlotPool):
                entries[name] = _Profile(name, pool=value)
            elif value is None or isinstance(value, Mapping):
                overrides = dict(value or {})
                entries[name] = _Profile(name, config_profile=overrides.pop("profile", name), overrides=overrides)
            else:
                raise ConfigError(f"profile {name!r}: expected a SlotPool or a mapping of job overrides, "
                                  f"got {type(value).__name__}")
        backend = cls.__new__(cls)
        backend._configure(entries, default if default is not None else next(iter(entries)), **options)
        return backend

    def list_profiles(self) -> list[str]:
        return list(self._profiles)

    @property
    def pools(self) -> dict[str, SlotPool | None]:
        """Each profile's pool (None before start() for a profile that submits)."""
        return {name: entry.pool for name, entry in self._profiles.items()}

    @property
    def jobs(self) -> list[Any]:
        """The jobs start() submitted and no stop(purge=True) has cancelled yet."""
        return [entry.job for entry in self._profiles.values() if entry.job is not None]

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every profile's pool, submitting the jobs of those without one (each
        waits for its first node server; a job that fails to start is cancelled, and
        so are the others this call submitted)."""
        async with self._lock:
            if self._started:
                return
            try:
                outcomes = await asyncio.gather(*(self._start_profile(e) for e in self._profiles.values()),
                                                return_exceptions=True)
                failed = [o for o in outcomes if isinstance(o, BaseException)]
                if failed:
                    raise failed[0]
            except BaseException:
                # Nothing this start made outlives it: pools stopped, jobs submitted cancelled.
                await asyncio.shield(self._teardown(purge=True, only=list(self._profiles.values())))
                raise
            self._started = True

    async def _start_profile(self, entry: _Profile) -> None:
        if entry.pool is not None:
            await entry.pool.start()
            return
        from .. import connect, jobs as job_api  # what `submit` and connect.launch use

        planned = connect.plan(entry.config_profile, config_file=self.config_file, overflow=self.overflow,
                               cloud_settings=self.cloud_settings, overrides=entry.overrides)
        submitted = entry.job is None
        if submitted:
            entry.job = job_api.submit(planned.spec)
            log.info("profile %s: submitted job %s", entry.name, entry.job.id)
        job = entry.job
        try:
            # With the cloud overflow, callers are served while the job queues.
            pool = await connect.pool_for(job, planned.cloud, wait_timeout=self.wait_timeout,
                                          acquire_timeout=self.acquire_timeout, lease_ttl=self.lease_ttl)
            await pool.start()
        except BaseException:
            if submitted:
                entry.job = None
                await asyncio.shield(asyncio.to_thread(_cancel_job, job))  # never outlives a failed start
            raise
        entry.pool, entry.own_pool = pool, True

    async def stop(self, purge: bool = False) -> None:
        """Stop the pools; slots still held are released first (reset), unless their
        job is being cancelled. With `purge`, the jobs start() submitted are cancelled
        (Nomad: purged); without, they keep running, and a later start() attaches to
        them again."""
        async with self._lock:
            self._started = False
            await asyncio.shield(self._teardown(purge, only=list(self._profiles.values())))

    async def _teardown(self, purge: bool, only: Sequence[_Profile]) -> None:
        # Slots still held go back (reset), but for those on a job about to be cancelled.
        names = {entry.name for entry in only if not (purge and entry.job is not None) and entry.pool is not None}
        held = [slot for slot in self._held.values() if slot.profile in names]
        await asyncio.gather(*(self.release(slot, reset_workspace=True) for slot in held), return_exceptions=True)
        for slot in [slot for slot in self._held.values() if slot.profile in {e.name for e in only}]:
            self._forget(slot)
        for entry in only:
            if entry.pool is not None:
                await entry.pool.stop()
                if entry.own_pool:
                    entry.pool, entry.own_pool = None, False
            if entry.job is not None:
                if purge:
                    job, entry.job = entry.job, None
                    await asyncio.to_thread(_cancel_job, job)
                    log.info("profile %s: job %s cancelled", entry.name, job.id)
                else:
                    log.warning("profile %s: job %s keeps running (stop(purge=True) or `hpc-sandbox cancel %s` "
                                "ends it)", entry.name, entry.job.id, entry.job.id)

    async def __aenter__(self) -> "HpcSandboxBackend":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(purge=True)

    # --- slots ----------------------------------------------------------------------------

    def _entry(self, profile: str | None) -> _Profile:
        name = self.default_profile if profile is None else profile
        entry = self._profiles.get(name)
        if entry is None:
            raise ConfigError(f"unknown profile {name!r}; this backend has: {', '.join(self._profiles)}")
        return entry

    def _pool_of(self, slot: BackendSlot) -> SlotPool:
        pool = self._entry(slot.profile).pool
        if pool is None:
            raise ConfigError(f"profile {slot.profile!r} has no pool: the backend is stopped (call start())")
        return pool

    async def acquire(self, trajectory_id: str | None = None, profile: str | None = None,
                      timeout: float | None = None) -> BackendSlot:
        """A slot of `profile` (default: the default profile), as soon as one is free
        (SlotPool.acquire: first come, first served; NoCapacity after `timeout`)."""
        entry = self._entry(profile)
        if not self._started:
            await self.start()
        if entry.pool is None:
            raise ConfigError(f"profile {entry.name!r} has no pool: the backend is stopped")
        slot = BackendSlot(await entry.pool.acquire(trajectory_id=trajectory_id, profile=entry.name, timeout=timeout),
                           entry.name, trajectory_id)
        self._held[slot.slot_id] = slot
        return slot

    def _forget(self, slot: BackendSlot) -> None:
        self._held.pop(slot.slot_id, None)
        self._tmux_dirs.pop(slot.slot_id, None)
        for key in [key for key in self._tmux if key[0] == slot.slot_id]:
            del self._tmux[key]

    async def release(self, slot: BackendSlot, reset_workspace: bool = False) -> None:
        """Give the slot back (SlotPool.release): its sessions and processes end (a real
        tmux server too: the agent's reset finds it by the tag in its environment); its
        workspace is wiped when `reset_workspace`."""
        folder = self._tmux_dirs.get(slot.slot_id)
        self._forget(slot)
        pool = self._pool_of(slot)
        if folder is not None:
            # The socket folder is outside the workspace, so no wipe removes it, and under
            # runtime none it would pile up in the node's /tmp, one per trajectory. Only the
            # folder: the server itself is left to the reset below, which ends it (with what
            # runs in its panes) even when nobody knows a folder, as after a lost lease.
            cleared = await pool.execute(slot.slot, "bash", {"command": f"rm -rf -- {shlex.quote(folder)}"},
                                         timeout=10)
            if not cleared.success:
                log.debug("slot %s: tmux folder %s not removed: %s", slot.slot_id, folder, cleared.error)
        await pool.release(slot.slot, reset_workspace=reset_workspace)

    # --- tool calls -----------------------------------------------------------------------

    async def execute(self, slot: BackendSlot, tool: str, args: Mapping[str, Any] | str | None = None,
                      timeout_s: float | None = None) -> ExecutionResult:
        """One call: execute_batch of one."""
        return (await self.execute_batch([(slot, tool, args or {})], timeout_s=timeout_s))[0]

    async def execute_batch(self, requests: Sequence[tuple | Mapping[str, Any]],
                            timeout_s: float | None = None) -> list[ExecutionResult]:
        """Run the requests; results in request order.

        A request is (slot, tool, args[, timeout]) or a dict with slot, tool (or
        tool_name/name), args (or arguments: a dict or its JSON) and optionally timeout.
        Calls on different slots run at once (one SlotPool.execute_batch per round); the
        calls of one slot run one after the other, in request order, as an agent's tool
        calls of one turn expect (a write_file before the bash that runs the file)."""
        timeout = self.default_timeout if timeout_s is None else float(timeout_s)
        wanted = [self._request(request, timeout) for request in requests]
        results: list[ExecutionResult | None] = [None] * len(wanted)
        queues: dict[str, list[int]] = {}
        for position, request in enumerate(wanted):
            queues.setdefault(request.slot.slot_id, []).append(position)
        for depth in range(max((len(queue) for queue in queues.values()), default=0)):
            await self._round(wanted, [queue[depth] for queue in queues.values() if depth < len(queue)], results)
        return results  # type: ignore[return-value]  (every position is filled by its round)

    def _request(self, request: tuple | Mapping[str, Any], timeout: float) -> _Request:
        call_timeout: Any = None
        if isinstance(request, Mapping):
            slot = request.get("slot")
            tool = request.get("tool", request.get("tool_name", request.get("name")))
            args = request.get("args", request.get("arguments"))
            call_timeout = request.get("timeout", request.get("timeout_s"))
        elif isinstance(request, (tuple, list)) and len(request) in (3, 4):
            slot, tool, args = request[0], request[1], request[2]
            call_timeout = request[3] if len(request) == 4 else None
        else:
            raise TypeError(f"a request is (slot, tool, args[, timeout]) or a dict with slot, tool, args; "
                            f"got {request!r}")
        if not isinstance(slot, BackendSlot):
            raise TypeError(f"a request's slot must come from acquire(), got {type(slot).__name__}")
        if not isinstance(tool, str):
            raise TypeError(f"a request's tool must be a name, got {tool!r}")
        effective = timeout if call_timeout is None else float(call_timeout)
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as exc:
                return _Request(slot, tool, {}, effective, invalid=f"arguments are not valid JSON: {exc}")
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            return _Request(slot, tool, {}, effective, invalid=f"arguments must be an object, got {args!r}")
        return _Request(slot, tool, dict(args), effective)

    def _plan(self, request: _Request) -> _Plan:
        if request.invalid is not None:
            return _Plan(done=_refused(request.slot, request.tool, "bad_request", request.invalid))
        if request.tool == "tmux":
            return _Plan(run=lambda: self._tmux_call(request))
        tool, args = request.tool, request.args
        if tool == "bash_stateful":
            name = args.pop("session", None) or args.pop("session_name", None) or self.stateful_session
            tool, args = "bash", {**args, "session": _session_name(name)}
        return _Plan(call=ToolCall(request.slot.slot, tool, args, request.timeout),
                     finish=lambda result: to_execution_result(result, request.tool, request.timeout))

    async def _round(self, wanted: list[_Request], positions: list[int],
                     results: list[ExecutionResult | None]) -> None:
        """One call of each slot: the single calls batched per pool, the rest alongside."""
        plans = {position: self._plan(wanted[position]) for position in positions}
        by_pool: dict[int, tuple[SlotPool, list[int]]] = {}
        runs = []
        for position, plan in plans.items():
            if plan.done is not None:
                results[position] = plan.done
            elif plan.run is not None:
                runs.append(position)
            else:
                pool = self._pool_of(wanted[position].slot)
                by_pool.setdefault(id(pool), (pool, []))[1].append(position)

        async def send(pool: SlotPool, batch: list[int]) -> None:
            try:
                answers = await pool.execute_batch([plans[p].call for p in batch])  # type: ignore[misc]
            except HpcSandboxError as exc:
                for p in batch:
                    results[p] = _refused(wanted[p].slot, wanted[p].tool, exc.kind, str(exc))
                return
            for p, answer in zip(batch, answers):
                results[p] = plans[p].finish(answer)  # type: ignore[misc]

        async def run(position: int) -> None:
            try:
                results[position] = await plans[position].run()  # type: ignore[misc]
            except HpcSandboxError as exc:
                results[position] = _refused(wanted[position].slot, wanted[position].tool, exc.kind, str(exc))

        await asyncio.gather(*(send(pool, batch) for pool, batch in by_pool.values()), *(run(p) for p in runs))

    # --- tmux: real tmux in the slot, or a named session as the fallback ---------------------

    async def _tmux_call(self, request: _Request) -> ExecutionResult:
        """tmux `action` start/send_keys/capture/stop on session `session_name` (default
        "main"): real tmux where the slot has it (and the backend's `tmux` is not
        "session"), else an agent session. metadata["mode"] says which ("tmux" or
        "session"). See _real_tmux and _session_tmux for what each answers."""
        args, slot = request.args, request.slot
        action = args.get("action")
        if action not in ("start", "send_keys", "capture", "stop"):
            return _refused(slot, "tmux", "bad_request",
                            f"tmux action must be start, send_keys, capture or stop; got {action!r}")
        name = str(args.get("session_name") or args.get("session") or args.get("name") or "main")
        where: dict[str, Any] = {"action": action, "session": name}
        if self.tmux == "session":
            return await self._session_tmux(request, action, name, {**where, "mode": "session"})
        found = self._tmux_found.get(slot.slot_id)
        if found is None:
            # Asked once per slot: `tmux -V` rather than `command -v` alone, so that a tmux
            # that cannot run (a broken image) means the fallback, not a failing start.
            probe = await self._pool_of(slot).execute(slot.slot, "bash", {"command": "command -v tmux >/dev/null "
                                                                          "&& tmux -V"}, timeout=request.timeout)
            if probe.error_kind is not None:  # no answer about tmux (a lost lease, a timeout): asked again next time
                return to_execution_result(probe, "tmux", request.timeout, output="", **where)
            found = self._tmux_found[slot.slot_id] = probe.exit_code == 0
        if found:
            return await self._real_tmux(request, action, name, {**where, "mode": "tmux"})
        if self.tmux == "tmux":
            return _refused(slot, "tmux", "unavailable", f"slot {slot.slot_id} has no tmux on its PATH "
                            "(the backend was made with tmux=\"tmux\"; \"auto\" falls back to a session)")
        return await self._session_tmux(request, action, name, {**where, "mode": "session"})

    async def _real_tmux(self, request: _Request, action: str, name: str, where: dict[str, Any]) -> ExecutionResult:
        """tmux itself, on a server of the slot's own (socket: see _tmux_script), one
        agent `bash` call per action, in the slot's runtime and workspace.

        start: a fresh detached session NAME, 200x50, in the workspace (an old one of
        that name is killed first). send_keys: `keys` as for the fallback (a string or a
        list; key names such as Enter, C-c, C-d, Tab, Up, ^C are pressed, other text is
        typed literally; `enter`, default true, presses Enter after the text); a session
        not started yet (or whose shell exited) is started first. It then waits for the
        pane to be quiet for `idle_timeout` (default tmux_idle; 0: no wait), at most
        `max_wait` seconds or until just before the call's timeout; the program keeps
        running either way (a terminal never interrupts on a timeout: send C-c). It
        answers no output; metadata["settled"] says whether the pane went quiet,
        ["pane_command"] what runs in it. capture: the pane as it is now (after waiting
        for quiet when given `idle_timeout`): the visible 50 rows and up to `scrollback`
        (default 200) lines above them, trailing blanks cut. Unlike the fallback, which returns what was
        printed since the last capture, a terminal's capture is a screen: a prompt,
        what was typed, a full-screen program's drawing, so every capture returns the
        whole of it and the environment compares screens. stop: the session is killed,
        and with the last one the server and its socket folder. metadata["socket"] is
        the server's socket in the slot, ["tmux_session"] the session's tmux name."""
        args, slot = request.args, request.slot
        pool = self._pool_of(slot)
        tmux_name = _tmux_name(name)
        where["tmux_session"] = tmux_name
        folder = self._tmux_dirs.get(slot.slot_id)
        try:
            idle = float(args.get("idle_timeout", self.tmux_idle if action == "send_keys" else 0) or 0)
            depth = max(0, int(args.get("scrollback", TMUX_SCROLLBACK)))
        except (TypeError, ValueError):
            return _refused(slot, "tmux", "bad_request", "idle_timeout must be seconds and scrollback a line count")
        # Up to just before the call's own timeout, which would kill the script (and a
        # server it had just started, whose tag is the call's); `max_wait` may say less.
        most = request.timeout - 1.0 if request.timeout > 2 else request.timeout / 2
        if args.get("max_wait") is not None:
            try:
                most = min(most, max(0.0, float(args["max_wait"])))
            except (TypeError, ValueError):
                return _refused(slot, "tmux", "bad_request", "max_wait must be seconds")
        most = max(idle, most)

        if action in ("capture", "stop") and folder is None:  # nothing started under this lease
            if action == "stop":
                return ExecutionResult(success=True, metadata={**_no_call_metadata(slot, "tmux"), **where,
                                                               "closed": False})
            return _refused(slot, "tmux", "not_running", f"no tmux session {name!r} (start it first)")

        if action == "start":
            body = 't kill-session -t "=$T" 2>/dev/null\n' + _TMUX_NEW
        elif action == "send_keys":
            lines = ['t has-session -t "=$T" 2>/dev/null || {', _TMUX_NEW, "}"]
            for kind, value in _tmux_steps(args.get("keys", args.get("text", "")), bool(args.get("enter", True))):
                if kind == "keys":
                    lines.append(f't send-keys -t "=$T:" {" ".join(map(shlex.quote, value.split()))} || exit 5')
                else:
                    for start in range(0, len(value), TMUX_TEXT_PIECE):
                        piece = shlex.quote(value[start:start + TMUX_TEXT_PIECE])
                        lines.append(f't send-keys -t "=$T:" -l -- {piece} || exit 5')
            lines.append(_tmux_settle(idle, most) if idle > 0 else "echo -")
            lines.append(_TMUX_PANE_COMMAND)
            body = "\n".join(lines)
        elif action == "capture":
            body = "\n".join([
                't has-session -t "=$T" 2>/dev/null || { echo "no tmux session $T" >&2; exit 3; }',
                _tmux_settle(idle, most) if idle > 0 else "echo -",
                _TMUX_PANE_COMMAND,
                f't capture-pane -p -J -t "=$T:" -S -{depth}'])
        else:  # stop
            body = "\n".join([
                't kill-session -t "=$T" 2>/dev/null && echo closed',
                # The last session gone: the server (it would exit by itself, but a server
                # between two sessions must not outlive the environment's stop) and the folder.
                'if [ -z "$(t list-sessions -F x 2>/dev/null)" ]; then',
                '  t kill-server 2>/dev/null; rm -rf -- "$d"; echo empty',
                'fi'])
        script = _tmux_script(folder, tmux_name, body, create=action in ("start", "send_keys"))
        result = await pool.execute(slot.slot, "bash", {"command": script}, timeout=request.timeout)
        lines = result.stdout.split("\n")
        if action in ("start", "send_keys") and result.error_kind in (None, "timeout") and lines[0]:
            # The folder made by this call (or the one already known): kept for the lease.
            self._tmux_dirs[slot.slot_id] = lines.pop(0)
        known = self._tmux_dirs.get(slot.slot_id) or folder
        if known:  # where the server listens: for a look with `tmux -S` from a bash call
            where["socket"] = posixpath.join(known, "sock")
        if not result.success:
            failed = to_execution_result(result, "tmux", request.timeout, output="", **where)
            if result.error_kind is None:  # the script's failure: say tmux's own words
                if result.exit_code == 3 and action == "capture":
                    failed.metadata["error_kind"] = "not_running"
                    failed.error = f"no tmux session {name!r} (start it first, or its shell exited)"
                else:
                    failed.error = f"tmux {action} failed: {result.stderr.strip() or failed.error}"
            return failed
        if action == "stop":
            if "empty" in lines:
                self._tmux_dirs.pop(slot.slot_id, None)
            return to_execution_result(result, "tmux", request.timeout, output="", closed="closed" in lines, **where)
        if action == "start":
            return to_execution_result(result, "tmux", request.timeout, output="", **where)
        state, command = (lines + ["", ""])[:2]
        extra = {"pane_command": command}
        if state != "-":
            extra["settled"] = state == "quiet"
        output = _pane_text(lines[2:]) if action == "capture" else ""
        return to_execution_result(result, "tmux", request.timeout, output=output, **extra, **where)

    async def _session_tmux(self, request: _Request, action: str, name: str,
                            where: dict[str, Any]) -> ExecutionResult:
        """The fallback: the agent session "tmux-NAME" (no tmux binary, no terminal).

        start: a fresh session (an old one of that name is closed). send_keys: `keys`
        (text, or a list with tmux key names: Enter, Tab, C-c interrupts, C-d ends the
        input; `enter` (default true) types a final Enter). Text typed while a command
        waits (runs, silent) is its input; else each complete line runs as a command.
        Every call returns after `idle_timeout` (default tmux_idle) of silence or at the
        call's timeout (a command that prints all along is then interrupted, as any
        timed-out call). send_keys answers no output: what was printed is kept here and
        capture returns it (after following a waiting command for more), once: with no
        screen to show, capture is what was printed since the last capture.
        stop: the session is closed."""
        args, slot = request.args, request.slot
        agent_name = _session_name(TMUX_PREFIX + name)
        key = (slot.slot_id, agent_name)
        pool = self._pool_of(slot)
        idle = args.get("idle_timeout", self.tmux_idle)

        async def bash(**extra: Any) -> ToolResult:
            return await pool.execute(slot.slot, "bash", {"session": agent_name, "idle_timeout": idle, **extra},
                                      timeout=request.timeout)

        if action == "start":
            await pool.execute(slot.slot, "session", {"action": "close", "name": agent_name})
            self._tmux.pop(key, None)
            started = await pool.execute(slot.slot, "bash", {"session": agent_name, "command": ":"},
                                         timeout=request.timeout)
            if started.success:
                self._tmux[key] = _TmuxState()
            return to_execution_result(started, "tmux", request.timeout, output="", **where)
        if action == "stop":
            closed = await pool.execute(slot.slot, "session", {"action": "close", "name": agent_name})
            self._tmux.pop(key, None)
            return to_execution_result(closed, "tmux", request.timeout, output="", **where)
        state = self._tmux.setdefault(key, _TmuxState())
        last: ToolResult | None = None
        if action == "capture":
            if state.waiting:
                last = await bash()  # follow the command: what it printed since
                if not self._absorb(state, last):
                    return to_execution_result(last, "tmux", request.timeout, output="", **where)
            output, state.buffer = "".join(state.buffer), []
            meta = _metadata(last, "tmux") if last is not None else _no_call_metadata(slot, "tmux")
            meta.update(where, waiting=state.waiting)
            return ExecutionResult(success=True, output=output, metadata=meta)

        async def step(**extra: Any) -> bool:
            nonlocal last
            last = await bash(**extra)
            return self._absorb(state, last)

        for kind, text in _key_segments(args.get("keys", args.get("text", "")), bool(args.get("enter", True))):
            ok = True
            if kind == "interrupt":
                state.line = ""
                if state.waiting:
                    ok = await step(interrupt=True)
            elif kind == "eof":
                if state.waiting:
                    ok = await step(input="", eof=True)
            else:
                state.line += text
                while ok and state.line:
                    if state.waiting:  # typed while a command waits: its input
                        typed, state.line = state.line, ""
                        ok = await step(input=typed)
                    elif "\n" in state.line:  # a complete line at the prompt: a command
                        line, state.line = state.line.split("\n", 1)
                        if line.strip():
                            ok = await step(command=line)
                    else:
                        break  # typed without Enter: kept until the Enter comes
            if not ok:
                assert last is not None
                return to_execution_result(last, "tmux", request.timeout, output="", **where)
        if last is None:
            return ExecutionResult(success=True, metadata={**_no_call_metadata(slot, "tmux"), **where,
                                                           "waiting": state.waiting})
        result = to_execution_result(last, "tmux", request.timeout, output="", waiting=state.waiting, **where)
        if not last.timed_out:  # the keys went in: a command's own exit code is no failure of send_keys
            result.success, result.error = True, None
        return result

    @staticmethod
    def _absorb(state: _TmuxState, result: ToolResult) -> bool:
        """Keep what a session call printed; False when the call itself failed (not a
        command's exit code, a timeout or a wait for input: an error of the tool)."""
        state.buffer.append(result.stdout)
        state.buffer.append(result.stderr)
        state.waiting = bool(result.data.get("waiting"))
        if result.error_kind == "not_running":  # the command ended unseen (a reset): nothing to follow
            state.waiting = False
            return True
        return result.error_kind in (None, "waiting", "timeout")

    # --- artifacts ------------------------------------------------------------------------

    async def _artifact_call(self, slot: BackendSlot, tool: str, args: dict[str, Any],
                             timeout: float | None) -> ToolResult:
        result = await self._pool_of(slot).execute(slot.slot, tool, args, timeout=timeout)
        if not result.success:
            raise ArtifactError(result.error_kind or "error", result.error or f"{tool} failed")
        return result

    async def read_artifact(self, slot: BackendSlot, path: str, max_bytes: int = DEFAULT_ARTIFACT_BYTES,
                            encoding: str = "text", timeout_s: float | None = None) -> dict[str, Any]:
        """A workspace file (agent read_file with sha256): a dict with path (workspace
        relative), content (the first max_bytes; text, or base64 with encoding="base64"),
        encoding, size (the whole file's), sha256 (the whole file's), truncated,
        bytes_read, lossy (binary read as text). Raises ArtifactError (not_found, path, ...)."""
        result = await self._artifact_call(slot, "read_file", {"path": path, "limit": max_bytes, "sha256": True,
                                                               "encoding": encoding}, timeout_s)
        data = result.data
        return {"path": data["path"], "content": data["content"], "encoding": data["encoding"],
                "size": data["size"], "sha256": data.get("sha256"), "truncated": not data["eof"],
                "bytes_read": data["bytes_read"], "lossy": bool(data.get("lossy"))}

    async def list_artifacts(self, slot: BackendSlot, path: str = ".", recursive: bool = False,
                             max_entries: int = DEFAULT_MAX_ENTRIES,
                             timeout_s: float | None = None) -> ArtifactListing:
        """The entries under `path` (agent list_files): dicts with path (workspace
        relative), is_dir, size, mtime, type (file, dir, symlink, other); at most
        max_entries of them (`.truncated` says whether there were more)."""
        result = await self._artifact_call(slot, "list_files", {"path": path, "recursive": recursive,
                                                                "max_entries": max_entries}, timeout_s)
        listing = ArtifactListing({"path": entry["path"], "is_dir": entry["type"] == "dir", "size": entry["size"],
                                   "mtime": entry["mtime"], "type": entry["type"]}
                                  for entry in result.data["entries"])
        listing.truncated = bool(result.data.get("truncated"))
        return listing

    async def archive_artifacts(self, slot: BackendSlot, paths: str | Sequence[str] = ".",
                                dest: str | Path | None = None, max_bytes: int | None = None,
                                timeout_s: float | None = None) -> dict[str, Any]:
        """A tar.gz of `paths` (files or folders, workspace relative; "." is the whole
        workspace), member names relative to the workspace ("sub/a.txt"). Returns a
        dict: content (the bytes, or None when written to `dest`), path (`dest`), size,
        sha256 (of the tar.gz), members. `max_bytes` caps each path's archive (agent
        `archive`); raises ArtifactError (too_large, not_found, path, ...)."""
        wanted = [paths] if isinstance(paths, str) else list(paths)
        parts: list[tuple[str, bytes]] = []
        for path in wanted:
            norm = _workspace_relative(path)
            args: dict[str, Any] = {"path": norm}
            if max_bytes is not None:
                args["max_bytes"] = max_bytes
            data = (await self._artifact_call(slot, "archive", args, timeout_s)).data
            try:
                raw = base64.b64decode(data["content"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ArtifactError("corrupt", f"archive of {path}: not base64: {exc}") from None
            if hashlib.sha256(raw).hexdigest() != data.get("sha256"):
                raise ArtifactError("corrupt", f"archive of {path}: sha256 does not match what the slot sent")
            parts.append((norm, raw))
        packed, members = await asyncio.to_thread(_repack, parts)
        digest = hashlib.sha256(packed).hexdigest()
        written: str | None = None
        if dest is not None:
            target = Path(dest).expanduser()
            partial = target.with_name(target.name + ".part")
            await asyncio.to_thread(partial.write_bytes, packed)
            os.replace(partial, target)
            written = str(target)
        return {"content": None if written else packed, "path": written, "size": len(packed), "sha256": digest,
                "members": members}

    # --- status ---------------------------------------------------------------------------

    async def get_status(self) -> dict[str, Any]:
        """What the pools say (SlotPool.report()): per profile and summed, slots by place
        (servers, slots, free, busy, starting), callers waiting, cloud sandboxes alive,
        sandbox-seconds and estimated cost; plus the jobs and the slots held here."""
        profiles: dict[str, dict[str, Any]] = {}
        places: dict[str, dict[str, int]] = {}
        totals = {"waiting": 0, "sandboxes": 0, "sandbox_seconds": 0.0}
        costs: list[float] = []
        for entry in self._profiles.values():
            jobs = [entry.job.id] if entry.job is not None else []
            if entry.pool is not None:
                jobs += [job.id for job in entry.pool.jobs if job.id not in jobs]
            row: dict[str, Any] = {"jobs": jobs, "held": sum(1 for s in self._held.values() if s.profile == entry.name),
                                   "slots": {}, "waiting": 0, "sandboxes": 0, "sandbox_seconds": 0.0, "cost": None,
                                   "cloud_off": None}
            if entry.pool is not None and self._started:
                report = await entry.pool.report()
                for place in report.places:
                    counts = {"servers": place.servers, "slots": place.slots, "free": place.free,
                              "busy": place.slots - place.free, "starting": place.starting}
                    row["slots"][place.place] = counts
                    summed = places.setdefault(place.place, dict.fromkeys(counts, 0))
                    for name, value in counts.items():
                        summed[name] += value
                row.update(waiting=report.waiting, sandboxes=report.sandboxes_alive,
                           sandbox_seconds=report.sandbox_seconds, cost=report.cost, cloud_off=report.cloud_off)
                totals["waiting"] += report.waiting
                totals["sandboxes"] += report.sandboxes_alive
                totals["sandbox_seconds"] += report.sandbox_seconds
                if report.cost is not None:
                    costs.append(report.cost)
            profiles[entry.name] = row
        return {"started": self._started, "default_profile": self.default_profile, "slots": places, **totals,
                "cost": sum(costs) if costs else None, "held": len(self._held), "profiles": profiles}


# The name the environments' code knows the interface by.
ToolBackend = HpcSandboxBackend

__all__ = ["ArtifactError", "ArtifactListing", "BackendSlot", "ExecutionResult", "HpcSandboxBackend", "ToolBackend",
           "to_execution_result"]
