#!/usr/bin/env python3
"""Clean-release benchmark (issue 17): what a clean release costs, against the code before it.

    python bench/clean_bench.py --quick               # ~1-1.5 min (--bomb-base: ~1.5-2 min)
    python bench/clean_bench.py                       # ~2.5 min (--bomb-base: ~3.5 min)
    python bench/clean_bench.py --only reset|contention|bomb

Two codes are measured side by side, in one run: NEW, this checkout's working tree (or
--code-at REV), and BASE, a git revision extracted to a temporary directory (--base REV,
default 0c235b3: the commit before 61ed664, which made a release clean). The client side
(NodeClient, JobFolder) is always NEW's: the wire protocol and the job folder did not
change. Each node server runs its own code (`python -m hpc_sandbox serve` with its working
directory and PYTHONPATH at that code's tree), with a token and the job's pinned TLS
certificate, on 127.0.0.1.

1. reset     per runtime (none, bwrap), one node server per code and runtime, one slot
             used: acquire -> bash `echo x > "${TMPDIR:-/tmp}/f"` -> release(reset_workspace=True),
             timed whole (the cycle) and the release alone. Rounds alternate the codes
             (A B, then B A, ...), so a drift of the machine's speed hits both alike;
             p50/p90 over every cycle of a code, the ratio NEW / BASE of the p50s, and
             the median of the per-round ratios.
2. fork bomb (run last) per runtime, NEW (and BASE with --bomb-base), a node server with
             `--slot-procs 64` and 2 slots: a BOUNDED bomb in one slot (a binary tree of
             bash subshells of depth --bomb-depth, 12 by default: at most 2^13 processes;
             each leaf a new session running `sleep 60`), while the neighbour slot runs
             `echo alive` every 0.1 s. Seconds from the start to the bomb call's answer
             (limit_exceeded expected), and until no process of the bomb is left; the
             neighbour's calls that failed, and its slowest. Whatever happens, every
             process carrying the bomb's marker is killed at the end, again and again while
             it forks. One bomb per code and runtime (2 without --quick). A bomb starves
             the whole machine while it runs (2 cores): each waits until the node is quiet,
             and BASE's only with --bomb-base.
3. contention `pool_bench.py --quick --only contention` run as a child process, on NEW
             and on BASE, each code's own bench/pool_bench.py (a revision's is extracted
             beside its hpc_sandbox/), alternating (2 runs each, 4 without --quick):
             wall time / ideal (target <= 1.15).
The sections run in the order 1, 3, 2: a bomb's aftermath must not weigh on the others.

Every process started here is stopped at the end, on error and on Ctrl-C.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
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
from _common import (REPO, Children, add_code_options, choose_code, environment, free_ports,  # noqa: E402
                     parse_and_run, percentile, print_table_header, use_code, verdict)

STARTED_IN = Path.cwd()  # where relative paths given on the command line point
BASE_DEFAULT = "0c235b3"
if __name__ == "__main__":
    # NEW: the working tree (or --code-at REV); this process imports it too.
    CODE_ROOT, CODE_NOTE = use_code(sys.argv[1:], "clean-bench")
else:
    CODE_ROOT, CODE_NOTE = REPO, "as imported"

from hpc_sandbox.client import NodeClient  # noqa: E402
from hpc_sandbox.jobfolder import JobFolder  # noqa: E402
from hpc_sandbox.models import Endpoint  # noqa: E402

try:  # a record + credentials -> Endpoint: client.endpoint_of since fd43c44, Endpoint.of before (--code-at)
    from hpc_sandbox.client import endpoint_of  # noqa: E402
except ImportError:
    endpoint_of = Endpoint.of

log = logging.getLogger("bench")

PORTS = (9500, 9599)  # pool_bench uses 9400-9499, exec_bench 9300-9399
RUNTIMES = ("none", "bwrap")
WRITE = 'echo x > "${TMPDIR:-/tmp}/f"'
TARGET_WALL = 1.15  # pool contention: wall <= 1.15 x ideal (issue 17 keeps issue 10's target)
TARGET_CONTAIN = 3.0  # "contained within a few seconds": our reading, 3 s from start to answer and to no process


@dataclass(frozen=True)
class Plan:
    rounds: int
    cycles: int  # per round, code and runtime
    bomb_depth: int
    pool_runs: int  # pool_bench runs per code
    bomb_reps: int  # fork bombs per code and runtime


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        return Plan(rounds=6, cycles=10, bomb_depth=args.bomb_depth, pool_runs=2, bomb_reps=1)
    return Plan(rounds=10, cycles=30, bomb_depth=args.bomb_depth, pool_runs=4, bomb_reps=2)


# --- node servers -----------------------------------------------------------------------


@dataclass
class Code:
    name: str  # "new" or "base"
    root: Path  # the directory holding its hpc_sandbox/
    note: str
    rev: str | None  # the git revision extracted to `root`; None: this checkout's working tree

    def bench_dir(self) -> Path:
        """The bench/ of the same code: this checkout's, or the revision's own, extracted
        beside its hpc_sandbox/ (a revision's pool_bench.py and exec_bench.py import what
        that revision's hpc_sandbox has; today's may import what it lacks)."""
        if self.rev is None:
            return HERE
        if not (self.root / "bench" / "pool_bench.py").exists():
            archive = subprocess.run(["git", "-C", str(REPO), "archive", self.rev, "bench"], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(self.root)], input=archive, check=True)
        return self.root / "bench"


class Server:
    """One node server of `code`, in its own state dir under `work`."""

    def __init__(self, children: Children, work: Path, code: Code, runtime: str, slots: int,
                 extra: Sequence[str] = ()) -> None:
        self.children = children
        self.code = code
        self.runtime = runtime
        self.state = work / f"{code.name}-{runtime}-{secrets.token_hex(3)}"
        self.state.mkdir(mode=0o700)
        self.job_id = f"clean-{code.name}-{runtime}"
        self.slots = slots
        self.extra = list(extra)
        self.log_file = self.state / "node-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Endpoint:
        folder = JobFolder(self.state, self.job_id)
        folder.create_credentials(tls=True)
        # BASE's runtime none gives a slot no TMPDIR of its own: a folder of this server's,
        # so that its slot's `echo x > $TMPDIR/f` does not write to the node's /tmp.
        tmp = self.state / "tmp"
        tmp.mkdir()
        env = {**os.environ, "PYTHONPATH": str(self.code.root), "TMPDIR": str(tmp)}
        argv = [sys.executable, "-m", "hpc_sandbox", "serve", "--job-id", self.job_id,
                "--state-dir", str(self.state), "--host", "127.0.0.1", "--slots", str(self.slots),
                "--runtime", self.runtime, "--port-range", f"{free_ports(1, PORTS)[0]}-{PORTS[1]}",
                "--workspace-root", str(self.state / "workspaces"), *self.extra]
        # `python -m` puts its working directory first on sys.path: the code's tree.
        self.proc = self.children.spawn(f"node server {self.code.name}/{self.runtime}", argv,
                                        log_file=self.log_file, cwd=str(self.code.root), env=env)
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in folder.read_records() if r.pid == self.proc.pid]
            if records:
                return endpoint_of(records[0], folder.credentials(), "local")
            if self.proc.poll() is not None:
                raise RuntimeError(f"node server exited with {self.proc.returncode}:\n{Children.tail(self.log_file)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"node server not ready within {timeout:.0f}s:\n{Children.tail(self.log_file)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.children.stop(self.proc)
            self.proc = None


async def start_servers(servers: Sequence[Server]) -> list[Endpoint]:
    # One after another: 2 cores, and each start imports aiohttp and starts agents.
    return [await asyncio.to_thread(s.start) for s in servers]


# --- 1. reset cost ---------------------------------------------------------------------


@dataclass
class ResetSamples:
    release: list[float] = field(default_factory=list)  # seconds
    cycle: list[float] = field(default_factory=list)
    per_round_release: list[float] = field(default_factory=list)  # median of each round
    per_round_cycle: list[float] = field(default_factory=list)
    errors: int = 0


async def reset_cycles(client: NodeClient, cycles: int, samples: ResetSamples) -> None:
    releases, whole = [], []
    for _ in range(cycles):
        t0 = time.perf_counter()
        grant = await client.acquire("clean-bench")
        answer = await client.execute(grant.slot, grant.lease, "bash", {"command": WRITE}, timeout=30)
        t1 = time.perf_counter()
        await client.release(grant.slot, grant.lease, reset_workspace=True)
        t2 = time.perf_counter()
        if not (answer.ok and answer.result.get("exit_code") == 0):
            samples.errors += 1
            if samples.errors <= 3:
                log.warning("write failed: %s", answer)
        releases.append(t2 - t1)
        whole.append(t2 - t0)
    samples.release += releases
    samples.cycle += whole
    samples.per_round_release.append(statistics.median(releases))
    samples.per_round_cycle.append(statistics.median(whole))


async def reset_section(children: Children, work: Path, codes: Sequence[Code], plan: Plan,
                        runtimes: Sequence[str]) -> dict[tuple[str, str], ResetSamples]:
    servers = {(c.name, rt): Server(children, work, c, rt, slots=1) for rt in runtimes for c in codes}
    print(f"\nstarting {len(servers)} node servers (1 slot each) ...", flush=True)
    endpoints = dict(zip(servers, await start_servers(list(servers.values()))))
    clients = {key: NodeClient(ep) for key, ep in endpoints.items()}
    samples = {key: ResetSamples() for key in servers}
    try:
        for key, client in clients.items():  # warm-up: connection, TLS, the agent's first bash
            await reset_cycles(client, 2, ResetSamples())
        for r in range(plan.rounds):
            order = list(codes) if r % 2 == 0 else list(reversed(codes))
            for rt in runtimes:
                for code in order:
                    await reset_cycles(clients[(code.name, rt)], plan.cycles, samples[(code.name, rt)])
            print(f"  round {r + 1}/{plan.rounds} ({' '.join(c.name for c in order)})", flush=True)
    finally:
        for client in clients.values():
            await client.close()
        await asyncio.to_thread(lambda: [s.stop() for s in servers.values()])
    return samples


def report_reset(samples: dict[tuple[str, str], ResetSamples], codes: Sequence[Code], runtimes: Sequence[str],
                 plan: Plan) -> list[dict]:
    print(f"\n1. reset cost: acquire -> bash `{WRITE}` -> release(reset_workspace=True), one slot per server;\n"
          f"   {plan.rounds} rounds x {plan.cycles} cycles per code and runtime, codes alternating (ABAB)")
    print_table_header(f"{'runtime':8s} {'code':5s} {'release p50 ms':>14s} {'p90':>7s} {'cycle p50 ms':>12s} "
                       f"{'p90':>7s} {'n':>4s} {'err':>3s}")
    rows = []
    for rt in runtimes:
        for code in codes:
            s = samples[(code.name, rt)]
            rel, cyc = sorted(s.release), sorted(s.cycle)
            print(f"{rt:8s} {code.name:5s} {percentile(rel, 0.5) * 1e3:14.1f} {percentile(rel, 0.9) * 1e3:7.1f} "
                  f"{percentile(cyc, 0.5) * 1e3:12.1f} {percentile(cyc, 0.9) * 1e3:7.1f} {len(rel):4d} {s.errors:3d}")
            rows.append({"runtime": rt, "code": code.name, "n": len(rel), "errors": s.errors,
                         "release_p50_ms": percentile(rel, 0.5) * 1e3, "release_p90_ms": percentile(rel, 0.9) * 1e3,
                         "cycle_p50_ms": percentile(cyc, 0.5) * 1e3, "cycle_p90_ms": percentile(cyc, 0.9) * 1e3})
    names = [c.name for c in codes]
    if "new" in names and "base" in names:
        for rt in runtimes:
            new, base = samples[("new", rt)], samples[("base", rt)]
            out = {}
            for what in ("release", "cycle"):
                p50 = percentile(sorted(getattr(new, what)), 0.5) / percentile(sorted(getattr(base, what)), 0.5)
                per_round = sorted(a / b for a, b in zip(getattr(new, f"per_round_{what}"),
                                                         getattr(base, f"per_round_{what}")))
                out[what] = {"p50_ratio": p50, "per_round_median": statistics.median(per_round),
                             "per_round_min": per_round[0], "per_round_max": per_round[-1]}
            print(f"  {rt}: new / base  release p50 {out['release']['p50_ratio']:.2f} (per round: median "
                  f"{out['release']['per_round_median']:.2f}, {out['release']['per_round_min']:.2f}-"
                  f"{out['release']['per_round_max']:.2f});  cycle p50 {out['cycle']['p50_ratio']:.2f} (per round: "
                  f"median {out['cycle']['per_round_median']:.2f}, {out['cycle']['per_round_min']:.2f}-"
                  f"{out['cycle']['per_round_max']:.2f})")
            rows.append({"runtime": rt, "ratio_new_over_base": out})
    return rows


# --- 2. fork bomb -----------------------------------------------------------------------


def pids_matching(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds `marker`."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def kill_marked(marker: str, rounds: int = 200) -> int:
    """SIGKILL every process carrying `marker`, again and again while some fork; how
    many were left to kill."""
    killed = 0
    for _ in range(rounds):
        pids = pids_matching(marker)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.05)
    log.warning("processes carrying %s still there after %d kill rounds", marker, rounds)
    return killed


@dataclass
class BombResult:
    runtime: str
    code: str
    answer_s: float
    answer: str  # the call's error kind ("ok" if it succeeded)
    left_at_answer: int  # bomb processes alive when the answer came
    gone_s: float | None  # None: some still there at the deadline
    release_s: float  # the bomb slot's release(reset_workspace=True) after it
    neighbour_calls: int
    neighbour_failed: int
    neighbour_max_s: float
    killed_after: int  # processes the bench had to kill at the end
    peak: int  # processes on the node at most during the bomb, above those before it


def node_processes() -> int:
    """Processes on the node now (a listing of /proc: cheap enough to sample while the
    bomb runs, unlike reading each one)."""
    return sum(1 for entry in os.listdir("/proc") if entry.isdigit())


def settle(timeout: float = 15.0) -> float:
    """Wait until at most 3 tasks are runnable on the node (or `timeout`): a bomb's
    aftermath must not weigh on what comes next. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                if int(line.split()[1]) <= 3:
                    return time.monotonic() - t0
        time.sleep(0.25)
    return time.monotonic() - t0


def bomb_script(marker: str, depth: int) -> str:
    # Each leaf a new session and an orphan (the subshell exits at once): the slot's tree
    # (or its kernel limits) is all it can be found by. The marker is in every process's
    # command line: the leaves' argv[0], and the script text of every bash subshell.
    return (f"b() {{ if [ $1 = 0 ]; then (setsid bash -c 'exec -a {marker} sleep 60' &); else "
            f"b $(($1 - 1)) & b $(($1 - 1)) & wait; fi; }}; b {depth}")


async def fork_bomb(client: NodeClient, runtime: str, code: str, depth: int, deadline_s: float = 30.0) -> BombResult:
    marker = f"hpcsbx-cleanbench-{os.getpid()}-{code}-{runtime}"
    killed = 0
    stop = asyncio.Event()
    loops: list[asyncio.Task] = []
    try:
        bomb = await client.acquire("bomb")
        neighbour = await client.acquire("neighbour")
        for grant in (bomb, neighbour):  # warm: the agents' first bash is not part of it
            await client.execute(grant.slot, grant.lease, "bash", {"command": "true"}, timeout=30)
        calls = failed = 0
        slowest = 0.0

        async def neighbour_loop() -> None:
            nonlocal calls, failed, slowest
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    echo = await client.execute(neighbour.slot, neighbour.lease, "bash", {"command": "echo alive"},
                                                timeout=30)
                    ok = echo.ok and echo.result.get("stdout") == "alive\n"
                except Exception as exc:  # counted as a failure
                    ok = False
                    log.warning("neighbour call raised %s: %s", exc.__class__.__name__, exc)
                calls += 1
                failed += not ok
                slowest = max(slowest, time.monotonic() - t0)
                try:
                    await asyncio.wait_for(stop.wait(), 0.1)
                except asyncio.TimeoutError:
                    pass

        before = node_processes()
        peak = before

        async def count_loop() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, await asyncio.to_thread(node_processes))
                try:
                    await asyncio.wait_for(stop.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass

        started = time.monotonic()
        loops += [asyncio.create_task(neighbour_loop()), asyncio.create_task(count_loop())]
        answer = await client.execute(bomb.slot, bomb.lease, "bash", {"command": bomb_script(marker, depth)},
                                      timeout=deadline_s)
        answer_s = time.monotonic() - started
        kind = "ok" if answer.ok else (answer.error_kind or "?")
        left = len(await asyncio.to_thread(pids_matching, marker))
        gone_s = answer_s if not left else None
        while gone_s is None and time.monotonic() - started < deadline_s:
            await asyncio.sleep(0.1)
            if not await asyncio.to_thread(pids_matching, marker):
                gone_s = time.monotonic() - started
        stop.set()
        await asyncio.gather(*loops)
        t0 = time.monotonic()
        await client.release(bomb.slot, bomb.lease, reset_workspace=True)
        release_s = time.monotonic() - t0
        await client.release(neighbour.slot, neighbour.lease, reset_workspace=True)
    finally:
        stop.set()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        killed = await asyncio.to_thread(kill_marked, marker)
    return BombResult(runtime, code, answer_s, kind, left, gone_s, release_s, calls, failed, slowest, killed,
                      peak - before)


async def bomb_section(children: Children, work: Path, codes: Sequence[Code], runtimes: Sequence[str],
                       depth: int, reps: int) -> list[BombResult]:
    results = []
    for rep, rt in ((rep, rt) for rep in range(reps) for rt in runtimes):
        k = rep + runtimes.index(rt)
        for code in (codes if k % 2 == 0 else list(reversed(codes))):
            waited = await asyncio.to_thread(settle)
            log.info("settled in %.1f s", waited)
            server = Server(children, work, code, rt, slots=2, extra=["--slot-procs", "64"])
            print(f"  fork bomb: {code.name} / {rt} ...", flush=True)
            try:
                endpoint = await asyncio.to_thread(server.start)
                async with NodeClient(endpoint) as client:
                    results.append(await fork_bomb(client, rt, code.name, depth))
            finally:
                await asyncio.to_thread(server.stop)
    return results


def report_bomb(results: list[BombResult], depth: int) -> list[dict]:
    print(f"\n2. fork bomb: binary tree of depth {depth} (<= {2 ** (depth + 1) - 1} processes, setsid leaves), "
          f"--slot-procs 64, 2 slots;\n   the neighbour slot runs `echo alive` every 0.1 s meanwhile")
    print_table_header(f"{'runtime':8s} {'code':5s} {'answer s':>8s} {'answer':16s} {'left':>5s} {'gone s':>7s} "
                       f"{'release s':>9s} {'neighbour ok':>12s} {'slowest s':>9s} {'peak procs':>10s} "
                       f"{'killed by bench':>15s}")
    rows = []
    for r in results:
        gone = f"{r.gone_s:7.2f}" if r.gone_s is not None else "  never"
        print(f"{r.runtime:8s} {r.code:5s} {r.answer_s:8.2f} {r.answer:16s} {r.left_at_answer:5d} {gone} "
              f"{r.release_s:9.2f} {r.neighbour_calls - r.neighbour_failed:5d}/{r.neighbour_calls:<6d} "
              f"{r.neighbour_max_s:9.2f} {r.peak:10d} {r.killed_after:15d}")
        contained = (r.answer == "limit_exceeded" and r.answer_s <= TARGET_CONTAIN and r.gone_s is not None
                     and r.gone_s <= TARGET_CONTAIN and r.neighbour_failed == 0 and r.killed_after == 0)
        rows.append({"runtime": r.runtime, "code": r.code, "answer_s": r.answer_s, "answer": r.answer,
                     "left_at_answer": r.left_at_answer, "gone_s": r.gone_s, "release_after_s": r.release_s,
                     "neighbour_calls": r.neighbour_calls, "neighbour_failed": r.neighbour_failed,
                     "neighbour_slowest_s": r.neighbour_max_s, "killed_by_bench": r.killed_after,
                     "peak_processes": r.peak,
                     "contained": contained})
    print("answer = the bomb call's error kind; left = its processes alive when the answer came; gone = start ->\n"
          "no process of it left; release = the bomb slot's release with reset afterwards; slowest = the\n"
          "neighbour's slowest `echo alive`; peak procs = processes on the node at most (sampled every 0.25 s)\n"
          "above those before; gone 'never' = some still there 30 s after the start; killed by bench = those\n"
          "left after the bomb slot's release, killed by the bench's marker sweep.")
    for row in rows:
        print(f"  target {row['runtime']}/{row['code']}: limit_exceeded, answer and gone <= {TARGET_CONTAIN:.0f} s, "
              f"neighbour never failed: {verdict(row['contained'])}")
    return rows


# --- 3. pool contention -------------------------------------------------------------------


async def pool_contention(work: Path, code: Code, k: int) -> dict:
    """One `pool_bench.py --quick --only contention` of `code`: its own bench/ and, without
    --code-at, the hpc_sandbox beside it (that pool_bench's REPO)."""
    out = work / f"pool-{code.name}-{k}.json"
    bench = await asyncio.to_thread(code.bench_dir)
    argv = [sys.executable, str(bench / "pool_bench.py"), "--quick", "--only", "contention", "--json", str(out)]
    log_file = work / f"pool-{code.name}-{k}.log"
    env = {**os.environ, "PYTHONPATH": str(code.root)}
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL, stdout=open(log_file, "wb"),
                                                stderr=subprocess.STDOUT, cwd=str(code.root), env=env,
                                                start_new_session=True)
    try:
        rc = await proc.wait()
    except asyncio.CancelledError:
        os.killpg(proc.pid, signal.SIGTERM)
        await proc.wait()
        raise
    took = time.monotonic() - t0
    if rc != 0 or not out.exists():
        print(f"  pool_bench ({code.name}) exited with {rc}:\n{Children.tail(log_file, 20)}", file=sys.stderr)
        return {"code": code.name, "rc": rc, "cases": [], "seconds": took}
    cases = json.loads(out.read_text())["contention"]
    return {"code": code.name, "rc": rc, "seconds": took,
            "cases": [{"case": c["case"], "wall_over_ideal": c["wall_over_ideal"], "mean_cycle_s": c["mean_cycle_s"],
                       "mean_release_s": c["mean_release_s"], "errors": c["errors"]} for c in cases]}


def report_pool(runs: list[dict]) -> dict:
    print("\n3. pool contention: pool_bench.py --quick --only contention (runtime none, HTTPS; acquire -> "
          "sleep 0.5 -> release with reset)")
    print_table_header(f"{'code':5s} {'case':32s} {'wall/ideal':>10s} {'cycle s':>8s} {'release ms':>10s} {'err':>3s}")
    worst: dict[str, float] = {}
    for run in runs:
        for c in run["cases"]:
            print(f"{run['code']:5s} {c['case']:32s} {c['wall_over_ideal']:10.2f} {c['mean_cycle_s']:8.3f} "
                  f"{c['mean_release_s'] * 1e3:10.1f} {c['errors']:3d}")
            worst[run["code"]] = max(worst.get(run["code"], 0.0), c["wall_over_ideal"])
        if not run["cases"]:
            print(f"{run['code']:5s} (failed, exit {run['rc']})")
    for code, value in worst.items():
        print(f"  target {code}: wall <= {TARGET_WALL} x ideal (worst case): {value:.2f} "
              f"{verdict(value <= TARGET_WALL)}")
    ratios = {}
    cases = sorted({c["case"] for run in runs for c in run["cases"]}, key=lambda c: int(c.split()[0]))
    for case in cases:
        of = {code: [c for run in runs if run["code"] == code for c in run["cases"] if c["case"] == case]
              for code in ("new", "base")}
        if of["new"] and of["base"]:
            med = {code: (statistics.median(c["wall_over_ideal"] for c in cs),
                          statistics.median(c["mean_release_s"] for c in cs)) for code, cs in of.items()}
            ratios[case] = {"wall_over_ideal_median": {k: v[0] for k, v in med.items()},
                            "new_over_base_wall": med["new"][0] / med["base"][0],
                            "release_ms_median": {k: v[1] * 1e3 for k, v in med.items()},
                            "new_over_base_release": med["new"][1] / med["base"][1]}
            print(f"  {case}: median wall/ideal new {med['new'][0]:.2f}, base {med['base'][0]:.2f} (new / base "
                  f"{med['new'][0] / med['base'][0]:.2f}); release in the cycle new {med['new'][1] * 1e3:.0f} ms, "
                  f"base {med['base'][1] * 1e3:.0f} ms ({med['new'][1] / med['base'][1]:.2f}x)")
    return {"runs": runs, "worst_wall_over_ideal": worst, "new_over_base": ratios}


# --- the run -------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="hpc-sandbox-clean-bench-"))
    base_root, base_note = choose_code(["--code-at", args.base], "clean-bench-base")
    new = Code("new", CODE_ROOT, CODE_NOTE, args.code_at)
    base = Code("base", base_root, base_note, args.base)
    codes = [new, base]
    runtimes = [rt for rt in RUNTIMES if rt != "bwrap" or shutil.which("bwrap")]
    # A reset under runtime none and the watchdog read every process of the node: their
    # cost follows how many there are.
    env = environment(CODE_ROOT, CODE_NOTE, {"base": base_note, "kernel": os.uname().release,
                                             "user": f"uid {os.getuid()}", "processes": str(node_processes())})
    print("clean-release benchmark" + (" (--quick)" if args.quick else ""))
    for key, value in env.items():
        print(f"  {key:13s} {value}")
    if "bwrap" not in runtimes:
        print("  (bwrap not found: runtime none only)")
    summary: dict = {"environment": env, "quick": args.quick}
    sections = args.only or ["reset", "contention", "bomb"]
    started = time.monotonic()
    failures = 0
    try:
        if "reset" in sections:
            samples = await reset_section(children, work, codes, plan, runtimes)
            summary["reset"] = report_reset(samples, codes, runtimes, plan)
            failures += sum(s.errors for s in samples.values())
        if "contention" in sections:
            print("\npool_bench contention runs ...", flush=True)
            runs = []
            for k in range(plan.pool_runs):
                for code in (codes if k % 2 == 0 else list(reversed(codes))):
                    print(f"  {code.name} ...", flush=True)
                    runs.append(await pool_contention(work, code, k))
            summary["contention"] = report_pool(runs)
            failures += sum(1 for r in runs if r["rc"] != 0)
        if "bomb" in sections:
            print(f"\nfork bombs, depth {plan.bomb_depth} (last: their aftermath must not weigh on the rest) ...",
                  flush=True)
            bomb_codes = codes if args.bomb_base else [new]
            results = await bomb_section(children, work, bomb_codes, runtimes, plan.bomb_depth, plan.bomb_reps)
            summary["bomb"] = report_bomb(results, plan.bomb_depth)
        took = time.monotonic() - started
        print(f"\n  took {took:.0f} s; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at end)")
        summary["seconds"] = took
        if args.json:
            (STARTED_IN / args.json).write_text(json.dumps(summary, indent=2))
        if failures:
            print(f"\n{failures} failures (see above): figures not trustworthy", file=sys.stderr)
            return 1
        return 0
    finally:
        await asyncio.to_thread(children.stop_all)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and cycles, 2 pool_bench runs per code, 1 bomb per code and runtime")
    parser.add_argument("--only", action="append", choices=["reset", "bomb", "contention"],
                        help="run only this section (repeatable)")
    add_code_options(parser)
    parser.add_argument("--base", default=BASE_DEFAULT, metavar="REV",
                        help=f"the code to compare with (default {BASE_DEFAULT}, before the clean release)")
    parser.add_argument("--bomb-base", action="store_true",
                        help="also set the fork bomb off on BASE (issue 17 saw it contained after 7-10 s under "
                             "runtime none, "
                             "starving the machine meanwhile; off by default)")
    parser.add_argument("--bomb-depth", type=int, default=12, choices=range(1, 13), metavar="1-12",
                        help="depth of the bounded fork bomb's binary tree (default 12: <= 8191 processes)")
    return parse_and_run(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
