"""SyncSlotPool: the slot API for scripts that are not async."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..models import ExecEvent, Slot, ToolResult
from .slotpool import SlotPool, ToolCall
from .sources import Capacity


class SyncSlotPool:
    """A blocking facade: the async pool runs on a private event loop thread.

        with SyncSlotPool(connect.from_state_dir()) as pool:
            with pool.slot(trajectory_id="t1") as slot:
                print(pool.execute(slot, "bash", {"command": "ls"}).stdout)
    """

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hpc-sandbox-pool", daemon=True)
        self._thread.start()
        self._run(pool.start())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def acquire(self, trajectory_id: str | None = None, profile: str = "default", timeout: float | None = None) -> Slot:
        return self._run(self.pool.acquire(trajectory_id, profile, timeout))

    def release(self, slot: Slot, reset_workspace: bool = True) -> None:
        self._run(self.pool.release(slot, reset_workspace))

    @contextlib.contextmanager
    def slot(self, trajectory_id: str | None = None, profile: str = "default",
             reset_workspace: bool = True) -> Iterator[Slot]:
        slot = self.acquire(trajectory_id, profile)
        try:
            yield slot
        finally:
            self.release(slot, reset_workspace)

    def reset(self, slot: Slot) -> None:
        self._run(self.pool.reset(slot))

    def execute(self, slot: Slot, tool: str, args: dict[str, Any] | None = None,
                timeout: float | None = None) -> ToolResult:
        return self._run(self.pool.execute(slot, tool, args, timeout))

    def stream(self, slot: Slot, tool: str, args: dict[str, Any] | None = None,
               timeout: float | None = None) -> Iterator[ExecEvent]:
        """`pool.stream` as a plain iterator: output events as they come, the result last.
        Leaving the loop early hangs up (the call runs on in the slot)."""
        events = self.pool.stream(slot, tool, args, timeout)
        try:
            while (event := self._run(_next(events))) is not None:
                yield event
        finally:
            self._run(events.aclose())

    def execute_batch(self, calls: Sequence[ToolCall | tuple], timeout: float | None = None) -> list[ToolResult]:
        return self._run(self.pool.execute_batch(calls, timeout))

    def download(self, slot: Slot, path: str, dest: Path) -> ToolResult:
        return self._run(self.pool.download(slot, path, dest))

    def upload(self, slot: Slot, source: Path, path: str, mode: int | None = None) -> ToolResult:
        return self._run(self.pool.upload(slot, source, path, mode))

    def upload_tree(self, slot: Slot, local_dir: Path, dest: str = ".", **caps: Any) -> ToolResult:
        return self._run(self.pool.upload_tree(slot, local_dir, dest, **caps))

    def download_tree(self, slot: Slot, src: str, local_dir: Path, **caps: Any) -> ToolResult:
        return self._run(self.pool.download_tree(slot, src, local_dir, **caps))

    def capacity(self) -> list[Capacity]:
        return self._run(self.pool.capacity())

    def close(self) -> None:
        self._run(self.pool.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> "SyncSlotPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _next(events: AsyncGenerator[ExecEvent, None]) -> ExecEvent | None:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
