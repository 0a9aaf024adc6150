#!/usr/bin/env python3
"""Where the CPU of one `bash -c true` call through a node server goes.

    python bench/exec_cpu_breakdown.py            # 3000 calls at concurrency 32, 32 slots
    python bench/exec_cpu_breakdown.py --calls 6000 --slots 8
    python bench/exec_cpu_breakdown.py --tls-ab   # HTTPS (pinned) against plain HTTP, alternating rounds

Starts one node server (runtime none), acquires its slots, runs the calls (one call per
slot at a time) and reads, from /proc, the user+system CPU each party spent per call:
this process (the SlotPool client), the node server, the slot agents, and the `bash`
commands the agents reaped. The direct-spawn baseline in exec_bench.py costs about the
`bash` figure plus 0.2-0.4 ms of its spawning parent; everything else here is what the
node server's path adds. On a machine with fewer cores than busy processes, that sum,
not latency, is what bounds throughput.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import Children, children_of  # noqa: E402
from exec_bench import NodeServer  # noqa: E402

from hpc_sandbox import NodeServerSource, SlotPool  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime+stime of `pid` (or, with reaped_children, of the children it has waited for)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ((cutime + cstime) if reaped_children else (utime + stime)) / TICKS


async def run(calls: int, slots: int, tls: bool = True) -> dict[str, float]:
    """CPU ms per call of each party (client, server, agent, bash), and calls per second."""
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="hpc-sandbox-cpu-"))
    state = work / "state"
    state.mkdir()
    node = NodeServer(children, state, slots, tls=tls)
    pool: SlotPool | None = None
    try:
        endpoint = await asyncio.to_thread(node.start)
        pool = SlotPool([NodeServerSource.from_endpoints([endpoint])], lease_ttl=3600)
        await pool.start()
        leased = [await pool.acquire(trajectory_id=f"cpu-{i}") for i in range(slots)]
        assert node.proc is not None
        agents = children_of(node.proc.pid)

        async def worker(slot, count: int) -> None:
            for _ in range(count):
                result = await pool.execute(slot, "bash", {"command": "true"})
                if not result.success:
                    raise RuntimeError(f"{result.error_kind}: {result.error}")

        def snapshot() -> tuple[float, float, float, float]:
            return (cpu_seconds(os.getpid()), cpu_seconds(node.proc.pid), sum(cpu_seconds(a) for a in agents),
                    sum(cpu_seconds(a, reaped_children=True) for a in agents))

        await asyncio.gather(*(worker(s, 10) for s in leased))  # warm-up
        per_slot = max(1, calls // slots)
        before, started = snapshot(), time.perf_counter()
        await asyncio.gather(*(worker(s, per_slot) for s in leased))
        seconds, after = time.perf_counter() - started, snapshot()
        done = per_slot * slots
        client, server, agent, bash = ((b - a) / done * 1e3 for a, b in zip(before, after))
        print(f"{'https' if tls else 'http '}: {done} calls on {slots} slots in {seconds:.2f}s "
              f"({done / seconds:.0f}/s); CPU ms per call:")
        print(f"  client (SlotPool) {client:.2f}   node server {server:.2f}   agents {agent:.2f}   "
              f"bash {bash:.2f}   total {client + server + agent + bash:.2f}")
        return {"client": client, "server": server, "agent": agent, "bash": bash, "rate": done / seconds}
    finally:
        if pool is not None:
            await pool.stop()
        await asyncio.to_thread(children.stop_all)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--slots", type=int, default=32, help="slots, one call in flight on each")
    parser.add_argument("--tls-ab", action="store_true",
                        help="alternate HTTPS and plain-HTTP rounds; print the ratios of each round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode with --tls-ab")
    args = parser.parse_args()
    if not args.tls_ab:
        asyncio.run(run(args.calls, args.slots))
        return 0
    ratios: dict[str, list[float]] = {"client+server CPU": [], "total CPU": [], "throughput": []}
    for _ in range(args.rounds):
        tls, plain = asyncio.run(run(args.calls, args.slots, tls=True)), asyncio.run(run(args.calls, args.slots, tls=False))
        ratios["client+server CPU"].append((tls["client"] + tls["server"]) / (plain["client"] + plain["server"]))
        ratios["total CPU"].append(sum(tls[k] for k in ("client", "server", "agent", "bash"))
                                   / sum(plain[k] for k in ("client", "server", "agent", "bash")))
        ratios["throughput"].append(tls["rate"] / plain["rate"])
    print("https / http, per round (keep-alive connections):")
    for name, values in ratios.items():
        print(f"  {name:18s} " + "  ".join(f"{v:.3f}" for v in values) + f"   median {sorted(values)[len(values) // 2]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
