"""The worker loop under faults, on every backend: a store that refuses a turn, output it
cannot keep, an error nothing expected, a task that exits, a worker stopped while results
wait to be recorded, and jobs whose worker died running them.

Each test here failed before the loop had one way of handling them: finishes a failed turn
decided stay decided until a turn records them; an error that is not the store's stops the
worker (heartbeat too) and says so; what a task raises is the task's failure.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

import baton
from baton import Engine, RunStatus, StepStatus
from baton.errors import PlanError, StoreError, UsageError, WorkerFailed
from baton.store import Store, TurnResult
from baton.store.base import Turn
from tests.conftest import StoreFactory

R, S = RunStatus, StepStatus
CALLS: Counter[str] = Counter()


@baton.task(name="fx.count")
async def count(key: str, seconds: float = 0.0) -> dict[str, Any]:
    CALLS[key] += 1
    await asyncio.sleep(seconds)
    return {"key": key, "call": CALLS[key]}


@baton.task(name="fx.surrogate")
async def surrogate() -> str:
    return "half of a pair: \ud800"


@baton.task(name="fx.exits")
def exits(how: str) -> str:
    if how == "exit":
        sys.exit(4)
    raise KeyboardInterrupt


class _Wrapped:
    """A store seen through a misbehaving database; everything else is delegated."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.turns_with_finishes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RefusesTurns(_Wrapped):
    """The database goes away for ``times`` turns that carry finished attempts."""

    def __init__(self, inner: Store, times: int = 1, error: Exception | None = None) -> None:
        super().__init__(inner)
        self.times = times
        self.error = error or StoreError("connection lost")

    async def turn(self, turn: Turn) -> TurnResult:
        if turn.done and self.times > 0:
            self.times -= 1
            raise self.error
        return await self.inner.turn(turn)


class Gated(_Wrapped):
    """The first turn that records a finish waits until ``gate`` opens."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def turn(self, turn: Turn) -> TurnResult:
        if turn.done and not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        return await self.inner.turn(turn)


@pytest.fixture
async def engine(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine(stores(), poll_s=0.05, workdir=tmp_path) as eng:
        await eng.start_worker()
        yield eng


async def test_a_turn_the_store_refuses_loses_no_finished_attempt(
    stores: StoreFactory, tmp_path: Path
) -> None:
    store = RefusesTurns(stores(), times=3)
    async with Engine(cast(Store, store), poll_s=0.05, workdir=tmp_path) as engine:
        job = await engine.enqueue("echo", {"text": "kept"})
        await engine.start_worker()
        run = await engine.submit({"name": "r", "steps": [{"id": "a", "task": "echo", "with": {"x": 1}}]})
        done = await engine.wait_job(job.id, timeout_s=20)
        record = await run.wait(timeout_s=20)
    assert store.times == 0  # the store did refuse three turns
    assert (done.state, done.output, done.attempt) == ("completed", {"text": "kept"}, 1)
    assert record.status is R.COMPLETED


class LosesAnswers(_Wrapped):
    """A turn commits, and then the connection drops before its answer comes back (a
    database restarting at that moment): ``times`` of the turns ``which`` picks."""

    def __init__(self, inner: Store, which: Callable[[Turn, TurnResult], bool], times: int = 1) -> None:
        super().__init__(inner)
        self.which = which
        self.times = times

    async def turn(self, turn: Turn) -> TurnResult:
        outcome = await self.inner.turn(turn)
        if self.times > 0 and self.which(turn, outcome):
            self.times -= 1
            raise StoreError("consuming input failed: server closed the connection unexpectedly")
        return outcome


async def test_claims_of_a_turn_whose_answer_was_lost_are_given_back(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """The long chaos run found them: running for good under a live, heartbeating worker."""
    store = LosesAnswers(stores(), lambda _, outcome: bool(outcome.claimed), times=2)
    async with Engine(cast(Store, store), poll_s=0.05, workdir=tmp_path) as engine:
        job = await engine.enqueue("echo", {"text": "claimed twice"})
        run = await engine.submit(
            {"name": "r", "steps": [{"id": "a", "task": "echo", "with": {"x": 1}}]}, start=False
        )
        await engine.start_worker()
        done = await engine.wait_job(job.id, timeout_s=20)
        record = await run.wait(timeout_s=20)
        assert await engine.store.held(engine.worker.id if engine.worker else "") == []
    assert store.times == 0
    # given back uncounted: the lost claims were never attempts
    assert (done.state, done.attempt) == ("completed", 1)
    assert record.status is R.COMPLETED


async def test_a_run_ended_by_a_turn_whose_answer_was_lost_is_on_the_audit_trail(
    stores: StoreFactory, tmp_path: Path
) -> None:
    store = LosesAnswers(stores(), lambda turn, _: bool(turn.done))
    async with Engine(cast(Store, store), poll_s=0.05, workdir=tmp_path) as engine:
        await engine.start_worker()
        run = await engine.submit({"name": "r", "steps": [{"id": "a", "task": "echo", "with": {"x": 1}}]})
        record = await run.wait(timeout_s=20)
        deadline = time.monotonic() + 10
        while not any(
            e.action == "run.completed" for e in await engine.store.audit_entries(subject=run.run_id)
        ):
            assert time.monotonic() < deadline, "the run's ending never reached the audit trail"
            await asyncio.sleep(0.05)
    assert store.times == 0 and record.status is R.COMPLETED


class RefusesReads(_Wrapped):
    """What an attempt reads before its task runs (its last attempt's details) fails
    ``times`` times: the database restarting."""

    def __init__(self, inner: Store, times: int) -> None:
        super().__init__(inner)
        self.times = times

    async def attempt_detail(self, step: int, attempt: int) -> Any:
        if self.times > 0:
            self.times -= 1
            raise StoreError("consuming input failed: server closed the connection unexpectedly")
        return await self.inner.attempt_detail(step, attempt)


async def test_an_attempt_that_cannot_read_what_it_needs_for_a_moment_waits_instead_of_failing(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """Found by the chaos test under PostgreSQL restarts: a step failed its attempt when
    reading what it needed to start (its needs' outputs) met the restart."""
    store = RefusesReads(stores(), times=3)
    step = {"id": "a", "task": "fail", "with": {"times": 1}, "retry": {"attempts": 2, "backoff_s": 0.01}}
    async with Engine(cast(Store, store), poll_s=0.05, workdir=tmp_path) as engine:
        record = await engine.run({"name": "r", "steps": [step]})
        (done,) = await engine.store.get_steps(record.id)
    assert store.times == 0  # the second attempt's read was refused three times
    assert record.status is R.COMPLETED, done.error
    assert done.output == {"attempt": 2}


async def test_output_that_cannot_be_stored_fails_the_attempt_not_the_worker(engine: Engine) -> None:
    bad = await engine.enqueue("fx.surrogate", max_attempts=1)
    good = await engine.enqueue("echo", {"after": "it"})
    failed = await engine.wait_job(bad.id, timeout_s=20)
    assert failed.state == "discarded"
    assert failed.error is not None and "cannot be stored" in failed.error and "\\ud800" in failed.error
    assert (await engine.wait_job(good.id, timeout_s=20)).state == "completed"
    assert engine.worker is not None and engine.worker.active


async def test_a_plan_or_job_that_is_not_unicode_is_refused_before_anything_is_written(
    engine: Engine,
) -> None:
    with pytest.raises(PlanError, match="lone surrogate"):
        await engine.submit({"name": "bad", "steps": [{"id": "a", "task": "echo", "with": {"t": "\ud800"}}]})
    with pytest.raises(UsageError, match="JSON text"):
        await engine.enqueue("echo", {"t": "\udfff"})
    assert await engine.store.list_runs() == []
    assert await engine.store.list_jobs() == []


async def test_an_unexpected_error_stops_the_worker_and_its_heartbeat(
    stores: StoreFactory, tmp_path: Path
) -> None:
    broken = RefusesTurns(stores(), times=1, error=RuntimeError("a bug in the store"))
    engine = Engine(cast(Store, broken), owner="broken", lease_s=0.5, poll_s=0.05, workdir=tmp_path)
    await engine.open()
    job = await engine.enqueue("fx.count", {"key": "unexpected"})
    worker = await engine.start_worker()
    await asyncio.wait_for(worker.finished(), 10)
    assert isinstance(worker.failure, RuntimeError)
    assert worker._beat_task is not None and worker._beat_task.done()  # no heartbeat over a dead loop
    with pytest.raises(WorkerFailed, match="a bug in the store"):
        await engine.start_worker()  # it does not quietly come back

    # Its lease lapses and another worker finishes what it held.
    async with Engine(stores(), owner="other", poll_s=0.05, workdir=tmp_path) as other:
        await other.start_worker()
        finished = await other.wait_job(job.id, timeout_s=20)
    assert finished.state == "completed"
    await engine.close()


async def test_a_store_error_that_will_not_mend_stops_the_worker_and_wakes_its_waiters(
    stores: StoreFactory, tmp_path: Path
) -> None:
    full = RefusesTurns(stores(), times=100, error=StoreError("database or disk is full", transient=False))
    async with Engine(cast(Store, full), poll_s=0.05, workdir=tmp_path) as engine:
        run = await engine.submit({"name": "r", "steps": [{"id": "a", "task": "echo"}]})
        with pytest.raises(WorkerFailed, match="disk is full"):
            await run.wait(timeout_s=20)


@pytest.mark.parametrize("how", ["exit", "interrupt"])
async def test_a_task_that_exits_fails_its_attempt_and_the_worker_goes_on(engine: Engine, how: str) -> None:
    job = await engine.enqueue("fx.exits", {"how": how}, max_attempts=2)
    failed = await engine.wait_job(job.id, timeout_s=30)
    after = await engine.enqueue("echo", {"still": "here"})
    assert (await engine.wait_job(after.id, timeout_s=20)).state == "completed"
    assert (failed.state, failed.attempt) == ("discarded", 2)
    name = "SystemExit(4)" if how == "exit" else "KeyboardInterrupt"
    assert failed.error == f"the task raised {name}"


async def test_stopping_records_what_finished_instead_of_giving_it_back(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """An attempt that finished while the worker was busy recording another is recorded by
    the stopping worker: given back, it would run (its effect happen) a second time."""
    CALLS.clear()
    gated = Gated(stores())
    engine = Engine(cast(Store, gated), poll_s=0.05, workdir=tmp_path)
    await engine.open()
    first = await engine.enqueue("fx.count", {"key": "first"})
    second = await engine.enqueue("fx.count", {"key": "second", "seconds": 0.2})
    worker = await engine.start_worker()
    await asyncio.wait_for(gated.waiting.wait(), 10)  # first's finish waits in a turn
    attempt = worker.running[second.id]
    assert attempt.task is not None
    await asyncio.wait_for(asyncio.shield(attempt.task), 10)  # second finished meanwhile
    closing = asyncio.ensure_future(engine.close())
    await asyncio.sleep(0.1)  # the worker is stopping
    gated.gate.set()
    await asyncio.wait_for(closing, 10)

    async with Engine(stores(), poll_s=0.05, workdir=tmp_path) as other:
        await other.start_worker()
        await asyncio.sleep(0.5)  # time for another worker to take anything given back
        jobs = {j.id: j for j in await other.store.list_jobs()}
    assert (jobs[first.id].state, jobs[second.id].state) == ("completed", "completed")
    assert (jobs[second.id].attempt, jobs[second.id].output) == (1, {"key": "second", "call": 1})
    assert CALLS == {"first": 1, "second": 1}


async def test_a_job_whose_worker_died_running_it_alone_is_discarded_after_its_attempts(
    stores: StoreFactory, tmp_path: Path
) -> None:
    """Lost attempts count: the job is discarded with the reason once its worker has
    died running it alone as many times as it had attempts."""
    CALLS.clear()
    store = stores()
    async with Engine(store, poll_s=0.05, workdir=tmp_path) as setup:
        job = await setup.enqueue("fx.count", {"key": "killer", "seconds": 30}, max_attempts=2)
    for n in range(1, 3):
        dying = Engine(stores(), owner=f"dying-{n}", lease_s=0.3, poll_s=0.05, workdir=tmp_path)
        await dying.start_worker()
        started = time.monotonic()
        while CALLS["killer"] < n:
            assert time.monotonic() - started < 10, f"attempt {n} did not start"
            await asyncio.sleep(0.02)
        await _die(dying)
        await asyncio.sleep(0.5)  # its lease lapses
    async with Engine(stores(), owner="last", poll_s=0.05, workdir=tmp_path) as last:
        await last.start_worker()
        final = await last.wait_job(job.id, timeout_s=20)
        history = await last.store.get_job_attempts(job.id)
    assert CALLS["killer"] == 2
    assert final.state == "discarded"
    assert final.error == "worker died 2 times running it"
    assert [a.status for a in history] == ["lost", "lost", "failed"]


async def _die(engine: Engine) -> None:
    """The engine's process dies where it is: nothing more is written, nothing released."""
    worker = engine.worker
    assert worker is not None
    tasks = [worker._loop_task, worker._beat_task, worker._watch_task]
    tasks += [a.task for a in worker.running.values()]
    for task in tasks:
        if task is not None:
            task.cancel()
    await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
    engine.worker = None
    await engine.close()


async def test_runs_started_from_python_are_on_the_audit_trail_with_their_end(engine: Engine) -> None:
    run = await engine.run(
        {"name": "audited", "steps": [{"id": "a", "task": "echo"}]}, actor="python:me@here"
    )
    assert run.status is R.COMPLETED
    for _ in range(200):  # the ending is written a moment after the run ends
        entries = await engine.store.audit_entries(subject=run.id)
        if len(entries) == 2:
            break
        await asyncio.sleep(0.01)
    assert [(e.actor, e.action) for e in entries] == [
        ("python:me@here", "run.start"),
        ("system", "run.completed"),
    ]
    assert entries[0].detail == {"name": "audited"}
