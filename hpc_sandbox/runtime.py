"""How a slot's agent is started: apptainer, singularity, bwrap, or none.

A runtime only builds the command line (and checks that it can run); the node
server spawns it and speaks to the agent over its stdin/stdout. Every runtime but
`none` shows the slot its own workspace at /workspace, a private /tmp and its own
pid namespace, and hides the state directory and the token file. A runtime that
cannot start is an error: there is no silent fallback to a weaker one.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RuntimeUnavailable
from .paths import SLOT_WORKSPACE  # where a contained slot sees its workspace

log = logging.getLogger(__name__)

AGENT_SOURCE = Path(__file__).with_name("agent.py")
SLOT_AGENT = "/opt/hpc-sandbox/agent.py"  # where a contained slot sees the agent
# What a slot's environment starts from: nothing of the server's own environment
# (which is where a secret would be, if a site put one there) reaches a slot.
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
# Host paths a bwrap slot must not see although they are outside $HOME: the munge
# socket (through it a slot could submit an unsandboxed job as the user), the munge
# key (readable when the server runs as root), and per-user runtime dirs (ssh-agent,
# gpg-agent sockets).
BWRAP_HIDDEN_HOST_PATHS = ("/run/munge", "/run/user", "/etc/munge")
REMOTE_IMAGE_PREFIXES = ("docker://", "docker-daemon://", "library://", "oras://", "shub://", "http://", "https://")


@dataclass(frozen=True)
class RuntimeOptions:
    kind: str = "none"
    image: str | None = None
    gpus: int = 0
    # Paths no slot may see (state dir, token file); the server fills these in.
    hidden_paths: tuple[Path, ...] = ()
    # The interpreter that runs the agent: the server's own for none/bwrap (they see
    # the host's files), the image's python3 for containers.
    python: str | None = None
    executable: str | None = None  # override the runtime binary (tests, odd installs)
    extra_binds: tuple[str, ...] = field(default=())


def slot_env(workspace: str, slot_index: int) -> dict[str, str]:
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update({"HOME": workspace, "TERM": "dumb", "HPC_SANDBOX_SLOT": str(slot_index), "PYTHONUNBUFFERED": "1"})
    return env


class SlotRuntime:
    """Base: builds the agent command line for one slot."""

    name = "base"

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options

    def check(self) -> str:
        """Raise RuntimeUnavailable if this runtime cannot start here; else describe it."""
        raise NotImplementedError

    def agent_command(self, workspace: Path, slot_index: int) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that start one slot's agent."""
        raise NotImplementedError

    def _agent_args(self, python: str, agent: str, workspace: str) -> list[str]:
        return [python, "-u", agent, "--workspace", workspace]


class NoneRuntime(SlotRuntime):
    """A plain local process. No isolation at all: for trusted local use only."""

    name = "none"

    def check(self) -> str:
        return "none: slots are plain local processes with no isolation (trusted local use only)"

    def agent_command(self, workspace: Path, slot_index: int) -> tuple[list[str], dict[str, str]]:
        python = self.options.python or sys.executable
        return self._agent_args(python, str(AGENT_SOURCE), str(workspace)), slot_env(str(workspace), slot_index)


class BwrapRuntime(SlotRuntime):
    """bubblewrap: host files read-only, workspace read-write at /workspace, private
    /tmp, own pid/ipc/uts namespaces, dies with the node server."""

    name = "bwrap"

    def __init__(self, options: RuntimeOptions) -> None:
        super().__init__(options)
        self._prefixes: set[Path] | None = None  # asked once: see _python_prefixes

    def binary(self) -> str:
        found = self.options.executable or shutil.which("bwrap")
        if not found:
            raise RuntimeUnavailable("runtime bwrap: the 'bwrap' executable is not on PATH (install bubblewrap)")
        return found

    def check(self) -> str:
        argv = [self.binary(), "--ro-bind", "/", "/", "--unshare-pid", "--dev", "/dev", "--proc", "/proc", "true"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeUnavailable(f"runtime bwrap: cannot run bwrap: {exc}") from exc
        if proc.returncode != 0:
            detail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
            raise RuntimeUnavailable(
                f"runtime bwrap: bwrap cannot create namespaces here ({detail[0]}); "
                "are unprivileged user namespaces disabled (kernel.unprivileged_userns_clone)?"
            )
        version = subprocess.run([self.binary(), "--version"], capture_output=True, text=True).stdout.strip()
        return f"bwrap: {version or 'unknown version'}"

    def root_binds(self) -> list[str]:
        """Mount the host's top-level folders read-only into bwrap's own tmpfs root.

        Binding them one by one (rather than `--ro-bind / /`) keeps the root writable
        for bwrap itself, so /workspace can exist without touching the host.
        """
        skip = {"proc", "dev", "tmp", "workspace", "opt"}
        args: list[str] = []
        for entry in sorted(os.scandir("/"), key=lambda e: e.name):
            if entry.name in skip:
                continue
            if entry.is_symlink():
                args += ["--symlink", os.readlink(entry.path), entry.path]
            elif entry.is_dir():
                args += ["--ro-bind", entry.path, entry.path]
        # /opt is bound child by child so that /opt/hpc-sandbox can be ours.
        if os.path.isdir("/opt"):
            args += ["--dir", "/opt"]
            for entry in sorted(os.scandir("/opt"), key=lambda e: e.name):
                if entry.name != "hpc-sandbox":
                    args += ["--ro-bind", entry.path, entry.path]
        return args

    def agent_command(self, workspace: Path, slot_index: int) -> tuple[list[str], dict[str, str]]:
        argv = [self.binary(), "--die-with-parent", "--new-session",
                "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        argv += self.root_binds()
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        python = self.options.python or sys.executable
        argv += self.home_binds(python)
        hidden = [Path(p) for p in (*self.options.hidden_paths, *BWRAP_HIDDEN_HOST_PATHS)]
        for path in hidden:
            # A path under another hidden folder is already covered by that folder's tmpfs.
            if not any(other != path and other.is_dir() and path.is_relative_to(other) for other in hidden):
                argv += _bwrap_hide(path)
        for bind in self.options.extra_binds:
            src, _, dst = bind.partition(":")
            argv += ["--ro-bind", src, dst or src]
        argv += ["--bind", str(workspace), SLOT_WORKSPACE,
                 "--ro-bind", str(AGENT_SOURCE), SLOT_AGENT,
                 "--chdir", SLOT_WORKSPACE, "--clearenv"]
        env = slot_env(SLOT_WORKSPACE, slot_index)
        for key, value in sorted(env.items()):
            argv += ["--setenv", key, value]
        argv += self._agent_args(python, SLOT_AGENT, SLOT_WORKSPACE)
        return argv, env

    def home_binds(self, python: str) -> list[str]:
        """Hide the server user's home ($HOME holds ~/.ssh, cloud credentials and, by
        default, the state dir) except the Python installation that runs the agent,
        when that lives there (pyenv, a venv, a `--prefix=$HOME` build): it is bound
        back read-only."""
        try:
            home = Path.home().resolve()
        except (KeyError, RuntimeError):
            return []
        if home == Path("/") or not home.is_dir():
            return []
        args = ["--tmpfs", str(home)]
        for prefix in sorted(self._python_prefixes(python)):
            if prefix == home:  # a Python installed straight into $HOME: its bin and lib only
                args += [arg for sub in ("bin", "lib", "lib64") if (home / sub).is_dir()
                         for arg in ("--ro-bind", str(home / sub), str(home / sub))]
            elif prefix.is_relative_to(home):
                args += ["--ro-bind", str(prefix), str(prefix)]
        return args

    def _python_prefixes(self, python: str) -> set[Path]:
        """sys.prefix and sys.base_prefix of the interpreter that runs the agent, resolved."""
        if self._prefixes is not None:
            return self._prefixes
        if python == sys.executable:
            found = [sys.prefix, sys.base_prefix]
        else:
            try:
                found = subprocess.run([python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
                                       capture_output=True, text=True, timeout=30).stdout.split("\n")[:2]
            except (OSError, subprocess.TimeoutExpired):
                found = []
            if len([f for f in found if f]) < 2:  # not a Python we can ask: assume bin/python's folder
                interpreter = Path(shutil.which(python) or python)
                found = [str(interpreter.absolute().parent.parent), str(interpreter.resolve().parent.parent)]
        self._prefixes = {Path(f).resolve() for f in found if f}
        return self._prefixes


def _bwrap_hide(path: Path) -> list[str]:
    """Cover a host path so the slot sees an empty folder or an empty file there."""
    if path.is_dir():
        return ["--tmpfs", str(path)]
    if path.exists():
        return ["--ro-bind", "/dev/null", str(path)]
    return []


class ApptainerRuntime(SlotRuntime):
    """Apptainer (or Singularity) `exec` with --containall: no $HOME, clean env,
    own pid/ipc namespaces, private /tmp; the workspace and the agent bound in.

    The argv follows spython's conventions (action, flags, image, command); spython
    itself detects the version. Site-wide `bind path` entries are turned off with
    `--no-mount bind-paths`, because a shared filesystem bound there could hold the
    state directory.
    """

    name = "apptainer"

    def binary(self) -> str:
        exe = self.options.executable or shutil.which(self.name)
        if not exe:
            raise RuntimeUnavailable(f"runtime {self.name}: the '{self.name}' executable is not on PATH "
                                     "(load its module, e.g. `module load apptainer`)")
        return exe

    def version(self) -> str:
        from spython.utils.terminal import run_command  # spython runs the binary, quietly

        result = run_command([self.binary(), "--version"], quiet=True)
        if isinstance(result, dict) and result.get("return_code") == 0 and result.get("message"):
            return str(result["message"][0]).strip()
        return ""

    def check_image(self) -> None:
        image = self.options.image
        if not image:
            raise RuntimeUnavailable(f"runtime {self.name}: no image given (--image path/to/image.sif)")
        if not image.startswith(REMOTE_IMAGE_PREFIXES) and not Path(image).exists():
            raise RuntimeUnavailable(f"runtime {self.name}: image not found: {image}")

    def check(self) -> str:
        self.binary()
        self.check_image()
        version = self.version()
        if not version:
            raise RuntimeUnavailable(f"runtime {self.name}: '{self.binary()} --version' failed; is it installed correctly?")
        return version

    def agent_command(self, workspace: Path, slot_index: int) -> tuple[list[str], dict[str, str]]:
        assert self.options.image
        flags = ["--containall", "--no-mount", "bind-paths", "--pwd", SLOT_WORKSPACE,
                 "--bind", f"{workspace}:{SLOT_WORKSPACE}",
                 "--bind", f"{AGENT_SOURCE}:{SLOT_AGENT}:ro"]
        for bind in self.options.extra_binds:
            flags += ["--bind", bind if ":" in bind else f"{bind}:{bind}:ro"]
        if self.options.gpus:
            flags.append("--nv")
        env = slot_env(SLOT_WORKSPACE, slot_index)
        for key, value in sorted(env.items()):
            if key != "PATH":  # the image's own PATH is the right one inside it
                flags += ["--env", f"{key}={value}"]
        python = self.options.python or "python3"
        argv = [self.binary(), "exec", *flags, self.options.image,
                *self._agent_args(python, SLOT_AGENT, SLOT_WORKSPACE)]
        # The container tool itself only needs a PATH and a locale to run.
        return argv, {key: env[key] for key in ("PATH", "LANG") if key in env}


class SingularityRuntime(ApptainerRuntime):
    name = "singularity"


RUNTIMES: dict[str, type[SlotRuntime]] = {
    "none": NoneRuntime,
    "bwrap": BwrapRuntime,
    "apptainer": ApptainerRuntime,
    "singularity": SingularityRuntime,
}


def make_runtime(options: RuntimeOptions) -> SlotRuntime:
    try:
        cls = RUNTIMES[options.kind]
    except KeyError:
        raise RuntimeUnavailable(f"unknown runtime {options.kind!r}; valid: {', '.join(RUNTIMES)}") from None
    return cls(options)
