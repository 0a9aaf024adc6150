"""Shared pieces of the benchmarks: which hpc_sandbox they measure (chosen before it is
imported) and the record of where they ran, child processes that are always cleaned up,
and a small load generator that times async operations.

Nothing here imports hpc_sandbox at module level: a benchmark imports this module first,
to choose the hpc_sandbox it measures (use_code) before anything imports it.

Every process a benchmark starts goes through `Children`: each gets its own process
group, and `Children.stop_all()` (called from a `finally`, and again from `atexit`)
sends SIGTERM to every group, waits a grace period, then SIGKILLs what is left.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Mapping, Sequence

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent  # this checkout (bench/ is in it)


# --- the hpc_sandbox measured ----------------------------------------------------------


def choose_code(argv: Sequence[str], bench: str, code_option: bool = False) -> tuple[Path, str]:
    """The hpc_sandbox to measure, from the benchmark's command line `argv`: this
    checkout's working tree (default), a git revision of it extracted to a temporary
    directory (--code-at REV; the working tree may hold others' half-done edits), or,
    with `code_option`, a directory (--code DIR). Returns that directory (the one holding
    hpc_sandbox/) and a note for the record. `bench` names the temporary directory.

    Read with the options the benchmark's own parser gets (add_code_options): argparse
    takes an abbreviation such as `--code` for `--code-at` where no --code exists, and
    both parsers must read the command line alike."""
    pre = argparse.ArgumentParser(add_help=False)
    add_code_options(pre, code_option)
    known, _ = pre.parse_known_args(argv)
    if known.code_at:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", known.code_at], check=True,
                             capture_output=True, text=True).stdout.strip()
        root = Path(tempfile.mkdtemp(prefix=f"hpc-sandbox-{bench}-code-"))
        atexit.register(shutil.rmtree, root, True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "hpc_sandbox"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        return root, f"git {sha} ({known.code_at}), extracted to {root}"
    root = Path(known.code).resolve() if getattr(known, "code", None) else REPO
    if root != REPO:
        return root, str(root)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "hpc_sandbox"],
                           capture_output=True, text=True).stdout.strip()
    return REPO, f"{REPO} (this checkout's working tree{', with uncommitted changes' if dirty else ''})"


def add_code_options(parser: argparse.ArgumentParser, code_option: bool = False) -> None:
    """The options choose_code reads (--code only with `code_option`), for the
    benchmark's --help and for choose_code's own early look at the command line."""
    if code_option:
        parser.add_argument("--code", help="measure the hpc_sandbox in this directory (default: this checkout)")
    parser.add_argument("--code-at", metavar="REV", help="measure this git revision of this checkout's hpc_sandbox/")


def code_first(root: Path) -> None:
    """Put `root`'s hpc_sandbox first for this process and for every Python process it
    starts (PYTHONPATH), not whatever `pip install -e` points at (or nothing:
    hpc_sandbox need not be installed)."""
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))


def use_code(argv: Sequence[str], bench: str, code_option: bool = False) -> tuple[Path, str]:
    """choose_code, then make it the hpc_sandbox that this process and the processes it
    starts import: call it before anything imports hpc_sandbox."""
    root, note = choose_code(argv, bench, code_option)
    code_first(root)
    # `python -m hpc_sandbox` (a node server the benchmark starts) puts its working
    # directory first on sys.path, ahead of PYTHONPATH.
    os.chdir(root)
    return root, note


# --- child processes -------------------------------------------------------------------


class Children:
    """Processes started by the benchmark; each in its own process group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen, Path | None]] = []
        atexit.register(self.stop_all)

    def spawn(self, name: str, argv: Sequence[str], log_file: Path | None = None, **kwargs) -> subprocess.Popen:
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kwargs)
        finally:
            if log_file:
                out.close()
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        self.procs.append((name, proc, log_file))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        self._stop([p for p in self.procs if p[1] is proc], grace)

    def stop_all(self, grace: float = 10.0) -> None:
        self._stop(list(self.procs), grace)

    def _stop(self, entries: list, grace: float) -> None:
        for name, proc, _ in entries:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, proc, _ in entries:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", name, proc.pid, grace)
            # Whatever is left in its group (a server's children) goes too.
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait()
        for entry in entries:
            if entry in self.procs:
                self.procs.remove(entry)

    @staticmethod
    def tail(log_file: Path | None, lines: int = 15) -> str:
        if not log_file or not log_file.exists():
            return "(no log)"
        return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_ports(count: int, port_range: tuple[int, int], host: str = "127.0.0.1") -> list[int]:
    """`count` ports of `port_range` that are free now. Use a range below the
    kernel's ephemeral ports (32768+ on Linux): an ephemeral port that is free now can
    be taken a moment later by any outgoing connection, ours included."""
    found = []
    for port in range(port_range[0], port_range[1] + 1):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"only {len(found)} of {count} ports free in {port_range[0]}-{port_range[1]} on {host}")


# --- CPU accounting --------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _proc_stat(int(entry))
            if fields and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def cpu_seconds(pids: Sequence[tuple[int, bool]]) -> float:
    """User+system CPU time of these processes; with True, also of their reaped
    children (a server's cutime/cstime holds the commands it ran and waited for)."""
    total = 0
    for pid, with_children in pids:
        fields = _proc_stat(pid)
        if fields is None:
            continue
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        if with_children:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
        total += ticks
    return total / _TICK


# --- measuring -------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name, for the record of where a benchmark ran."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _git(*args: str) -> str:
    """A git command's output in this checkout; "?" where git is missing or hangs (the
    record of where a benchmark ran must not stop it)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def environment(code_root: Path, code_note: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where a benchmark ran, for its header: date, CPU, versions, this checkout's HEAD and
    the hpc_sandbox measured (`code_note`, from choose_code), then `extra` (the
    benchmark's own lines) and the load average. Raises if hpc_sandbox was imported from
    elsewhere than `code_root`: the figures would be of other code."""
    # Imported here, not at module level: hpc_sandbox only once use_code has chosen it;
    # aiohttp only by the benchmarks that report it.
    import aiohttp
    import hpc_sandbox
    code = Path(hpc_sandbox.__file__).resolve().parent
    if code.parent != code_root.resolve():
        raise RuntimeError(f"hpc_sandbox was imported from {code}, not from {code_root}")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": f"{cpu_model()} x {os.cpu_count()}",
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "git HEAD": _git("rev-parse", "--short", "HEAD"),
        "hpc_sandbox": code_note,
        **(extra or {}),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (at start)",
    }


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def print_table_header(header: str) -> None:
    """A report table's header line, and a rule as wide under it."""
    print(header)
    print("-" * len(header))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Measurement:
    """One timed load: `calls` commands run, in `seconds`, by `ops` operations
    (an operation is one request; a batch request runs several calls)."""

    name: str
    concurrency: int
    calls: int
    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # per operation, seconds
    errors: int = 0
    cpu: float = float("nan")  # CPU seconds used by every process involved, during the run

    @property
    def cpu_ms_per_call(self) -> float:
        return self.cpu * 1000.0 / self.calls if self.calls else float("nan")

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def pct_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies), q) * 1000.0


Op = Callable[[], Awaitable[int]]
"""An operation: runs one request, returns how many commands succeeded in it."""


async def run_load(name: str, ops: Sequence[Op], calls_per_op: int, total_ops: int, max_seconds: float,
                   cpu_of: Sequence[tuple[int, bool]] = ()) -> Measurement:
    """Run `ops` concurrently (worker i repeats ops[i]) until `total_ops` operations are
    done or `max_seconds` have passed; time each operation, and count the CPU time of
    the processes `cpu_of` (see cpu_seconds)."""
    remaining = total_ops
    latencies: list[float] = []
    errors = 0
    succeeded = 0
    deadline = time.perf_counter() + max_seconds

    async def worker(op: Op) -> None:
        nonlocal remaining, errors, succeeded
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            t0 = time.perf_counter()
            try:
                ok = await op()
            except Exception as exc:  # counted, reported, and the run goes on
                ok = 0
                if errors < 3:
                    log.warning("%s: operation failed: %s: %s", name, exc.__class__.__name__, exc)
            latencies.append(time.perf_counter() - t0)
            succeeded += ok
            errors += calls_per_op - ok

    cpu_before = cpu_seconds(cpu_of) if cpu_of else float("nan")
    start = time.perf_counter()
    await asyncio.gather(*(worker(op) for op in ops))
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(cpu_of) - cpu_before if cpu_of else float("nan")
    return Measurement(name=name, concurrency=len(ops), calls=len(latencies) * calls_per_op, ops=len(latencies),
                       seconds=seconds, latencies=latencies, errors=errors, cpu=cpu)


def parse_and_run(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Awaitable[int]],
                  argv: Sequence[str] | None) -> int:
    """A benchmark's main: its parser gets the last two options (--json, -v), then its
    `run` coroutine runs under run_benchmark with the parsed arguments."""
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    return run_benchmark(lambda: run(args), args.verbose)


def run_benchmark(run: Callable[[], Awaitable[int]], verbose: bool) -> int:
    """Run a benchmark's coroutine with logging set up; Ctrl-C or SIGTERM cancels it, so
    that it stops every process it started (Children) before this one exits."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    task = loop.create_task(run())
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        print("interrupted: stopped every process this benchmark started", file=sys.stderr)
        return 130
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
