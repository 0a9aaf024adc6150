#!/usr/bin/env python3
"""Cloud overflow benchmark (issue 11): a SlotPool bursting to Modal, AGAINST THE MODAL SDK DOUBLE.

    python bench/burst_bench.py                   # ~1.5 min, this working tree's hpc_sandbox/
    python bench/burst_bench.py --code-at HEAD    # a commit's hpc_sandbox/ (others' edits in progress aside)
    python bench/burst_bench.py -v --json F       # log every sandbox's steps; every figure to F

Modal cannot be reached from here: `import modal` is the tests' double
(tests/doubles/modal), which starts each "sandbox" as a real local node server
(`python -m hpc_sandbox.burst.entry`, the sandbox's own entry point) behind a real TLS
tunnel on 127.0.0.1. The cluster is one real node server (`hpc-sandbox serve --runtime
none`, HTTPS with the job's pinned certificate) with C slots, found by a ClusterSource
over its state dir, as `connect.from_state_dir(..., overflow=ModalSource(...))` sets it up.

1. sandboxes per cloud slot   C=4 cluster slots, N=28 trajectories, slots_per_sandbox S=4,
                              burst_after 1 s; every trajectory: acquire -> bash `sleep
                              12` -> release. (a) all arrive at once, (b) one every 0.1 s.
                              The cluster holders outlast the bursts, so no slot serves two
                              trajectories: sandboxes created / cloud slots handed out,
                              target exactly 1/S; the first burst decision, Sandbox.create
                              call and return after the first arrival, target >=
                              burst_after; cloud slots handed out before the caller's own
                              deadline (arrival + burst_after).
2. deadline -> cloud slot     per cloud-served trajectory of 1a, 1b and 2c: (acquire
                              returned) - max(its deadline, its sandbox ready), the pool's
                              own latency, target <= 0.3 s. "Ready" is when the sandbox can
                              serve: Modal's TCP readiness probe passed (wait_until_ready
                              returned) and the node server inside logged "ready:" (the
                              probe passes as soon as the server has bound its port, before
                              its slot agents run). Labelled apart: acquire returned -
                              deadline, which includes the double's start time; and, for
                              every caller wherever it was served, the time it spent past
                              its deadline while a usable cloud slot was free for it. Per
                              sandbox: where its time went. (2c) a sandbox already up and
                              idle when callers pass their deadline: policy + one acquire.
3. slot-seconds wasted        the 4 cluster holders release 0.3 s after burst_after while
                              sandboxes start (the double's create_delay 2 s);
                              cloud_idle_timeout 1 s; (a) the freed cluster slots serve
                              every waiter, (b) the next cluster holders keep theirs and
                              4 waiters go to the cloud. Sum over sandboxes of slot-seconds
                              from create returned to the pool stopping it, minus leased
                              slot-seconds.

Timestamps come from outside the production code: a subclass of ModalSource (burst
decisions, sandbox ready for the pool), a wrapper around the double's SDK module
(Sandbox.create called/returned, wait_until_ready returned) and each sandbox's log. One run; figures are taken
within it. Every process started here (the cluster's node server, every sandbox of the
double) is stopped at the end, on error and on Ctrl-C; all traffic stays on 127.0.0.1.

What the double does not model: Modal's real create and start time (image pull, container
scheduling: seconds to minutes; here a local Python start on this machine's cores), the
network between the pool and Modal's edge (every tunnel request here is a loopback round
trip), Modal's own throttling and billing granularity.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Before hpc_sandbox: _common imports none of it, and use_code chooses which is imported.
from _common import (REPO, Children, add_code_options, code_first, environment, parse_and_run,  # noqa: E402
                     percentile, print_table_header, use_code, verdict)

DOUBLES = REPO / "tests" / "doubles"
STARTED_IN = Path.cwd()  # where relative paths given on the command line point

if __name__ == "__main__":
    # The hpc_sandbox to measure (--code-at REV, or this working tree: it may hold others'
    # half-done edits), before it is imported: this process, the cluster's node server and
    # every sandbox of the double (add_local_python_source, as resolved here) use it.
    CODE_ROOT, CODE_NOTE = use_code(sys.argv[1:], "burst-bench")
else:
    CODE_ROOT, CODE_NOTE = REPO, "as imported"
    code_first(CODE_ROOT)  # the sandboxes it starts import this checkout's, too

import exec_bench  # noqa: E402  (its NodeServer starts a real node server)

from hpc_sandbox.burst.modal import ModalSource  # noqa: E402
from hpc_sandbox.cloudprofile import CloudProfile  # noqa: E402
from hpc_sandbox import connect  # noqa: E402
from hpc_sandbox.pool import SlotPool  # noqa: E402

log = logging.getLogger("bench")

NODE_PORT_RANGE = "9500-9599"  # the cluster's node server (exec_bench 9300-, pool_bench 9400-)
CLUSTER_SLOTS = 4
SLOTS_PER_SANDBOX = 4
BURST_AFTER = 1.0
TRAJECTORIES = 28
# Long enough that every cluster holder still holds when the last sandbox's slots are handed
# out (6 sandboxes starting at once take up to ~7 s on 2 cores), so each slot serves one caller.
HOLD = 12.0
ARRIVAL_GAP = 0.1  # case 1b: one trajectory every 0.1 s
TARGET_OVERHEAD = 0.3  # s, deadline (or sandbox ready) -> slot
WASTE_CREATE_DELAY = 2.0  # s before Sandbox.create returns, in case 3
WASTE_IDLE_TIMEOUT = 1.0  # cloud_idle_timeout in case 3
WASTE_TRAJECTORIES = 12


# --- timestamps from outside the production code ------------------------------------------------


@dataclass
class Timeline:
    """What happened when, in monotonic seconds."""

    decisions: list[tuple[float, int]] = field(default_factory=list)  # (when, sandboxes started) per provision
    create_calls: list[float] = field(default_factory=list)  # Sandbox.create.aio called (throttled ones too)
    created: dict[str, float] = field(default_factory=dict)  # sandbox id -> create returned
    created_order: list[str] = field(default_factory=list)  # sandbox ids in the order their creates returned
    modal_ready: dict[str, float] = field(default_factory=dict)  # wait_until_ready returned (Modal's "ready")
    server_ready: dict[str, float] = field(default_factory=dict)  # the node server inside logged "ready:"
    pool_ready: dict[str, float] = field(default_factory=dict)  # tunnel found + token checked: slots usable
    slots: dict[str, int] = field(default_factory=dict)  # sandbox id -> its slots

    def sandbox_ready(self, sandbox_id: str) -> float:
        """When the sandbox could serve: Modal's probe passed AND its node server serves.
        The probe is a TCP connect, which the node server accepts as soon as it has bound
        its port, before its slot agents have started (seconds, on a busy machine): that
        part is the sandbox's start, not the pool's latency."""
        return max(self.modal_ready[sandbox_id], self.server_ready.get(sandbox_id, -math.inf))

    def read_server_logs(self, double_dir: Path) -> None:
        """The "ready:" line of each sandbox's node server (the double keeps its output in
        sandboxes/ID.log; logging's asctime: local time, milliseconds)."""
        offset = time.time() - time.monotonic()
        for sandbox_id in self.created:
            try:
                lines = (double_dir / "sandboxes" / f"{sandbox_id}.log").read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                if " ready: " in line:
                    stamp, ms = line[:23].split(",")
                    wall = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000
                    self.server_ready[sandbox_id] = wall - offset
                    break


class _TimedCall:
    """`fn.aio(...)` with a stamp before and after."""

    def __init__(self, call: Any, before: Any = None, after: Any = None) -> None:
        self._call, self._before, self._after = call, before, after

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        if self._before is not None:
            self._before()
        result = await self._call.aio(*args, **kwargs)
        if self._after is not None:
            result = self._after(result)
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)


class _TimedHandle:
    """A sandbox handle of the double whose wait_until_ready is stamped; the rest passes through."""

    def __init__(self, handle: Any, timeline: Timeline) -> None:
        self._handle = handle
        self.object_id = handle.object_id

        def ready(result: Any) -> Any:
            timeline.modal_ready[handle.object_id] = time.monotonic()
            return result

        self.wait_until_ready = _TimedCall(handle.wait_until_ready, after=ready)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class _TimedSandboxClass:
    def __init__(self, real: Any, timeline: Timeline) -> None:
        self._real = real

        def returned(handle: Any) -> Any:
            timeline.created[handle.object_id] = time.monotonic()
            timeline.created_order.append(handle.object_id)
            return _TimedHandle(handle, timeline)

        self.create = _TimedCall(real.create, before=lambda: timeline.create_calls.append(time.monotonic()),
                                 after=returned)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class TimedSDK:
    """The double's `modal` module with Sandbox.create and each sandbox's
    wait_until_ready stamped: passed to ModalSource as `sdk=`, so that nothing of the
    production code changes. Everything else is the double's own."""

    def __init__(self, sdk: ModuleType, timeline: Timeline) -> None:
        self._sdk = sdk
        self.Sandbox = _TimedSandboxClass(sdk.Sandbox, timeline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sdk, name)


class TimedModalSource(ModalSource):
    """ModalSource with the burst decisions and the moment a sandbox's slots become
    usable stamped. Both hooks are synchronous after the parent's work, so the stamp is
    taken in the same event-loop step as the state change it records."""

    def __init__(self, *args: Any, timeline: Timeline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeline = timeline

    def provision(self, slots: int) -> int:
        started = super().provision(slots)
        if started:
            self.timeline.decisions.append((time.monotonic(), started))
        return started

    async def _make_ready(self, sandbox: Any, handle: Any) -> None:
        self.timeline.slots[handle.object_id] = sandbox.entry.slots
        await super()._make_ready(sandbox, handle)
        if sandbox.entry.state == "ready":
            self.timeline.pool_ready[handle.object_id] = time.monotonic()


# --- trajectories ---------------------------------------------------------------------------------


@dataclass
class Hold:
    """One trajectory: when it came, got its slot and gave it back."""

    index: int
    arrived: float  # monotonic, just before acquire
    got: float = math.nan  # acquire returned
    released: float = math.nan  # release returned
    got_wall: float = math.nan
    released_wall: float = math.nan
    location: str = "?"
    server: str = "?"  # the sandbox id for a cloud slot
    slot_id: str = "?"
    ok: bool = False


async def trajectory(pool: SlotPool, index: int, arrive_at: float, hold: float, holds: list[Hold]) -> None:
    delay = arrive_at - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    h = Hold(index, time.monotonic())
    holds.append(h)
    slot = await pool.acquire(trajectory_id=f"t{index}", timeout=120)
    h.got, h.got_wall = time.monotonic(), time.time()
    h.location, h.server, h.slot_id = slot.location, slot.endpoint.name, slot.id
    try:
        # A real command on the slot: a cloud slot handed out is a working one.
        result = await pool.execute(slot, "bash", {"command": f"sleep {hold}"}, timeout=hold + 60)
        h.ok = result.success
        if not result.success:
            log.warning("t%d on %s: %s: %s", index, slot.location, result.error_kind, result.error)
    finally:
        await pool.release(slot)
        h.released, h.released_wall = time.monotonic(), time.time()


def cloud_profile(name: str, **settings: Any) -> CloudProfile:
    base: dict[str, Any] = dict(name=name, slots_per_sandbox=SLOTS_PER_SANDBOX, burst_after=BURST_AFTER,
                                max_cloud_slots=64, cloud_idle_timeout=60.0)
    return CloudProfile(**{**base, **settings})


# --- 1 and 2: sandboxes per cloud slot, deadline -> slot --------------------------------------------


@dataclass
class BurstResult:
    label: str
    trajectories: int
    start: float  # monotonic: the first arrival
    holds: list[Hold]
    timeline: Timeline
    created: int  # source.created
    wall: float
    info: bool = False  # shown, not part of the sandboxes-per-slot target (its slots serve twice)

    @property
    def cloud(self) -> list[Hold]:
        return [h for h in self.holds if h.location == "cloud"]

    @property
    def cloud_slots_used(self) -> int:
        return len({h.slot_id for h in self.cloud})

    def deadline(self, h: Hold) -> float:
        return h.arrived + BURST_AFTER

    def overhead(self, h: Hold, ready: float) -> float:
        """The pool's own latency: slot in hand - max(deadline, its sandbox ready)."""
        return h.got - max(self.deadline(h), ready)

    def early(self) -> list[Hold]:
        """Cloud slots handed out before their caller's own deadline."""
        return [h for h in self.cloud if h.got < self.deadline(h)]

    def past_deadline(self) -> int:
        """Callers that were still waiting at their deadline: the cloud's to serve."""
        return sum(1 for h in self.holds if h.got >= self.deadline(h))

    def free_cloud_slots(self, t: float) -> int:
        """Usable cloud slots (sandbox token-checked) that no caller holds at `t`. No
        sandbox stops during these cases (cloud_idle_timeout 60 s)."""
        slots = sum(n for sid, n in self.timeline.slots.items() if self.timeline.pool_ready.get(sid, math.inf) <= t)
        return slots - sum(1 for h in self.cloud if h.got <= t < h.released)

    def stuck(self, step: float = 0.005) -> dict[int, float]:
        """Per caller: seconds during which it was past its deadline, still waiting, and
        a usable cloud slot was free for it (first come, first served: the k oldest such
        callers share k free slots). Measures the handout, whatever place served the
        caller in the end; for a cloud-served caller it is close to the OWN latency."""
        stuck = {h.index: 0.0 for h in self.holds}
        t = self.start
        end = max(h.got for h in self.holds)
        while t < end:
            due = sorted((h for h in self.holds if self.deadline(h) <= t < h.got), key=lambda h: h.arrived)
            for h in due[:max(0, self.free_cloud_slots(t))]:
                stuck[h.index] += step
            t += step
        return stuck


async def burst_case(key: str, label: str, state_dir: Path, sdk: ModuleType, gap: float) -> BurstResult:
    timeline = Timeline()
    source = TimedModalSource(cloud_profile(f"bench-{key}"), state_dir=state_dir, pool_id=f"bench-{key}",
                              sdk=TimedSDK(sdk, timeline), timeline=timeline)
    pool = connect.from_state_dir(state_dir, overflow=source, acquire_timeout=120)
    holds: list[Hold] = []
    async with pool:
        await asyncio.sleep(0.5)  # Modal's app and image are looked up in the background at start
        start = time.monotonic()
        await asyncio.gather(*(trajectory(pool, i, start + i * gap, HOLD, holds) for i in range(TRAJECTORIES)))
        wall = time.monotonic() - start
    timeline.read_server_logs(Path(os.environ["MODAL_DOUBLE_DIR"]))
    return BurstResult(label, TRAJECTORIES, start, sorted(holds, key=lambda h: h.index), timeline, source.created,
                       wall)


async def warm_case(key: str, label: str, state_dir: Path, sdk: ModuleType) -> BurstResult:
    """A sandbox already up and idle when callers pass their deadline: what remains of
    deadline -> slot is the policy and one acquire through the tunnel. 4 cluster holders
    (13.5 s); 4 callers at once burst one sandbox and hold it 0.5 s; 4 more come at 6.0,
    8.5, 11.0 and 11.25 s and find it idle (cloud_idle_timeout 60 s keeps it). The first
    three are 2.5 s apart, so that the policy has looked again (wanted=0) before each
    comes; the last comes 0.25 s after the third, within its burst_after."""
    timeline = Timeline()
    source = TimedModalSource(cloud_profile(f"bench-{key}"), state_dir=state_dir, pool_id=f"bench-{key}",
                              sdk=TimedSDK(sdk, timeline), timeline=timeline)
    pool = connect.from_state_dir(state_dir, overflow=source, acquire_timeout=120)
    holds: list[Hold] = []
    plan = ([(0.0, 13.5)] * CLUSTER_SLOTS + [(0.0, 0.5)] * SLOTS_PER_SANDBOX
            + [(at, 0.5) for at in (6.0, 8.5, 11.0, 11.25)])
    async with pool:
        await asyncio.sleep(0.5)
        start = time.monotonic()
        await asyncio.gather(*(trajectory(pool, i, start + at, hold, holds) for i, (at, hold) in enumerate(plan)))
        wall = time.monotonic() - start
    timeline.read_server_logs(Path(os.environ["MODAL_DOUBLE_DIR"]))
    return BurstResult(label, len(plan), start, sorted(holds, key=lambda h: h.index), timeline, source.created, wall,
                       info=True)


# --- 3: slot-seconds wasted -----------------------------------------------------------------------------


@dataclass
class WasteResult:
    label: str
    holds: list[Hold]
    timeline: Timeline
    created: int
    sandboxes: list[Any]  # SandboxEntry: created/ended (wall), slots
    all_stopped: bool

    @property
    def cloud(self) -> list[Hold]:
        return [h for h in self.holds if h.location == "cloud"]

    def billed(self) -> float:
        """Slot-seconds of every sandbox, create returned -> the pool stopped it (the
        pool's own sandbox-seconds, times slots)."""
        return sum(s.slots * s.seconds(time.time()) for s in self.sandboxes)

    def leased(self) -> float:
        return sum(h.released_wall - h.got_wall for h in self.cloud)

    def starting(self) -> float:
        """Slot-seconds from create returned to ready (no slot can be leased yet)."""
        t = self.timeline
        return sum(s.slots * (t.pool_ready.get(s.id, t.created[s.id]) - t.created[s.id]) for s in self.sandboxes
                   if s.id in t.created)


async def waste_case(key: str, label: str, state_dir: Path, sdk: ModuleType, second_hold: float) -> WasteResult:
    """C=4 cluster holders release 0.3 s after burst_after; the next 4 (served by those
    freed slots) hold `second_hold`; the last 4 hold 1 s, wherever they land."""
    timeline = Timeline()
    sdk._double.create_delay(WASTE_CREATE_DELAY)
    source = TimedModalSource(cloud_profile(f"bench-{key}", cloud_idle_timeout=WASTE_IDLE_TIMEOUT),
                              state_dir=state_dir, pool_id=f"bench-{key}", sdk=TimedSDK(sdk, timeline),
                              timeline=timeline)
    pool = connect.from_state_dir(state_dir, overflow=source, acquire_timeout=120)
    holds: list[Hold] = []
    try:
        async with pool:
            await asyncio.sleep(0.5)
            start = time.monotonic()

            def hold_of(i: int) -> float:
                # FIFO: trajectory i is the i-th waiter, so 4-7 take the freed cluster slots.
                return BURST_AFTER + 0.3 if i < CLUSTER_SLOTS else second_hold if i < 2 * CLUSTER_SLOTS else 1.0

            await asyncio.gather(*(trajectory(pool, i, start, hold_of(i), holds) for i in range(WASTE_TRAJECTORIES)))
            # Until the pool stops every sandbox by itself (idle), or a generous bound.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                states = [s.entry.state for s in source._sandboxes.values()]
                if source._creating == 0 and all(st in ("stopped", "dead") for st in states):
                    break
                await asyncio.sleep(0.1)
            # A snapshot: the pool's stop would change the live entries.
            entries = [dataclasses.replace(e) for e in source.usage().sandboxes]
            stopped = all(e.state in ("stopped", "dead") for e in entries) and source._creating == 0
            return WasteResult(label, sorted(holds, key=lambda h: h.index), timeline, source.created, entries,
                               stopped)
    finally:
        sdk._double.reset_controls()


# --- report ------------------------------------------------------------------------------------------


def stats(values: Sequence[float]) -> str:
    v = sorted(values)
    if not v:
        return "-"
    return f"p50 {percentile(v, 0.5):.3f} p90 {percentile(v, 0.9):.3f} max {v[-1]:.3f} s (n={len(v)})"


def report_bursts(results: list[BurstResult]) -> tuple[list[dict], bool]:
    target = 1 / SLOTS_PER_SANDBOX
    print(f"\n1. sandboxes per cloud slot: C={CLUSTER_SLOTS} cluster slots, N={TRAJECTORIES} trajectories "
          f"holding {HOLD:.0f} s, S={SLOTS_PER_SANDBOX}, burst_after {BURST_AFTER:.0f} s")
    print_table_header(f"{'case':26s} {'past deadline':>13s} {'sandboxes':>9s} {'per caller':>10s} "
                       f"{'cloud grants':>12s} {'per grant':>9s} {'decision':>8s} {'create call':>11s} "
                       f"{'create ret':>10s} {'early':>5s} {'failed':>6s}")
    rows, met = [], True
    for r in results:
        t = r.timeline
        per = r.created / len(r.cloud) if r.cloud else math.inf
        per_caller = r.created / r.past_deadline() if r.past_deadline() else math.inf
        first = [min(x) - r.start if x else math.nan
                 for x in ([d for d, _ in t.decisions], t.create_calls, list(t.created.values()))]
        failed = sum(1 for h in r.holds if not h.ok)
        if not r.info:
            met = met and math.isclose(per, target) and all(f >= BURST_AFTER for f in first) and not failed
        print(f"{r.label + (' (info)' if r.info else ''):26s} {r.past_deadline():13d} {r.created:9d} "
              f"{per_caller:10.3f} {len(r.cloud):12d} {per:9.3f} {first[0]:7.2f}s {first[1]:10.2f}s "
              f"{first[2]:9.2f}s {len(r.early()):5d} {failed:6d}")
        rows.append({"case": r.label, "info": r.info, "callers_past_deadline": r.past_deadline(),
                     "sandboxes_created": r.created, "sandboxes_per_caller_past_deadline": per_caller,
                     "cloud_grants": len(r.cloud), "cloud_slots_used": r.cloud_slots_used,
                     "sandboxes_per_cloud_grant": per, "first_decision_s": first[0],
                     "first_create_call_s": first[1], "first_create_return_s": first[2],
                     "cloud_grants_before_own_deadline": len(r.early()), "failed": failed, "wall_s": r.wall})
    print("past deadline = callers still waiting at arrival + burst_after; per caller = sandboxes / those\n"
          "(what the policy provisioned for); cloud grants = cloud slots handed out; per grant = sandboxes /\n"
          f"cloud grants, THE TARGET: exactly 1/S = {target:.3f}. decision, create call, create ret = the first\n"
          "burst decision (provision), Sandbox.create called, returned, after the first arrival (target >=\n"
          f"burst_after {BURST_AFTER:.1f} s). early = cloud slots handed to a caller before its own deadline.\n"
          "(info): section 2's warm case, whose 4 cloud slots serve 8 callers one after the other.")
    print(f"  target 1/S per cloud slot handed out, none before burst_after: {verdict(met)}")
    return rows, met


def report_overhead(results: list[BurstResult]) -> tuple[dict, bool]:
    print("\n2. deadline -> cloud slot (deadline = arrival + burst_after; sandbox ready = Modal's TCP probe passed\n"
          "   (wait_until_ready returned) and the node server inside serves (its \"ready:\" log line), the later)")
    own_all: list[float] = []
    stuck_all: list[float] = []
    out: dict = {}
    for r in results:
        t = r.timeline
        served = [h for h in r.cloud if h.got >= r.deadline(h)]
        own = [r.overhead(h, t.sandbox_ready(h.server)) for h in served]
        probe = [r.overhead(h, t.modal_ready[h.server]) for h in served]
        idle = [h.got - r.deadline(h) for h in served if r.deadline(h) >= t.sandbox_ready(h.server)]
        raw = [h.got - r.deadline(h) for h in served]
        early = [r.deadline(h) - h.got for h in r.early()]
        stuck = r.stuck()
        by_place = {h.index: h.location for h in r.holds}
        long_stuck = [i for i, s in stuck.items() if s > TARGET_OVERHEAD]
        own_all += own
        stuck_all += list(stuck.values())
        print(f"  {r.label}:")
        print(f"    OWN, cloud-served callers: got - max(deadline, sandbox ready)             {stats(own)}")
        print(f"      of them, deadline after the sandbox was ready (policy + 1 acquire):      {stats(idle)}")
        print(f"      (ready = the TCP probe alone, which passes before the server serves:     {stats(probe)})")
        print(f"    RAW, INCLUDING THE DOUBLE'S START TIME: got - deadline                     {stats(raw)}")
        print(f"    every caller: time past its deadline with a usable cloud slot free for it   "
              f"{stats([s for s in stuck.values() if s > 0])}")
        print(f"      callers with > {TARGET_OVERHEAD} s of it: {len(long_stuck)}"
              + (f" (served in the end by: {', '.join(sorted(by_place[i] for i in long_stuck))})" if long_stuck
                 else ""))
        if early:
            print(f"    cloud slots handed out BEFORE the caller's deadline: {len(early)}, by up to {max(early):.2f} s")
        # Per sandbox, in the order its create returned: where its time went.
        decided = [d for d, n in t.decisions for _ in range(n)]
        calls = sorted(t.create_calls)
        print(f"    per sandbox (s)  {'decided':>7s} {'->call':>6s} {'->ret':>6s} {'->probe':>7s} {'->server':>8s} "
              f"{'->usable':>8s} {'->last grant':>12s}")
        phases = []
        for k, sid in enumerate(t.created_order):
            grants = [h.got for h in r.cloud if h.server == sid]
            server = t.server_ready.get(sid, math.nan)
            row = (decided[k] - r.start if k < len(decided) else math.nan,
                   calls[k] - decided[k] if k < min(len(decided), len(calls)) else math.nan,
                   t.created[sid] - calls[k] if k < len(calls) else math.nan,
                   t.modal_ready.get(sid, math.nan) - t.created[sid],
                   server - t.modal_ready.get(sid, math.nan),
                   t.pool_ready.get(sid, math.nan) - server,
                   max(grants) - t.pool_ready.get(sid, math.nan) if grants else math.nan)
            phases.append(row)
            print(f"      {sid[:11]}…  {row[0]:7.2f} {row[1]:6.2f} {row[2]:6.2f} {row[3]:7.2f} {row[4]:8.2f} "
                  f"{row[5]:8.3f} {row[6]:12.3f}")
        out[r.label] = {"own_s": sorted(own), "own_idle_sandbox_s": sorted(idle), "own_probe_only_s": sorted(probe),
                        "raw_s": sorted(raw), "early_by_s": sorted(early),
                        "stuck_s": {str(i): s for i, s in stuck.items()},
                        "per_sandbox": [dict(zip(("decided", "to_create_call", "to_create_return", "to_probe_ok",
                                                  "to_server_ready", "to_usable", "to_last_grant"), p))
                                        for p in phases]}
    print("  per sandbox: decided = burst decision after the first arrival; ->call = Sandbox.create called\n"
          "  (the pool's create rate limit, 4/s); ->ret = create returned (the double: spawn); ->probe =\n"
          "  wait_until_ready returned (the port accepts TCP); ->server = the node server logged \"ready:\" (its\n"
          "  slot agents started); these three are THE DOUBLE'S START TIME, Python on this machine's cores;\n"
          "  ->usable = tunnels() + the pool's authenticated request answered (ours); ->last grant = until the\n"
          "  last of its slots was in a caller's hands (ours). nan: no slot of it was handed out.")
    worst = max(own_all) if own_all else math.nan
    worst_stuck = max(stuck_all) if stuck_all else math.nan
    met = bool(own_all) and worst <= TARGET_OVERHEAD
    print(f"  target: own latency <= {TARGET_OVERHEAD} s, cloud-served callers: max {worst:.3f} s {verdict(met)}; "
          f"every caller (free cloud slot while past its deadline): max {worst_stuck:.3f} s "
          f"{verdict(worst_stuck <= TARGET_OVERHEAD)}")
    return out, met and worst_stuck <= TARGET_OVERHEAD


def report_waste(results: list[WasteResult]) -> list[dict]:
    print(f"\n3. slot-seconds wasted: C={CLUSTER_SLOTS}, N={WASTE_TRAJECTORIES} at once, S={SLOTS_PER_SANDBOX}, "
          f"burst_after {BURST_AFTER:.0f} s; the {CLUSTER_SLOTS} cluster\n   holders release at "
          f"{BURST_AFTER + 0.3:.1f} s; Sandbox.create takes {WASTE_CREATE_DELAY:.0f} s (the double's create_delay); "
          f"cloud_idle_timeout {WASTE_IDLE_TIMEOUT:.0f} s")
    print_table_header(f"{'case':28s} {'sandboxes':>9s} {'never used':>10s} {'cloud grants':>12s} "
                       f"{'billed slot-s':>13s} {'leased':>7s} {'WASTED':>7s} {'starting':>8s} "
                       f"{'ready, unleased':>15s} {'stopped':>7s}")
    rows = []
    for r in results:
        billed, leased, starting = r.billed(), r.leased(), r.starting()
        wasted = billed - leased
        unused = sum(1 for s in r.sandboxes if not any(h.server == s.id for h in r.cloud))
        print(f"{r.label:28s} {r.created:9d} {unused:10d} {len(r.cloud):12d} {billed:13.1f} {leased:7.1f} "
              f"{wasted:7.1f} {starting:8.1f} {wasted - starting:15.1f} {'all' if r.all_stopped else 'NOT ALL':>7s}")
        rows.append({"case": r.label, "sandboxes_created": r.created, "never_used": unused,
                     "cloud_grants": len(r.cloud), "billed_slot_s": billed, "leased_slot_s": leased,
                     "wasted_slot_s": wasted, "starting_slot_s": starting, "ready_unleased_slot_s": wasted - starting,
                     "all_stopped": r.all_stopped,
                     "sandboxes": [{"slots": s.slots, "seconds": s.seconds(time.time()), "reason": s.reason}
                                   for s in r.sandboxes]})
    print("billed = slots x (create returned -> the pool stopped the sandbox): the pool's own sandbox-seconds;\n"
          "leased = acquire returned -> release returned, on cloud slots; WASTED = billed - leased, of it\n"
          "starting = slots x (create returned -> token checked) and ready, unleased = the rest (idle until\n"
          "cloud_idle_timeout and the watcher's next look, free slots beside leased ones). Not counted: the\n"
          "2 s inside Sandbox.create (the double's create_delay) and the terminate itself.")
    return rows


# --- the run ---------------------------------------------------------------------------------------


def import_double(folder: Path) -> ModuleType:
    """The Modal SDK double as `modal`, on `folder`, its tunnels trusted (SSL_CERT_FILE)."""
    os.environ["MODAL_DOUBLE_DIR"] = str(folder)
    sys.path.insert(0, str(DOUBLES))
    import modal
    if not getattr(modal, "__modal_double__", False):
        raise RuntimeError(f"`import modal` gave {modal.__file__}, not the double")
    # The pool's system TLS context reads SSL_CERT_FILE when made (hpc_sandbox.tls.system_context).
    os.environ["SSL_CERT_FILE"] = str(modal._double.ca_bundle())
    return modal


async def run(args: argparse.Namespace) -> int:
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="hpc-sandbox-burst-bench-"))
    # The sandboxes' entry point makes its state dir with mkdtemp: in here, removed with it.
    (work / "tmp").mkdir()
    os.environ["TMPDIR"] = str(work / "tmp")
    sdk = import_double(work / "modal-double")
    atexit.register(sdk._double.cleanup)  # also if this process ends some other way
    env = environment(CODE_ROOT, CODE_NOTE,
                      {"modal": f"THE DOUBLE ({Path(sdk.__file__).parent.relative_to(REPO)}), not Modal"})
    print("cloud overflow benchmark, against the Modal SDK double (real local node servers as sandboxes)")
    for key, value in env.items():
        print(f"  {key:13s} {value}")
    summary: dict = {"environment": env}
    try:
        state = work / "state"
        state.mkdir(mode=0o700)
        exec_bench.PORT_RANGE = NODE_PORT_RANGE
        node = exec_bench.NodeServer(children, state, CLUSTER_SLOTS, tls=True)
        print(f"\nstarting the cluster: 1 node server, {CLUSTER_SLOTS} slots (HTTPS) ...", flush=True)
        await asyncio.to_thread(node.start)
        bursts = []
        for label, gap in (("1a all at once", 0.0), (f"1b one per {ARRIVAL_GAP:.1f} s", ARRIVAL_GAP)):
            print(f"  {label} ...", flush=True)
            bursts.append(await burst_case(label.split()[0], label, state, sdk, gap))
        print("  2c sandbox already up ...", flush=True)
        bursts.append(await warm_case("2c", "2c sandbox already up", state, sdk))
        wastes = []
        for label, second in (("3a freed slots serve all", 1.0), ("3b 4 waiters go to the cloud", HOLD)):
            print(f"  {label} ...", flush=True)
            wastes.append(await waste_case(label.split()[0], label, state, sdk, second))
        summary["sandboxes_per_cloud_slot"], met1 = report_bursts(bursts)
        summary["deadline_to_cloud_slot"], met2 = report_overhead(bursts)
        summary["wasted"] = report_waste(wastes)
        left = sdk._double.sandboxes()
        print(f"\n  sandboxes still running after every pool stopped: {len(left)}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (at end)")
        if args.json:
            (STARTED_IN / args.json).write_text(json.dumps(summary, indent=2, default=str))
        failed = sum(1 for r in bursts + wastes for h in r.holds if not h.ok)  # type: ignore[operator]
        if failed or left:
            print(f"\n{failed} trajectories failed, {len(left)} sandboxes left: figures not trustworthy",
                  file=sys.stderr)
            return 1
        return 0
    finally:
        await asyncio.to_thread(sdk._double.cleanup)
        await asyncio.to_thread(children.stop_all)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_code_options(parser)
    return parse_and_run(parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
