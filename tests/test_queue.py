"""Standalone jobs and cron through the Engine and its worker, on every backend; the
`baton worker` and `baton jobs` commands as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import baton
from baton import Engine, TaskContext
from baton.errors import Conflict, UsageError
from baton.queue.cron import fire_due, next_tick
from baton.store import Schedule, Store
from tests.conftest import StoreFactory

CALLS: Counter[str] = Counter()
GATE = asyncio.Event()


@baton.task(name="q.add")
async def add(a: int, b: int) -> int:
    CALLS["add"] += 1
    return a + b


@baton.task(name="q.flaky")
async def flaky(ctx: TaskContext, key: str, fail_first: int = 1) -> dict[str, Any]:
    CALLS[key] += 1
    if ctx.attempt <= fail_first:
        raise RuntimeError(f"flaky attempt {ctx.attempt}")
    return {"attempt": ctx.attempt, "previous_error": ctx.previous_error}


@baton.task(name="q.wait")
async def wait_forever(key: str) -> str:
    CALLS[key] += 1
    await asyncio.sleep(60)
    return "late"


@pytest.fixture
async def engine(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine(stores(), poll_s=0.05, workdir=tmp_path) as eng:
        yield eng


async def test_an_enqueued_call_runs_on_the_worker_and_its_result_is_kept(engine: Engine) -> None:
    job = await engine.enqueue("q.add", {"a": 2, "b": 3})
    assert job.state == "available" and job.attempt == 0
    await engine.start_worker()
    done = await engine.wait_job(job.id, timeout_s=10)
    assert (done.state, done.output, done.attempt) == ("completed", 5, 1)
    assert [(a.attempt, a.status) for a in await engine.store.get_job_attempts(job.id)] == [(1, "succeeded")]


async def test_a_key_holders_job_keeps_its_role_and_runs_confined(engine: Engine) -> None:
    local = await engine.enqueue("shell", {"argv": ["pwd"]})
    held = await engine.enqueue("shell", {"argv": ["pwd"]}, key_role="admin", actor="key:test")
    await engine.start_worker()
    done = [await engine.wait_job(job.id, timeout_s=10) for job in (local, held)]
    assert [d.state for d in done] == ["completed", "completed"]
    assert done[0].output["stdout"].strip() == str(engine.workdir)  # a local caller's: as before
    assert done[1].output["stdout"].strip() == str(engine.sandbox.root / f"job-{held.id}")


async def test_a_failing_job_retries_with_feedback_then_completes(engine: Engine) -> None:
    await engine.start_worker()
    job = await engine.enqueue("q.flaky", {"key": f"retry-{uuid.uuid4().hex}"}, max_attempts=3)
    # Job retries back off exponentially from 1 s.
    done = await engine.wait_job(job.id, timeout_s=15)
    assert done.state == "completed"
    assert done.output == {"attempt": 2, "previous_error": "RuntimeError: flaky attempt 1"}
    assert [a.status for a in await engine.store.get_job_attempts(job.id)] == ["failed", "succeeded"]


async def test_a_job_out_of_attempts_is_discarded_and_can_be_retried_by_hand(engine: Engine) -> None:
    await engine.start_worker()
    key = f"discard-{uuid.uuid4().hex}"
    job = await engine.enqueue("q.flaky", {"key": key, "fail_first": 1}, max_attempts=1)
    done = await engine.wait_job(job.id, timeout_s=10)
    assert (done.state, done.attempt, done.error) == ("discarded", 1, "RuntimeError: flaky attempt 1")
    assert [j.id for j in await engine.store.list_jobs(state="discarded")] == [job.id]
    with pytest.raises(Conflict, match="only discarded or cancelled"):
        await engine.retry_job((await engine.enqueue("q.add", {"a": 1, "b": 1})).id)

    again = await engine.retry_job(job.id)
    assert again.state == "available" and again.max_attempts == 2
    done = await engine.wait_job(job.id, timeout_s=10)
    assert (done.state, done.attempt) == ("completed", 2)
    assert CALLS[key] == 2


async def test_a_scheduled_job_waits_for_its_time(engine: Engine) -> None:
    await engine.start_worker()
    job = await engine.enqueue("q.add", {"a": 1, "b": 1}, delay_s=0.6)
    assert job.state == "scheduled"
    await asyncio.sleep(0.3)
    assert (await engine.store.get_job(job.id)).state == "scheduled"
    done = await engine.wait_job(job.id, timeout_s=10)
    assert done.state == "completed"
    assert done.started_at is not None and done.started_at >= job.created_at + 0.6


async def test_priority_and_queues_decide_what_a_worker_takes(engine: Engine) -> None:
    low = await engine.enqueue("q.add", {"a": 0, "b": 1}, priority=0)
    high = await engine.enqueue("q.add", {"a": 0, "b": 2}, priority=5)
    other = await engine.enqueue("q.add", {"a": 0, "b": 3}, queue="reports")
    await engine.start_worker(concurrency=1, queues=["default"])
    await engine.wait_job(low.id, timeout_s=10)
    first, second = await engine.store.get_job(high.id), await engine.store.get_job(low.id)
    assert first.started_at is not None and second.started_at is not None
    assert first.started_at <= second.started_at  # higher priority first
    await asyncio.sleep(0.2)
    assert (await engine.store.get_job(other.id)).state == "available"  # not this worker's queue


async def test_cancelling_a_running_job_stops_it(engine: Engine) -> None:
    await engine.start_worker()
    key = f"cancel-{uuid.uuid4().hex}"
    job = await engine.enqueue("q.wait", {"key": key})
    deadline = time.monotonic() + 5
    while CALLS[key] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await engine.cancel_job(job.id)
    done = await engine.wait_job(job.id, timeout_s=5)
    assert done.state == "cancelled"
    with pytest.raises(Conflict, match="nothing to cancel"):
        await engine.cancel_job(job.id)


async def test_bad_calls_are_refused_before_anything_is_queued(engine: Engine) -> None:
    with pytest.raises(UsageError, match="unknown task 'nope'"):
        await engine.enqueue("nope")
    with pytest.raises(UsageError, match=r"q\.add"):
        await engine.enqueue("q.add", {"a": 1})
    with pytest.raises(UsageError, match="cron expression"):
        await engine.schedule("q.add", cron="every minute", inputs={"a": 1, "b": 2})
    assert await engine.store.list_jobs() == []
    assert await engine.store.list_schedules() == []


async def test_fifty_concurrent_enqueues_with_one_key_make_one_job(
    stores: StoreFactory, tmp_path: Path
) -> None:
    engines = [Engine(stores(), workdir=tmp_path) for _ in range(50)]
    try:
        await asyncio.gather(*(e.open() for e in engines))
        made = await asyncio.gather(
            *(
                e.enqueue("q.add", {"a": i, "b": 0}, unique_key="nightly-report")
                for i, e in enumerate(engines)
            )
        )
    finally:
        await asyncio.gather(*(e.close() for e in engines))
    assert len({j.id for j in made}) == 1
    assert sorted(j.duplicate for j in made) == [False] + [True] * 49


async def test_three_schedulers_fire_exactly_one_job_per_tick(stores: StoreFactory, tmp_path: Path) -> None:
    """Three schedulers (their own store connections) race over 120 simulated minutes."""
    engines = [Engine(stores(), workdir=tmp_path) for _ in range(3)]
    start = 1_800_000_000.0  # a whole minute
    try:
        await asyncio.gather(*(e.open() for e in engines))
        schedule = await engines[0].schedule("q.add", cron="* * * * *", inputs={"a": 1, "b": 1}, name="tick")
        await _restart_at(engines[0].store, schedule, start)
        for minute in range(120):
            now = start + minute * 60 + 0.5
            await asyncio.gather(*(fire_due(e.store, now) for e in engines))
        jobs = await engines[0].store.list_jobs(limit=1000)
    finally:
        await asyncio.gather(*(e.close() for e in engines))
    keys = Counter(j.unique_key for j in jobs)
    assert len(jobs) == 120
    assert set(keys.values()) == {1}
    assert sorted(keys) == sorted(f"cron:tick:{start + m * 60:.3f}" for m in range(120))


async def _restart_at(store: Store, schedule: Schedule, next_at: float) -> None:
    """The schedule as if declared just before ``next_at`` (simulated time)."""
    await store.delete_schedule(schedule.name)
    schedule.next_at = next_at
    await store.put_schedule(schedule)


async def test_a_scheduler_that_was_down_does_not_fire_a_burst(engine: Engine) -> None:
    start = 1_800_000_000.0
    schedule = await engine.schedule("q.add", cron="* * * * *", inputs={"a": 1, "b": 1}, catch_up_s=150)
    await _restart_at(engine.store, schedule, start)
    # Down for an hour: only the ticks of the last 150 s fire, then the schedule moves on.
    fired = await fire_due(engine.store, start + 3600 + 1)
    assert fired == {"q.add": 3}
    (moved,) = await engine.store.list_schedules()
    assert moved.next_at == next_tick("* * * * *", start + 3600 + 1) == start + 3660
    assert await fire_due(engine.store, start + 3600 + 2) == {}


async def test_cron_ticks_run_on_the_worker(engine: Engine) -> None:
    await engine.schedule("q.add", cron="* * * * * *", inputs={"a": 20, "b": 1}, name="every-second")
    await engine.start_worker()
    deadline = time.monotonic() + 10
    while not [j for j in await engine.store.list_jobs(state="completed")]:
        assert time.monotonic() < deadline, "no cron tick ran within 10 s"
        await asyncio.sleep(0.1)
    (done, *_) = await engine.store.list_jobs(state="completed")
    assert (
        done.output == 21 and done.unique_key is not None and done.unique_key.startswith("cron:every-second:")
    )


# -- the commands -------------------------------------------------------------------------------

TASKS = """
import asyncio, baton

@baton.task(name="w.slow")
async def slow(n: int, seconds: float = 1.0) -> int:
    await asyncio.sleep(seconds)
    return n
"""


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def workdir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "wtasks.py").write_text(TASKS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "BATON_DB": str(tmp_path / "q.db")}
    return tmp_path, env


def test_sigterm_lets_running_jobs_finish_then_the_worker_exits_0(
    workdir: tuple[Path, dict[str, str]],
) -> None:
    cwd, env = workdir
    for n in range(3):
        made = _cli(
            "jobs",
            "enqueue",
            "w.slow",
            "-i",
            json.dumps({"n": n, "seconds": 3}),  # long enough to see two of them running
            "--import",
            "wtasks",
            cwd=cwd,
            env=env,
        )
        assert made.returncode == 0, made.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton", "worker", "--import", "wtasks", "--concurrency", "2", "--json"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "started"
        deadline = time.monotonic() + 20
        while True:
            listed = json.loads(_cli("jobs", "list", "--state", "running", "--json", cwd=cwd, env=env).stdout)
            if len(listed["jobs"]) == 2:
                break
            assert time.monotonic() < deadline, "the worker took no jobs"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stopped = json.loads(out)
    assert stopped["event"] == "stopped" and stopped["attempts"] == 2
    jobs = json.loads(_cli("jobs", "list", "--json", cwd=cwd, env=env).stdout)["jobs"]
    # The two it was running finished; the third was never started and waits for a worker.
    assert sorted(j["state"] for j in jobs) == ["available", "completed", "completed"]


def test_jobs_commands_report_bad_input_with_exit_2(workdir: tuple[Path, dict[str, str]]) -> None:
    cwd, env = workdir
    bad_json = _cli("jobs", "enqueue", "echo", "-i", "{nope", cwd=cwd, env=env)
    unknown = _cli("jobs", "enqueue", "nope", cwd=cwd, env=env)
    bad_state = _cli("jobs", "list", "--state", "sleeping", cwd=cwd, env=env)
    missing = _cli("jobs", "show", "999", "--json", cwd=cwd, env=env)
    bad_cron = _cli("schedules", "add", "x", "--task", "echo", "--cron", "61 * * * *", cwd=cwd, env=env)
    for result in (bad_json, unknown, bad_state, missing, bad_cron):
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
    assert "--input is not JSON" in bad_json.stderr
    assert "unknown task 'nope'" in unknown.stderr
    assert "unknown job state 'sleeping'" in bad_state.stderr
    assert json.loads(missing.stdout) == {"error": {"code": "not_found", "message": "no job 999"}}
    assert "not valid" in bad_cron.stderr
    listed = _cli("jobs", "list", "--json", cwd=cwd, env=env)
    assert json.loads(listed.stdout) == {"jobs": []}  # nothing was queued by the bad calls


async def test_schedules_declared_in_a_file_are_checked_and_put(engine: Engine, tmp_path: Path) -> None:
    from baton.cli.queue import load_schedules

    good = tmp_path / "schedules.yaml"
    good.write_text(
        "- {name: nightly, task: q.add, cron: '0 3 * * *', with: {a: 1, b: 2}, catch_up_s: 600}\n"
        "- {task: echo, cron: '*/5 * * * *', queue: reports}\n"
    )
    declared = await load_schedules(engine, good)
    assert [(s.name, s.task, s.cron, s.queue) for s in declared] == [
        ("nightly", "q.add", "0 3 * * *", "default"),
        ("echo", "echo", "*/5 * * * *", "reports"),
    ]
    assert sorted(s.name for s in await engine.store.list_schedules()) == ["echo", "nightly"]

    bad = tmp_path / "bad.yaml"
    for text, problem in [
        ("{task: echo}", "expected a list"),
        ("- {task: echo}", "needs at least 'task' and 'cron'"),
        ("- {task: echo, cron: '* * * * *', every: 5}", "unknown field(s) ['every']"),
        ("- {task: echo, cron: 'often'}", "cron expression 'often'"),
    ]:
        bad.write_text(text)
        with pytest.raises(UsageError, match=re.escape(problem)):
            await load_schedules(engine, bad)


async def test_a_run_at_past_any_date_is_refused(tmp_path: Path) -> None:
    async with Engine(str(tmp_path / "q.db")) as engine:
        with pytest.raises(UsageError, match="run_at must be a Unix time"):
            await engine.enqueue("echo", {}, run_at=1e300)
        assert await engine.store.list_jobs() == []
