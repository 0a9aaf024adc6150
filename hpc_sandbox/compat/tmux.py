"""Terminal emulation for a face's `tmux` tool: start, send_keys, capture, stop.

Two terminals serve the one interface (`Terminal`), each driving the slot's agent
through the pool:
- `RealTmux`: tmux itself in the slot, on a server of the slot's own, one agent `bash`
  call per action. A terminal: capture returns the screen.
- `SessionTerminal`: where the slot has no tmux, the agent session "tmux-NAME"; no
  terminal, so capture returns what was printed since the last capture.
`Terminals` picks one per slot (`TmuxMode`) and keeps what they know of each lease.

An action comes to a `TerminalReply`: the slot call that decides success, error kind
and metadata (its `data` carries the terminal's own fields), and the text to show. The
face maps it onto its own result shape; nothing here knows that shape.

The shell that drives real tmux is constant text. What an environment sends (keys, a
session name) reaches it in the call's environment (HPCSBX_TMUX_* variables), never in
the script, so no shell string is built from user input.
"""
from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Protocol

from ..errors import ErrorKind
from ..models import Slot, ToolResult

log = logging.getLogger(__name__)

TMUX_IDLE = 0.5  # send_keys/capture return after this much silence of the command they follow
ACTIONS = ("start", "send_keys", "capture", "stop")
# Lines of history above the visible pane that a real-tmux capture returns (its `scrollback`
# argument overrides): a command's last couple of hundred lines beyond the 50 on screen,
# without handing the model the whole session's history at every capture.
TMUX_SCROLLBACK = 200
TMUX_POLL = 0.1  # how often a real-tmux send_keys looks at the pane while it waits for quiet
# send-keys -l text is sent in pieces: a tmux command travels in one message to its server,
# which refuses messages over about 16 KiB (4 bytes a character at worst).
TMUX_TEXT_PIECE = 2000
SESSION_PREFIX = "tmux-"  # the fallback's agent session for NAME, apart from bash_stateful's

# tmux key names that type text, for the fallback; C-c interrupts and C-d ends the input.
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
_UNSAFE_SESSION = re.compile(r"[^A-Za-z0-9_.-]")
_TMUX_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # tmux forbids '.' and ':' in session names (target syntax)


class TmuxMode(str, Enum):
    """What serves the tmux tool: real tmux where the slot has it, else a session (AUTO);
    always the session (SESSION); real tmux or an `unavailable` error (TMUX)."""

    AUTO = "auto"
    SESSION = "session"
    TMUX = "tmux"


class SlotRunner(Protocol):
    """What a terminal needs of the pool: one tool call in a slot."""

    async def execute(self, slot: Slot, tool: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> ToolResult: ...


@dataclass(frozen=True)
class TerminalCall:
    """One action's target: the slot (through its pool), the environment's session name,
    the call's timeout (nothing here outlives it) and the action's own arguments (keys,
    enter, idle_timeout, scrollback, max_wait), as the environment sent them."""

    pool: SlotRunner
    slot: Slot
    session: str
    timeout: float
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TerminalReply:
    """What an action came to: `result` decides success, error kind and metadata (its
    data holds the terminal's fields: settled, waiting, closed, socket, ...); `output` is
    the text to show. A failure is worded as the face words `result`, after
    `error_prefix`, unless `error` has the terminal's own words for it."""

    result: ToolResult
    output: str = ""
    error: str | None = None
    error_prefix: str = ""


class Terminal(Protocol):
    async def start(self, call: TerminalCall) -> TerminalReply: ...
    async def send_keys(self, call: TerminalCall) -> TerminalReply: ...
    async def capture(self, call: TerminalCall) -> TerminalReply: ...
    async def stop(self, call: TerminalCall) -> TerminalReply: ...


def agent_session_name(name: object) -> str:
    """A session name the agent takes (1-64 of letters, digits, '_', '.', '-')."""
    cleaned = _UNSAFE_SESSION.sub("_", str(name))
    if not cleaned[:1].isalnum():
        cleaned = "s" + cleaned
    return cleaned[:64]


def _answered(slot: Slot, **fields: Any) -> ToolResult:
    """A reply given without a call to the slot."""
    return ToolResult(success=True, tool="tmux", slot=slot.id, location=slot.location, data=fields)


def _refusal(slot: Slot, kind: ErrorKind, message: str) -> TerminalReply:
    return TerminalReply(ToolResult.failure("tmux", kind, message, slot))


def _with(result: ToolResult, **fields: Any) -> ToolResult:
    return replace(result, data={**result.data, **fields})


def _tokens(keys: object) -> list[str]:
    """send_keys' `keys`: a string, or a list of them."""
    return [keys] if isinstance(keys, str) else list(map(str, keys)) if isinstance(keys, (list, tuple)) \
        else [str(keys)]


# --- the session fallback ------------------------------------------------------------


def key_segments(keys: object, enter: bool) -> list[tuple[str, str]]:
    """tmux send-keys arguments as ("text", s), ("interrupt", ""), ("eof", "") steps.
    A string is typed as it is unless it is a key name (Enter, C-c, ...); a list holds
    several; `enter` ends the typed text with a newline, as tmux's trailing Enter would."""
    segments: list[tuple[str, str]] = []
    for token in _tokens(keys):
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


@dataclass
class _Typed:
    """A fallback session's side kept here: output not captured yet, a line typed without
    Enter, and whether a command of the session waits (runs, silent) for more."""

    buffer: list[str] = field(default_factory=list)
    line: str = ""
    waiting: bool = False

    def absorb(self, result: ToolResult) -> bool:
        """Keep what a session call printed; False when the call itself failed (not a
        command's exit code, a timeout or a wait for input: an error of the tool)."""
        self.buffer += [result.stdout, result.stderr]
        self.waiting = bool(result.data.get("waiting"))
        if result.error_kind == ErrorKind.NOT_RUNNING:  # the command ended unseen (a reset): nothing to follow
            self.waiting = False
            return True
        return result.error_kind in (None, ErrorKind.WAITING, ErrorKind.TIMEOUT)


class SessionTerminal:
    """The agent session "tmux-NAME" (no tmux binary, no terminal).

    start: a fresh session (an old one of that name is closed). send_keys: `keys` (text,
    or a list with tmux key names: Enter, Tab, C-c interrupts, C-d ends the input;
    `enter`, default true, types a final Enter). Text typed while a command waits (runs,
    silent) is its input; else each complete line runs as a command. Every call returns
    after `idle_timeout` (default the terminal's idle) of silence or at the call's timeout
    (a command that prints all along is then interrupted, as any timed-out call).
    send_keys answers no output: what was printed is kept here and capture returns it
    (after following a waiting command for more), once: with no screen to show, capture
    is what was printed since the last capture. stop: the session is closed."""

    def __init__(self, idle: float = TMUX_IDLE) -> None:
        self.idle = idle
        self._typed: dict[tuple[str, str], _Typed] = {}  # per (slot id, agent session)

    def forget(self, slot_id: str) -> None:
        for key in [key for key in self._typed if key[0] == slot_id]:
            del self._typed[key]

    @staticmethod
    def _name(call: TerminalCall) -> str:
        return agent_session_name(SESSION_PREFIX + call.session)

    async def _bash(self, call: TerminalCall, **extra: Any) -> ToolResult:
        idle = call.args.get("idle_timeout", self.idle)
        return await call.pool.execute(call.slot, "bash", {"session": self._name(call), "idle_timeout": idle,
                                                           **extra}, timeout=call.timeout)

    async def start(self, call: TerminalCall) -> TerminalReply:
        name, key = self._name(call), (call.slot.id, self._name(call))
        await call.pool.execute(call.slot, "session", {"action": "close", "name": name})
        self._typed.pop(key, None)
        started = await call.pool.execute(call.slot, "bash", {"session": name, "command": ":"}, timeout=call.timeout)
        if started.success:
            self._typed[key] = _Typed()
        return TerminalReply(started)

    async def stop(self, call: TerminalCall) -> TerminalReply:
        closed = await call.pool.execute(call.slot, "session", {"action": "close", "name": self._name(call)})
        self._typed.pop((call.slot.id, self._name(call)), None)
        return TerminalReply(closed)

    async def capture(self, call: TerminalCall) -> TerminalReply:
        typed = self._typed.setdefault((call.slot.id, self._name(call)), _Typed())
        last: ToolResult | None = None
        if typed.waiting:
            last = await self._bash(call)  # follow the command: what it printed since
            if not typed.absorb(last):
                return TerminalReply(last)
        output, typed.buffer = "".join(typed.buffer), []
        if last is None:
            return TerminalReply(_answered(call.slot, waiting=typed.waiting), output)
        return TerminalReply(replace(_with(last, waiting=typed.waiting), success=True), output)

    async def send_keys(self, call: TerminalCall) -> TerminalReply:
        typed = self._typed.setdefault((call.slot.id, self._name(call)), _Typed())
        last: ToolResult | None = None

        async def step(**extra: Any) -> bool:
            nonlocal last
            last = await self._bash(call, **extra)
            return typed.absorb(last)

        keys = call.args.get("keys", call.args.get("text", ""))
        for kind, text in key_segments(keys, bool(call.args.get("enter", True))):
            ok = True
            if kind == "interrupt":
                typed.line = ""
                if typed.waiting:
                    ok = await step(interrupt=True)
            elif kind == "eof":
                if typed.waiting:
                    ok = await step(input="", eof=True)
            else:
                typed.line += text
                while ok and typed.line:
                    if typed.waiting:  # typed while a command waits: its input
                        sent, typed.line = typed.line, ""
                        ok = await step(input=sent)
                    elif "\n" in typed.line:  # a complete line at the prompt: a command
                        line, typed.line = typed.line.split("\n", 1)
                        if line.strip():
                            ok = await step(command=line)
                    else:
                        break  # typed without Enter: kept until the Enter comes
            if not ok:
                assert last is not None
                return TerminalReply(last)
        if last is None:
            return TerminalReply(_answered(call.slot, waiting=typed.waiting))
        result = _with(last, waiting=typed.waiting)
        if not last.timed_out:  # the keys went in: a command's own exit code is no failure of send_keys
            result = replace(result, success=True)
        return TerminalReply(result)


# --- real tmux -------------------------------------------------------------------------


def tmux_steps(keys: object, enter: bool) -> list[tuple[str, str]]:
    """send_keys arguments as real tmux steps: ("keys", "C-c Enter") sent as key names,
    ("text", s) typed literally (send-keys -l). Same argument shapes as the fallback's:
    a string or a list of them, each a key name (Enter, C-c, ^C, Tab, Up, ...) or text;
    `enter` presses Enter after text that does not already end with a newline."""
    steps: list[tuple[str, str]] = []
    for token in _tokens(keys):
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


def tmux_name(name: str) -> str:
    """The tmux session name of an environment's session name: letters, digits, '_', '-'
    (tmux reads '.' and ':' in a target as window and pane), at most 64 characters. The
    socket is the slot's own, so the name needs no trajectory in it."""
    cleaned = _TMUX_UNSAFE.sub("_", name)
    return (cleaned if cleaned[:1].isalnum() else "s" + cleaned)[:64]


def pane_text(lines: list[str]) -> str:
    """The captured pane as text: each line without its trailing blanks (a pane row is
    padded to its width) and without the empty rows below the last line written."""
    rows = [line.rstrip() for line in lines]
    while rows and not rows[-1]:
        rows.pop()
    return "".join(row + "\n" for row in rows)


# The functions every real-tmux script starts with. The values come in HPCSBX_TMUX_*
# variables, unexported first: a tmux server started by the script inherits its
# environment, and must not hand an environment's keys on to the shells of its panes.
_FUNCTIONS = r'''
for v in "${!HPCSBX_TMUX_@}"; do export -n "$v"; done
d=$HPCSBX_TMUX_DIR
T=$HPCSBX_TMUX_NAME
t() { tmux -S "$d/sock" "$@"; }

# The socket lives in a folder of this lease, made by mktemp -d under the slot's $TMPDIR
# or /tmp (0700, a random name; its path goes first in stdout, the backend keeps it).
# Not tmux's default /tmp/tmux-UID/default: under runtime none every slot of a node
# shares /tmp and the uid, so their sessions and kill-server would meet. Not a folder in
# the workspace either: artifact listings would show the socket, a wipe of the workspace
# is the reset's own business, and a deep workspace path can pass the 107 bytes a socket
# path may have.
socket_folder() {
  if [ -z "$d" ] || [ ! -d "$d" ]; then
    d=$(mktemp -d "${TMPDIR:-/tmp}/hpc-sandbox-tmux.XXXXXX") || exit 4
  fi
  printf '%s\n' "$d"
}

# Starts session $T, 200x50, in the workspace (the server too, when it is the first).
# The environment's defaults, not a user's: no ~/.tmux.conf or /etc/tmux.conf
# (-f /dev/null), bash as the pane's shell when the slot has it (the slot's clean
# environment has no SHELL, and tmux would fall back to the passwd entry's), and HISTFILE
# empty, so that the pane's shell leaves no .bash_history in $HOME, which is the
# workspace. The server inherits the agent's tag of the call that started it: that tag
# is how the slot's reset finds the server, which has left the call's process group.
# Tried up to 5 times: a server whose last session was just killed is still exiting, and
# a client that reaches it then fails ("server exited unexpectedly"); the next try starts
# a fresh server. Then it waits (up to 5 s) for the shell's first prompt: keys sent
# before it are typed ahead, but a pane still blank would look quiet to settle, and
# send_keys would return before the shell had even read them (a loaded node starts a
# shell slowly).
new_session() {
  local shell n=0 i=0
  shell=$(command -v bash || command -v sh)
  until t has-session -t "=$T" 2>/dev/null ||
        HISTFILE= SHELL="$shell" t -f /dev/null new-session -d -s "$T" -x 200 -y 50 -c "$PWD"; do
    n=$((n + 1)); [ $n -ge 5 ] && exit 4; sleep 0.1
  done
  while [ $i -lt 50 ] && [ -z "$(t capture-pane -p -t "=$T:" 2>/dev/null)" ]; do
    sleep 0.1; i=$((i + 1))
  done
}

# Presses and types what send_keys was given: HPCSBX_TMUX_STEPS steps, step i being
# HPCSBX_TMUX_KIND_i "keys" (key names, pressed) or "text" (typed literally) with its
# value in HPCSBX_TMUX_STEP_i.
send_steps() {
  local i=0 kind value names
  while [ $i -lt "${HPCSBX_TMUX_STEPS:-0}" ]; do
    kind=HPCSBX_TMUX_KIND_$i
    value=HPCSBX_TMUX_STEP_$i
    if [ "${!kind}" = keys ]; then
      read -ra names <<<"${!value}"
      t send-keys -t "=$T:" "${names[@]}" || exit 5
    else
      t send-keys -t "=$T:" -l -- "${!value}" || exit 5
    fi
    i=$((i + 1))
  done
}

# Waits until the pane has not changed for HPCSBX_TMUX_NEED looks, HPCSBX_TMUX_POLL
# seconds apart, and prints "quiet", "busy" or "gone" ("-": no wait asked). In the slot,
# one call: polling from the backend would cost a round trip per look. Each look costs
# a tmux call on top of its sleep, so the count of looks alone would overrun the wait
# (and the call's timeout behind it) on a pane that never goes quiet: bash's SECONDS
# (whole seconds since the script began) bounds the wall time too.
settle() {
  local n=0 same=0 prev= cur state=busy
  if [ "$HPCSBX_TMUX_NEED" -eq 0 ]; then echo -; return; fi
  while [ $n -lt "$HPCSBX_TMUX_POLLS" ] && [ $SECONDS -lt "$HPCSBX_TMUX_MOST" ]; do
    sleep "$HPCSBX_TMUX_POLL"
    cur=$(t capture-pane -p -t "=$T:" 2>/dev/null) || { state=gone; break; }
    if [ "$cur" = "$prev" ]; then
      same=$((same + 1)); [ $same -ge "$HPCSBX_TMUX_NEED" ] && { state=quiet; break; }
    else
      same=0; prev=$cur
    fi
    n=$((n + 1))
  done
  echo "$state"
}

# What runs in the pane now (the shell, or the program it waits on).
pane_command() {
  t display-message -p -t "=$T:" '#{pane_current_command}' 2>/dev/null || echo
}
'''

# Each action's script after the functions. Start and send_keys print the socket folder
# first; send_keys and capture then print the settle state, the pane's command and (for
# capture) the pane.
_SCRIPTS = {
    "start": '''
socket_folder
t kill-session -t "=$T" 2>/dev/null
new_session
''',
    "send_keys": '''
socket_folder
t has-session -t "=$T" 2>/dev/null || new_session
send_steps
settle
pane_command
''',
    "capture": '''
t has-session -t "=$T" 2>/dev/null || { echo "no tmux session $T" >&2; exit 3; }
settle
pane_command
t capture-pane -p -J -t "=$T:" -S "-$HPCSBX_TMUX_DEPTH"
''',
    # The last session gone, the server goes too (it would exit by itself, but a server
    # between two sessions must not outlive the environment's stop) and its folder.
    "stop": '''
t kill-session -t "=$T" 2>/dev/null && echo closed
if [ -z "$(t list-sessions -F x 2>/dev/null)" ]; then
  t kill-server 2>/dev/null; rm -rf -- "$d"; echo empty
fi
''',
}
# Asked once per slot: `tmux -V` rather than `command -v` alone, so that a tmux that
# cannot run (a broken image) means the fallback, not a failing start.
PROBE = "command -v tmux >/dev/null && tmux -V"
_CLEAR_FOLDER = 'rm -rf -- "$HPCSBX_TMUX_DIR"'


def _step_env(steps: list[tuple[str, str]]) -> dict[str, str]:
    """send_keys' steps as send_steps reads them; long text in pieces (TMUX_TEXT_PIECE)."""
    pieces: list[tuple[str, str]] = []
    for kind, value in steps:
        if kind == "keys":
            pieces.append((kind, value))
        else:
            pieces += [(kind, value[start:start + TMUX_TEXT_PIECE]) for start in range(0, len(value), TMUX_TEXT_PIECE)]
    env = {"HPCSBX_TMUX_STEPS": str(len(pieces))}
    for number, (kind, value) in enumerate(pieces):
        env[f"HPCSBX_TMUX_KIND_{number}"], env[f"HPCSBX_TMUX_STEP_{number}"] = kind, value
    return env


def _settle_env(idle: float, most: float) -> dict[str, str]:
    """settle's looks: `idle` seconds of quiet wanted (0: no wait), at most `most` seconds."""
    need = max(1, round(idle / TMUX_POLL)) if idle > 0 else 0
    return {"HPCSBX_TMUX_NEED": str(need), "HPCSBX_TMUX_POLL": str(TMUX_POLL),
            "HPCSBX_TMUX_POLLS": str(max(need + 1, int(most / TMUX_POLL))), "HPCSBX_TMUX_MOST": str(max(1, int(most)))}


class RealTmux:
    """tmux itself, on a server of the slot's own, one agent `bash` call per action, in the
    slot's runtime and workspace.

    start: a fresh detached session NAME, 200x50, in the workspace (an old one of that
    name is killed first). send_keys: `keys` as for the fallback (a string or a list; key
    names such as Enter, C-c, C-d, Tab, Up, ^C are pressed, other text is typed literally;
    `enter`, default true, presses Enter after the text); a session not started yet (or
    whose shell exited) is started first. It then waits for the pane to be quiet for
    `idle_timeout` (default the terminal's idle; 0: no wait), at most `max_wait` seconds or
    until just before the call's timeout; the program keeps running either way (a
    terminal never interrupts on a timeout: send C-c). It answers no output; `settled`
    says whether the pane went quiet, `pane_command` what runs in it. capture: the pane
    as it is now (after waiting for quiet when given `idle_timeout`): the visible 50 rows
    and up to `scrollback` (default 200) lines above them, trailing blanks cut. Unlike the
    fallback's, a terminal's capture is a screen (a prompt, what was typed, a full-screen
    program's drawing), so every capture returns the whole of it. stop: the session is
    killed, and with the last one the server and its socket folder. `socket` is the
    server's socket in the slot, `tmux_session` the session's tmux name."""

    def __init__(self, idle: float = TMUX_IDLE) -> None:
        self.idle = idle
        self._folders: dict[str, str] = {}  # slot id -> the socket folder of the lease that holds it

    def forget(self, slot_id: str) -> str | None:
        """Drop what is known of the slot's lease; its socket folder, if it had one."""
        return self._folders.pop(slot_id, None)

    async def start(self, call: TerminalCall) -> TerminalReply:
        return await self._run(call, "start")

    async def send_keys(self, call: TerminalCall) -> TerminalReply:
        return await self._run(call, "send_keys")

    async def capture(self, call: TerminalCall) -> TerminalReply:
        return await self._run(call, "capture")

    async def stop(self, call: TerminalCall) -> TerminalReply:
        return await self._run(call, "stop")

    async def _run(self, call: TerminalCall, action: str) -> TerminalReply:
        args, slot = call.args, call.slot
        fields: dict[str, Any] = {"tmux_session": tmux_name(call.session)}
        folder = self._folders.get(slot.id)
        try:
            idle = float(args.get("idle_timeout", self.idle if action == "send_keys" else 0) or 0)
            depth = max(0, int(args.get("scrollback", TMUX_SCROLLBACK)))
        except (TypeError, ValueError):
            return _refusal(slot, ErrorKind.BAD_REQUEST, "idle_timeout must be seconds and scrollback a line count")
        # Up to just before the call's own timeout, which would kill the script (and a
        # server it had just started, whose tag is the call's); `max_wait` may say less.
        most = call.timeout - 1.0 if call.timeout > 2 else call.timeout / 2
        if args.get("max_wait") is not None:
            try:
                most = min(most, max(0.0, float(args["max_wait"])))
            except (TypeError, ValueError):
                return _refusal(slot, ErrorKind.BAD_REQUEST, "max_wait must be seconds")
        if action in ("capture", "stop") and folder is None:  # nothing started under this lease
            if action == "stop":
                return TerminalReply(_answered(slot, **fields, closed=False))
            return _refusal(slot, ErrorKind.NOT_RUNNING, f"no tmux session {call.session!r} (start it first)")

        env = {"HPCSBX_TMUX_DIR": folder or "", "HPCSBX_TMUX_NAME": fields["tmux_session"],
               "HPCSBX_TMUX_DEPTH": str(depth), **_settle_env(idle, max(idle, most))}
        if action == "send_keys":
            env.update(_step_env(tmux_steps(args.get("keys", args.get("text", "")), bool(args.get("enter", True)))))
        result = await call.pool.execute(slot, "bash", {"command": _FUNCTIONS + _SCRIPTS[action], "env": env},
                                         timeout=call.timeout)
        lines = result.stdout.split("\n")
        if action in ("start", "send_keys") and result.error_kind in (None, ErrorKind.TIMEOUT) and lines[0]:
            # The folder made by this call (or the one already known): kept for the lease.
            self._folders[slot.id] = lines.pop(0)
        known = self._folders.get(slot.id) or folder
        if known:  # where the server listens: for a look with `tmux -S` from a bash call
            fields["socket"] = posixpath.join(known, "sock")
        if not result.success:
            failed = _with(result, **fields)
            if result.error_kind is not None:
                return TerminalReply(failed)
            if result.exit_code == 3 and action == "capture":  # the script's failure: say tmux's own words
                return TerminalReply(replace(failed, error_kind=ErrorKind.NOT_RUNNING),
                                     error=f"no tmux session {call.session!r} (start it first, or its shell exited)")
            stderr = result.stderr.strip()
            return TerminalReply(failed, error=f"tmux {action} failed: {stderr}" if stderr else None,
                                 error_prefix=f"tmux {action} failed: ")
        if action == "stop":
            if "empty" in lines:
                self._folders.pop(slot.id, None)
            return TerminalReply(_with(result, **fields, closed="closed" in lines))
        if action == "start":
            return TerminalReply(_with(result, **fields))
        state, command = (lines + ["", ""])[:2]
        fields["pane_command"] = command
        if state != "-":
            fields["settled"] = state == "quiet"
        return TerminalReply(_with(result, **fields), pane_text(lines[2:]) if action == "capture" else "")


# --- which terminal serves a slot ----------------------------------------------------------


class Terminals:
    """The tmux tool of a face: RealTmux where the slot has tmux (and the mode allows it),
    else SessionTerminal; `mode` and `session` (the environment's name) in every reply's
    fields, with the action."""

    def __init__(self, mode: TmuxMode | str = TmuxMode.AUTO, idle: float = TMUX_IDLE) -> None:
        self.mode = TmuxMode(mode)
        self.real = RealTmux(idle)
        self.session = SessionTerminal(idle)
        # Whether a slot has a tmux that runs, asked once per slot id (a slot's image
        # does not change between leases).
        self._found: dict[str, bool] = {}

    async def run(self, action: object, call: TerminalCall) -> TerminalReply:
        if action not in ACTIONS:
            return _refusal(call.slot, ErrorKind.BAD_REQUEST,
                            f"tmux action must be start, send_keys, capture or stop; got {action!r}")
        where = {"action": action, "session": call.session}
        terminal: Terminal = self.session
        if self.mode is not TmuxMode.SESSION:
            found = self._found.get(call.slot.id)
            if found is None:
                probe = await call.pool.execute(call.slot, "bash", {"command": PROBE}, timeout=call.timeout)
                if probe.error_kind is not None:  # no answer about tmux (a lost lease, a timeout): asked again
                    return TerminalReply(_with(probe, **where))
                found = self._found[call.slot.id] = probe.exit_code == 0
            if found:
                terminal = self.real
            elif self.mode is TmuxMode.TMUX:
                return _refusal(call.slot, ErrorKind.UNAVAILABLE, f"slot {call.slot.id} has no tmux on its PATH (the "
                                "backend was made with tmux=\"tmux\"; \"auto\" falls back to a session)")
        reply = await getattr(terminal, action)(call)
        mode = TmuxMode.TMUX if terminal is self.real else TmuxMode.SESSION
        return replace(reply, result=_with(reply.result, **where, mode=mode.value))

    def forget(self, slot_id: str) -> str | None:
        """Drop what is known of the slot's lease (it is released, or lost); the real tmux
        socket folder it left in the slot, if any, for clear_folder."""
        self.session.forget(slot_id)
        return self.real.forget(slot_id)

    @staticmethod
    async def clear_folder(pool: SlotRunner, slot: Slot, folder: str | None) -> None:
        """Remove a lease's socket folder from the slot. It is outside the workspace, so no
        wipe removes it, and under runtime none it would pile up in the node's /tmp, one
        per trajectory. Only the folder: the server itself is left to the slot's reset,
        which ends it (with what runs in its panes) even when nobody knows a folder, as
        after a lost lease."""
        if folder is None:
            return
        cleared = await pool.execute(slot, "bash", {"command": _CLEAR_FOLDER, "env": {"HPCSBX_TMUX_DIR": folder}},
                                     timeout=10)
        if not cleared.success:
            log.debug("slot %s: tmux folder %s not removed: %s", slot.id, folder, cleared.error)
