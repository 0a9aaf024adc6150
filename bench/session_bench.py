"""The cost of a `bash` call in a persistent session against a plain `bash` call (issue 13).

Target: a session call costs no more CPU than a plain one. Both drive a real slot agent
(`hpc_sandbox/agent.py`) over its JSON-lines protocol, one call after another, so what is
measured is the agent's own work and the shell's: no HTTP, no node server.

CPU per call is what the agent and every process under it used (our RUSAGE_CHILDREN
grows by the agent's total, its reaped children included, once we reap it), for N calls
minus that for 1 call, over N - 1: the agent's start and a session's first shell are
not per-call costs. Plain and session rounds alternate (ABAB...) in one run, and the
ratio of the medians is printed: this machine is noisy, a ratio taken in one run is not.

    python bench/session_bench.py             # 5 rounds x 300 calls per mode and command
    python bench/session_bench.py --calls 100 --rounds 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model  # noqa: E402

AGENT = Path(__file__).resolve().parent.parent / "hpc_sandbox" / "agent.py"
COMMANDS = ("true", "ls /", "echo $((6 * 7)); pwd")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _agent_run(calls: int, command: str, session: bool) -> tuple[float, float]:
    """Start an agent, make `calls` bash calls, stop it; (CPU seconds, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="session-bench-") as workspace:
        before = _children_cpu()
        proc = await asyncio.create_subprocess_exec(sys.executable, str(AGENT), "--workspace", workspace,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                    limit=1 << 24)
        assert proc.stdin is not None and proc.stdout is not None
        ready = json.loads(await proc.stdout.readline())
        assert ready["result"]["ready"], ready
        started = time.perf_counter()
        for number in range(calls):
            args = {"command": command, **({"session": "main"} if session else {})}
            proc.stdin.write(json.dumps({"id": str(number), "tool": "bash", "args": args}).encode() + b"\n")
            answer = json.loads(await proc.stdout.readline())
            result = answer.get("result") or {}
            if answer.get("error") or result.get("exit_code") != 0:
                raise RuntimeError(f"call failed: {answer}")
        wall = time.perf_counter() - started
        proc.stdin.close()
        await proc.wait()  # reaped: its CPU, its children's included, is in RUSAGE_CHILDREN now
        return _children_cpu() - before, wall


async def per_call(calls: int, command: str, session: bool) -> tuple[float, float]:
    """CPU and wall time of one call, without the agent's start (or the session's shell)."""
    cpu_n, wall_n = await _agent_run(calls, command, session)
    cpu_1, wall_1 = await _agent_run(1, command, session)
    return (cpu_n - cpu_1) / (calls - 1), (wall_n - wall_1) / (calls - 1)


async def main(calls: int, rounds: int) -> int:
    print(f"session vs plain bash calls, agent driven directly; {calls} calls x {rounds} rounds per mode")
    print(f"  date   {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n  cpu    {cpu_model()} x {os.cpu_count()}\n"
          f"  python {sys.version.split()[0]}\n  load   {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at start)")
    print(f"\n{'command':<24} {'plain CPU/call':>15} {'session CPU/call':>17} {'ratio':>7} "
          f"{'plain wall':>11} {'session wall':>13}")
    worst = 0.0
    for command in COMMANDS:
        plain: list[tuple[float, float]] = []
        session: list[tuple[float, float]] = []
        for _ in range(rounds):  # alternate, so a noisy minute hits both alike
            plain.append(await per_call(calls, command, session=False))
            session.append(await per_call(calls, command, session=True))
        p_cpu, s_cpu = statistics.median(c for c, _ in plain), statistics.median(c for c, _ in session)
        p_wall, s_wall = statistics.median(w for _, w in plain), statistics.median(w for _, w in session)
        ratio = s_cpu / p_cpu
        worst = max(worst, ratio)
        print(f"{command:<24} {p_cpu * 1e3:>12.2f} ms {s_cpu * 1e3:>14.2f} ms {ratio:>7.2f} "
              f"{p_wall * 1e3:>8.2f} ms {s_wall * 1e3:>10.2f} ms")
    print(f"\n  target: a session call costs no more CPU than a plain one (ratio <= 1.00): "
          f"worst {worst:.2f} {'MET' if worst <= 1.0 else 'MISSED'}")
    print(f"  load   {' '.join(f'{x:.2f}' for x in os.getloadavg())} (at end)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    raise SystemExit(asyncio.run(main(options.calls, options.rounds)))
