#!/usr/bin/env python3
"""Rollout benchmark (issue 19): SWE-style trajectories on real projects, end to end.

    python bench/rollout_bench.py            # 24 trajectories on 8 slots, runtimes none and bwrap
    python bench/rollout_bench.py --quick    # 8 trajectories on 4 slots, none only

The projects are three real ones from the package index (attrs 23.2.0, toolz 0.12.0,
six 1.16.0): their sdists and the wheels their tests need (pytest, hypothesis and what
those require) are fetched once into a cache (`--cache`, default ~/.cache/hpcsbx-rollout)
with `pip download`; nothing else touches the network, and slots install from the
uploaded wheels only (`--no-index`).

Each trajectory, as an agent's rollout would:
  acquire -> upload the project's tree and the wheels -> in a session: make a venv and
  install the test tools -> run the tests, output streamed -> write a patch that breaks one
  function -> run the tests again (they must fail) -> read the test log back -> release
  with reset.
A local job (`connect.launch`, scheduler local) serves the slots. Reported per runtime:
the median of each step, the wall time, and slot utilisation (time slots were leased /
wall x slots, and time a call ran in them / wall x slots). Figures are taken in one run;
the machine is noisy, so compare the runtimes within it.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import environment, print_table_header  # noqa: E402

from hpc_sandbox import connect  # noqa: E402
from hpc_sandbox.models import Slot  # noqa: E402
from hpc_sandbox.pool import SlotPool  # noqa: E402

# (sdist, where its importable code is, the tests to run, a file and a line of it to break)
PROJECTS = {
    "attrs": ("attrs==23.2.0", "src", "tests/test_funcs.py tests/test_filters.py",
              "src/attr/_funcs.py", "def has(cls):"),
    "toolz": ("toolz==0.12.0", ".", "toolz/tests/test_itertoolz.py toolz/tests/test_dicttoolz.py",
              "toolz/itertoolz.py", "def take(n, seq):"),
    # (dbm.ndbm is not in every Python build: its case of test_move_items is left out)
    "six": ("six==1.16.0", ".", "test_six.py -k 'not dbm_ndbm'", "six.py", "def with_metaclass(meta, *bases):"),
}
TEST_TOOLS = ("pytest==7.4.4", "hypothesis==6.92.1")
STEPS = ("acquire", "upload", "venv", "tests", "patch", "tests again", "read back", "release")


def fetch(cache: Path) -> dict[str, Path]:
    """The projects' trees (extracted sdists) and the wheel folder, fetched once."""
    wheels = cache / "wheels"
    trees = {name: cache / "trees" / name for name in PROJECTS}
    if not wheels.is_dir() or not any(wheels.iterdir()):
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
                        "--dest", str(wheels), *TEST_TOOLS], check=True)
    for name, (requirement, *_rest) in PROJECTS.items():
        if trees[name].is_dir():
            continue
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            "--dest", folder, requirement], check=True)
            [sdist] = Path(folder).glob("*.tar.gz")
            with tarfile.open(sdist) as tar:
                tar.extractall(folder, filter="data")
            [top] = [p for p in Path(folder).iterdir() if p.is_dir()]
            trees[name].parent.mkdir(parents=True, exist_ok=True)
            top.rename(trees[name])
    return {**trees, "wheels": wheels}


@dataclass
class Trajectory:
    project: str
    steps: dict[str, float] = field(default_factory=dict)
    busy: float = 0.0  # seconds a call ran in the slot
    leased: float = 0.0
    ok: bool = False
    why: str = ""


async def _call(pool: SlotPool, slot: Slot, trajectory: Trajectory, step: str, command: str,
                timeout: float = 600) -> str:
    """One bash call in the trajectory's session, streamed; its stdout."""
    started = time.monotonic()
    result = None
    async for event in pool.stream(slot, "bash", {"command": command, "session": "main"}, timeout=timeout):
        if event.result is not None:
            result = event.result
    took = time.monotonic() - started
    trajectory.steps[step] = trajectory.steps.get(step, 0.0) + took
    trajectory.busy += took
    assert result is not None
    if result.error_kind is not None:
        raise RuntimeError(f"{step}: {result.error_kind}: {result.error}")
    return result.stdout


async def _upload(pool: SlotPool, slot: Slot, local: Path, dest: str) -> None:
    """The tree in: one streamed archive and one `extract` call (pool.upload_tree)."""
    result = await pool.upload_tree(slot, local, dest)
    if not result.success:
        raise RuntimeError(f"upload of {local.name}: {result.error_kind}: {result.error}")


async def rollout(pool: SlotPool, paths: dict[str, Path], project: str, index: int) -> Trajectory:
    trajectory = Trajectory(project)
    _, code, tests, target, line = PROJECTS[project]
    started = time.monotonic()
    async with pool.slot(trajectory_id=f"{project}-{index}") as slot:
        leased = time.monotonic()
        trajectory.steps["acquire"] = leased - started
        try:
            mark = time.monotonic()
            await _upload(pool, slot, paths[project], "proj")
            await _upload(pool, slot, paths["wheels"], "wheels")
            trajectory.steps["upload"] = time.monotonic() - mark
            trajectory.busy += trajectory.steps["upload"]
            await _call(pool, slot, trajectory, "venv",
                        "python3 -m venv .venv && . .venv/bin/activate && "
                        "pip install --quiet --no-index --find-links wheels " + " ".join(TEST_TOOLS) + " && cd proj")
            run = f"PYTHONPATH={code} python -m pytest -q -p no:cacheprovider {tests} > ../test.log 2>&1; echo $?"
            first = await _call(pool, slot, trajectory, "tests", run)
            if first.strip() != "0":
                tail = await _call(pool, slot, trajectory, "tests", "tail -5 ../test.log")
                raise RuntimeError(f"{project}: the tests failed before the patch (pytest exit {first.strip()}): "
                                   + " | ".join(tail.splitlines()))
            # The patch: the function returns None at once.
            patch = (f"python3 - <<'EOF'\nimport pathlib\np = pathlib.Path({target!r})\ns = p.read_text()\n"
                     f"s = s.replace({line!r}, {line!r} + '\\n    return None', 1)\np.write_text(s)\nEOF")
            await _call(pool, slot, trajectory, "patch", patch)
            again = await _call(pool, slot, trajectory, "tests again", run)
            if again.strip() == "0":
                raise RuntimeError("the tests passed after the patch")
            mark = time.monotonic()
            log = await pool.execute(slot, "read_file", {"path": "test.log"})
            trajectory.steps["read back"] = time.monotonic() - mark
            if not log.success or "failed" not in str(log.data.get("content", "")):
                raise RuntimeError(f"read back: {log.error or 'no failure in the log'}")
            trajectory.ok = True
        except Exception as exc:  # a failed trajectory is a result: counted and said
            trajectory.why = f"{type(exc).__name__}: {exc}"
        released = time.monotonic()
    trajectory.steps["release"] = time.monotonic() - released
    trajectory.leased = time.monotonic() - leased
    return trajectory


async def run_runtime(runtime: str, slots: int, count: int, paths: dict[str, Path], state: Path) -> dict:
    names = list(PROJECTS)
    started = time.monotonic()
    async with connect.launch(scheduler="local", runtime=runtime, slots=slots, state_dir=state,
                              acquire_timeout=3600) as pool:
        ready = time.monotonic()
        trajectories = await asyncio.gather(*(rollout(pool, paths, names[i % len(names)], i) for i in range(count)))
        wall = time.monotonic() - ready
    ok = [t for t in trajectories if t.ok]
    return {
        "runtime": runtime, "slots": slots, "trajectories": count, "ok": len(ok), "wall": wall,
        "start": ready - started,
        "steps": {step: statistics.median([t.steps[step] for t in ok if step in t.steps] or [0.0]) for step in STEPS},
        "leased": sum(t.leased for t in trajectories) / (wall * slots),
        "busy": sum(t.busy for t in trajectories) / (wall * slots),
        "failures": sorted({t.why for t in trajectories if not t.ok}),
    }


async def main(args: argparse.Namespace) -> int:
    paths = fetch(Path(args.cache).expanduser())
    runtimes = ["none"] if args.quick else args.runtime
    slots, count = (4, 8) if args.quick else (args.slots, args.trajectories)
    for key, value in environment(HERE.parent, "working tree").items():
        print(f"{key}: {value}")
    results = []
    with tempfile.TemporaryDirectory(prefix="hpcsbx-rollout-") as folder:
        for runtime in runtimes:
            print(f"  {runtime}: {count} trajectories on {slots} slots ...", flush=True)
            results.append(await run_runtime(runtime, slots, count, paths, Path(folder) / runtime))
    print_table_header(f"SWE-style rollouts: {', '.join(PROJECTS)}; median seconds per step of the "
                       "trajectories that completed")
    print(f"{'runtime':8} {'ok':>6} {'wall s':>7} " + " ".join(f"{s:>11}" for s in STEPS) + "  leased  busy")
    for r in results:
        print(f"{r['runtime']:8} {r['ok']:>3}/{r['trajectories']:<2} {r['wall']:7.1f} "
              + " ".join(f"{r['steps'][s]:11.2f}" for s in STEPS) + f"  {r['leased']:6.2f}  {r['busy']:4.2f}")
        for why in r["failures"]:
            print(f"  failed ({r['runtime']}): {why}")
    print("leased = time slots were leased / (wall x slots); busy = time a call or an upload ran in them / "
          "(wall x slots)")
    return 0 if all(r["ok"] == r["trajectories"] for r in results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 trajectories on 4 slots, runtime none only")
    parser.add_argument("--runtime", action="append", choices=("none", "bwrap"), default=None)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--trajectories", type=int, default=24)
    parser.add_argument("--cache", default="~/.cache/hpcsbx-rollout")
    args = parser.parse_args()
    args.runtime = args.runtime or ["none", "bwrap"]
    sys.exit(asyncio.run(main(args)))
