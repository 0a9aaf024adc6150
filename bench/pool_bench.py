#!/usr/bin/env python3
"""Pool benchmark (issue 10): the SlotPool under contention, at scale, and its discovery.

    python bench/pool_bench.py            # full run, ~6-10 min
    python bench/pool_bench.py --quick    # ~1-2 min smoke run

1. contention  real node servers (`hpc-sandbox serve --runtime none`, HTTPS with the
               job's pinned certificate, as exec_bench.py starts them): 8 slots on 1
               server with 128 trajectories, 32 slots on 4 servers (8 each) with 512;
               each trajectory: acquire -> bash `sleep 0.5` -> release(reset_workspace=True).
               Wall time against the ideal (trajectories x 0.5 s / slots) and against the
               ideal with the measured cycle (acquire returned -> release returned, which
               adds the exec round trip and the release's agent restart to the 0.5 s);
               acquire HTTP requests sent per grant; grants out of arrival order; wait
               for a slot, p50 and max.
2. scale       the pool's own CPU per acquire+release (process CPU time of this
               process, which runs the pool and nothing else: servers are other
               processes) as slots grow 10 -> 100,000 and node servers 1 -> 1,000, up
               to 10,000 concurrent trajectories. A few real node servers (plain HTTP
               here, so that every row pays the same transport), then the
               PROTOCOL-LEVEL HARNESS SERVER WITHOUT AGENTS (bench/_harness_server.py:
               acquire with wait/FIFO, release, renew, GET /v1/slots; one port per
               harness node server, many per process) for the large rows.
3. discovery   a ClusterSource over a state dir holding one job with 1,000 ready
               records: one discovery when nothing changed, and one after a record
               was added.

Ratios are taken within this run; these machines are noisy. Every process started
here is stopped at the end, on error and on Ctrl-C; all traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import json
import logging
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Before hpc_sandbox: _common imports none of it, and use_code chooses which is imported.
from _common import (REPO, Children, add_code_options, environment, free_ports, parse_and_run,  # noqa: E402
                     percentile, print_table_header, use_code, verdict)

STARTED_IN = Path.cwd()  # where relative paths given on the command line point
if __name__ == "__main__":
    # The hpc_sandbox to measure (--code DIR, --code-at REV, or this working tree), before
    # it is imported: this process, the node servers (`python -m hpc_sandbox`, run from
    # that directory) and the harness servers all use it.
    CODE_ROOT, CODE_NOTE = use_code(sys.argv[1:], "pool-bench", code_option=True)
else:
    CODE_ROOT, CODE_NOTE = REPO, "as imported"

import exec_bench  # noqa: E402  (its NodeServer starts a real node server)

from hpc_sandbox import Endpoint, NodeServerSource, SlotPool  # noqa: E402
from hpc_sandbox.jobfolder import JobFolder, JobInfo, ServerRecord  # noqa: E402
from hpc_sandbox.pool import ClusterSource  # noqa: E402

log = logging.getLogger("bench")

NODE_PORT_RANGE = "9400-9499"  # real node servers (exec_bench.py uses 9300-9399)
HARNESS_PORTS = (21000, 29999)  # harness listeners: below the kernel's ephemeral ports
SLEEP = 0.5

TARGET_WALL = 1.15  # wall <= 1.15 x ideal
TARGET_REQUESTS = 1.5  # acquire requests per grant
TARGET_OUT_OF_ORDER = 0.05
TARGET_SCALE = 2.0  # CPU per acquire+release, largest / smallest
TARGET_DISCOVERY_MS = 20.0


@dataclass(frozen=True)
class ScaleRow:
    key: str
    kind: str  # "real" (hpc-sandbox serve) or "harness"
    servers: int
    slots_per_server: int
    trajectories: int
    cycles: int  # measured acquire+release cycles
    info: bool = False  # shown, but not part of the target's ratio

    @property
    def slots(self) -> int:
        return self.servers * self.slots_per_server


@dataclass(frozen=True)
class Plan:
    contention: tuple[tuple[int, int, int], ...]  # (servers, slots each, trajectories)
    scale: tuple[ScaleRow, ...]
    warm_fraction: float
    discovery_records: int
    discovery_reps: int
    harness_procs: int


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        contention = ((1, 8, 32), (4, 8, 128))
        scale = (
            ScaleRow("real 1x10", "real", 1, 10, 20, 600),
            ScaleRow("harness 1x10", "harness", 1, 10, 20, 600),
            ScaleRow("harness 10x100", "harness", 10, 100, 2000, 2000),
            ScaleRow("harness 1000x100", "harness", 1000, 100, 10000, 10000),
        )
        return Plan(contention, scale, 0.3, 1000, 10, args.harness_procs)
    contention = ((1, 8, 128), (4, 8, 512))
    scale = (
        ScaleRow("real 1x10", "real", 1, 10, 20, 4000),
        ScaleRow("real 4x10", "real", 4, 10, 80, 4000),
        ScaleRow("harness 1x10", "harness", 1, 10, 20, 4000),
        ScaleRow("harness 10x100", "harness", 10, 100, 2000, 8000),
        ScaleRow("harness 100x10", "harness", 100, 10, 2000, 8000),
        ScaleRow("harness 1000x100", "harness", 1000, 100, 10000, 20000),
        # What the cost follows: many servers with few callers, many callers on one server,
        # and 1,000 servers whose slots are all taken (long polls on every server).
        ScaleRow("harness 1000x100 c20", "harness", 1000, 100, 20, 4000, info=True),
        ScaleRow("harness 1x10 c10000", "harness", 1, 10, 10000, 10000, info=True),
        ScaleRow("harness 1000x5", "harness", 1000, 5, 10000, 20000, info=True),
    )
    return Plan(contention, scale, 0.3, 1000, 50, args.harness_procs)


# --- servers ---------------------------------------------------------------------------


async def start_node_servers(children: Children, work: Path, count: int, slots: int, tls: bool,
                             tag: str) -> tuple[list[exec_bench.NodeServer], list[Endpoint]]:
    """Real node servers, each in its own state dir (exec_bench's NodeServer keeps its
    workspaces and log there)."""
    exec_bench.PORT_RANGE = NODE_PORT_RANGE
    nodes = []
    for k in range(count):
        state = work / f"{tag}-{k}"
        state.mkdir(mode=0o700)
        nodes.append(exec_bench.NodeServer(children, state, slots, tls=tls))
    endpoints = list(await asyncio.gather(*(asyncio.to_thread(n.start) for n in nodes)))
    return nodes, endpoints


def stop_node_servers(children: Children, nodes: Sequence[exec_bench.NodeServer]) -> None:
    for node in nodes:
        if node.proc is not None:
            children.stop(node.proc)


class HarnessFleet:
    """Harness node servers (bench/_harness_server.py), `procs` processes sharing the ports."""

    def __init__(self, children: Children, work: Path, procs: int) -> None:
        self.children = children
        self.work = work
        self.procs_wanted = procs
        self.procs: list[subprocess.Popen] = []

    async def start(self, servers: int, slots: int, tag: str, timeout: float = 120.0) -> list[Endpoint]:
        ports = free_ports(servers, HARNESS_PORTS)
        token = secrets.token_urlsafe(24)
        env = {**os.environ, "HARNESS_TOKEN": token}
        procs = max(1, min(self.procs_wanted, servers))
        chunks = [ports[k::procs] for k in range(procs)]
        ready = []
        for k, chunk in enumerate(chunks):
            ready_file = self.work / f"{tag}-{k}.ready"
            log_file = self.work / f"{tag}-{k}.log"
            argv = [sys.executable, str(HERE / "_harness_server.py"), "--ports", ",".join(map(str, chunk)),
                    "--slots", str(slots), "--ready-file", str(ready_file)]
            self.procs.append(self.children.spawn(f"harness {tag}-{k}", argv, log_file=log_file, env=env))
            ready.append((ready_file, log_file, self.procs[-1]))
        deadline = time.monotonic() + timeout
        for ready_file, log_file, proc in ready:
            while not ready_file.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"harness server exited with {proc.returncode}:\n{Children.tail(log_file)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"harness server not ready within {timeout:.0f}s:\n{Children.tail(log_file)}")
                await asyncio.sleep(0.05)
        return [Endpoint(url=f"http://127.0.0.1:{port}", token=token, job_id=f"harness-{tag}",
                         name=f"harness-{port}", location="local", slots=slots) for port in ports]

    def stop(self) -> None:
        for proc in self.procs:
            self.children.stop(proc)
        self.procs.clear()


# --- 1. contention -----------------------------------------------------------------------


@dataclass
class ContentionResult:
    label: str
    servers: int
    slots: int
    trajectories: int
    wall: float
    ideal: float
    ideal_measured: float
    mean_cycle: float  # acquire returned -> release returned
    mean_exec: float
    mean_release: float
    requests: int
    out_of_order: int
    waits: list[float] = field(default_factory=list)
    errors: int = 0
    doubles: int = 0  # a slot handed to two trajectories at once (must be 0)
    # For each slot handed from one trajectory to the next while callers waited: the
    # time from the first one's release returning to the next one's acquire returning.
    gaps: list[float] = field(default_factory=list)
    idle: float = 0.0  # slot-seconds free while callers waited (idle_while_waiting)
    uses: tuple[int, int] = (0, 0)  # fewest and most trajectories one slot served

    @property
    def requests_per_grant(self) -> float:
        return self.requests / self.trajectories

    @property
    def out_of_order_fraction(self) -> float:
        return self.out_of_order / self.trajectories


def count_out_of_order(events: list[tuple[int, int]]) -> int:
    """events: (0, a) when trajectory a (its arrival rank) called acquire, (1, a) when its
    acquire returned, in the order they happened. A grant is out of order when some
    trajectory that called acquire before it was still waiting at that moment."""
    waiting: list[int] = []
    granted: set[int] = set()
    late = 0
    for what, a in events:
        if what == 0:
            heapq.heappush(waiting, a)
            continue
        granted.add(a)
        while waiting and waiting[0] in granted:
            heapq.heappop(waiting)
        if waiting and waiting[0] < a:
            late += 1
    return late


def handover_gaps(holds: list[tuple[str, float, float, float]]) -> list[float]:
    """Per slot, in order of its holders: next holder's acquire returned - previous
    holder's release returned, where the next holder was already waiting then. Near 0
    (or below: the server hands a slot on before its answer to the release arrives)
    when a freed slot goes straight to a waiting caller."""
    gaps = []
    for uses in _by_slot(holds).values():
        for (_, _, released), (called, got, _) in zip(uses, uses[1:]):
            if called < released:
                gaps.append(got - released)
    return sorted(gaps)


def _by_slot(holds: list[tuple[str, float, float, float]]) -> dict[str, list[tuple[float, float, float]]]:
    by_slot: dict[str, list[tuple[float, float, float]]] = {}
    for slot, called, got, released in holds:
        by_slot.setdefault(slot, []).append((called, got, released))
    for uses in by_slot.values():
        uses.sort(key=lambda u: u[1])
    return by_slot


def idle_while_waiting(holds: list[tuple[str, float, float, float]], start: float, slots: int) -> float:
    """Slot-seconds during which a slot was free (by the client's clock: from start or its
    release returning to its next acquire returning) while some caller still waited for
    one; every trajectory calls acquire at `start`, so callers wait until the last grant.
    Slots that were never handed out count from start to the last grant."""
    last_grant = max(got for _, _, got, _ in holds)
    by_slot = _by_slot(holds)
    idle = 0.0
    for uses in by_slot.values():
        free_from = start
        for _, got, released in uses:
            idle += max(0.0, min(got, last_grant) - free_from)
            free_from = released
        idle += max(0.0, last_grant - free_from)
    return idle + (slots - len(by_slot)) * (last_grant - start)


async def contention(label: str, endpoints: list[Endpoint], trajectories: int) -> ContentionResult:
    source = NodeServerSource.from_endpoints(endpoints)
    pool = SlotPool([source], acquire_timeout=600.0)
    slots = sum(e.slots for e in endpoints)
    try:
        await pool.start()
        # Warm-up: one connection per slot, every slot taken and given back untouched
        # (an unused grant goes back without an agent restart).
        warm = [await pool.acquire(trajectory_id="warm-up") for _ in range(slots)]
        for slot in warm:
            await pool.release(slot, reset_workspace=False)
        requests0 = source.requests
        events: list[tuple[int, int]] = []
        held: set[str] = set()
        waits, cycles, execs, releases = [], [], [], []
        holds: list[tuple[str, float, float, float]] = []  # (slot, acquire called, returned, release returned)
        errors = doubles = 0
        arrivals = 0

        async def trajectory() -> None:
            nonlocal arrivals, errors, doubles
            rank = arrivals
            arrivals += 1
            events.append((0, rank))
            t0 = time.perf_counter()
            slot = await pool.acquire(trajectory_id=f"t{rank}")
            t1 = time.perf_counter()
            events.append((1, rank))
            if slot.id in held:
                doubles += 1
            held.add(slot.id)
            result = await pool.execute(slot, "bash", {"command": f"sleep {SLEEP}"}, timeout=60)
            t2 = time.perf_counter()
            if not result.success:
                errors += 1
                if errors <= 3:
                    log.warning("%s: %s: %s", label, result.error_kind, result.error)
            held.discard(slot.id)  # before release: the server hands it on before answering
            await pool.release(slot, reset_workspace=True)
            t3 = time.perf_counter()
            waits.append(t1 - t0)
            cycles.append(t3 - t1)
            execs.append(t2 - t1)
            releases.append(t3 - t2)
            holds.append((slot.id, t0, t1, t3))

        start = time.perf_counter()
        await asyncio.gather(*(trajectory() for _ in range(trajectories)))
        wall = time.perf_counter() - start
        mean_cycle = statistics.fmean(cycles)
        return ContentionResult(
            label=label, servers=len(endpoints), slots=slots, trajectories=trajectories, wall=wall,
            ideal=trajectories * SLEEP / slots, ideal_measured=trajectories * mean_cycle / slots,
            mean_cycle=mean_cycle, mean_exec=statistics.fmean(execs), mean_release=statistics.fmean(releases),
            requests=source.requests - requests0, out_of_order=count_out_of_order(events),
            waits=sorted(waits), errors=errors, doubles=doubles, gaps=handover_gaps(holds),
            idle=idle_while_waiting(holds, start, slots),
            uses=(min(map(len, _by_slot(holds).values())), max(map(len, _by_slot(holds).values()))))
    finally:
        await pool.stop()


# --- 2. scale ------------------------------------------------------------------------------


class GcTimer:
    """CPU time this process spends in the garbage collector while active."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0  # generation-2 collections
        self._t0 = 0.0
        self.active = False

    def __call__(self, phase: str, info: dict) -> None:
        if not self.active:
            return
        if phase == "start":
            self._t0 = time.process_time()
        else:
            self.seconds += time.process_time() - self._t0
            self.full += info.get("generation") == 2

    def __enter__(self) -> "GcTimer":
        gc.callbacks.append(self)
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False
        gc.callbacks.remove(self)


@dataclass
class ScaleResult:
    row: ScaleRow
    cycles: int
    wall: float
    cpu: float  # CPU seconds of this process during the measured cycles
    requests: int
    gc: float  # of which in the garbage collector
    gc_full: int

    @property
    def cpu_ms(self) -> float:
        return self.cpu * 1000.0 / self.cycles

    @property
    def gc_ms(self) -> float:
        return self.gc * 1000.0 / self.cycles

    @property
    def requests_per_grant(self) -> float:
        return self.requests / self.cycles


async def scale_case(row: ScaleRow, endpoints: list[Endpoint], warm_fraction: float) -> ScaleResult:
    source = NodeServerSource.from_endpoints(endpoints)
    pool = SlotPool([source], acquire_timeout=600.0)
    remaining = 0
    done = 0

    async def trajectory(i: int) -> None:
        nonlocal remaining, done
        tid = f"s{i}"
        while remaining > 0:
            remaining -= 1
            slot = await pool.acquire(trajectory_id=tid)
            await pool.release(slot, reset_workspace=False)
            done += 1

    async def phase(cycles: int) -> int:
        nonlocal remaining, done
        remaining, done = cycles, 0
        await asyncio.gather(*(trajectory(i) for i in range(row.trajectories)))
        return done

    try:
        await pool.start()
        await phase(max(row.trajectories, int(row.cycles * warm_fraction)))  # connections, caches
        requests0 = source.requests
        with GcTimer() as collector:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            cycles = await phase(row.cycles)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        return ScaleResult(row, cycles, wall, cpu, source.requests - requests0, collector.seconds, collector.full)
    finally:
        await pool.stop()


# --- 3. discovery --------------------------------------------------------------------------


@dataclass
class DiscoveryResult:
    records: int
    first_ms: float
    unchanged_ms: list[float]
    added_ms: list[float]
    found: int


def discovery(work: Path, records: int, reps: int) -> DiscoveryResult:
    state = work / "discovery"
    state.mkdir(mode=0o700)
    job = "bench-discovery"
    folder = JobFolder(state, job)
    folder.create_credentials(tls=True)
    folder.write_info(JobInfo(job_id=job, scheduler="slurm", submitted_at=time.time(), servers=records + reps,
                              slots_per_server=8, runtime="none", scheduler_ids=("12345",)))

    def record(i: int) -> ServerRecord:
        # Other hosts' records: discovery cannot check their processes (as on a cluster).
        return ServerRecord(job_id=job, host=f"10.1.{i // 200}.{i % 200 + 1}", port=9300, slots=8, pid=10000 + i,
                            hostname=f"bench-node{i:05d}", runtime="none", started_at=time.time(), task_index=i,
                            tls=True)

    for i in range(records):
        folder.write_record(record(i))
    source = ClusterSource(state)
    t0 = time.perf_counter()
    found = len(source._discover())
    first = (time.perf_counter() - t0) * 1000
    unchanged = []
    for _ in range(reps):
        t0 = time.perf_counter()
        source._discover()
        unchanged.append((time.perf_counter() - t0) * 1000)
    added = []
    for k in range(max(5, reps // 5)):
        folder.write_record(record(records + k))
        t0 = time.perf_counter()
        n = len(source._discover())
        added.append((time.perf_counter() - t0) * 1000)
        if n != records + k + 1:
            raise RuntimeError(f"discovery found {n} node servers after adding record {k + 1}, not {records + k + 1}")
    return DiscoveryResult(records, first, sorted(unchanged), sorted(added), found)


# --- report ----------------------------------------------------------------------------------


def report_contention(results: list[ContentionResult]) -> list[dict]:
    print("\n1. contention: real node servers (runtime none, HTTPS); each trajectory: acquire -> "
          f"bash `sleep {SLEEP}` -> release(reset_workspace=True)")
    print_table_header(f"{'case':26s} {'wall s':>7s} {'ideal s':>7s} {'wall/ideal':>10s} {'cycle s':>7s} "
                       f"{'ideal@cycle':>11s} {'wall/that':>9s} {'req/grant':>9s} {'out of order':>12s} "
                       f"{'wait p50':>8s} {'wait max':>8s} {'err':>3s}")
    rows = []
    for r in results:
        print(f"{r.label:26s} {r.wall:7.2f} {r.ideal:7.2f} {r.wall / r.ideal:10.2f} {r.mean_cycle:7.3f} "
              f"{r.ideal_measured:11.2f} {r.wall / r.ideal_measured:9.2f} {r.requests_per_grant:9.2f} "
              f"{r.out_of_order:5d} ({r.out_of_order_fraction:4.1%}) "
              f"{percentile(r.waits, 0.5):8.2f} {r.waits[-1]:8.2f} {r.errors + r.doubles:3d}")
        rows.append({
            "case": r.label, "servers": r.servers, "slots": r.slots, "trajectories": r.trajectories,
            "wall_s": r.wall, "ideal_s": r.ideal, "wall_over_ideal": r.wall / r.ideal,
            "mean_cycle_s": r.mean_cycle, "mean_exec_s": r.mean_exec, "mean_release_s": r.mean_release,
            "ideal_with_cycle_s": r.ideal_measured, "wall_over_ideal_with_cycle": r.wall / r.ideal_measured,
            "acquire_requests": r.requests, "requests_per_grant": r.requests_per_grant,
            "out_of_order": r.out_of_order, "out_of_order_fraction": r.out_of_order_fraction,
            "wait_p50_s": percentile(r.waits, 0.5), "wait_max_s": r.waits[-1], "errors": r.errors,
            "double_grants": r.doubles, "handover_p50_s": percentile(r.gaps, 0.5),
            "handover_p90_s": percentile(r.gaps, 0.9), "handover_max_s": r.gaps[-1] if r.gaps else None,
            "idle_slot_seconds_while_waiting": r.idle, "trajectories_per_slot": list(r.uses),
        })
    print("ideal = trajectories x 0.5 s / slots. cycle = mean time from acquire returned to release returned\n"
          "(the 0.5 s sleep + the exec round trip + the release, whose reset ends the slot's processes and\n"
          "wipes its workspace); ideal@cycle = trajectories x cycle / slots.\n"
          "req/grant = acquire HTTP requests the pool sent / grants (= trajectories; a long poll that times out\n"
          "empty counts too). out of order: grants made while a trajectory that had called acquire earlier was\n"
          "still waiting. wait = time in acquire.")
    for r in results:
        gap = lambda q: percentile(r.gaps, q) * 1000  # noqa: E731
        print(f"  {r.label}: exec {r.mean_exec:.3f} s + release {r.mean_release:.3f} s per cycle (overhead "
              f"{r.mean_cycle - SLEEP:.3f} s per trajectory above the 0.5 s); slot handover (release returned -> "
              f"next waiting caller's acquire returned) p50 {gap(0.5):.0f} ms, p90 {gap(0.9):.0f} ms, max "
              f"{gap(1.0):.0f} ms over {len(r.gaps)}; slots free while callers waited: {r.idle:.1f} slot-s "
              f"({r.idle / (r.slots * r.wall):.1%} of slots x wall); trajectories per slot {r.uses[0]}-{r.uses[1]}")
    for r in results:
        walls = r.wall / r.ideal, r.wall / r.ideal_measured
        print(f"  target {r.label}: wall <= {TARGET_WALL} x ideal: {walls[0]:.2f} {verdict(walls[0] <= TARGET_WALL)} "
              f"(vs ideal@cycle {walls[1]:.2f} {verdict(walls[1] <= TARGET_WALL)}); req/grant <= {TARGET_REQUESTS}: "
              f"{r.requests_per_grant:.2f} {verdict(r.requests_per_grant <= TARGET_REQUESTS)}; out of order <= "
              f"{TARGET_OUT_OF_ORDER:.0%}: {r.out_of_order_fraction:.1%} "
              f"{verdict(r.out_of_order_fraction <= TARGET_OUT_OF_ORDER)}")
    return rows


def report_scale(results: list[ScaleResult]) -> dict:
    print("\n2. scale: the pool's own CPU per acquire + release(reset_workspace=False) (process CPU time of this\n"
          "   process: the pool and the trajectories' loops; servers run in other processes). Plain HTTP in\n"
          "   every row. 'harness' = PROTOCOL-LEVEL HARNESS SERVER WITHOUT AGENTS (bench/_harness_server.py),\n"
          "   one port per harness node server; 'real' = hpc-sandbox serve --runtime none --insecure-http.")
    print_table_header(f"{'row':30s} {'servers':>7s} {'slots':>7s} {'traj':>6s} {'cycles':>7s} {'cycles/s':>8s} "
                       f"{'CPU ms/cycle':>12s} {'of it GC':>8s} {'req/grant':>9s}")
    rows = []
    for r in results:
        print(f"{r.row.key + (' (info)' if r.row.info else ''):30s} {r.row.servers:7d} {r.row.slots:7d} "
              f"{r.row.trajectories:6d} {r.cycles:7d} {r.cycles / r.wall:8.0f} {r.cpu_ms:12.3f} "
              f"{r.gc_ms:8.3f} {r.requests_per_grant:9.2f}")
        rows.append({"row": r.row.key, "kind": r.row.kind, "servers": r.row.servers, "slots": r.row.slots,
                     "trajectories": r.row.trajectories, "cycles": r.cycles, "wall_s": r.wall, "cpu_s": r.cpu,
                     "cpu_ms_per_cycle": r.cpu_ms, "gc_ms_per_cycle": r.gc_ms,
                     "gc_full_collections": r.gc_full, "requests_per_grant": r.requests_per_grant, "info": r.row.info})
    main = [r for r in results if not r.row.info]
    out: dict = {"rows": rows}
    if main:
        lo = min(main, key=lambda r: r.cpu_ms)
        hi = max(main, key=lambda r: r.cpu_ms)
        ratio = hi.cpu_ms / lo.cpu_ms
        print(f"  target: CPU per acquire+release, largest / smallest <= {TARGET_SCALE}: {ratio:.2f} "
              f"({hi.row.key} / {lo.row.key}) {verdict(ratio <= TARGET_SCALE)}")
        out["ratio"] = {"value": ratio, "largest": hi.row.key, "smallest": lo.row.key, "met": ratio <= TARGET_SCALE}
        small = [r for r in main if r.row.kind == "harness" and r.row.slots == min(x.row.slots for x in main)]
        top = [r for r in main if r.row.slots == max(x.row.slots for x in main)]
        if small and top:
            print(f"  (info) {top[0].row.key} / {small[0].row.key}: {top[0].cpu_ms / small[0].cpu_ms:.2f}")
    return out


def report_discovery(d: DiscoveryResult) -> dict:
    med = statistics.median(d.unchanged_ms)
    added = statistics.median(d.added_ms)
    print(f"\n3. discovery: ClusterSource._discover() over one job with {d.records} ready records "
          f"(found {d.found})")
    print(f"  first discovery (credentials, job.json, every record): {d.first_ms:.1f} ms")
    print(f"  nothing changed: median {med:.2f} ms, max {d.unchanged_ms[-1]:.2f} ms over {len(d.unchanged_ms)}; "
          f"target < {TARGET_DISCOVERY_MS:.0f} ms: {verdict(med < TARGET_DISCOVERY_MS)}")
    print(f"  a record added: median {added:.1f} ms, max {d.added_ms[-1]:.1f} ms over {len(d.added_ms)} "
          "(every record of the job is read again)")
    return {"records": d.records, "first_ms": d.first_ms, "unchanged_median_ms": med,
            "unchanged_max_ms": d.unchanged_ms[-1], "added_median_ms": added, "added_max_ms": d.added_ms[-1],
            "met": med < TARGET_DISCOVERY_MS}


# --- the run -----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="hpc-sandbox-pool-bench-"))
    env = environment(CODE_ROOT, CODE_NOTE)
    print("pool benchmark" + (" (--quick)" if args.quick else ""))
    for key, value in env.items():
        print(f"  {key:13s} {value}")
    summary: dict = {"environment": env, "quick": args.quick}
    failures = 0
    try:
        sections = args.only or ["contention", "scale", "discovery"]
        if "contention" in sections:
            count = max(s for s, _, _ in plan.contention)
            per = plan.contention[0][1]
            print(f"\nstarting {count} node servers with {per} slots each (HTTPS) ...", flush=True)
            nodes, endpoints = await start_node_servers(children, work, count, per, tls=True, tag="contention")
            results = []
            for servers, slots, trajectories in plan.contention:
                label = f"{servers * slots} slots / {servers} srv, {trajectories} traj"
                print(f"  {label} ...", flush=True)
                results.append(await contention(label, endpoints[:servers], trajectories))
            await asyncio.to_thread(stop_node_servers, children, nodes)
            summary["contention"] = report_contention(results)
            failures += sum(r.errors + r.doubles for r in results)
        if "scale" in sections:
            print("\nscale rows ...", flush=True)
            scale_results = []
            for k, row in enumerate(plan.scale):
                print(f"  {row.key}: {row.slots} slots on {row.servers} {row.kind} servers, "
                      f"{row.trajectories} trajectories ...", flush=True)
                fleet = HarnessFleet(children, work, plan.harness_procs)
                nodes = []
                try:
                    if row.kind == "real":
                        nodes, endpoints = await start_node_servers(children, work, row.servers, row.slots_per_server,
                                                                    tls=False, tag=f"scale{k}")
                    else:
                        endpoints = await fleet.start(row.servers, row.slots_per_server, tag=f"scale{k}")
                    scale_results.append(await scale_case(row, endpoints, plan.warm_fraction))
                finally:
                    await asyncio.to_thread(fleet.stop)
                    await asyncio.to_thread(stop_node_servers, children, nodes)
            summary["scale"] = report_scale(scale_results)
        if "discovery" in sections:
            d = await asyncio.to_thread(discovery, work, plan.discovery_records, plan.discovery_reps)
            summary["discovery"] = report_discovery(d)
        print(f"\n  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at end)")
        if args.json:
            (STARTED_IN / args.json).write_text(json.dumps(summary, indent=2))
        if failures:
            print(f"\n{failures} trajectories failed or got a slot held by another: figures not trustworthy",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        await asyncio.to_thread(children.stop_all)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (smaller contention and scale cases)")
    parser.add_argument("--only", action="append", choices=["contention", "scale", "discovery"],
                        help="run only this section (repeatable)")
    add_code_options(parser, code_option=True)
    parser.add_argument("--harness-procs", type=int, default=2, help="processes the harness servers share (default 2)")
    return parse_and_run(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
