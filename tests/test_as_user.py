"""A new user, for real: an unprivileged account installs hpc-sandbox into its own venv
and runs the README's first command, then the same with runtime bwrap.

Run as root (CI does): the test makes the account `hpcsbx-user` (with a home) when it
is missing and leaves it afterwards. Every step runs through `runuser` with a clean
environment: HOME the user's home, PATH the venv's bin and the system's, no TMPDIR, no
HPC_SANDBOX_* variable of root's. The user

1. makes ~/venv with a Python it can run (the tests' own base interpreter when the user
   may run it, else Debian's /usr/bin/python3: pyenv under /root is not readable by
   other users), installs the project from a copy of the working tree under /tmp, and
   runs the README's first command word for word (read from README.md), then `status`
   and `cancel JOB`; then `submit --runtime bwrap` and checks, in a slot, its own uid,
   no capability and an empty home;
2. makes a venv under /tmp and does the same with runtime bwrap (a bwrap slot has a
   private /tmp, so the venv's python is not visible in it; this once failed with
   "bwrap: execvp /tmp/venv/bin/python: No such file or directory").

Cost: about 55-70 s on a 2-core machine (two venvs, two installs; more under load).
The dependencies are fetched from PyPI with one `pip download` into the user's
~/.cache/hpcsbx-wheels (kept between runs: skipped when an offline dry run finds all it
needs there); both installs then read only that folder (PIP_NO_INDEX, PIP_FIND_LINKS),
so the README command's `pip install .` runs as written. Two runs of this file at once
take turns (a lock file).
"""
from __future__ import annotations

import fcntl
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, pids_matching, requires_bwrap, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: it creates the unprivileged user hpcsbx-user and runs as it "
                                       "(CI runs tests/run.sh as root)")

USER = "hpcsbx-user"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
SRC = Path("/tmp/hpcsbx-src-as-user")
TMP_VENV = Path("/tmp/hpcsbx-venv-as-user")
LOCK = Path("/run/lock/hpcsbx-test-as-user.lock") if Path("/run/lock").is_dir() else Path("/tmp/hpcsbx-as-user.lock")
NO_CAPS = "CapEff:\t0000000000000000"
# Files of the working tree that are not the project (and may not even be readable).
_NOT_COPIED = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
                                     ".hypothesis", "*.pyc")


def readme_first_command() -> str:
    """The README's first command (the first line of its first ```bash block)."""
    match = re.search(r"```bash\n(.+?)\n", (REPO / "README.md").read_text())
    assert match, "README.md has no ```bash block"
    return match.group(1).strip()


class User:
    """The unprivileged account and a way to run bash as it, cleanly and with a timeout."""

    def __init__(self, name: str) -> None:
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.home = name, entry.pw_uid, Path(entry.pw_dir)

    def run(self, script: str, *, timeout: float, venv: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """bash -c SCRIPT as the user, in its home, with only the variables a login gives
        (PATH starting with VENV/bin when given)."""
        path = f"{venv}/bin:{SYSTEM_PATH}" if venv else SYSTEM_PATH
        clean = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "SHELL": "/bin/bash",
                 "PATH": path, "LANG": "C.UTF-8", **(env or {})}
        argv = ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in clean.items()),
                "bash", "-c", f"cd ~ && {script}"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd="/")
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:  # a daemon still holds the pipes
                out, err = "", "(output lost: the pipes stayed open)"
            pytest.fail(f"as {self.name}, timed out after {timeout}s: {script}\n--- stdout:\n{out}\n--- stderr:\n{err}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def ok(self, script: str, **kwargs) -> subprocess.CompletedProcess:
        result = self.run(script, **kwargs)
        assert result.returncode == 0, explain(result, script)
        return result

    def cancel_all_jobs(self, venv: Path) -> None:
        """Cancel whatever jobs the user's state dir holds (a failed test's, an earlier run's)."""
        if (venv / "bin" / "hpc-sandbox").exists():
            self.run('for job in ~/.hpc-sandbox/jobs/*; do [ -d "$job" ] && hpc-sandbox cancel "${job##*/}"; done; '
                     "true", venv=venv, timeout=120)


def explain(result: subprocess.CompletedProcess, script: str) -> str:
    """What a failed step printed, and the tail of every job log it left (cancel removes them)."""
    logs = "".join(f"--- {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]) + "\n"
                   for log in sorted(Path(pwd.getpwnam(USER).pw_dir).glob(".hpc-sandbox/jobs/*/logs/*"))
                   if log.is_file())
    return (f"as {USER}: `{script}` exited with {result.returncode}\n--- stdout:\n{result.stdout}\n"
            f"--- stderr:\n{result.stderr}\n{logs}")


def ensure_user() -> User:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True, capture_output=True,
                       timeout=60)
    user = User(USER)
    if not user.home.is_dir():  # an account made earlier without one
        subprocess.run(["mkhomedir_helper", USER] if shutil.which("mkhomedir_helper") else
                       ["install", "-d", "-o", USER, "-g", str(pwd.getpwnam(USER).pw_gid), "-m", "0750",
                        str(user.home)], check=True, capture_output=True, timeout=60)
    return user


def pick_python(user: User) -> str:
    """The tests' own base interpreter if the user can make a venv with it, else /usr/bin/python3."""
    own = os.path.realpath(getattr(sys, "_base_executable", "") or sys.executable)
    tried = []
    for python in dict.fromkeys([own, "/usr/bin/python3"]):
        result = user.run(f"{shlex.quote(python)} -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 10)'",
                          timeout=60)
        if result.returncode == 0:
            return python
        tried.append(f"{python}: {result.stderr.strip()[-300:]}")
    pytest.fail(f"no Python that {USER} can make a venv with (tests/run.sh installs python3-venv as root):\n"
                + "\n".join(tried))


@pytest.fixture(scope="module")
def env():
    """The user, a copy of the working tree it owns, the dependencies' wheels, the Python
    it makes venvs with; afterwards every job cancelled and the venvs and copy removed."""
    LOCK.touch(mode=0o600)
    with open(LOCK) as lock:
        deadline = time.monotonic() + 240
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another run of test_as_user.py held {LOCK} for 240 s")
                time.sleep(1)
        user = ensure_user()
        home_venv = user.home / "venv"
        venvs = (home_venv, TMP_VENV)

        def clean() -> None:
            for venv in venvs:
                user.cancel_all_jobs(venv)
            user.run(f"rm -rf ~/venv ~/.hpc-sandbox {TMP_VENV} {SRC}", timeout=120)
            for path in (TMP_VENV, SRC):  # not the user's (an earlier run as someone else): root removes them
                shutil.rmtree(path, ignore_errors=True)

        clean()
        try:
            shutil.copytree(REPO, SRC, ignore=_NOT_COPIED, symlinks=True)
            subprocess.run(["chown", "-R", f"{USER}:", str(SRC)], check=True, timeout=60)
            python = pick_python(user)
            # The user's first step: ~/venv. Its pip then fetches the dependencies (and
            # what a build may need) into the wheel folder, unless they are all there.
            user.ok(f"{shlex.quote(python)} -m venv {home_venv}", timeout=120)
            wheels = user.home / ".cache" / "hpcsbx-wheels"
            offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
            wanted = f"{SRC} setuptools wheel"
            if user.run(f"pip install --dry-run --quiet {wanted}", venv=home_venv, env=offline,
                        timeout=120).returncode != 0:
                user.ok(f"mkdir -p {wheels} && pip download --quiet --dest {wheels} {wanted}", venv=home_venv,
                        env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"}, timeout=300)
            yield {"user": user, "python": python, "home_venv": home_venv, "pip_env": offline}
        finally:
            clean()
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_venv(env: dict, venv: Path) -> None:
    env["user"].ok(f"{shlex.quote(env['python'])} -m venv {venv}", timeout=120)


def job_of(stdout: str) -> str:
    """The job id `submit` prints (its first line of output)."""
    first = stdout.splitlines()[0] if stdout.strip() else ""
    assert re.fullmatch(r"hpc-sandbox-[0-9a-f]+", first), f"submit printed no job id first: {stdout!r}"
    return first


def status_and_cancel(user: User, venv: Path, job: str, runtime: str) -> None:
    status = user.ok("hpc-sandbox status", venv=venv, timeout=60)
    line = next((l for l in status.stdout.splitlines() if l.startswith(job)), "")
    assert "running" in line and "servers 1/1 ready" in line, explain(status, "hpc-sandbox status")
    assert re.search(rf"https://127\.0\.0\.1:\d+\s+{runtime}\s", status.stdout), explain(status, "hpc-sandbox status")
    # The node server runs as the user, not as root.
    servers = pids_matching(job)
    assert servers and all(os.stat(f"/proc/{pid}").st_uid == user.uid for pid in servers), servers
    cancel = user.ok(f"hpc-sandbox cancel {job}", venv=venv, timeout=60)
    assert f"cancelled {job}" in cancel.stderr, explain(cancel, f"hpc-sandbox cancel {job}")
    assert wait_until(lambda: not pids_matching(job), timeout=15), f"processes of {job} survive cancel: " \
                                                                    f"{pids_matching(job)}"
    after = user.ok("hpc-sandbox status", venv=venv, timeout=60)
    assert job not in after.stdout, explain(after, "hpc-sandbox status")


def bwrap_slot_checks(env: dict, venv: Path) -> None:
    """submit --runtime bwrap, then in a slot: the user's own uid, no capability, an
    empty home; the user's real home and /tmp (where the venv may be) not visible."""
    user = env["user"]
    script = "hpc-sandbox submit --slots 4 --runtime bwrap --wait"
    submitted = user.ok(script, venv=venv, timeout=180)
    job = job_of(submitted.stdout)
    try:
        script = "hpc-sandbox exec -- 'id -u; grep CapEff /proc/self/status; ls -A $HOME | wc -l'"
        result = user.ok(script, venv=venv, timeout=120)
        assert result.stdout.splitlines() == [str(user.uid), NO_CAPS, "0"], explain(result, script)
        script = f"hpc-sandbox exec -- 'echo hello from $PWD; ls -A {user.home} | wc -l; ls -A /tmp | wc -l'"
        result = user.ok(script, venv=venv, timeout=120)
        assert result.stdout.splitlines() == ["hello from /workspace", "0", "0"], explain(result, script)
        status_and_cancel(user, venv, job, "bwrap")
    finally:
        user.cancel_all_jobs(venv)


def test_readme_quickstart_from_a_venv_in_home(env):
    """~/venv, `pip install .` in the copy, the README's first command as written."""
    user, venv = env["user"], env["home_venv"]  # made by the fixture
    command = readme_first_command()
    assert command.startswith("pip install . && hpc-sandbox submit"), f"the README's first command changed: {command}"
    script = f"cd {SRC} && [ \"$(command -v pip)\" = {venv}/bin/pip ] && {command}"
    result = user.run(script, venv=venv, env=env["pip_env"], timeout=300)
    try:
        assert result.returncode == 0, explain(result, script)
        assert user.ok("command -v hpc-sandbox", venv=venv, timeout=30).stdout.strip() == f"{venv}/bin/hpc-sandbox"
        # pip is quiet but for the job id (submit) and the command's output (exec).
        job = job_of(result.stdout.splitlines()[-2] if len(result.stdout.splitlines()) >= 2 else result.stdout)
        hello = result.stdout.splitlines()[-1]
        # The slot's workspace: node-local scratch of this user ($TMPDIR unset: /tmp).
        assert re.fullmatch(rf"hello from /tmp/hpc-sandbox-{user.uid}/\S*{job}\S*/workspace", hello), \
            explain(result, script)
        status_and_cancel(user, venv, job, "none")
    finally:
        user.cancel_all_jobs(venv)


@requires_bwrap
def test_bwrap_slots_from_a_venv_in_home(env):
    venv = env["home_venv"]
    if not (venv / "bin" / "hpc-sandbox").exists():  # run alone (-k): install as the test above does
        env["user"].ok(f"pip install {SRC}", venv=venv, env=env["pip_env"], timeout=300)
    bwrap_slot_checks(env, venv)


@requires_bwrap
def test_bwrap_slots_from_a_venv_under_tmp(env):
    """A venv in /tmp, which a bwrap slot replaces with its own: the agent must run on
    the base interpreter."""
    make_venv(env, TMP_VENV)
    env["user"].ok(f"pip install {SRC}", venv=TMP_VENV, env=env["pip_env"], timeout=300)
    bwrap_slot_checks(env, TMP_VENV)


# A process that hides its environment (PR_SET_DUMPABLE 0: its environ is then closed to
# its own user), writes its pid to a file, then holds MiB of memory and sleeps.
_HIDDEN_HOG = """import ctypes, os, sys, time
ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)
with open(sys.argv[2] + ".tmp", "w") as pid:
    pid.write(str(os.getpid()))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
held = bytearray(int(sys.argv[1]) << 20)
held[::4096] = bytes([1]) * len(held[::4096])
time.sleep(60)
"""


def _daemon(hog: Path, mib: int, marker: str) -> str:
    """A slot command: start the hog as a daemon that left the agent's tree (setsid, its
    parent gone), wait for its pid in $PWD/MARKER.pid, and leave it in $pid."""
    return (f"(setsid python3 {hog} {mib} $PWD/{marker}.pid {marker} >/dev/null 2>&1 &); "
            f"for i in $(seq 200); do [ -s {marker}.pid ] && break; sleep 0.1; done; pid=$(cat {marker}.pid)")


def test_a_released_slot_is_clean_for_an_ordinary_user(env):
    """Issue 17's probes as an ordinary user (whose /proc hides a non-dumpable process's
    environment): runtime none: a non-dumpable daemon is still counted by slot_memory and
    ends with the release; bwrap: the next holder finds nothing of the last one's in /tmp,
    /dev/shm or a folder it locked in the workspace, and the kernel fences the slot's tasks."""
    user, venv = env["user"], env["home_venv"]
    if not (venv / "bin" / "hpc-sandbox").exists():  # run alone (-k)
        user.ok(f"pip install {SRC}", venv=venv, env=env["pip_env"], timeout=300)
    config, hog = user.home / "limits.yaml", user.home / "hog.py"
    user.ok(f"printf 'profiles:\\n  none:\\n    runtime: none\\n    slot_memory: 256M\\n"
            f"  bwrap:\\n    runtime: bwrap\\n    slot_memory: 256M\\n    slot_procs: 64\\n' > {config}; "
            f"printf %s {shlex.quote(_HIDDEN_HOG)} > {hog}", timeout=30)
    marker = f"hpcsbx-as-user-{os.getpid()}"
    try:
        job = job_of(user.ok(f"hpc-sandbox submit --config {config} --profile none --slots 1 --wait",
                             venv=venv, timeout=180).stdout)
        watched = (f"{_daemon(hog, 400, marker + '-big')}; for i in $(seq 100); do "
                   "kill -0 $pid 2>/dev/null || { echo killed; exit 0; }; sleep 0.2; done; echo survived")
        script = f"hpc-sandbox exec --job {job} -- {shlex.quote(watched)}"
        result = user.ok(script, venv=venv, timeout=120)
        assert result.stdout.strip() == "killed", explain(result, script)
        user.ok(f"hpc-sandbox exec --job {job} -- {shlex.quote(_daemon(hog, 8, marker + '-small') + '; sleep 1')}",
                venv=venv, timeout=120)
        assert wait_until(lambda: not pids_matching(marker), timeout=15), \
            f"a non-dumpable daemon outlived its lease: {pids_matching(marker)}"
        user.ok(f"hpc-sandbox cancel {job}", venv=venv, timeout=60)

        job = job_of(user.ok(f"hpc-sandbox submit --config {config} --profile bwrap --slots 1 --wait",
                             venv=venv, timeout=180).stdout)
        plant = "echo secret > /tmp/x; echo secret > /dev/shm/y; mkdir -p d/e; echo secret > d/e/f; chmod 000 d"
        user.ok(f"hpc-sandbox exec --job {job} -- {shlex.quote(plant)}", venv=venv, timeout=120)
        script = f"hpc-sandbox exec --job {job} -- 'ls -A /tmp /dev/shm . | grep -v :; ulimit -u'"
        result = user.ok(script, venv=venv, timeout=120)
        assert [line for line in result.stdout.splitlines() if line] == ["128"], explain(result, script)
    finally:
        user.cancel_all_jobs(venv)
        for pid in pids_matching(marker):
            os.kill(pid, signal.SIGKILL)
