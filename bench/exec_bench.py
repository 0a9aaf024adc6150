#!/usr/bin/env python3
"""Exec benchmark: `bash -c true` through the node server, against spawning it
directly from Python (the limit on this machine) and against SWE-ReX's server.

    python bench/exec_bench.py            # full run, a few minutes
    python bench/exec_bench.py --quick    # ~30 s smoke run

In one run, on the same command (`true`), it measures:
  direct    asyncio.create_subprocess_exec("bash", "-c", "true") in this process:
            one after another (latency) and 32 at once (throughput); and the same
            spawn with its exit watched on a pidfd (Python >= 3.12's default; this
            is how the slot agent waits for its commands).
  node      one node server (`hpc-sandbox serve --runtime none`, 32 slots):
            single calls one after another; 32 concurrent calls on 32 slots (one
            call per slot at a time); 32 concurrent calls on 8 slots (4 per slot);
            batches of 32 calls (one per slot) in one HTTP request.
  swerex    SWE-ReX `swerex-remote` (installed from PyPI into bench/.venv-swerex):
            one server (sequential and 32 concurrent requests), and one server per
            slot (N servers, 32 concurrent requests, one per server); with the
            documented `{"command": "true", "shell": true}` (run by /bin/sh, dash
            here) and, for comparison, `["bash", "-c", "true"]` (our exact process).
Measurements run in rounds, every other round in reverse order, so that a drift in
the machine's speed hits all of them alike; the table shows the median over rounds,
and each ratio is taken within a round (median over rounds). Besides calls/s and
latency, it counts the CPU time per call of every process involved, which other
tenants of a noisy machine disturb much less than wall-clock throughput.
Everything runs on 127.0.0.1; every process started here is stopped at the end, on
error and on Ctrl-C/SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import aiohttp  # noqa: E402

from _common import Children, Measurement, Op, children_of, cpu_model, run_benchmark, run_load  # noqa: E402
import _swerex  # noqa: E402

from hpc_sandbox import Endpoint, NodeServerSource, SlotPool  # noqa: E402
from hpc_sandbox.client import endpoint_of  # noqa: E402
from hpc_sandbox.jobfolder import JobFolder  # noqa: E402

log = logging.getLogger("bench")

COMMAND = "true"
PORT_RANGE = "9300-9399"
TARGET_DIRECT_RATIO = 0.8
TARGET_SWEREX_RATIO = 2.0
TARGET_LATENCY_MS = 1.5


@dataclass(frozen=True)
class Plan:
    rounds: int
    seq_ops: int  # sequential operations per latency measurement
    tp_calls: int  # commands per throughput measurement
    max_seconds: float  # cap on any one measurement
    concurrency: int
    slots: int
    shared_slots: int  # the "8 slots x 4" configuration
    swerex_servers: int


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(rounds=1, seq_ops=150, tp_calls=600, max_seconds=3.0, concurrency=32, slots=32,
                    shared_slots=8, swerex_servers=8)
    else:
        plan = Plan(rounds=4, seq_ops=400, tp_calls=1500, max_seconds=8.0, concurrency=32, slots=32,
                    shared_slots=8, swerex_servers=32)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("swerex_servers", args.swerex_servers)) if v is not None}
    return Plan(**{**plan.__dict__, **overrides})


# --- operations ------------------------------------------------------------------------


async def direct_op() -> int:
    proc = await asyncio.create_subprocess_exec("bash", "-c", COMMAND)
    return 1 if await proc.wait() == 0 else 0


def pidfd_usable() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except (AttributeError, OSError):
        return False


async def direct_pidfd_op() -> int:
    """The same spawn, its exit watched on a pidfd in the event loop: what asyncio does
    by default from Python 3.12 on (3.8-3.11 start a thread per child to wait for it)."""
    loop = asyncio.get_running_loop()
    proc = subprocess.Popen(["bash", "-c", COMMAND])
    pidfd = os.pidfd_open(proc.pid)
    exited = loop.create_future()
    loop.add_reader(pidfd, exited.set_result, None)
    try:
        await exited
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return 1 if proc.wait() == 0 else 0


def node_op(pool: SlotPool, slot) -> Op:
    args = {"command": COMMAND}

    async def op() -> int:
        result = await pool.execute(slot, "bash", args)
        if result.error_kind and result.error_kind != "timeout":
            raise RuntimeError(f"{result.error_kind}: {result.error}")
        return 1 if result.success else 0

    return op


def node_batch_op(pool: SlotPool, slots) -> Op:
    calls = [(slot, "bash", {"command": COMMAND}) for slot in slots]

    async def op() -> int:
        results = await pool.execute_batch(calls)
        return sum(1 for r in results if r.success)

    return op


# --- the node server -------------------------------------------------------------------


class NodeServer:
    def __init__(self, children: Children, state_dir: Path, slots: int, tls: bool = True) -> None:
        self.children = children
        self.state_dir = state_dir
        self.slots = slots
        self.tls = tls  # HTTPS with the job's pinned certificate, as submit sets it up; False: --insecure-http
        self.job_id = "bench-" + secrets.token_hex(4)
        self.log_file = state_dir / "node-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> Endpoint:
        folder = JobFolder(self.state_dir, self.job_id)
        folder.create_credentials(tls=self.tls)
        argv = [sys.executable, "-m", "hpc_sandbox", "serve", "--job-id", self.job_id,
                "--state-dir", str(self.state_dir), "--host", "127.0.0.1", "--slots", str(self.slots),
                "--runtime", "none", "--port-range", PORT_RANGE,
                "--workspace-root", str(self.state_dir / "workspaces"), *([] if self.tls else ["--insecure-http"])]
        self.proc = self.children.spawn("node server", argv, log_file=self.log_file)
        deadline = time.monotonic() + timeout
        while True:
            records = JobFolder(self.state_dir, self.job_id).read_records()
            if records:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"node server exited with {self.proc.returncode}:\n{Children.tail(self.log_file)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node server not ready within {timeout:.0f}s:\n{Children.tail(self.log_file)}")
            time.sleep(0.1)
        return endpoint_of(records[0], folder.credentials(), "local")

    def stop(self) -> None:
        if self.proc is not None:
            self.children.stop(self.proc)  # SIGTERM: it stops its agents and removes its record
            self.proc = None


# --- environment -----------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def environment(swerex_exe: Path | None) -> dict[str, str]:
    cpu = cpu_model()
    import hpc_sandbox
    commit = _first_line(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"])
    try:
        watcher = type(asyncio.get_child_watcher()).__name__  # noqa: deprecated in 3.12, informative only
    except Exception:
        watcher = "?"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": platform.node(),
        "cpu": f"{cpu} x {os.cpu_count()}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "bash": _first_line(["bash", "--version"]),
        "hpc_sandbox": f"{hpc_sandbox.__version__} (git {commit}) from {Path(hpc_sandbox.__file__).parent}",
        "swe-rex": _first_line([str(swerex_exe), "--version"]) if swerex_exe else "skipped",
        "child watcher": watcher,
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (at start)",
    }


# --- the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    ops: Callable[[], list[Op]]
    calls_per_op: int
    sequential: bool
    cpu_of: Callable[[], list[tuple[int, bool]]]  # the processes doing the work (see cpu_seconds)


async def measure_all(configs: list[Config], plan: Plan) -> dict[str, list[Measurement]]:
    results: dict[str, list[Measurement]] = {c.key: [] for c in configs}
    for round_no in range(plan.rounds):
        # Every other round runs backwards, so that a drift in the machine's speed
        # (other tenants, thermal) does not favour whatever is measured first.
        for config in (configs if round_no % 2 == 0 else configs[::-1]):
            ops = config.ops()
            if config.sequential:
                total = plan.seq_ops
            else:
                total = max(1, plan.tp_calls // config.calls_per_op)
            warm = max(2 * len(ops), 20) if config.calls_per_op == 1 else 3
            await run_load(config.key + " warm-up", ops, config.calls_per_op, warm, plan.max_seconds)
            m = await run_load(config.label, ops, config.calls_per_op, total, plan.max_seconds, config.cpu_of())
            results[config.key].append(m)
            log.info("round %d %-28s %5d calls %6.2fs %7.1f/s p50 %.2f ms cpu %.2f ms/call%s", round_no + 1, config.key,
                     m.calls, m.seconds, m.throughput, m.pct_ms(0.5), m.cpu_ms_per_call,
                     f"  ERRORS {m.errors}" if m.errors else "")
    return results


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(env: dict[str, str], plan: Plan, configs: list[Config], results: dict[str, list[Measurement]]) -> dict:
    print()
    print("exec benchmark: `bash -c true` (SWE-ReX: `/bin/sh -c true`, its shell=True)")
    for key, value in env.items():
        print(f"  {key:14s} {value}")
    print(f"  load average   {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at end)")
    print(f"  plan           {plan.rounds} round(s); {plan.seq_ops} sequential calls / {plan.tp_calls} calls per "
          f"throughput measurement (cap {plan.max_seconds:.0f}s); concurrency {plan.concurrency}")
    print()
    header = (f"{'measurement':44s} {'conc':>4s} {'calls':>6s} {'calls/s':>8s} {'range/s':>11s} {'p50 ms':>7s} "
              f"{'p90 ms':>7s} {'p99 ms':>7s} {'CPU ms':>7s} {'err':>4s}")
    print(header)
    print("-" * len(header))
    table = {}
    for config in configs:
        ms = results[config.key]
        if not ms:
            continue
        tps = [m.throughput for m in ms]
        row = {
            "label": config.label,
            "concurrency": ms[0].concurrency,
            "calls_per_op": config.calls_per_op,
            "calls": sum(m.calls for m in ms),
            "throughput": _median(tps),
            "throughput_rounds": tps,
            "p50_ms": _median([m.pct_ms(0.5) for m in ms]),
            "p90_ms": _median([m.pct_ms(0.9) for m in ms]),
            "p99_ms": _median([m.pct_ms(0.99) for m in ms]),
            "p50_ms_rounds": [m.pct_ms(0.5) for m in ms],
            "cpu_ms_per_call": _median([m.cpu_ms_per_call for m in ms]),
            "errors": sum(m.errors for m in ms),
        }
        table[config.key] = row
        spread = f"{min(tps):.0f}-{max(tps):.0f}" if len(tps) > 1 else ""
        print(f"{config.label:44s} {row['concurrency']:4d} {row['calls']:6d} {row['throughput']:8.1f} {spread:>11s} "
              f"{row['p50_ms']:7.2f} {row['p90_ms']:7.2f} {row['p99_ms']:7.2f} {row['cpu_ms_per_call']:7.2f} "
              f"{row['errors']:4d}")
    print("calls/s and latencies: median over rounds; range: slowest-fastest round. Latency is per request (a batch\n"
          "request's covers its 32 calls). CPU ms: user+system CPU per call of every process involved (this one,\n"
          "the server(s), the agents, the commands), a figure that other tenants' load disturbs less.")

    def per_round(num: str, den: str, fn) -> list[float]:
        keys = [num, den] + (["pidfd_c32"] if fn is overhead_ratio else [])
        if any(not results.get(k) for k in keys):
            return []
        return [fn(*ms) for ms in zip(*(results[k] for k in keys))]

    tp_ratio = lambda a, b: a.throughput / b.throughput if b.throughput else float("nan")  # noqa: E731
    p50_diff = lambda a, b: a.pct_ms(0.5) - b.pct_ms(0.5)  # noqa: E731
    cpu_ratio = lambda a, b: a.cpu_ms_per_call / b.cpu_ms_per_call if b.cpu_ms_per_call else float("nan")  # noqa: E731

    def overhead_ratio(a: Measurement, b: Measurement, spawn: Measurement) -> float:
        """CPU per call above the bare spawn (direct, pidfd watcher): a's over b's."""
        over_b = b.cpu_ms_per_call - spawn.cpu_ms_per_call
        return (a.cpu_ms_per_call - spawn.cpu_ms_per_call) / over_b if over_b > 0 else float("nan")

    n = plan.swerex_servers
    checks = [
        ("node c32 (32 slots) / direct c32", "node_c32", "direct_c32", tp_ratio, ">=", TARGET_DIRECT_RATIO, "x"),
        ("node c32 (32 slots) / direct c32, pidfd", "node_c32", "pidfd_c32", tp_ratio, ">=", TARGET_DIRECT_RATIO, "x"),
        ("node c32 (32 slots) / SWE-ReX c32, 1 server", "node_c32", "swerex1_c32", tp_ratio, ">=", TARGET_SWEREX_RATIO, "x"),
        (f"node c32 (32 slots) / SWE-ReX c32, {n} servers", "node_c32", "swerexN_c32", tp_ratio, ">=",
         TARGET_SWEREX_RATIO, "x"),
        ("p50 node seq - direct seq", "node_seq", "direct_seq", p50_diff, "<=", TARGET_LATENCY_MS, " ms"),
        ("p50 node seq - direct seq, pidfd", "node_seq", "pidfd_seq", p50_diff, "<=", TARGET_LATENCY_MS, " ms"),
        ("(info) node c32 (8 slots x4) / direct c32", "node_c32_shared", "direct_c32", tp_ratio, None, None, "x"),
        ("(info) node batch32 / direct c32", "node_batch32", "direct_c32", tp_ratio, None, None, "x"),
        ("(info) node batch32 / direct c32, pidfd", "node_batch32", "pidfd_c32", tp_ratio, None, None, "x"),
        ("(info) node batch32 / SWE-ReX c32, 1 server", "node_batch32", "swerex1_c32", tp_ratio, None, None, "x"),
        (f"(info) node batch32 / SWE-ReX c32, {n} servers", "node_batch32", "swerexN_c32", tp_ratio, None, None, "x"),
        ("(info) node c32 / SWE-ReX c32, 1 server, bash", "node_c32", "swerex1_bash_c32", tp_ratio, None, None, "x"),
        (f"(info) node c32 / SWE-ReX c32, {n} servers, bash", "node_c32", "swerexN_bash_c32", tp_ratio, None, None, "x"),
        ("(info) CPU/call: direct c32 / node c32", "direct_c32", "node_c32", cpu_ratio, None, None, "x"),
        ("(info) CPU/call: direct pidfd c32 / node c32", "pidfd_c32", "node_c32", cpu_ratio, None, None, "x"),
        ("(info) CPU/call: direct pidfd c32 / node batch32", "pidfd_c32", "node_batch32", cpu_ratio, None, None, "x"),
        (f"(info) CPU/call: SWE-ReX {n} servers / node c32", "swerexN_c32", "node_c32", cpu_ratio, None, None, "x"),
        (f"(info) CPU/call: SWE-ReX {n} srv bash / node c32", "swerexN_bash_c32", "node_c32", cpu_ratio, None, None, "x"),
        (f"(info) CPU above spawn: SWE-ReX {n} bash / node", "swerexN_bash_c32", "node_c32", overhead_ratio, None, None,
         "x"),
        ("(info) CPU above spawn: SWE-ReX 1 bash / node", "swerex1_bash_c32", "node_c32", overhead_ratio, None, None, "x"),
    ]
    print()
    print(f"{'ratio (each taken within a round)':48s} {'median':>8s}  {'per round':24s} target")
    ratios = {}
    for name, num, den, fn, op, target, unit in checks:
        values = per_round(num, den, fn)
        if not values:
            continue
        value = _median(values)
        verdict = ""
        if op is not None:
            met = value >= target if op == ">=" else value <= target
            verdict = f"{op} {target}{unit.strip()}: {'MET' if met else 'MISSED'}"
        ratios[name] = {"median": value, "rounds": values, "target": f"{op} {target}" if op else None,
                        "met": (value >= target if op == ">=" else value <= target) if op else None}
        rounds = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:48s} {value:8.2f}{unit:3s} {rounds:24s} {verdict}")
    return {"environment": env, "plan": plan.__dict__, "measurements": table, "ratios": ratios}


async def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="hpc-sandbox-bench-"))
    state_dir = work / "state"
    state_dir.mkdir(mode=0o700)
    pool: SlotPool | None = None
    session: aiohttp.ClientSession | None = None
    node = NodeServer(children, state_dir, plan.slots)
    try:
        swerex_exe = None
        if not args.no_swerex:
            swerex_exe = await asyncio.to_thread(_swerex.ensure_venv, Path(args.swerex_venv), args.swerex_version)
        env = environment(swerex_exe)

        print(f"starting a node server with {plan.slots} slots (runtime none) ...", flush=True)
        endpoint = await asyncio.to_thread(node.start)
        pool = SlotPool([NodeServerSource.from_endpoints([endpoint])], lease_ttl=3600)
        await pool.start()
        slots = [await pool.acquire(trajectory_id=f"bench-{i}") for i in range(plan.slots)]

        me = os.getpid()
        direct_cpu = lambda: [(me, True)]  # noqa: E731  this process and the commands it reaped
        agents = children_of(node.proc.pid)
        node_cpu = lambda: [(me, False), (node.proc.pid, False)] + [(a, True) for a in agents]  # noqa: E731
        c = plan.concurrency
        configs = [
            Config("direct_seq", "direct spawn, sequential", lambda: [direct_op], 1, True, direct_cpu),
            Config("direct_c32", "direct spawn", lambda: [direct_op] * c, 1, False, direct_cpu),
        ]
        if pidfd_usable():
            configs += [
                Config("pidfd_seq", "direct spawn, pidfd watcher, sequential", lambda: [direct_pidfd_op], 1, True,
                       direct_cpu),
                Config("pidfd_c32", "direct spawn, pidfd watcher", lambda: [direct_pidfd_op] * c, 1, False, direct_cpu),
            ]
        configs += [
            Config("node_seq", "node server, sequential (1 slot)", lambda: [node_op(pool, slots[0])], 1, True, node_cpu),
            Config("node_c32", f"node server, {plan.slots} slots x 1",
                   lambda: [node_op(pool, slots[i % plan.slots]) for i in range(c)], 1, False, node_cpu),
            Config("node_c32_shared", f"node server, {plan.shared_slots} slots x {c // plan.shared_slots}",
                   lambda: [node_op(pool, slots[i % plan.shared_slots]) for i in range(c)], 1, False, node_cpu),
            Config("node_batch32", f"node server, batch of {plan.slots} calls/request",
                   lambda: [node_batch_op(pool, slots)], plan.slots, False, node_cpu),
        ]
        if swerex_exe is not None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
            token = secrets.token_urlsafe(24)
            swerex = _swerex.SwerexServers(children, swerex_exe, token, work)
            print(f"starting {plan.swerex_servers} swerex-remote servers ...", flush=True)
            await swerex.start(plan.swerex_servers, session)
            urls = list(swerex.urls)
            n = len(urls)
            swerex_cpu = lambda: [(me, False)] + [(p.pid, True) for p in swerex.procs]  # noqa: E731
            sh, bash = _swerex.SHELL_TRUE, _swerex.BASH_TRUE
            configs += [
                Config("swerex1_seq", "SWE-ReX, 1 server, sequential",
                       lambda: [_swerex.execute_op(session, urls[0], token, sh)], 1, True, swerex_cpu),
                Config("swerex1_c32", "SWE-ReX, 1 server",
                       lambda: [_swerex.execute_op(session, urls[0], token, sh)] * c, 1, False, swerex_cpu),
                Config("swerexN_c32", f"SWE-ReX, {n} servers (one per slot)",
                       lambda: [_swerex.execute_op(session, urls[i % n], token, sh) for i in range(c)], 1, False,
                       swerex_cpu),
                Config("swerex1_bash_c32", "SWE-ReX, 1 server, bash -c true",
                       lambda: [_swerex.execute_op(session, urls[0], token, bash)] * c, 1, False, swerex_cpu),
                Config("swerexN_bash_c32", f"SWE-ReX, {n} servers, bash -c true",
                       lambda: [_swerex.execute_op(session, urls[i % n], token, bash) for i in range(c)], 1, False,
                       swerex_cpu),
            ]
        print(f"measuring ({plan.rounds} round(s)) ...", flush=True)
        results = await measure_all(configs, plan)
        summary = report(env, plan, configs, results)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
        errors = sum(row["errors"] for row in summary["measurements"].values())
        if errors:
            print(f"\n{errors} calls failed: the figures above are not trustworthy", file=sys.stderr)
            return 1
        return 0
    finally:
        if session is not None:
            await session.close()
        if pool is not None:
            await pool.stop()
        await asyncio.to_thread(children.stop_all)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run (1 round, fewer calls, 8 SWE-ReX servers)")
    parser.add_argument("--rounds", type=int, help="rounds of measurements (default 3, quick 1)")
    parser.add_argument("--swerex-servers", type=int, help="SWE-ReX servers for one-per-slot (default 32, quick 8)")
    parser.add_argument("--no-swerex", action="store_true", help="skip SWE-ReX")
    parser.add_argument("--swerex-venv", default=str(HERE / ".venv-swerex"), help="virtualenv for swe-rex")
    parser.add_argument("--swerex-version", default=_swerex.DEFAULT_VERSION)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each measurement")
    args = parser.parse_args(argv)
    return run_benchmark(lambda: run(args), args.verbose)


if __name__ == "__main__":
    sys.exit(main())
