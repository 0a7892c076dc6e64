"""Cancellation is never lost: a wait that is cancelled in the same moment as what it waits
for wakes it must end cancelled. (Python 3.11's asyncio.wait_for returns the result then and
drops the cancellation, which a loop around it turns into a wait for ever: Ctrl-C on
`baton run` hung when a step ended at the moment it was pressed.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

from baton import Engine


async def test_a_run_wait_cancelled_as_the_run_changes_ends_cancelled(tmp_path: Path) -> None:
    async with Engine(str(tmp_path / "w.db"), poll_s=5.0) as engine:
        handle = await engine.submit({"name": "idle", "steps": [{"id": "a", "task": "echo"}]}, start=False)
        for _ in range(50):
            waiting = asyncio.create_task(engine.wait(handle.run_id))
            await asyncio.sleep(0.005)  # it is waiting on the run's wake-up now
            engine.runs_changed({handle.run_id})  # the run moved on ...
            waiting.cancel()  # ... as Ctrl-C came
            done, _ = await asyncio.wait([waiting], timeout=2)
            assert done, "the cancellation was lost: the wait goes on"
            assert waiting.cancelled()


async def test_the_worker_stops_when_cancelled_as_it_is_woken(tmp_path: Path) -> None:
    async with Engine(str(tmp_path / "k.db"), poll_s=5.0) as engine:
        for _ in range(20):
            worker = await engine.start_worker()
            loop_task = worker._loop_task
            assert loop_task is not None
            await asyncio.sleep(0.005)
            worker.poke()
            loop_task.cancel()
            done, _ = await asyncio.wait([loop_task], timeout=2)
            assert done, "the worker's loop went on after it was cancelled"
            await worker.stop()
            engine.worker = None
