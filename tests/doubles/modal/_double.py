"""The machinery behind the Modal DOUBLE, and the controls tests drive it with.

Tests use:
- `install(monkeypatch, state_dir)` -> the double as `modal`, in this process;
  `subprocess_env(state_dir)` -> an environment in which a child's `import modal` is the
  double and shares the same state dir (env var `MODAL_DOUBLE_DIR`);
- `calls` (what the code under test called, in this process), `recorded_calls(state_dir)`
  (names and keyword names only, from every process), and `check_against_real_sdk(calls)`;
- `ca_bundle(state_dir)` -> the PEM file that makes tunnels trusted (for SSL_CERT_FILE);
- controls: `throttle`, `fail`, `create_delay`, `named_secret`, `reset_controls`, `kill`,
  `sandboxes`, `cleanup`.

State shared by every process using one state dir (so that a process can find, list and
terminate sandboxes that another one made, even one that was SIGKILLed):
  apps.json                 app name -> app id
  controls.json             throttle / fail / create_delay / secrets
  calls.jsonl               one line per call: name, positional count, keyword names (no values)
  sandboxes/<id>.json       one record per sandbox (no secret values)
  sandboxes/<id>.exit       its exit code, once it has one
  sandboxes/<id>.log        its stdout and stderr
  work/<id>-*/              its working folder
  tls/                      the CA and the tunnels' certificate (see _tls.py)
"""
from __future__ import annotations

import asyncio
import contextlib
import difflib
import fcntl
import importlib
import inspect
import json
import logging
import os
import secrets as _random
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from . import exception

log = logging.getLogger("modal-double")
T = TypeVar("T")

ENV_DIR = "MODAL_DOUBLE_DIR"
PACKAGE_DIR = Path(__file__).resolve().parent
DOUBLES_DIR = PACKAGE_DIR.parent  # what goes first on sys.path / PYTHONPATH
SUPERVISOR = PACKAGE_DIR / "_supervisor.py"
GRACE = 2.0  # terminate: SIGTERM, then SIGKILL after this many seconds (as _supervisor does)
TERMINATED = 137  # Modal's exit code for a terminated (or crashed) sandbox


# --- recording ------------------------------------------------------------------------------

@dataclass
class Call:
    """One call into the double: `name` is the real SDK's qualified name (e.g.
    "Sandbox.create"); `args` excludes `self`."""
    name: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    aio: bool = False


calls: list[Call] = []


def record(name: str, args: tuple, kwargs: dict, aio: bool = False) -> None:
    calls.append(Call(name, tuple(args), dict(kwargs), aio))
    # On disk only the shape (enough to check against the real signatures), never values:
    # a secret passed to Secret.from_dict must not land in a file.
    folder = _state_dir_or_none()
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"name": name, "nargs": len(args), "kwargs": sorted(kwargs), "aio": aio})
        with open(folder / "calls.jsonl", "a") as out:
            out.write(line + "\n")


def recorded_calls(state_dir: Path | str) -> list[Call]:
    """Every call made by any process on this state dir, with placeholders for values."""
    path = Path(state_dir) / "calls.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        found.append(Call(item["name"], (None,) * item["nargs"], dict.fromkeys(item["kwargs"]), item["aio"]))
    return found


# --- the state dir and its files ------------------------------------------------------------------

def _state_dir_or_none() -> Path | None:
    value = os.environ.get(ENV_DIR)
    return Path(value) if value else None


def state_dir() -> Path:
    """Where this process's double keeps its shared state. Unset is what the real SDK sees
    without credentials, so it raises the same error type."""
    folder = _state_dir_or_none()
    if folder is None:
        raise exception.AuthError(f"Modal double: {ENV_DIR} is not set (no state dir, like no Modal token)")
    (folder / "sandboxes").mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    """One lock for every read-modify-write of the shared files, across processes."""
    folder = state_dir()
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield folder


def _read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out, indent=1)
    os.replace(tmp, path)  # readers never see half a file


def new_id(prefix: str) -> str:
    """An id shaped like Modal's ("sb-" or "ap-" and 22 letters and digits)."""
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(_random.choice(alphabet) for _ in range(22))


def app_id_for(name: str, create_if_missing: bool) -> str:
    with _locked() as folder:
        apps = _read_json(folder / "apps.json", {})
        if name not in apps:
            if not create_if_missing:
                raise exception.NotFoundError(f"App '{name}' not found")
            apps[name] = new_id("ap-")
            _write_json(folder / "apps.json", apps)
        return apps[name]


# --- controls (fault injection) -------------------------------------------------------------------

def _update_controls(change: Callable[[dict], T]) -> T:
    with _locked() as folder:
        controls = _read_json(folder / "controls.json", {})
        before = json.dumps(controls, sort_keys=True)
        result = change(controls)
        if json.dumps(controls, sort_keys=True) != before:
            _write_json(folder / "controls.json", controls)
        return result


def controls() -> dict:
    return _read_json(state_dir() / "controls.json", {})


def throttle(n: int) -> None:
    """The next n `Sandbox.create` calls raise ResourceExhaustedError, as Modal's rate limit does."""
    _update_controls(lambda c: c.__setitem__("throttle", int(n)))


def fail(call_name: str, exc: type[BaseException] | BaseException, times: int = 1) -> None:
    """The next `times` calls of `call_name` (e.g. "App.lookup", "Sandbox.create") raise
    `exc`, a class or instance from `modal.exception` (stored by name, so that another
    process on the same state dir raises it too)."""
    kind = exc if isinstance(exc, type) else type(exc)
    if getattr(exception, kind.__name__, None) is None:
        raise ValueError(f"fail(): {kind.__name__} is not a modal.exception class")
    message = "" if isinstance(exc, type) else str(exc)
    message = message or f"{kind.__name__} injected by the Modal double's fail()"
    entry = {"type": kind.__name__, "message": message, "times": int(times)}
    _update_controls(lambda c: c.setdefault("fail", {}).setdefault(call_name, []).append(entry))


def create_delay(seconds: float) -> None:
    """Every `Sandbox.create` takes this long first (a cold start); it sleeps on the double's
    own event loop, so an `.aio` caller's loop keeps running."""
    _update_controls(lambda c: c.__setitem__("create_delay", float(seconds)))


def named_secret(name: str, values: dict[str, str]) -> None:
    """What `Secret.from_name(name)` holds (unknown names hold {})."""
    _update_controls(lambda c: c.setdefault("secrets", {}).__setitem__(name, dict(values)))


def reset_controls() -> None:
    _update_controls(lambda c: c.clear())


def take_fault(call_name: str) -> None:
    """Raise what `fail` (or, for Sandbox.create, `throttle`) queued for this call, if anything."""
    def take(c: dict) -> exception.Error | None:
        queue = c.get("fail", {}).get(call_name, [])
        if queue:
            entry = queue[0]
            entry["times"] -= 1
            if entry["times"] <= 0:
                queue.pop(0)
            return getattr(exception, entry["type"])(entry["message"])
        if call_name == "Sandbox.create" and c.get("throttle", 0) > 0:
            c["throttle"] -= 1
            return exception.ResourceExhaustedError("Sandbox create rate limit exceeded (Modal double throttle)")
        return None
    if (error := _update_controls(take)) is not None:
        raise error


# --- sandbox records and their processes ----------------------------------------------------------

def record_path(sandbox_id: str) -> Path:
    return state_dir() / "sandboxes" / f"{sandbox_id}.json"


def load_record(sandbox_id: str) -> dict | None:
    return _read_json(record_path(sandbox_id), None)


def all_records(folder: Path | None = None) -> list[dict]:
    """Every sandbox ever made on this state dir, newest first (as Modal lists)."""
    found = [_read_json(p, None) for p in ((folder or state_dir()) / "sandboxes").glob("sb-*.json")]
    return sorted((r for r in found if r), key=lambda r: r["created"], reverse=True)


def save_record(rec: dict) -> None:
    _write_json(record_path(rec["id"]), rec)


def update_record(sandbox_id: str, change: Callable[[dict], None]) -> dict:
    with _locked():
        rec = load_record(sandbox_id)
        if rec is None:
            raise exception.NotFoundError(f"Sandbox {sandbox_id} not found")
        change(rec)
        save_record(rec)
        return rec


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) from /proc, or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(")") + 2:].split()  # the name may hold spaces: cut after it
    return fields[0], int(fields[2]), int(fields[19])


def start_time(pid: int) -> int:
    found = _stat(pid)
    return found[2] if found else -1


def _leader_alive(rec: dict) -> bool:
    """The sandbox's supervisor still runs, and is the same process (its pid not reused)."""
    found = _stat(rec["pid"])
    return found is not None and found[0] not in "ZX" and found[2] == rec["start_time"]


def _members(rec: dict) -> list[int]:
    """Live processes of the sandbox's group: same group id, started no earlier than the
    leader (a later process given that number again could not pass for one of them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found and found[0] not in "ZX" and found[1] == rec["pgid"] and found[2] >= rec["start_time"]:
                pids.append(int(entry.name))
    return pids


def _signal(rec: dict, sig: int) -> None:
    if _leader_alive(rec):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(rec["pgid"], sig)
        return
    for pid in _members(rec):  # the leader is gone (SIGKILLed): what it left, one by one
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def write_exit(rec: dict, code: int) -> None:
    """First writer wins (see _supervisor.write_exit)."""
    path = Path(rec["exit"])
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(str(code))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def returncode(rec: dict) -> int | None:
    """None while the sandbox runs; else its exit code. A supervisor that vanished without
    writing one was killed (crash, SIGKILL): Modal reports that as terminated."""
    path = Path(rec["exit"])
    if not path.exists():
        if _leader_alive(rec):
            return None
        write_exit(rec, TERMINATED)
    return int(path.read_text())


async def terminate(rec: dict) -> None:
    """SIGTERM the sandbox's process group; SIGKILL what is left after GRACE seconds."""
    if not _leader_alive(rec) and not _members(rec):
        returncode(rec)
        return
    write_exit(rec, TERMINATED)  # before signalling: the child's own exit must not win
    _signal(rec, signal.SIGTERM)
    deadline = time.monotonic() + GRACE + 0.5
    while _leader_alive(rec) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    _signal(rec, signal.SIGKILL)  # the group if its leader is wedged, else whatever it left behind


def kill(sandbox_id: str) -> None:
    """The sandbox crashes: SIGKILL its whole group, supervisor and tunnels included, so
    poll() turns non-None (137) and its tunnels refuse connections."""
    rec = load_record(sandbox_id)
    if rec is None:
        raise KeyError(sandbox_id)
    _signal(rec, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _leader_alive(rec) and time.monotonic() < deadline:
        time.sleep(0.01)
    returncode(rec)


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def sandboxes() -> list[dict]:
    """The running sandboxes on this state dir, newest first: id, app_id, app_name, name,
    tags, pid (the group leader), argv (as run, ports remapped), requested_argv, env (the
    variables it got beyond this process's own environment: secrets, `env=`, image env),
    ports (container port -> local port), tunnels (container port -> proxy port), log."""
    live = []
    for rec in all_records():
        if returncode(rec) is None:
            mine = dict(os.environ)
            env = {k: v for k, v in _environ(rec["pid"]).items() if mine.get(k) != v}
            live.append({**rec, "env": env})
    return live


# --- starting a sandbox ---------------------------------------------------------------------------

def _bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def remap_argv(argv: list[str], ports: dict[int, int]) -> list[str]:
    """The argv as the double runs it. A container has its own network namespace and local
    processes share one, so a container port P becomes a free local port: in `--port P`,
    and in `--port-range P-P` (the node server's form); `--host X` becomes 127.0.0.1.
    `python`/`python3` become this interpreter. Only separate argv items are rewritten
    (not text inside a `sh -c` string)."""
    out = list(argv)
    if out and out[0] in ("python", "python3"):
        out[0] = sys.executable

    def remap(flag: str, value: str) -> str:
        if flag == "--host":
            return "127.0.0.1"
        if flag == "--port" and value.isdigit():
            return str(ports.get(int(value), value))
        lo, _, hi = value.partition("-")
        if lo.isdigit() and hi in ("", lo) and int(lo) in ports:
            return f"{ports[int(lo)]}-{ports[int(lo)]}"
        return value

    i = 0
    while i < len(out):
        flag, eq, value = out[i].partition("=")
        if flag in ("--port", "--port-range", "--host"):
            if eq:
                out[i] = f"{flag}={remap(flag, value)}"
            elif i + 1 < len(out):
                out[i + 1] = remap(flag, out[i + 1])
                i += 1
        i += 1
    return out


def spawn(*, argv: list[str], app: Any, name: str | None, tags: dict[str, str], env: dict[str, str | None],
          encrypted_ports: list[int], probe: Any, timeout: int, workdir: str | None, details: dict) -> dict:
    """Start one sandbox: its supervisor (see _supervisor.py) in a new session, holding the
    tunnels' listening sockets, running argv in a fresh working folder. Returns its record."""
    from . import _tls
    folder = state_dir()
    tls = _tls.ensure(folder)
    sandbox_id = new_id("sb-")
    # Container port -> a local port, free now (the sandbox's server binds it a moment
    # later); its placeholder stays bound until the tunnels' listeners have their ports.
    placeholders = {int(p): _bound() for p in encrypted_ports}
    ports = {p: sock.getsockname()[1] for p, sock in placeholders.items()}
    listeners: dict[int, socket.socket] = {}
    try:
        for port in ports:
            listeners[port] = _bound()
            listeners[port].listen(128)
        for sock in placeholders.values():
            sock.close()
        (folder / "work").mkdir(exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{sandbox_id}-", dir=folder / "work"))
        cwd = work / workdir.lstrip("/") if workdir else work  # `workdir` is made inside the fresh folder
        cwd.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **env}
        full_env = {k: v for k, v in full_env.items() if v is not None}
        probe_port = getattr(probe, "tcp_port", None)
        rec = {
            "id": sandbox_id, "app_id": app.app_id, "app_name": app.name, "name": name, "tags": tags,
            "requested_argv": argv, "argv": remap_argv(argv, ports),
            "ports": {str(p): local for p, local in ports.items()},
            "tunnels": {str(p): sock.getsockname()[1] for p, sock in listeners.items()},
            "probe_port": ports.get(probe_port, probe_port), "probe_interval_ms": getattr(probe, "interval_ms", 100),
            "timeout": timeout, "workdir": str(cwd), "log": str(folder / "sandboxes" / f"{sandbox_id}.log"),
            "exit": str(folder / "sandboxes" / f"{sandbox_id}.exit"),
            "created": time.time(), "creator_pid": os.getpid(), **details,
        }
        config = {"argv": rec["argv"], "exit_path": rec["exit"], "timeout": timeout,
                  "cert": str(tls["cert"]), "key": str(tls["key"]),
                  "tunnels": [{"fd": sock.fileno(), "target_port": ports[p]} for p, sock in listeners.items()]}
        with _locked():
            if name is not None and any(r["app_id"] == app.app_id and r["name"] == name and returncode(r) is None
                                        for r in all_records()):
                raise exception.AlreadyExistsError(f"Sandbox with name {name!r} already exists in app {app.name!r}")
            with open(rec["log"], "ab") as log_file:
                proc = subprocess.Popen([sys.executable, "-I", str(SUPERVISOR)], stdin=subprocess.PIPE,
                                        stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd, env=full_env,
                                        start_new_session=True, pass_fds=[s.fileno() for s in listeners.values()])
            rec.update(pid=proc.pid, pgid=proc.pid, start_time=start_time(proc.pid))
            save_record(rec)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode())
        proc.stdin.close()
    finally:
        for sock in [*placeholders.values(), *listeners.values()]:
            sock.close()  # the supervisor holds its own copies of the listeners
    adopt(sandbox_id, proc)
    log.info("sandbox %s started: pid %s, argv %s", sandbox_id, proc.pid, rec["argv"])
    return rec


# --- processes this process started ---------------------------------------------------------------

_children: dict[str, Any] = {}  # sandbox id -> subprocess.Popen of its supervisor


def adopt(sandbox_id: str, proc: Any) -> None:
    """Reap the supervisor when it ends (no zombie that would look alive to others)."""
    _children[sandbox_id] = proc
    threading.Thread(target=proc.wait, name=f"modal-double-reap-{sandbox_id}", daemon=True).start()


def cleanup(state_dir_: Path | str | None = None) -> None:
    """Terminate every sandbox still running on the state dir (default: MODAL_DOUBLE_DIR),
    made here or by any other process, and stop the double's event loop. Idempotent;
    install() runs it at teardown."""
    folder = Path(state_dir_) if state_dir_ is not None else _state_dir_or_none()
    if folder is not None and (folder / "sandboxes").is_dir():
        async def stop_all() -> None:
            await asyncio.gather(*(terminate(rec) for rec in all_records(folder) if returncode(rec) is None))
        loop.run(stop_all())
    for proc in _children.values():
        with contextlib.suppress(Exception):
            proc.wait(timeout=GRACE + 1)
    _children.clear()
    loop.stop()


# --- the double's own event loop ------------------------------------------------------------------

class _Loop:
    """Every operation runs here, on a thread of its own (as synchronicity runs the real
    SDK's): a blocking call waits for its result; an `.aio` call awaits it without holding
    the caller's loop, and a busy caller's loop cannot stall it (tunnels, probes, delays)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def _get(self) -> asyncio.AbstractEventLoop:
        with self._guard:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="modal-double-loop", daemon=True)
                self._thread.start()
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._thread is threading.current_thread():
            raise RuntimeError("Modal double: a blocking call from the double's own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._get()).result()

    async def aio(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._get()))

    def stop(self) -> None:
        with self._guard:
            loop_, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop_ is not None and thread is not None:
            loop_.call_soon_threadsafe(loop_.stop)
            thread.join(timeout=5)
            loop_.close()


loop = _Loop()


# --- TLS ------------------------------------------------------------------------------------------

def ca_bundle(state_dir_: Path | str | None = None) -> Path:
    """The PEM bundle (the double's CA plus the system's CAs) to put in SSL_CERT_FILE or pass
    as `cafile=`, so that `ssl.create_default_context()` trusts the tunnels."""
    from . import _tls
    return _tls.ensure(Path(state_dir_) if state_dir_ is not None else state_dir())["bundle"]


# --- using the double -----------------------------------------------------------------------------

def _is_modal(name: str) -> bool:
    return name == "modal" or name.startswith("modal.")


class _OnUndo:
    """install() gets no teardown hook but `monkeypatch`, which undoes a setattr by setting
    the old value back: setting `armed` back to False runs the action (cleanup)."""

    def __init__(self, action: Callable[[], None]) -> None:
        object.__setattr__(self, "_action", action)
        object.__setattr__(self, "armed", False)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name == "armed" and not value:
            self._action()


def install(monkeypatch: Any, state_dir_: Path | str) -> ModuleType:
    """Make `import modal` give the double in this process, on `state_dir_`, until the
    test ends; then terminate what it started and give the real SDK back.

    Returns the double's `modal` module: use it (its `_double` holds `calls` and the
    controls), not the copy this function may have been imported from (e.g. as
    `doubles.modal`), whose exception classes are different objects."""
    folder = Path(state_dir_)
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv(ENV_DIR, str(folder))
    real = {name: mod for name, mod in sys.modules.items() if _is_modal(name)}
    for name in real:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(DOUBLES_DIR))
    double = importlib.import_module("modal")
    if Path(double.__file__).resolve().parent != PACKAGE_DIR:
        raise RuntimeError(f"install(): `import modal` gave {double.__file__}, not the double")
    # Register the double's modules with monkeypatch so undo removes them again.
    for name in [n for n in sys.modules if _is_modal(n)]:
        monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
    if not hasattr(real.get("modal"), "__modal_double__"):
        double._double._real_modal = real.get("modal")  # spares check_against_real_sdk an import
    monkeypatch.setattr(_OnUndo(lambda: double._double.cleanup(folder)), "armed", True)
    return double


def subprocess_env(state_dir_: Path | str, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for a child process in which `import modal` is the double, on the
    same state dir: `tests/doubles` first on PYTHONPATH, MODAL_DOUBLE_DIR set."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DOUBLES_DIR), env.get("PYTHONPATH", "")) if p)
    env[ENV_DIR] = str(state_dir_)
    return env


# --- checking call shapes against the real SDK ----------------------------------------------------

_real_modal: ModuleType | None = None


def real_modal() -> ModuleType:
    """The installed `modal` SDK (site-packages), imported without disturbing the double:
    the double's modules and path entry are set aside while it loads, then put back."""
    global _real_modal
    if _real_modal is not None:
        return _real_modal
    saved_modules = {n: sys.modules.pop(n) for n in [n for n in sys.modules if _is_modal(n)]}
    saved_path = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != DOUBLES_DIR]
    try:
        real = importlib.import_module("modal")
        if Path(real.__file__).resolve().parent == PACKAGE_DIR:
            raise RuntimeError("check_against_real_sdk: could not find the real modal SDK")
        _real_modal = real
        return real
    finally:
        for name in [n for n in sys.modules if _is_modal(n)]:
            del sys.modules[name]
        sys.modules.update(saved_modules)
        sys.path[:] = saved_path


def _real_callable(name: str) -> Callable:
    target: Any = real_modal()
    for part in name.split("."):
        if not hasattr(target, part):
            raise AssertionError(f"the real modal SDK has no modal.{name}")
        target = getattr(target, part)
    return target


def check_against_real_sdk(recorded: Iterable[Call]) -> None:
    """Bind every recorded call to the real SDK's signature of the same name; raise
    AssertionError naming each call that the real SDK would reject (an unknown keyword, a
    missing argument, too many positional ones)."""
    problems = []
    for call in recorded:
        real = _real_callable(call.name)
        sig = inspect.signature(real)
        params = list(sig.parameters)
        args = (None, *call.args) if params[:1] == ["self"] else call.args
        try:
            sig.bind(*args, **call.kwargs)
        except TypeError as exc:
            takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
            unknown = [k for k in call.kwargs if k not in sig.parameters and not takes_any]
            hints = [f"{k!r} (did you mean {difflib.get_close_matches(k, params, 1)}?)" for k in unknown]
            detail = f"keyword {', '.join(hints)} not taken" if hints else str(exc)
            problems.append(f"modal.{call.name}: {detail}; the real signature is {sig}")
    if problems:
        raise AssertionError("calls the real modal SDK would reject:\n" + "\n".join(problems))

