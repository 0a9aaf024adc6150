"""Shared pieces of the benchmarks: child processes that are always cleaned up, and
a small load generator that times async operations.

Every process a benchmark starts goes through `Children`: each gets its own process
group, and `Children.stop_all()` (called from a `finally`, and again from `atexit`)
sends SIGTERM to every group, waits a grace period, then SIGKILLs what is left.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

log = logging.getLogger("bench")


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
