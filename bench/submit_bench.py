#!/usr/bin/env python3
"""Submit benchmark: submit -> first usable slot through `hpc-sandbox submit --wait`
on the local Slurm cluster, against a bare `sbatch` of a one-line script that writes
a file, in one run, on the same cluster.

    python bench/submit_bench.py              # 5 repetitions of each case, a few minutes
    python bench/submit_bench.py --quick      # 2 repetitions, about a minute
    python bench/submit_bench.py --reps 10 --cases array --json-out runs.json

Needs the cluster running (`bash slurm/start.sh`). Every time is wall-clock seconds
from t0, the moment just before the benchmark starts the first process of the
variant (`hpc-sandbox submit` or `sbatch`).

Cases and variants (all interleaved within each repetition, the order alternating
from one repetition to the next, so drift in the machine's speed hits all of them):

single  one job, one node server with one slot (`--slots 1 --runtime none`)
  bare        `sbatch` of `printf "$EPOCHREALTIME" > FILE` (same partition, --time,
              --nodes/--ntasks as hpc-sandbox renders); timed until FILE exists,
              polled every 10 ms.
  hpc         `hpc-sandbox submit --scheduler slurm --partition P --slots 1
              --runtime none --wait --json`; then, in this (already warm) Python
              process, `connect.from_state_dir(state, [job])`, `acquire()` and
              `execute(slot, "bash", {"command": "true"})` with exit code 0.
              FIRST USABLE SLOT = that execute has returned exit code 0.
              Also timed on its own afterwards: `hpc-sandbox exec --job JOB -- true`
              (a cold CLI process doing the same), and `hpc-sandbox cancel JOB`.
  hpc-nowait  the same submit without --wait (returns once sbatch has), then the
              same pool acquire+execute at once: the pool's own discovery polling.

array   one array job of 16 tasks, one node server each (`--array 16 --slots 1`)
  bare        `sbatch --array=0-15` of the same one-line script (one file per task);
              times until the first and until all 16 files exist.
  hpc         `hpc-sandbox submit --scheduler slurm --array 16 --slots 1 ... --wait`:
              ALL READY = the CLI has returned (every node server answered its probe).
              FIRST USABLE SLOT = alongside it, as soon as the job's job.json exists
              (i.e. when a submit without --wait would have printed the id), this
              process starts a pool for the job and runs acquire()+execute("true");
              the time that returns exit code 0 (the pool polls as shipped).

Where the time goes (the breakdown table): timestamps the job leaves behind, all on
this machine's clock: the token file's mtime (the CLI is up and has read its config),
the rendered script's mtime, `submit/scheduler-ids` (sbatch returned), a
`printf "$EPOCHREALTIME"` setup line added through a `--config` profile (the batch
script started; a bash builtin, no process), the node server log's first line (the
`runtime none` warning: Python started, hpc_sandbox imported, options parsed, port
bound), and the ready record's `started_at` (slot agents started, HTTP site up).

Each variant uses a fresh 64-port range (from --port-base), a temporary state dir
(HPC_SANDBOX_STATE_DIR), and waits until the node has none of this benchmark's jobs
left (and, up to --idle-wait seconds, none of anyone else's), then pauses --gap plus a
random 0-1 s (Slurm starts jobs from a 1-second loop: without it, every run would
submit at the same phase of that loop and all bare runs could look 0.4 s faster or
slower than they are) before it starts. Every
job it submits is cancelled (`hpc-sandbox cancel`, then `scancel` of every Slurm id
it saw) at the end of each variant, on error, and on Ctrl-C/SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import percentile  # noqa: E402

from hpc_sandbox import connect  # noqa: E402

log = logging.getLogger("bench.submit")

ARRAY_TASKS = 16
PORT_BLOCK = 64  # the default port range's size; one block per variant run
PORT_BLOCKS = 16  # --port-base .. --port-base + 1023, reused round-robin
FILE_POLL = 0.010  # seconds between filesystem polls
SUBMIT_TIMEOUT = 300.0
PROFILE = "bench-submit"
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


class BenchError(Exception):
    pass


# --- small helpers ---------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    return percentile(sorted(v for v in values if v is not None), q)


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def read_float(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def first_log_time(path: Path) -> float | None:
    """Wall-clock time of the first timestamped line of a node server log."""
    try:
        with open(path, errors="replace") as handle:
            for line in handle:
                match = _LOG_TIME.match(line)
                if match:
                    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")
                    return stamp.timestamp() + int(match.group(2)) / 1000.0
    except OSError:
        pass
    return None


def run(argv: list[str], timeout: float = 60.0, env: dict | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])}... failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    return proc.stdout


def active_jobs() -> list[tuple[str, str, str]]:
    """(array-or-job id, job id, state) of every job squeue still shows (not finished)."""
    out = run(["squeue", "-h", "-o", "%F|%i|%T"], timeout=30)
    rows = []
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


@dataclass
class Sample:
    case: str
    variant: str
    rep: int
    t: dict[str, float] = field(default_factory=dict)  # seconds from t0 (or a duration, see DURATIONS)
    foreign_jobs: int = 0  # other people's jobs squeue showed at the start
    load1: float = 0.0
    ok: bool = True
    error: str = ""


# --- the benchmark ---------------------------------------------------------------------


class SubmitBench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.state = work / "state"
        self.marks = work / "marks"
        self.state.mkdir(parents=True)
        self.marks.mkdir()
        self.cfg = work / "bench-config.yaml"
        mark = f"{self.marks}/hpc." + "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}.${SLURM_ARRAY_TASK_ID:-0}"
        self.cfg.write_text(json.dumps({"profiles": {PROFILE: {
            "setup_lines": [f"printf '%s\\n' \"$EPOCHREALTIME\" > {mark}"]}}}, indent=2) + "\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("HPC_SANDBOX_")}
        dropped = sorted(k for k in os.environ if k.startswith("HPC_SANDBOX_"))
        if dropped:
            log.info("not passing %s to hpc-sandbox", ", ".join(dropped))
        self.env["HPC_SANDBOX_STATE_DIR"] = str(self.state)
        self.cli = self._find_cli()
        self.block = 0
        self.bare_ids: set[str] = set()  # every Slurm id this benchmark submitted or saw
        self.hpc_jobs: set[str] = set()
        self.children: set[asyncio.subprocess.Process] = set()

    def _find_cli(self) -> list[str]:
        if self.args.cli:
            return self.args.cli.split()
        beside = Path(sys.executable).parent / "hpc-sandbox"
        if beside.is_file():
            return [str(beside)]
        found = shutil.which("hpc-sandbox")
        if found:
            return [found]
        return [sys.executable, "-m", "hpc_sandbox"]

    def port_range(self) -> str:
        lo = self.args.port_base + (self.block % PORT_BLOCKS) * PORT_BLOCK
        self.block += 1
        return f"{lo}-{lo + PORT_BLOCK - 1}"

    # --- cluster state -----------------------------------------------------------

    def ours(self) -> set[str]:
        ids = set(self.bare_ids)
        for job in self.state_jobs():
            ids.update(self.scheduler_ids(job))
        return ids

    def state_jobs(self) -> list[str]:
        folder = self.state / "jobs"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def scheduler_ids(self, job: str) -> list[str]:
        path = self.state / "jobs" / job / "submit" / "scheduler-ids"
        try:
            ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError:
            return []
        self.bare_ids.update(ids)  # remembered: the folder goes away at cancel
        return ids

    async def settle(self) -> tuple[int, float]:
        """Wait until none of our jobs is left on the node, then (up to --idle-wait) until
        nobody else's is; return how many foreign jobs were still there, and the load."""
        ours = self.ours()
        deadline = time.monotonic() + 60
        while True:
            rows = await asyncio.to_thread(active_jobs)
            mine = [r for r in rows if r[0] in ours]
            if not mine:
                break
            if time.monotonic() > deadline:
                log.warning("our jobs still in squeue after 60s: %s; going on", mine[:5])
                break
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + self.args.idle_wait
        foreign = [r for r in rows if r[0] not in ours]
        waited = False
        while foreign and time.monotonic() < deadline:
            if not waited:
                log.info("waiting up to %.0fs for %d other job(s) to leave the node", self.args.idle_wait,
                         len(foreign))
                waited = True
            await asyncio.sleep(1.0)
            foreign = [r for r in await asyncio.to_thread(active_jobs) if r[0] not in ours]
        if foreign:
            log.info("going on with %d other job(s) on the node: %s", len(foreign),
                     " ".join(f"{r[1]}:{r[2]}" for r in foreign[:8]))
        # A random pause: Slurm starts jobs from a 1-second loop, and a start that is in
        # step with the previous job's end would catch it at the same phase every time.
        await asyncio.sleep(self.args.gap + random.uniform(0.0, 1.0))
        return len(foreign), os.getloadavg()[0]

    # --- processes ---------------------------------------------------------------

    async def spawn(self, argv: list[str]) -> asyncio.subprocess.Process:
        log.debug("running %s", " ".join(argv))
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=self.env)
        self.children.add(proc)
        return proc

    async def finish(self, proc: asyncio.subprocess.Process, timeout: float) -> tuple[int, str, str]:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            self.children.discard(proc)
        return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")

    async def wait_for_file(self, path: Path, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise BenchError(f"{path} did not appear within {timeout:.0f}s")
            await asyncio.sleep(FILE_POLL)
        return time.time()

    async def wait_for_job(self, before: set[str], timeout: float) -> str:
        """The id of the job folder that appears in the state dir (and has job.json)."""
        deadline = time.monotonic() + timeout
        while True:
            for job in set(self.state_jobs()) - before:
                if (self.state / "jobs" / job / "job.json").exists():
                    self.hpc_jobs.add(job)
                    self.scheduler_ids(job)
                    return job
            if time.monotonic() > deadline:
                raise BenchError(f"no new job folder in {self.state / 'jobs'} within {timeout:.0f}s")
            await asyncio.sleep(FILE_POLL)

    async def first_usable(self, job: str) -> tuple[float, float]:
        """Pool for the job, acquire + execute('true'); (time acquired, time executed)."""
        async with connect.from_state_dir(self.state, [job], acquire_timeout=SUBMIT_TIMEOUT) as pool:
            slot = await pool.acquire(trajectory_id="submit-bench")
            t_acquired = time.time()
            result = await pool.execute(slot, "bash", {"command": "true"}, timeout=60)
            t_done = time.time()
            if result.exit_code != 0:
                raise BenchError(f"`true` in {slot.id} did not exit 0: {result}")
            await pool.release(slot)
        return t_acquired, t_done

    # --- bare sbatch ---------------------------------------------------------------

    async def bare(self, case: str, rep: int) -> Sample:
        tasks = ARRAY_TASKS if case == "array" else 1
        folder = self.work / f"bare-{case}-{rep}"
        folder.mkdir()
        script = folder / "job.sh"
        script.write_text("#!/bin/bash\n"
                          f"printf '%s\\n' \"$EPOCHREALTIME\" > {folder}/done.${{SLURM_ARRAY_TASK_ID:-0}}\n")
        argv = ["sbatch", "--parsable", f"--partition={self.args.partition}", "--job-name=bench-bare",
                "--nodes=1", "--ntasks=1", "--time=01:00:00"]
        if case == "array":
            argv += [f"--array=0-{tasks - 1}", f"--output={folder}/slurm-%A_%a.out"]
        else:
            argv += [f"--output={folder}/slurm-%j.out"]
        argv.append(str(script))
        sample = Sample(case, "bare", rep)
        sample.foreign_jobs, sample.load1 = await self.settle()
        t0 = time.time()
        proc = await self.spawn(argv)
        code, out, err = await self.finish(proc, 60)
        t_sbatch = time.time()
        if code != 0:
            raise BenchError(f"sbatch failed (exit {code}): {err.strip()}")
        sid = out.strip().split(";")[0]
        self.bare_ids.add(sid)
        files = [folder / f"done.{i}" for i in range(tasks)]
        seen: dict[int, float] = {}
        deadline = time.monotonic() + SUBMIT_TIMEOUT
        while len(seen) < tasks:
            now = time.time()
            for i, path in enumerate(files):
                if i not in seen and path.exists():
                    seen[i] = now
            if len(seen) < tasks:
                if time.monotonic() > deadline:
                    raise BenchError(f"bare job {sid}: {len(seen)} of {tasks} files after {SUBMIT_TIMEOUT:.0f}s")
                await asyncio.sleep(FILE_POLL)
        starts = [read_float(p) for p in files]
        starts = [s for s in starts if s is not None]
        sample.t = {"sbatch": t_sbatch - t0, "first_file": min(seen.values()) - t0,
                    "all_files": max(seen.values()) - t0}
        if starts:
            sample.t["first_start"] = min(starts) - t0
            sample.t["last_start"] = max(starts) - t0
        run(["scancel", sid], check=False)  # finished already; harmless
        return sample

    # --- hpc-sandbox -----------------------------------------------------------------

    def submit_argv(self, case: str, wait: bool) -> list[str]:
        argv = [*self.cli, "submit", "--scheduler", "slurm", "--partition", self.args.partition,
                "--slots", "1", "--runtime", "none", "--port-range", self.port_range(),
                "--config", str(self.cfg), "--profile", PROFILE, "--json"]
        if case == "array":
            argv += ["--array", str(ARRAY_TASKS)]
        if wait:
            argv += ["--wait", "--wait-timeout", str(int(SUBMIT_TIMEOUT))]
        return argv

    async def hpc(self, case: str, variant: str, rep: int) -> Sample:
        wait = variant == "hpc"
        argv = self.submit_argv(case, wait)
        sample = Sample(case, variant, rep)
        sample.foreign_jobs, sample.load1 = await self.settle()
        before = set(self.state_jobs())
        job: str | None = None
        usable: asyncio.Task | None = None
        t0 = time.time()
        proc = await self.spawn(argv)
        try:
            watcher = asyncio.create_task(self.wait_for_job(before, SUBMIT_TIMEOUT))
            if case == "array":
                usable = asyncio.create_task(self._usable_when_submitted(watcher))
            code, out, err = await self.finish(proc, SUBMIT_TIMEOUT + 60)
            t_cli = time.time()
            if code != 0:
                watcher.cancel()
                raise BenchError(f"hpc-sandbox submit failed (exit {code}): {err.strip()[-600:]}")
            job = json.loads(out)["job_id"]
            self.hpc_jobs.add(job)
            self.scheduler_ids(job)
            if not watcher.done():
                watcher.cancel()
            sample.t["cli_exit"] = t_cli - t0
            self._phases(job, t0, sample)  # before cancel removes the folder
            if usable is not None:
                t_acq, t_exec = await asyncio.wait_for(usable, SUBMIT_TIMEOUT)
                sample.t["usable_acquired"] = t_acq - t0
                sample.t["usable"] = t_exec - t0
            else:
                t_acq, t_exec = await self.first_usable(job)
                sample.t["usable_acquired"] = t_acq - t0
                sample.t["usable"] = t_exec - t0
                self._phases(job, t0, sample)  # nowait: the record exists only now
            if case == "single" and wait:
                ts = time.time()
                proc = await self.spawn([*self.cli, "exec", "--job", job, "--", "true"])
                code, _, err = await self.finish(proc, 120)
                if code != 0:
                    log.warning("hpc-sandbox exec -- true: exit %d: %s", code, err.strip()[-300:])
                else:
                    sample.t["exec_cli_duration"] = time.time() - ts
        finally:
            if usable is not None and not usable.done():
                usable.cancel()
            if job is not None:
                ts = time.time()
                await asyncio.to_thread(self.cancel_job, job)
                sample.t["cancel_cli_duration"] = time.time() - ts
        return sample

    async def _usable_when_submitted(self, watcher: asyncio.Task) -> tuple[float, float]:
        job = await watcher
        return await self.first_usable(job)

    def _phases(self, job: str, t0: float, sample: Sample) -> None:
        folder = self.state / "jobs" / job
        ids = self.scheduler_ids(job)
        got = {
            "token": mtime(folder / "token"),
            "rendered": max((m for m in (mtime(p) for p in (folder / "submit").glob("*.sbatch")) if m), default=None),
            "sbatch_returned": mtime(folder / "submit" / "scheduler-ids"),
        }
        starts = [s for s in (read_float(p) for sid in ids for p in self.marks.glob(f"hpc.{sid}.*")) if s]
        if starts:
            got["first_start"], got["last_start"] = min(starts), max(starts)
        logs = [t for t in (first_log_time(p) for p in (folder / "logs").glob("*.out")) if t]
        if logs:
            got["first_server_log"] = min(logs)
        records = []
        for path in (folder / "servers").glob("*.json"):
            try:
                records.append(float(json.loads(path.read_text())["started_at"]))
            except (OSError, ValueError, KeyError):
                pass
        if records:
            got["first_ready"], got["last_ready"] = min(records), max(records)
            got["ready_count"] = len(records)
        for name, value in got.items():
            if value is None:
                continue
            sample.t[name] = value if name == "ready_count" else value - t0

    def cancel_job(self, job: str) -> None:
        ids = self.scheduler_ids(job)
        try:
            run([*self.cli, "cancel", job], timeout=120, env=self.env)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            log.warning("hpc-sandbox cancel %s: %s", job, exc)
        if ids:
            run(["scancel", *ids], check=False)
        self.hpc_jobs.discard(job)

    # --- cleanup -------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop every child, cancel every job this benchmark started; never raises."""
        for proc in list(self.children):
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
        for job in set(self.state_jobs()) | set(self.hpc_jobs):
            log.info("cancelling leftover job %s", job)
            try:
                self.cancel_job(job)
            except Exception as exc:  # keep going: scancel below catches the rest
                log.warning("cancel %s: %s", job, exc)
        if self.bare_ids:
            try:
                run(["scancel", *sorted(self.bare_ids)], check=False, timeout=60)
            except Exception as exc:
                log.warning("scancel %s: %s", " ".join(sorted(self.bare_ids)), exc)

    # --- the run -------------------------------------------------------------------

    async def main(self) -> list[Sample]:
        samples: list[Sample] = []
        plan = {"single": ["bare", "hpc", "hpc-nowait"], "array": ["bare", "hpc"]}
        for rep in range(self.args.reps):
            for case in self.args.cases:
                variants = plan[case] if rep % 2 == 0 else plan[case][::-1]
                for variant in variants:
                    log.info("rep %d/%d: %s %s", rep + 1, self.args.reps, case, variant)
                    try:
                        if variant == "bare":
                            sample = await self.bare(case, rep)
                        else:
                            sample = await self.hpc(case, variant, rep)
                    except (BenchError, asyncio.TimeoutError, subprocess.TimeoutExpired) as exc:
                        log.error("rep %d %s %s failed: %s", rep + 1, case, variant, exc)
                        sample = Sample(case, variant, rep, ok=False, error=str(exc))
                    samples.append(sample)
                    log.info("  %s", " ".join(f"{k}={v:.3f}" for k, v in sample.t.items()))
        return samples


# --- the report ------------------------------------------------------------------------

ROWS = {
    "single": [
        ("bare", "sbatch", "bare sbatch: sbatch returned"),
        ("bare", "first_start", "bare sbatch: job script started"),
        ("bare", "first_file", "bare sbatch: file seen (= first usable)"),
        ("hpc", "token", "hpc --wait: CLI up, config read (token written)"),
        ("hpc", "sbatch_returned", "hpc --wait: sbatch returned"),
        ("hpc", "first_start", "hpc --wait: job script started"),
        ("hpc", "first_server_log", "hpc --wait: node server's first log line"),
        ("hpc", "first_ready", "hpc --wait: node server ready (record)"),
        ("hpc", "cli_exit", "hpc --wait: `submit --wait` returned"),
        ("hpc", "usable", "hpc --wait: FIRST USABLE SLOT (then pool)"),
        ("hpc-nowait", "cli_exit", "hpc no-wait: `submit` returned"),
        ("hpc-nowait", "first_ready", "hpc no-wait: node server ready (record)"),
        ("hpc-nowait", "usable", "hpc no-wait: FIRST USABLE SLOT (pool polls)"),
    ],
    "array": [
        ("bare", "sbatch", "bare sbatch: sbatch returned"),
        ("bare", "first_file", "bare sbatch: FIRST file seen"),
        ("bare", "last_start", "bare sbatch: last task started"),
        ("bare", "all_files", "bare sbatch: ALL 16 files seen"),
        ("hpc", "sbatch_returned", "hpc: sbatch returned"),
        ("hpc", "first_start", "hpc: first task started"),
        ("hpc", "first_ready", "hpc: first node server ready (record)"),
        ("hpc", "usable", "hpc: FIRST USABLE SLOT (pool alongside)"),
        ("hpc", "last_start", "hpc: last task started"),
        ("hpc", "last_ready", "hpc: last node server ready (record)"),
        ("hpc", "cli_exit", "hpc: ALL 16 READY (`submit --wait` returned)"),
    ],
}
RATIOS = {
    "single": [("first usable slot: hpc --wait + pool / bare file", ("hpc", "usable"), ("bare", "first_file")),
               ("`submit --wait` returned / bare file", ("hpc", "cli_exit"), ("bare", "first_file")),
               ("first usable slot: hpc no-wait + pool / bare file", ("hpc-nowait", "usable"),
                ("bare", "first_file"))],
    "array": [("all 16 ready: `submit --wait` / bare all 16 files", ("hpc", "cli_exit"), ("bare", "all_files")),
              ("first usable slot: hpc pool / bare first file", ("hpc", "usable"), ("bare", "first_file")),
              ("first node server ready / bare first file", ("hpc", "first_ready"), ("bare", "first_file"))],
}
# Phases of one hpc-sandbox submit, as differences of the timestamps above.
PHASES = {
    "single": [
        ("CLI start-up: exec, Python, imports, config", "hpc", None, "token"),
        ("render + write the script", "hpc", "token", "rendered"),
        ("sbatch", "hpc", "rendered", "sbatch_returned"),
        ("Slurm: sbatch returned -> script starts", "hpc", "sbatch_returned", "first_start"),
        ("srun step + Python + imports -> first log line", "hpc", "first_start", "first_server_log"),
        ("slot agent start + HTTP site -> record", "hpc", "first_server_log", "first_ready"),
        ("--wait notices the record and exits", "hpc", "first_ready", "cli_exit"),
        ("pool start + acquire + execute('true')", "hpc", "cli_exit", "usable"),
        ("(bare) sbatch", "bare", None, "sbatch"),
        ("(bare) Slurm: sbatch returned -> script starts", "bare", "sbatch", "first_start"),
        ("(bare) script start -> file seen", "bare", "first_start", "first_file"),
        ("(no-wait) record -> pool's execute returned", "hpc-nowait", "first_ready", "usable"),
    ],
    "array": [
        ("CLI start-up: exec, Python, imports, config", "hpc", None, "token"),
        ("render + write + sbatch", "hpc", "token", "sbatch_returned"),
        ("Slurm: sbatch returned -> first task starts", "hpc", "sbatch_returned", "first_start"),
        ("Slurm: first -> last task starts", "hpc", "first_start", "last_start"),
        ("last task start -> last record", "hpc", "last_start", "last_ready"),
        ("first record -> pool's execute returned", "hpc", "first_ready", "usable"),
        ("last record -> --wait exits", "hpc", "last_ready", "cli_exit"),
        ("(bare) Slurm: sbatch returned -> first task starts", "bare", "sbatch", "first_start"),
        ("(bare) Slurm: first -> last task starts", "bare", "first_start", "last_start"),
    ],
}


def values(samples: list[Sample], case: str, variant: str, key: str) -> list[float]:
    return [s.t[key] for s in samples if s.ok and s.case == case and s.variant == variant and key in s.t]


def fmt(x: float) -> str:
    return "   -  " if x != x else f"{x:6.3f}"


def report(samples: list[Sample], args: argparse.Namespace, cli: list[str]) -> str:
    out = [f"submit -> first usable slot, Slurm partition {args.partition}, {args.reps} repetition(s), "
           f"seconds from t0 (just before `hpc-sandbox submit` / `sbatch` is started)",
           f"hpc-sandbox CLI: {' '.join(cli)}"]
    failed = [s for s in samples if not s.ok]
    for case in args.cases:
        title = ("single job: 1 node server, 1 slot" if case == "single"
                 else f"array job: {ARRAY_TASKS} tasks, 1 node server with 1 slot each")
        mine = [s for s in samples if s.case == case]
        foreign = [s.foreign_jobs for s in mine]
        loads = [s.load1 for s in mine]
        out += ["", f"== {title} ==",
                f"(other users' jobs on the node at start: {min(foreign, default=0)}-{max(foreign, default=0)}; "
                f"1-min load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f} on {os.cpu_count()} CPUs)",
                f"{'':52} {'p50':>6} {'min':>6} {'max':>6}  n"]
        for variant, key, label in ROWS[case]:
            vals = values(samples, case, variant, key)
            if vals:
                out.append(f"{label:52} {fmt(pct(vals, .5))} {fmt(min(vals))} {fmt(max(vals))}  {len(vals)}")
        out += ["", f"{'ratio (hpc-sandbox / bare sbatch)':52} {'p50s':>6} {'perrep':>6} {'min':>6} {'max':>6}"]
        for label, (va, ka), (vb, kb) in RATIOS[case]:
            a, b = values(samples, case, va, ka), values(samples, case, vb, kb)
            per_rep = []
            for rep in range(args.reps):
                ra = [s.t[ka] for s in mine if s.ok and s.variant == va and s.rep == rep and ka in s.t]
                rb = [s.t[kb] for s in mine if s.ok and s.variant == vb and s.rep == rep and kb in s.t]
                if ra and rb and rb[0] > 0:
                    per_rep.append(ra[0] / rb[0])
            if a and b:
                out.append(f"{label:52} {pct(a, .5) / pct(b, .5):6.2f} {pct(per_rep, .5):6.2f} "
                           f"{min(per_rep, default=float('nan')):6.2f} {max(per_rep, default=float('nan')):6.2f}")
        out += ["", f"{'where the time goes (p50 of each phase, seconds)':52} {'p50':>6} {'min':>6} {'max':>6}"]
        for label, variant, start, end in PHASES[case]:
            diffs = [s.t[end] - (s.t[start] if start else 0.0) for s in mine
                     if s.ok and s.variant == variant and end in s.t and (start is None or start in s.t)]
            if diffs:
                out.append(f"{label:52} {fmt(pct(diffs, .5))} {fmt(min(diffs))} {fmt(max(diffs))}")
        if case == "single":
            for key, label in (("exec_cli_duration", "`hpc-sandbox exec -- true` alone (cold CLI)"),
                               ("cancel_cli_duration", "`hpc-sandbox cancel JOB` alone")):
                vals = values(samples, case, "hpc", key)
                if vals:
                    out.append(f"{label:52} {fmt(pct(vals, .5))} {fmt(min(vals))} {fmt(max(vals))}")
    if failed:
        out += ["", f"{len(failed)} run(s) failed (left out above):"]
        out += [f"  rep {s.rep + 1} {s.case} {s.variant}: {s.error}" for s in failed]
    return "\n".join(out)


# --- entry point -----------------------------------------------------------------------


def preflight(partition: str) -> None:
    try:
        out = run(["sinfo", "-h", "-p", partition, "-o", "%a %T"], timeout=20)
    except (BenchError, FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise SystemExit(f"submit_bench: the Slurm cluster does not answer ({exc}); start it: bash slurm/start.sh")
    if not out.strip():
        raise SystemExit(f"submit_bench: no partition {partition!r} (sinfo shows nothing)")
    log.info("partition %s: %s", partition, " ".join(out.split()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each variant [5]")
    parser.add_argument("--quick", action="store_true", help="2 repetitions")
    parser.add_argument("--cases", default="single,array", help="comma-separated: single, array [both]")
    parser.add_argument("--partition", default="debug")
    parser.add_argument("--port-base", type=int, default=23000,
                        help=f"first port of the {PORT_BLOCKS} blocks of {PORT_BLOCK} ports the node servers use")
    parser.add_argument("--idle-wait", type=float, default=20.0,
                        help="seconds to wait, before each run, for other users' jobs to leave the node [20]")
    parser.add_argument("--gap", type=float, default=0.5,
                        help="pause before each run, seconds, plus a random 0-1 s [0.5]")
    parser.add_argument("--cli", default=None, help="the hpc-sandbox command [the console script of this Python]")
    parser.add_argument("--json-out", type=Path, default=None, help="also write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (state dir, marks, logs)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 2
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not set(args.cases) <= {"single", "array"} or args.reps < 1:
        parser.error("--cases takes single and/or array; --reps at least 1")
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose + 1, 2),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.verbose < 2:
        logging.getLogger("hpc_sandbox").setLevel(logging.WARNING)
    preflight(args.partition)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    work = Path(tempfile.mkdtemp(prefix="hpc-sandbox-submit-bench-"))
    bench = SubmitBench(args, work)
    log.info("work dir %s; hpc-sandbox CLI: %s", work, " ".join(bench.cli))
    samples: list[Sample] = []
    try:
        samples = asyncio.run(bench.main())
    except KeyboardInterrupt:
        log.error("interrupted; cancelling every job this benchmark submitted")
        return 130
    finally:
        bench.cleanup()
        if args.keep:
            log.warning("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(report(samples, args, bench.cli))
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(s) for s in samples], indent=1) + "\n")
    return 0 if all(s.ok for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
