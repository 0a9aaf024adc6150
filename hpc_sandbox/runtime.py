"""How a slot's agent is started: apptainer, singularity, bwrap, or none.

A runtime only builds the command line (and checks that it can run); the node
server spawns it and speaks to the agent over its stdin/stdout. Every runtime but
`none` shows the slot its own workspace at /workspace, a private /tmp and its own
pid namespace, hides the state directory and the token file, and can cut the slot
off the network (network "none"). A runtime that
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
SLOT_PIP_CONF = "/opt/hpc-sandbox/pip.conf"  # where a contained slot sees its profile's pip_conf
PIP_CONFIG_ENV = "PIP_CONFIG_FILE"
# What a slot's environment starts from: nothing of the server's own environment
# (which is where a secret would be, if a site put one there) reaches a slot.
_PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ")
# Host paths a bwrap slot must not see although they are outside $HOME: the munge
# socket (through it a slot could submit an unsandboxed job as the user), the munge
# key (readable when the server runs as root), and per-user runtime dirs (ssh-agent,
# gpg-agent sockets).
BWRAP_HIDDEN_HOST_PATHS = ("/run/munge", "/run/user", "/etc/munge")
# What a slot may reach on the network: "host" shares the node's network (the default:
# agents usually fetch packages), "none" leaves the slot only a loopback of its own.
NETWORK_MODES = ("host", "none")
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
    network: str = "host"  # one of NETWORK_MODES
    # Variables every slot gets on top of its clean environment (serve --slot-env-file;
    # a cloud sandbox hands its profile's env and pass_env this way).
    extra_env: tuple[tuple[str, str], ...] = ()
    # The slot's limits, where a runtime can have the kernel keep them: the size of a
    # container's /tmp and /dev/shm (memory they hold is the node's), and the
    # processes behind a per-slot task fence. None: no such limit.
    slot_memory_mb: int | None = None
    slot_procs: int | None = None
    # A pip.conf every slot reads (PIP_CONFIG_FILE), bound read-only into contained slots.
    pip_conf: Path | None = None

    def slot_extra_env(self, pip_conf_at: str | None) -> tuple[tuple[str, str], ...]:
        """extra_env, and PIP_CONFIG_FILE where the slot sees the pip.conf (if one is set)."""
        if self.pip_conf is None or pip_conf_at is None:
            return self.extra_env
        return (*self.extra_env, (PIP_CONFIG_ENV, pip_conf_at))


def task_fence(procs: int) -> int:
    """The kernel's per-slot fence (RLIMIT_NPROC in the slot's own user namespace) for a
    limit of `procs` processes. It counts threads and the agent's own processes too, so
    it sits well above the limit the watchdog keeps exactly: it is there to stop a fork
    bomb short of the node's pid space while the watchdog kills it."""
    return max(2 * procs, procs + 64)


def slot_env(workspace: str, slot_index: int, extra: tuple[tuple[str, str], ...] = (),
             tmpdir: str | None = None) -> dict[str, str]:
    env = {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}
    env.update(extra)  # below the slot's own HOME, TERM and index, which no setting may change
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.setdefault("LANG", "C.UTF-8")
    env.update({"HOME": workspace, "TERM": "dumb", "HPC_SANDBOX_SLOT": str(slot_index), "PYTHONUNBUFFERED": "1"})
    if tmpdir:
        env["TMPDIR"] = tmpdir
    return env


def host_scratch(workspace: Path) -> Path:
    """The folder of a slot's own beside its workspace that runtime none gives the slot
    as TMPDIR (a contained slot has a private /tmp instead)."""
    return workspace.parent / "tmp"


class SlotRuntime:
    """Base: builds the agent command line for one slot."""

    name = "base"
    # Whether slots can be handed GPUs: Apptainer/Singularity with --nv, and `none`,
    # whose slots are plain host processes that see the host's devices. bwrap builds a
    # minimal /dev (`--dev /dev`) without the NVIDIA device nodes, so it cannot.
    passes_gpus = False
    # Whether a slot gets a pid namespace of its own: then its agent can end every
    # process of the slot (all it can see) when the slot changes hands, without a restart.
    own_pid_namespace = False

    def __init__(self, options: RuntimeOptions) -> None:
        self.options = options

    def check(self) -> str:
        """Raise RuntimeUnavailable if this runtime cannot start here; else describe it."""
        raise NotImplementedError

    def agent_command(self, workspace: Path, slot_index: int) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that start one slot's agent."""
        raise NotImplementedError

    def scratch(self, workspace: Path) -> tuple[str, ...]:
        """The slot's temporary folders outside its workspace, as its agent sees them:
        the agent empties them at every reset, so the next holder finds them empty."""
        raise NotImplementedError

    def max_tasks(self) -> int | None:
        """The agent's RLIMIT_NPROC, for a runtime whose slots have a user namespace of
        their own (there the kernel counts a slot's tasks apart from the user's others)."""
        return None

    def probe_command(self, workspace: Path, script: str) -> tuple[list[str], dict[str, str]]:
        """The argv and environment that run `bash -c script` where a slot's commands
        run (its mounts, PATH and HOME): the agent's own command line, with bash in the
        agent's place. How `check` asks what a slot sees."""
        argv, env = self.agent_command(workspace, 0)
        # _agent_args: [python, "-u", agent path, ...], last on the line.
        agent = max(i for i, arg in enumerate(argv) if arg in (SLOT_AGENT, str(AGENT_SOURCE)))
        return [*argv[:agent - 2], "bash", "-c", script], env

    def _agent_args(self, python: str, agent: str, workspace: str, scratch: tuple[str, ...]) -> list[str]:
        args = [python, "-u", agent, "--workspace", workspace]
        if self.own_pid_namespace:
            args.append("--own-pid-namespace")
        for folder in scratch:
            args += ["--scratch", folder]
        if self.max_tasks():
            args += ["--max-tasks", str(self.max_tasks())]
        return args


class NoneRuntime(SlotRuntime):
    """A plain local process. No isolation at all: for trusted local use only."""

    name = "none"
    passes_gpus = True

    def __init__(self, options: RuntimeOptions) -> None:
        if options.network != "host":
            raise RuntimeUnavailable(f"runtime none cannot cut a slot off the network (network {options.network!r}): "
                                     "its slots are plain processes of the node; use runtime bwrap or apptainer")
        super().__init__(options)

    def check(self) -> str:
        return "none: slots are plain local processes with no isolation (trusted local use only)"

    def scratch(self, workspace: Path) -> tuple[str, ...]:
        # Only what honours TMPDIR lands there: the node's /tmp and /dev/shm are shared.
        return (str(host_scratch(workspace)),)

    def agent_command(self, workspace: Path, slot_index: int) -> tuple[list[str], dict[str, str]]:
        python = self.options.python or sys.executable
        scratch = self.scratch(workspace)
        pip_conf = str(self.options.pip_conf) if self.options.pip_conf else None
        return (self._agent_args(python, str(AGENT_SOURCE), str(workspace), scratch),
                slot_env(str(workspace), slot_index, self.options.slot_extra_env(pip_conf), tmpdir=scratch[0]))


# Asked once of the interpreter that will run the agent: the binary to run (a venv's
# base interpreter, resolved), then sys.base_prefix and sys.prefix.
_INTERPRETER_QUERY = ("import os, sys; "
                      "print(os.path.realpath(getattr(sys, '_base_executable', '') or sys.executable)); "
                      "print(sys.base_prefix); print(sys.prefix)")


class BwrapRuntime(SlotRuntime):
    """bubblewrap: host files read-only, workspace read-write at /workspace, private
    /tmp, own user namespace holding no capability, own pid/ipc/uts (and, with network
    none, net) namespaces, dies with the node server."""

    name = "bwrap"
    own_pid_namespace = True  # --unshare-pid (and --unshare-ipc)
    # A slot's writable places but its workspace: each a tmpfs of the slot's own
    # (capped at the slot's memory limit), emptied by its agent at every reset. Every
    # other mount, bwrap's own root and /dev included, is read-only.
    SCRATCH = ("/tmp", "/dev/shm", "/dev/mqueue")

    def __init__(self, options: RuntimeOptions) -> None:
        super().__init__(options)
        self._interpreter: tuple[str, frozenset[Path]] | None = None  # asked once: see interpreter()
        self._help: str | None = None

    def binary(self) -> str:
        found = self.options.executable or shutil.which("bwrap")
        if not found:
            raise RuntimeUnavailable("runtime bwrap: the 'bwrap' executable is not on PATH (install bubblewrap)")
        return found

    def supports(self, option: str) -> bool:
        """Whether this bwrap knows `option` (from its --help, read once)."""
        if self._help is None:
            try:
                self._help = subprocess.run([self.binary(), "--help"], capture_output=True, text=True,
                                            timeout=20).stdout
            except (OSError, subprocess.TimeoutExpired):
                self._help = ""
        return option in self._help

    def namespace_args(self) -> list[str]:
        # A user namespace of its own whoever runs the server: without one, a root
        # server's slot is root on the host with every capability, and can remount the
        # read-only binds or unmount the tmpfs that hides $HOME. The ids inside stay the
        # caller's, so that files in the workspace show their real owner.
        args = ["--unshare-user", "--uid", str(os.getuid()), "--gid", str(os.getgid())]
        # No capability even inside it, and no nested user namespace, in which a slot
        # would hold every capability again (--disable-userns is new in bwrap 0.8).
        if self.supports("--disable-userns"):
            args.append("--disable-userns")
        args += ["--cap-drop", "ALL", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if self.options.network == "none":
            args.append("--unshare-net")  # bwrap brings up the new namespace's own loopback
        return args

    def check(self) -> str:
        # The same namespaces as a slot's: a node that cannot make them fails here, at start.
        argv = [self.binary(), *self.namespace_args(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                "true"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeUnavailable(f"runtime bwrap: cannot run bwrap: {exc}") from exc
        if proc.returncode != 0:
            detail = proc.stderr.strip().splitlines()[-1:] or ["no message"]
            raise RuntimeUnavailable(
                f"runtime bwrap: bwrap cannot create namespaces here ({detail[0]}); "
                "are unprivileged user namespaces disabled (kernel.unprivileged_userns_clone, "
                "user.max_user_namespaces)?"
            )
        if not self.supports("--disable-userns"):
            log.warning("runtime bwrap: this bwrap has no --disable-userns (new in 0.8): a slot can create a nested "
                        "user namespace (it still holds no capability on the host)")
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

    def scratch(self, workspace: Path) -> tuple[str, ...]:
        return self.SCRATCH

    def max_tasks(self) -> int | None:
        # Linux counts RLIMIT_NPROC per user namespace since 5.14 (ucounts); before, the
        # count is the user's over the whole node, and a fence would hit every slot.
        if self.options.slot_procs is None or _kernel_version() < (5, 14):
            return None
        return task_fence(self.options.slot_procs)

    def _sized(self) -> list[str]:
        """The size option of a scratch tmpfs: the slot's memory limit, if it has one."""
        memory = self.options.slot_memory_mb
        return ["--size", str(memory << 20)] if memory else []

    def agent_command(self, workspace: Path, slot_index: int) -> tuple[list[str], dict[str, str]]:
        python, needs = self.interpreter()
        argv = [self.binary(), "--die-with-parent", "--new-session", *self.namespace_args()]
        argv += self.root_binds()
        argv += ["--dev", "/dev", *self._sized(), "--tmpfs", "/dev/shm", "--mqueue", "/dev/mqueue",
                 "--proc", "/proc"]
        hiding = self.hiding_mounts(needs)
        argv += hiding
        for bind in self.options.extra_binds:
            src, _, dst = bind.partition(":")
            argv += ["--ro-bind", src, dst or src]
        # bwrap resolves a bind's source on the host, so a workspace inside a hidden
        # folder (the per-user base of every server's workspaces) is still bound here.
        argv += ["--bind", str(workspace), SLOT_WORKSPACE,
                 "--ro-bind", str(AGENT_SOURCE), SLOT_AGENT]
        if self.options.pip_conf:  # the one file, read-only (its folder may be the hidden $HOME)
            argv += ["--ro-bind", str(self.options.pip_conf), SLOT_PIP_CONF]
        # Last, once every mount point exists: bwrap's own root, /dev and the tmpfs that
        # hide host folders become read-only, so that nothing a holder writes outside
        # its workspace and scratch can outlive its lease.
        covers = [hiding[i + 1] for i, arg in enumerate(hiding) if arg == "--tmpfs" and hiding[i + 1] != "/tmp"]
        for folder in ("/", "/dev", *covers):
            argv += ["--remount-ro", folder]
        argv += ["--chdir", SLOT_WORKSPACE]
        # bwrap itself runs with exactly the slot's environment (built clean, never the
        # server's), which its child inherits: no value is put on a command line, where
        # anyone on the node could read it in /proc/PID/cmdline.
        env = slot_env(SLOT_WORKSPACE, slot_index, self.options.slot_extra_env(SLOT_PIP_CONF))
        argv += self._agent_args(python, SLOT_AGENT, SLOT_WORKSPACE, self.scratch(workspace))
        return argv, env

    def interpreter(self) -> tuple[str, frozenset[Path]]:
        """The binary that runs the agent and the folders it needs (asked once).

        The agent needs a Python's standard library and nothing else, so a venv's own
        python is not what runs it: its base interpreter is. Then it does not matter
        where the venv lives (under /tmp, which every slot gets privately; in $HOME,
        which is hidden): only the base install must be visible, and hiding_mounts binds
        it back when it lives in such a place itself (pyenv in $HOME). sys.prefix is
        needed too only when the binary is not in the base install (a venv made with
        --copies, whose pyvenv.cfg names the base).
        """
        if self._interpreter is None:
            python = self.options.python or sys.executable
            try:
                facts = subprocess.run([python, "-I", "-c", _INTERPRETER_QUERY], capture_output=True, text=True,
                                       timeout=30).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                facts = []
            if len(facts) == 3 and all(facts):
                binary, base_prefix, prefix = (Path(fact).resolve() for fact in facts)
                needs = {base_prefix} if binary.is_relative_to(base_prefix) else {base_prefix, prefix, binary.parent}
                self._interpreter = (str(binary), frozenset(needs))
            else:  # not a Python we can ask: run it as named, and assume bin/python's layout
                found = Path(shutil.which(python) or python)
                self._interpreter = (python, frozenset({found.absolute().parent.parent,
                                                        found.resolve().parent.parent}))
        return self._interpreter

    def hiding_mounts(self, needs: frozenset[Path]) -> list[str]:
        """A tmpfs over /tmp, $HOME ($HOME holds ~/.ssh, cloud credentials and, by
        default, the state dir) and every hidden folder, /dev/null over a hidden file,
        and the folders the interpreter needs bound back read-only where those hide them.

        bwrap mounts in argv order, a later mount over an earlier one, so the mounts are
        sorted by depth: a deeper path wins over its parent whether it hides (a hidden
        folder inside a bound-back prefix) or shows (a venv in $HOME); at equal depth,
        hiding wins. A mount whose nearest parent mount already has the same effect is
        left out. Paths are resolved on the host first: bwrap cannot make a mount point
        through an absolute symlink (TMPDIR=/scratch/me with /scratch -> /local/scratch).
        """
        covers: dict[Path, list[str]] = {Path("/tmp"): [*self._sized(), "--tmpfs", "/tmp"]}
        home = _home()
        if home:
            covers[home] = ["--tmpfs", str(home)]
        for path in (*self.options.hidden_paths, *BWRAP_HIDDEN_HOST_PATHS):
            resolved = Path(path).resolve()
            if hide := _bwrap_hide(resolved):
                covers[resolved] = hide
        shows: set[Path] = set()
        for prefix in needs:
            if prefix in covers:  # a Python installed straight into $HOME: its bin and lib only
                shows.update(prefix / sub for sub in ("bin", "lib", "lib64") if (prefix / sub).is_dir())
            else:
                shows.add(prefix)
        hidden_dirs = {path for path, args in covers.items() if "--tmpfs" in args}

        def hidden_by_parent(path: Path) -> bool:
            parents = [p for p in (*hidden_dirs, *shows) if p != path and path.is_relative_to(p)]
            return bool(parents) and max(parents, key=lambda p: len(p.parts)) in hidden_dirs

        mounts = [(len(path.parts), 1, str(path), args) for path, args in covers.items() if not hidden_by_parent(path)]
        mounts += [(len(path.parts), 0, str(path), ["--ro-bind", str(path), str(path)])
                   for path in shows if hidden_by_parent(path)]
        return [arg for *_, args in sorted(mounts, key=lambda mount: mount[:3]) for arg in args]


def _kernel_version() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def _home() -> Path | None:
    """The server user's home, resolved; None when there is none worth hiding."""
    try:
        home = Path.home().resolve()
    except (KeyError, RuntimeError):
        return None
    return home if home != Path("/") and home.is_dir() else None


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
    passes_gpus = True
    own_pid_namespace = True  # --containall includes --pid and --ipc
    # --containall gives a container its own /tmp and /var/tmp (in its session
    # directory: a tmpfs of `sessiondir max size`, 64 MiB by default) and a minimal
    # /dev with its own /dev/shm; the agent empties them at every reset.
    SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")

    def scratch(self, workspace: Path) -> tuple[str, ...]:
        return self.SCRATCH

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
        if self.options.pip_conf:
            flags += ["--bind", f"{self.options.pip_conf}:{SLOT_PIP_CONF}:ro"]
        if self.options.gpus:
            flags.append("--nv")
        if self.options.network == "none":
            flags += ["--net", "--network", "none"]
        env = slot_env(SLOT_WORKSPACE, slot_index)
        if self.options.pip_conf:  # a path, not a secret: fine on the command line
            env[PIP_CONFIG_ENV] = SLOT_PIP_CONF
        for key, value in sorted(env.items()):
            if key != "PATH":  # the image's own PATH is the right one inside it
                flags += ["--env", f"{key}={value}"]
        python = self.options.python or "python3"
        argv = [self.binary(), "exec", *flags, self.options.image,
                *self._agent_args(python, SLOT_AGENT, SLOT_WORKSPACE, self.scratch(workspace))]
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
    if options.network not in NETWORK_MODES:
        raise RuntimeUnavailable(f"unknown network {options.network!r}; valid: {', '.join(NETWORK_MODES)}")
    return cls(options)
