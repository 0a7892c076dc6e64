"""Running plans through the Engine: dataflow, bounds, retries, timeouts, pause/resume/cancel,
recovery of orphaned runs, fencing, built-in tasks and user tasks.

Tests where the store matters run on both backends: memory, and SQLite on a real file.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

import baton
from baton import Engine, Event, Registry, RunHandle, RunStatus, StepStatus, TaskContext
from baton.errors import PlanError, TaskFailed
from baton.store import Beat, Store
from tests.conftest import StoreFactory

R, S = RunStatus, StepStatus

# -- recording tasks -------------------------------------------------------------------------


@dataclass
class Recorder:
    """What the tasks of one run did, in this process's clock."""

    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, "start"|"end", step)
    calls: Counter[str] = field(default_factory=Counter)
    active: int = 0
    peak: int = 0

    def start(self, step: str) -> None:
        self.calls[step] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.events.append((time.perf_counter(), "start", step))

    def end(self, step: str) -> None:
        self.active -= 1
        self.events.append((time.perf_counter(), "end", step))

    def at(self, kind: str, step: str) -> float:
        return next(t for t, k, s in self.events if k == kind and s == step)

    @property
    def started(self) -> list[str]:
        return [s for _, k, s in self.events if k == "start"]


RUNS: defaultdict[str, Recorder] = defaultdict(Recorder)


@baton.task(name="t.work")
async def work(ctx: TaskContext, seconds: float = 0.0, value: Any = None) -> dict[str, Any]:
    """Record start and end, sleep ``seconds``, return what it was given."""
    rec = RUNS[ctx.run_id]
    rec.start(ctx.step_id)
    try:
        await asyncio.sleep(seconds)
    finally:
        rec.end(ctx.step_id)
    return {"step": ctx.step_id, "value": value, "attempt": ctx.attempt}


@baton.task(name="t.context")
async def show_context(ctx: TaskContext, note: str = "") -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "step_id": ctx.step_id,
        "attempt": ctx.attempt,
        "idempotency_key": ctx.idempotency_key,
        "workdir": str(ctx.workdir),
        "note": note,
    }


@baton.task(name="t.blocking")
def blocking(ctx: TaskContext, timeout_s: float = 3.0) -> dict[str, Any]:
    """A sync task that blocks until its sibling (an async task) lets it go."""
    released = GATES[ctx.run_id].wait(timeout_s)
    return {"thread": threading.get_ident(), "released": released}


@baton.task(name="t.release")
async def release(ctx: TaskContext) -> str:
    await asyncio.sleep(0.05)
    GATES[ctx.run_id].set()
    return "released"


GATES: defaultdict[str, threading.Event] = defaultdict(threading.Event)


@baton.task(name="t.flaky")
async def flaky(ctx: TaskContext, fail_first: int = 1, seconds: float = 0.0) -> dict[str, Any]:
    RUNS[ctx.run_id].start(ctx.step_id)
    try:
        await asyncio.sleep(seconds)
    finally:
        RUNS[ctx.run_id].end(ctx.step_id)
    if ctx.attempt <= fail_first:
        raise TaskFailed(f"flaky attempt {ctx.attempt}")
    return {"attempt": ctx.attempt, "temperature": ctx.temperature}


@baton.task(name="t.value")
def value(result: Any) -> Any:
    return result


@baton.task(name="t.not_json")
def not_json(kind: str) -> Any:
    return {"set": {1, 2}} if kind == "set" else float("nan")


@baton.task
def default_named(x: int) -> int:
    """A task registered under its module-qualified name."""
    return x * 2


@baton.task(name="t.ctx_by_module")
async def ctx_by_module(ctx: baton.TaskContext) -> str:
    return ctx.idempotency_key


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
async def engine(stores: StoreFactory, tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine(stores(), poll_s=0.05, workdir=tmp_path) as eng:
        yield eng


@pytest.fixture
async def mem_engine(tmp_path: Path) -> AsyncIterator[Engine]:
    """For behaviour that does not depend on the store."""
    async with Engine("memory://", poll_s=0.05, workdir=tmp_path) as eng:
        yield eng


def plan(*steps: dict[str, Any], name: str = "p", **policy: Any) -> dict[str, Any]:
    return {"name": name, "policy": policy, "steps": list(steps)}


def step(id: str, task: str = "t.work", needs: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
    inputs = fields.pop("with", {})
    return {"id": id, "task": task, "needs": list(needs), "with": inputs, **fields}


async def until(pred: Callable[[], Any], within: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while True:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def step_map(engine: Engine, run_id: str) -> dict[str, Any]:
    return {s.step_id: s for s in await engine.store.get_steps(run_id)}


async def statuses(engine: Engine, run_id: str) -> dict[str, StepStatus]:
    return {k: s.status for k, s in (await step_map(engine, run_id)).items()}


async def attempts(engine: Engine, run_id: str, step_id: str) -> list[tuple[int, str]]:
    return [(a.attempt, a.status) for a in await engine.store.get_attempts(run_id) if a.step_id == step_id]


async def submit(engine: Engine, source: Any) -> RunHandle:
    handle = await engine.submit(source)
    assert isinstance(handle, RunHandle)
    return handle


class _Wrapped:
    """A store seen through a misbehaving process; everything else is delegated."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Stalls(_Wrapped):
    """The process stalls: its heartbeats do not land, so its lease lapses while it works on."""

    async def heartbeat(self, owner: str, now: float, lease_s: float, held: list[int]) -> Beat:
        return Beat()


async def crash(engine: Engine) -> None:
    """The engine's process dies where it is: nothing more is written, nothing released."""
    worker = engine.worker
    assert worker is not None
    tasks = [worker._loop_task, worker._beat_task, worker._watch_task]
    tasks += [a.task for a in worker.running.values()]
    for task in tasks:
        if task is not None:
            task.cancel()
    for task in tasks:
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    engine.worker = None
    await engine.close()


# -- dataflow and scheduling ----------------------------------------------------------------


async def test_a_step_starts_only_after_all_its_needs_succeeded(engine: Engine) -> None:
    seen: dict[str, dict[str, tuple[StepStatus, Any]]] = {}

    async def probe(ctx: TaskContext, seconds: float) -> str:
        # What the store says about this step's needs when it starts.
        steps = await step_map(engine, ctx.run_id)
        seen[ctx.step_id] = {k: (s.status, s.output) for k, s in steps.items()}
        RUNS[ctx.run_id].start(ctx.step_id)
        await asyncio.sleep(seconds)
        RUNS[ctx.run_id].end(ctx.step_id)
        return f"out-{ctx.step_id}"

    engine.registry.add(probe, name="probe")
    needs = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c"), "e": (), "f": ("e", "a")}
    seconds = {"a": 0.1, "b": 0.15, "c": 0.01, "d": 0.01, "e": 0.2, "f": 0.01}
    record = await engine.run(
        plan(*[step(k, "probe", needs=v, **{"with": {"seconds": seconds[k]}}) for k, v in needs.items()])
    )
    assert record.status is R.COMPLETED
    rec = RUNS[record.id]
    for sid, deps in needs.items():
        for dep in deps:
            assert rec.at("start", sid) > rec.at("end", dep), f"{sid} started before {dep} finished"
            # ... and the need's output was committed before the dependent started.
            assert seen[sid][dep] == (S.SUCCEEDED, f"out-{dep}")
    # Independent steps did run at the same time.
    assert rec.at("start", "e") < rec.at("end", "a")
    assert rec.at("start", "c") < rec.at("end", "b")


async def test_max_parallel_is_never_exceeded(engine: Engine) -> None:
    steps = [step(f"s{i}", **{"with": {"seconds": 0.04}}) for i in range(10)]
    steps += [step("join", needs=tuple(f"s{i}" for i in range(10)))]
    record = await engine.run(plan(*steps, max_parallel=3))
    assert record.status is R.COMPLETED
    rec = RUNS[record.id]
    assert rec.peak == 3
    assert sum(rec.calls.values()) == 11


async def test_the_step_heading_the_longest_chain_starts_first(mem_engine: Engine) -> None:
    record = await mem_engine.run(
        plan(
            step("short"),
            step("side"),
            step("l1"),
            step("l2", needs=("l1",)),
            step("l3", needs=("l2",)),
            max_parallel=1,
        )
    )
    order = RUNS[record.id].started
    assert order[:2] == ["l1", "l2"], order
    assert RUNS[record.id].peak == 1


async def test_estimates_weigh_the_critical_path(mem_engine: Engine) -> None:
    record = await mem_engine.run(
        plan(
            step("quick1", estimate_s=1),
            step("quick2", needs=("quick1",), estimate_s=1),
            step("big", estimate_s=10),
            max_parallel=1,
        )
    )
    assert RUNS[record.id].started[0] == "big"


@pytest.mark.parametrize("barrier", ["none", "wave"])
async def test_wave_barrier_versus_dataflow(mem_engine: Engine, barrier: str) -> None:
    started_early = asyncio.Event()

    async def slow(ctx: TaskContext) -> str:
        RUNS[ctx.run_id].start(ctx.step_id)
        # Under dataflow, "next" starts while this runs and lets it go at once; under
        # the wave barrier nothing of wave 1 may start, so this waits its full time.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(started_early.wait(), 0.4)
        RUNS[ctx.run_id].end(ctx.step_id)
        return "slow"

    async def nxt(ctx: TaskContext) -> str:
        RUNS[ctx.run_id].start(ctx.step_id)
        started_early.set()
        RUNS[ctx.run_id].end(ctx.step_id)
        return "next"

    mem_engine.registry.add(slow, name="slow")
    mem_engine.registry.add(nxt, name="next")
    record = await mem_engine.run(
        plan(step("slow", "slow"), step("fast"), step("next", "next", needs=("fast",)), barrier=barrier)
    )
    assert record.status is R.COMPLETED
    rec = RUNS[record.id]
    if barrier == "wave":
        assert rec.at("start", "next") > rec.at("end", "slow")
        assert rec.at("start", "next") > rec.at("end", "fast")
    else:
        assert rec.at("start", "next") < rec.at("end", "slow")


@pytest.mark.parametrize(
    ("policy", "peak"),
    [
        ({"complexity": "simple"}, 1),
        ({"complexity": "medium"}, 2),
        ({"complexity": "complex"}, 3),
        ({"complexity": "crisis"}, 5),
        ({"mode": "sequential"}, 1),
        ({"mode": "single"}, 1),
        ({"complexity": "simple", "max_parallel": 4}, 4),
    ],
)
async def test_complexity_presets_and_modes_bound_concurrency(
    mem_engine: Engine, policy: dict[str, Any], peak: int
) -> None:
    record = await mem_engine.run(
        plan(*[step(f"s{i}", **{"with": {"seconds": 0.03}}) for i in range(6)], **policy)
    )
    assert record.status is R.COMPLETED
    assert RUNS[record.id].peak == peak


async def test_complexity_preset_timeout_applies_to_steps(mem_engine: Engine) -> None:
    # The preset's timeout is the default; a step's own timeout still wins.
    record = await mem_engine.run(
        plan(
            step("own", "sleep", timeout_s=0.05, **{"with": {"seconds": 5}}),
            step("quick", "sleep", **{"with": {"seconds": 0.01}}),
            complexity="crisis",
        )
    )
    steps = await step_map(mem_engine, record.id)
    assert steps["own"].status is S.FAILED
    assert "0.05" in steps["own"].error
    assert steps["quick"].status is S.SUCCEEDED


# -- statuses, failures, retries, timeouts -----------------------------------------------------


async def test_statuses_of_a_completed_run(engine: Engine) -> None:
    events: list[Event] = []
    engine.subscribe(events.append)
    record = await engine.run(plan(step("a"), step("b", needs=("a",))))
    assert record.status is R.COMPLETED
    assert record.error is None
    assert record.started_at is not None and record.finished_at is not None
    assert record.finished_at >= record.started_at
    steps = await step_map(engine, record.id)
    assert {k: (s.status, s.attempt) for k, s in steps.items()} == {
        "a": (S.SUCCEEDED, 1),
        "b": (S.SUCCEEDED, 1),
    }
    assert steps["b"].output == {"step": "b", "value": None, "attempt": 1}
    kinds = [e.kind for e in events if e.run_id == record.id]
    assert kinds[0] == "run.pending" and kinds[-1] == "run.completed"
    assert [(e.kind, e.step_id) for e in events if e.kind.startswith("step.")] == [
        ("step.running", "a"),
        ("step.succeeded", "a"),
        ("step.running", "b"),
        ("step.succeeded", "b"),
    ]
    assert [r.id for r in await engine.store.list_runs(status=R.COMPLETED)] == [record.id]


async def test_failure_is_isolated_to_the_dependents_of_the_failed_step(engine: Engine) -> None:
    record = await engine.run(
        plan(
            step("bad", "fail", **{"with": {"message": "no luck"}}),
            step("child", needs=("bad",)),
            step("grandchild", needs=("child",)),
            step("other", **{"with": {"seconds": 0.05}}),
            step("other2", needs=("other",)),
            step("mixed", needs=("bad", "other")),
        )
    )
    assert record.status is R.FAILED
    assert record.error is not None and "bad" in record.error
    steps = await step_map(engine, record.id)
    assert {k: s.status for k, s in steps.items()} == {
        "bad": S.FAILED,
        "child": S.SKIPPED,
        "grandchild": S.SKIPPED,
        "other": S.SUCCEEDED,
        "other2": S.SUCCEEDED,
        "mixed": S.SKIPPED,
    }
    assert steps["bad"].error == "no luck (attempt 1)"
    assert "bad" in steps["child"].error
    calls = RUNS[record.id].calls
    assert calls["child"] == calls["grandchild"] == calls["mixed"] == 0
    assert calls["other"] == calls["other2"] == 1


async def test_retries_with_backoff_until_success(engine: Engine) -> None:
    events: list[Event] = []
    engine.subscribe(events.append)
    started = time.monotonic()
    record = await engine.run(
        plan(step("flaky", "fail", retry={"attempts": 3, "backoff_s": 0.05}, **{"with": {"times": 2}}))
    )
    elapsed = time.monotonic() - started
    assert record.status is R.COMPLETED
    steps = await step_map(engine, record.id)
    assert (steps["flaky"].status, steps["flaky"].attempt, steps["flaky"].output) == (
        S.SUCCEEDED,
        3,
        {"attempt": 3},
    )
    history = [a for a in await engine.store.get_attempts(record.id) if a.step_id == "flaky"]
    assert [(a.attempt, a.status) for a in history] == [(1, "failed"), (2, "failed"), (3, "succeeded")]
    assert history[0].error == "injected failure (attempt 1)"
    # Backoff 0.05 then 0.1, each with at most 20% jitter.
    assert history[1].started_at - history[0].finished_at >= 0.04
    assert history[2].started_at - history[1].finished_at >= 0.08
    assert elapsed >= 0.12
    assert [e.kind for e in events if e.step_id == "flaky"].count("step.retrying") == 2


async def test_retries_exhausted_fail_the_step(mem_engine: Engine) -> None:
    record = await mem_engine.run(
        plan(step("never", "fail", retry={"attempts": 2, "backoff_s": 0}), step("after", needs=("never",)))
    )
    assert record.status is R.FAILED
    assert await attempts(mem_engine, record.id, "never") == [(1, "failed"), (2, "failed")]
    assert await statuses(mem_engine, record.id) == {"never": S.FAILED, "after": S.SKIPPED}


async def test_plan_retry_policy_is_the_default_for_steps(mem_engine: Engine) -> None:
    record = await mem_engine.run(
        plan(
            step("x", "fail", **{"with": {"times": 1}}),
            step("y", "fail", retry={"attempts": 1}, **{"with": {"times": 1}}),
            retry={"attempts": 2, "backoff_s": 0},
        )
    )
    assert await statuses(mem_engine, record.id) == {"x": S.SUCCEEDED, "y": S.FAILED}


async def test_retry_temperatures_reach_the_task(mem_engine: Engine) -> None:
    record = await mem_engine.run(
        plan(
            step(
                "gen",
                "t.flaky",
                retry={"attempts": 4, "backoff_s": 0, "temperatures": [0.7, 0.5, 0.3]},
                **{"with": {"fail_first": 3}},
            )
        )
    )
    steps = await step_map(mem_engine, record.id)
    assert steps["gen"].output == {"attempt": 4, "temperature": 0.3}


async def test_per_attempt_timeout_fails_and_retries(engine: Engine) -> None:
    record = await engine.run(
        plan(
            step(
                "slow",
                "sleep",
                timeout_s=0.1,
                retry={"attempts": 2, "backoff_s": 0},
                **{"with": {"seconds": 30}},
            )
        )
    )
    assert record.status is R.FAILED
    steps = await step_map(engine, record.id)
    assert steps["slow"].status is S.FAILED
    assert "timed out" in steps["slow"].error
    history = [a for a in await engine.store.get_attempts(record.id) if a.step_id == "slow"]
    assert [(a.attempt, a.status) for a in history] == [(1, "timeout"), (2, "timeout")]
    for a in history:
        assert a.finished_at - a.started_at >= 0.09
        assert a.finished_at - a.started_at < 10


async def test_plan_timeout_is_the_default_for_steps(mem_engine: Engine) -> None:
    record = await mem_engine.run(
        plan(
            step("slow", "sleep", **{"with": {"seconds": 30}}),
            step("patient", "sleep", timeout_s=5, **{"with": {"seconds": 0.1}}),
            timeout_s=0.05,
        )
    )
    assert await statuses(mem_engine, record.id) == {"slow": S.FAILED, "patient": S.SUCCEEDED}


# -- outputs, references, validators ---------------------------------------------------------


async def test_outputs_pass_through_references(engine: Engine) -> None:
    record = await engine.run(
        plan(
            step("src", "t.value", **{"with": {"result": {"items": [{"name": "x"}, {"name": "y"}], "n": 2}}}),
            step(
                "use",
                "echo",
                needs=("src",),
                **{
                    "with": {
                        "whole": "${{ steps.src.output.items }}",
                        "one": "${{ steps.src.output.items[1].name }}",
                        "text": "n=${{ steps.src.output.n }} first=${{ steps.src.output.items[0] }}",
                        "nested": {"list": ["${{ steps.src.output.n }}"]},
                    }
                },
            ),
            step("far", "echo", needs=("use",), **{"with": {"n": "${{ steps.src.output.n }}"}}),
        )
    )
    assert record.status is R.COMPLETED
    steps = await step_map(engine, record.id)
    assert steps["use"].output == {
        "whole": [{"name": "x"}, {"name": "y"}],
        "one": "y",
        "text": 'n=2 first={"name": "x"}',
        "nested": {"list": [2]},
    }
    assert steps["far"].output == {"n": 2}


async def test_a_reference_to_a_missing_field_fails_the_step(mem_engine: Engine) -> None:
    record = await mem_engine.run(
        plan(
            step("src", "t.value", **{"with": {"result": {"a": 1}}}),
            step("use", "echo", needs=("src",), **{"with": {"v": "${{ steps.src.output.b }}"}}),
        )
    )
    assert record.status is R.FAILED
    use = (await step_map(mem_engine, record.id))["use"]
    assert use.status is S.FAILED
    assert "b" in use.error


async def test_a_failing_validator_fails_the_attempt(engine: Engine) -> None:
    record = await engine.run(
        plan(
            step(
                "bad",
                "t.value",
                validate=[{"kind": "json"}],
                retry={"attempts": 2, "backoff_s": 0},
                **{"with": {"result": "this is not json"}},
            ),
            step("good", "t.value", validate=[{"kind": "json"}], **{"with": {"result": '{"ok": true}'}}),
            step(
                "field",
                "t.value",
                validate=[{"kind": "regex", "pattern": "^def ", "field": "code"}],
                **{"with": {"result": {"code": "class X: pass"}}},
            ),
        )
    )
    assert record.status is R.FAILED
    steps = await step_map(engine, record.id)
    assert steps["bad"].status is S.FAILED
    assert "validation failed" in steps["bad"].error and "json" in steps["bad"].error
    assert await attempts(engine, record.id, "bad") == [(1, "failed"), (2, "failed")]
    assert (steps["good"].status, steps["good"].output) == (S.SUCCEEDED, '{"ok": true}')
    assert steps["field"].status is S.FAILED and "regex" in steps["field"].error


@pytest.mark.parametrize("kind", ["set", "nan"])
async def test_an_output_that_is_not_json_fails_the_step_clearly(engine: Engine, kind: str) -> None:
    record = await engine.run(plan(step("odd", "t.not_json", **{"with": {"kind": kind}})))
    assert record.status is R.FAILED
    odd = (await step_map(engine, record.id))["odd"]
    assert odd.status is S.FAILED
    assert odd.output is None
    assert "JSON" in odd.error


async def test_execute_calls_one_task_through_the_executor(engine: Engine) -> None:
    assert await engine.execute("echo", {"a": 1, "b": [2, 3]}) == {"a": 1, "b": [2, 3]}
    assert await engine.execute("fail", {"times": 1}, retry={"attempts": 2, "backoff_s": 0}) == {"attempt": 2}
    with pytest.raises(TaskFailed, match="boom"):
        await engine.execute("fail", {"message": "boom"})
    with pytest.raises(PlanError):
        await engine.execute("no.such.task", {})
    # Each call is a recorded run, like any other.
    assert len(await engine.store.list_runs()) == 3


# -- pause, resume, cancel ---------------------------------------------------------------------


async def test_pause_lets_running_steps_finish_then_resume_completes(engine: Engine) -> None:
    handle = await submit(
        engine,
        plan(
            *[step(f"s{i}", **{"with": {"seconds": 0.2}}) for i in range(4)],
            step("z", needs=("s0",)),
            max_parallel=2,
        ),
    )
    rec = RUNS[handle.run_id]
    await until(lambda: rec.active == 2, what="two steps running")
    paused = await engine.pause(handle.run_id)
    assert paused.status is R.PAUSED

    record = await handle.wait()
    assert record.status is R.PAUSED
    assert record.running == 0  # nothing of it runs anywhere: any process may resume it
    steps = await statuses(engine, handle.run_id)
    assert steps["s0"] is S.SUCCEEDED and steps["s1"] is S.SUCCEEDED  # finished and recorded
    assert steps["s2"] in (S.PENDING, S.READY) and steps["s3"] in (S.PENDING, S.READY)
    assert rec.calls["s2"] == rec.calls["s3"] == rec.calls["z"] == 0  # nothing new started
    await asyncio.sleep(0.1)
    assert rec.calls["s2"] == 0

    resumed = await engine.resume(handle.run_id)
    record = await resumed.wait()
    assert record.status is R.COMPLETED
    assert set((await statuses(engine, handle.run_id)).values()) == {S.SUCCEEDED}
    assert dict(rec.calls) == {"s0": 1, "s1": 1, "s2": 1, "s3": 1, "z": 1}


async def test_a_paused_run_is_resumed_by_another_engine(stores: StoreFactory, tmp_path: Path) -> None:
    async with Engine(stores(), owner="first", poll_s=0.05, workdir=tmp_path) as first:
        handle = await submit(first, plan(step("a", **{"with": {"seconds": 0.1}}), step("b", needs=("a",))))
        rec = RUNS[handle.run_id]
        await until(lambda: rec.active == 1, what="a running")
        await first.pause(handle.run_id)
        assert (await handle.wait()).status is R.PAUSED
    async with Engine(stores(), owner="second", poll_s=0.05, workdir=tmp_path) as second:
        record = await (await second.resume(handle.run_id)).wait()
        assert record.status is R.COMPLETED
        outputs = await step_map(second, handle.run_id)
    assert dict(rec.calls) == {"a": 1, "b": 1}
    assert outputs["b"].output == {"step": "b", "value": None, "attempt": 1}


async def test_a_step_failing_while_paused_keeps_its_retries(mem_engine: Engine) -> None:
    handle = await submit(
        mem_engine,
        plan(step("flaky", "t.flaky", retry={"attempts": 2, "backoff_s": 0}, **{"with": {"seconds": 0.15}})),
    )
    rec = RUNS[handle.run_id]
    await until(lambda: rec.active == 1, what="flaky running")
    await mem_engine.pause(handle.run_id)
    assert (await handle.wait()).status is R.PAUSED
    flaky_step = (await step_map(mem_engine, handle.run_id))["flaky"]
    assert flaky_step.status is not S.FAILED, "a pause must not use up a step's retries"

    record = await (await mem_engine.resume(handle.run_id)).wait()
    assert record.status is R.COMPLETED
    assert (await step_map(mem_engine, handle.run_id))["flaky"].output == {"attempt": 2, "temperature": None}


async def test_cancel_stops_running_steps_and_cancels_the_rest(engine: Engine) -> None:
    events: list[Event] = []
    engine.subscribe(events.append)
    handle = await submit(
        engine,
        plan(
            step("long1", "sleep", **{"with": {"seconds": 30}}),
            step("long2", "sleep", **{"with": {"seconds": 30}}),
            step("queued", "sleep", **{"with": {"seconds": 30}}),
            step("after", needs=("long1",)),
            max_parallel=2,
        ),
    )
    await until(lambda: sum(e.kind == "step.running" for e in events) == 2, what="two steps running")
    cancelled = await engine.cancel(handle.run_id)
    assert cancelled.status is R.CANCELLED

    record = await asyncio.wait_for(handle.wait(), 10)
    assert record.status is R.CANCELLED
    assert record.finished_at is not None
    steps = await step_map(engine, handle.run_id)
    assert {k: s.status for k, s in steps.items()} == dict.fromkeys(
        ["long1", "long2", "queued", "after"], S.CANCELLED
    )
    assert await attempts(engine, handle.run_id, "long1") == [(1, "cancelled")]
    assert await attempts(engine, handle.run_id, "queued") == []
    assert any(e.kind == "run.cancelled" for e in events)
    with pytest.raises(baton.Conflict):
        await engine.resume(handle.run_id)


async def test_cancel_gives_up_on_a_stubborn_step_after_the_grace_period(tmp_path: Path) -> None:
    let_go = asyncio.Event()
    running = asyncio.Event()

    async def stubborn() -> str:
        running.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await let_go.wait()  # a long clean-up that ignores the cancel
            raise
        return "done"

    async with Engine("memory://", poll_s=0.05, cancel_grace_s=0.2, workdir=tmp_path) as eng:
        eng.registry.add(stubborn, name="stubborn")
        handle = await submit(eng, plan(step("s", "stubborn"), step("t", needs=("s",))))
        await asyncio.wait_for(running.wait(), 5)
        await eng.cancel(handle.run_id)
        try:
            record = await asyncio.wait_for(handle.wait(), 5)
            assert record.status is R.CANCELLED
            assert await statuses(eng, handle.run_id) == {"s": S.CANCELLED, "t": S.CANCELLED}
        finally:
            let_go.set()


# -- recovery and fencing -----------------------------------------------------------------------


def counting_registry(calls: Counter[str], hold: dict[str, asyncio.Event] | None = None) -> Registry:
    """A task that counts its calls; the first call of a step in ``hold`` waits on it."""
    registry = Registry.default()

    async def count(ctx: TaskContext, name: str) -> dict[str, Any]:
        calls[name] += 1
        n = calls[name]
        if hold and name in hold and n == 1:
            await hold[name].wait()
        return {"name": name, "call": n}

    registry.add(count, name="count")
    return registry


CHAIN = plan(
    step("a", "count", **{"with": {"name": "a"}}),
    step("b", "count", needs=("a",), **{"with": {"name": "b"}}),
    step("c", "count", needs=("b",), **{"with": {"name": "c"}}),
    name="chain",
)


async def test_a_live_holder_renews_its_lease_through_a_long_step(
    stores: StoreFactory, tmp_path: Path
) -> None:
    calls: Counter[str] = Counter()
    hold = {"b": asyncio.Event()}
    registry = counting_registry(calls, hold)
    async with Engine(
        stores(), owner="A", lease_s=0.3, poll_s=0.05, registry=registry, workdir=tmp_path
    ) as a:
        handle = await submit(a, CHAIN)
        await until(lambda: calls["b"] == 1, what="b running in A")
        async with Engine(stores(), owner="B", poll_s=0.05, registry=registry, workdir=tmp_path) as b:
            assert await b.recover() == []  # nothing is orphaned: A is alive
            await asyncio.sleep(1.0)  # more than three of A's leases; B sweeps all along
            assert calls["b"] == 1
            hold["b"].set()
            record = await handle.wait()
            history = await a.store.get_attempts(handle.run_id)
    assert record.status is R.COMPLETED
    assert dict(calls) == {"a": 1, "b": 1, "c": 1}
    assert [(h.step_id, h.status) for h in history] == [
        ("a", "succeeded"),
        ("b", "succeeded"),
        ("c", "succeeded"),
    ]
    assert [h.owner for h in history][:2] == ["A", "A"]  # c: whichever worker claimed it


async def test_a_dead_workers_steps_are_rescued_without_rerunning_committed_ones(
    stores: StoreFactory, tmp_path: Path
) -> None:
    calls: Counter[str] = Counter()
    registry = counting_registry(calls, {"b": asyncio.Event()})  # A's attempt of b never ends

    dead = Engine(stores(), owner="A", lease_s=0.3, poll_s=0.05, registry=registry, workdir=tmp_path)
    handle = await submit(dead, CHAIN)
    run_id = handle.run_id
    await until(lambda: calls["b"] == 1, what="b running in A")
    await crash(dead)

    async with Engine(stores(), owner="B", poll_s=0.05, registry=registry, workdir=tmp_path) as rescuer:
        await rescuer.start_worker()
        record = await asyncio.wait_for(rescuer.wait(run_id), 10)
        assert record.status is R.COMPLETED
        steps = await step_map(rescuer, run_id)
        history = await rescuer.store.get_attempts(run_id)

    assert dict(calls) == {"a": 1, "b": 2, "c": 1}  # a was committed: it did not run again
    assert steps["a"].output == {"name": "a", "call": 1}
    assert steps["b"].output == {"name": "b", "call": 2}
    assert [(a.attempt, a.status, a.owner) for a in history if a.step_id == "b"] == [
        (1, "lost", "A"),
        (2, "succeeded", "B"),
    ]
    assert [(a.attempt, a.status, a.owner) for a in history if a.step_id == "a"] == [(1, "succeeded", "A")]


async def test_a_stale_workers_late_write_is_rejected(stores: StoreFactory, tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    gate = asyncio.Event()
    registry = counting_registry(calls, {"b": gate})
    events: list[Event] = []

    stalling = cast(Store, Stalls(stores()))
    # With its one slot taken, A does not come back to the store until b returns.
    stale = Engine(
        stalling, owner="A", lease_s=0.3, poll_s=0.05, concurrency=1, registry=registry, workdir=tmp_path
    )
    stale.subscribe(events.append)
    async with stale:
        handle = await submit(stale, CHAIN)
        run_id = handle.run_id
        await until(lambda: calls["b"] == 1, what="b running in A")

        async with Engine(stores(), owner="B", poll_s=0.05, registry=registry, workdir=tmp_path) as taker:
            await taker.start_worker()  # its sweep rescues b once A's lease lapses
            assert (await asyncio.wait_for(taker.wait(run_id), 10)).status is R.COMPLETED

            gate.set()  # A's attempt of b finally returns, long after B took over
            await until(lambda: any(e.kind == "step.lost" for e in events), what="A's late write refused")

            run = await taker.store.get_run(run_id)
            steps = await step_map(taker, run_id)
            history = await taker.store.get_attempts(run_id)

    assert run.status is R.COMPLETED
    assert steps["b"].output == {"name": "b", "call": 2}  # B's result, not A's late one
    assert [(a.attempt, a.status, a.owner) for a in history if a.step_id == "b"] == [
        (1, "lost", "A"),
        (2, "succeeded", "B"),
    ]
    assert [(a.step_id, a.status) for a in history if a.owner == "A"] == [("a", "succeeded"), ("b", "lost")]
    assert dict(calls) == {"a": 1, "b": 2, "c": 1}
    assert [(e.run_id, e.step_id) for e in events if e.kind == "step.lost"] == [(run_id, "b")]
    assert any(e.kind == "worker.lost" for e in events)  # and it learnt it had been taken over


# -- built-in tasks -------------------------------------------------------------------------------


async def test_fail_task(mem_engine: Engine) -> None:
    with pytest.raises(TaskFailed, match=r"injected failure \(attempt 1\)"):
        await mem_engine.execute("fail")
    with pytest.raises(TaskFailed, match=r"custom \(attempt 2\)"):
        await mem_engine.execute(
            "fail", {"times": 5, "message": "custom"}, retry={"attempts": 2, "backoff_s": 0}
        )
    assert await mem_engine.execute("fail", {"times": 0}) == {"attempt": 1}


async def test_sleep_task(mem_engine: Engine) -> None:
    started = time.monotonic()
    assert await mem_engine.execute("sleep", {"seconds": 0.05}) == {"slept_s": 0.05}
    assert time.monotonic() - started >= 0.045
    with pytest.raises(TaskFailed, match="seconds must be a number"):
        await mem_engine.execute("sleep", {"seconds": -1})
    with pytest.raises(TaskFailed, match="seconds must be a number"):
        await mem_engine.execute("sleep", {"seconds": "soon"})


async def test_echo_task(mem_engine: Engine) -> None:
    assert await mem_engine.execute("echo", {}) == {}
    assert await mem_engine.execute("echo", {"nested": {"x": [1, None, "s"]}}) == {
        "nested": {"x": [1, None, "s"]}
    }


PY = sys.executable


def same_dir(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


async def test_shell_runs_argv_and_returns_its_output(mem_engine: Engine) -> None:
    out = await mem_engine.execute(
        "shell", {"argv": [PY, "-c", "import sys; print('hi'); print('err', file=sys.stderr)"]}
    )
    assert out == {"returncode": 0, "stdout": "hi\n", "stderr": "err\n"}


async def test_shell_argv_never_goes_through_a_shell(mem_engine: Engine, tmp_path: Path) -> None:
    text = "$HOME; touch pwned && echo `id`"
    out = await mem_engine.execute("shell", {"argv": [PY, "-c", "import sys; print(sys.argv[1])", text]})
    assert out["stdout"] == text + "\n"
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(TaskFailed, match="argv must be a non-empty list"):
        await mem_engine.execute("shell", {"argv": "echo hi"})
    with pytest.raises(TaskFailed, match="argv must be a non-empty list"):
        await mem_engine.execute("shell", {"argv": []})


async def test_shell_nonzero_exit_fails_the_step(mem_engine: Engine) -> None:
    argv = [PY, "-c", "import sys; print('it broke', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(TaskFailed, match="exited with 3: it broke"):
        await mem_engine.execute("shell", {"argv": argv})
    out = await mem_engine.execute("shell", {"argv": argv, "check": False})
    assert out["returncode"] == 3


async def test_shell_timeout_kills_the_program(mem_engine: Engine, tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    code = f"import time, pathlib; time.sleep(0.8); pathlib.Path({str(marker)!r}).write_text('x')"
    with pytest.raises(TaskFailed) as info:
        await mem_engine.execute("shell", {"argv": [PY, "-c", code], "timeout_s": 0.2})
    await asyncio.sleep(1.0)
    assert not marker.exists(), "the program was killed, not left running"
    message = str(info.value)
    assert "timed out" in message
    assert "None" not in message, message  # says which limit it hit


async def test_shell_cwd_is_confined_to_the_working_directory(mem_engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    out = await mem_engine.execute(
        "shell", {"argv": [PY, "-c", "import os; print(os.getcwd())"], "cwd": "sub"}
    )
    assert same_dir(out["stdout"].strip(), tmp_path / "sub")
    out = await mem_engine.execute("shell", {"argv": [PY, "-c", "import os; print(os.getcwd())"]})
    assert same_dir(out["stdout"].strip(), tmp_path)
    for escape in ("..", "../..", "/etc", "sub/../.."):
        with pytest.raises(TaskFailed, match="leaves the working directory"):
            await mem_engine.execute("shell", {"argv": [PY, "-c", "pass"], "cwd": escape})
    with pytest.raises(TaskFailed, match="not a directory"):
        await mem_engine.execute("shell", {"argv": [PY, "-c", "pass"], "cwd": "missing"})


async def test_shell_environment_is_scrubbed_and_carries_the_idempotency_key(
    mem_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATON_TEST_SECRET", "hunter2")
    code = "import os, json; print(json.dumps(dict(os.environ)))"
    handle = await submit(
        mem_engine, plan(step("sh", "shell", **{"with": {"argv": [PY, "-c", code], "env": {"MINE": "1"}}}))
    )
    record = await handle.wait()
    assert record.status is R.COMPLETED
    env = json.loads((await step_map(mem_engine, record.id))["sh"].output["stdout"])
    assert "BATON_TEST_SECRET" not in env
    assert env["MINE"] == "1"
    assert env["BATON_IDEMPOTENCY_KEY"] == f"{record.id}:sh"


async def test_python_task_calls_a_dotted_path(mem_engine: Engine) -> None:
    assert await mem_engine.execute(
        "python", {"function": "os.path.join", "args": ["a", "b"]}
    ) == os.path.join("a", "b")
    assert (
        await mem_engine.execute(
            "python", {"function": "json:dumps", "args": [[1]], "kwargs": {"indent": None}}
        )
        == "[1]"
    )
    # An async callable is awaited.
    assert await mem_engine.execute("python", {"function": "asyncio:sleep", "args": [0, "done"]}) == "done"
    with pytest.raises(TaskFailed, match="cannot import module"):
        await mem_engine.execute("python", {"function": "no_such_module_xyz.fn"})
    with pytest.raises(TaskFailed, match="has no attribute"):
        await mem_engine.execute("python", {"function": "os.path:no_such_fn"})
    with pytest.raises(TaskFailed, match="not callable"):
        await mem_engine.execute("python", {"function": "os:sep"})


# -- user tasks ---------------------------------------------------------------------------------


async def test_user_task_receives_its_context(engine: Engine, tmp_path: Path) -> None:
    record = await engine.run(
        plan(
            step("first", "t.context"),
            step("second", "t.context", needs=("first",), **{"with": {"note": "n"}}),
        )
    )
    steps = await step_map(engine, record.id)
    assert steps["second"].output == {
        "run_id": record.id,
        "step_id": "second",
        "attempt": 1,
        "idempotency_key": f"{record.id}:second",
        "workdir": str(tmp_path),
        "note": "n",
    }
    assert steps["first"].output["idempotency_key"] == f"{record.id}:first"


async def test_idempotency_key_is_stable_across_attempts(mem_engine: Engine) -> None:
    keys: list[tuple[int, str]] = []

    async def flaky_key(ctx: TaskContext) -> str:
        keys.append((ctx.attempt, ctx.idempotency_key))
        if ctx.attempt < 2:
            raise TaskFailed("again")
        return ctx.idempotency_key

    mem_engine.registry.add(flaky_key, name="flaky_key")
    record = await mem_engine.run(plan(step("k", "flaky_key", retry={"attempts": 2, "backoff_s": 0})))
    assert keys == [(1, f"{record.id}:k"), (2, f"{record.id}:k")]


async def test_sync_tasks_run_in_a_thread(engine: Engine) -> None:
    record = await engine.run(plan(step("block", "t.blocking"), step("free", "t.release")))
    assert record.status is R.COMPLETED
    out = (await step_map(engine, record.id))["block"].output
    assert out["released"] is True  # the loop went on while the sync task blocked
    assert out["thread"] != threading.get_ident()


async def test_decorated_task_default_name_and_sync_execute(mem_engine: Engine) -> None:
    name = f"{default_named.__module__}.{default_named.__qualname__}"
    assert name in mem_engine.registry
    assert await mem_engine.execute(name, {"x": 21}) == 42
    assert default_named(2) == 4  # the decorator returns the function itself


async def test_task_errors_fail_the_step_with_their_message(mem_engine: Engine) -> None:
    def broken(n: int) -> int:
        return {"a": 1}["missing"] if n else n // 0

    mem_engine.registry.add(broken, name="broken")
    with pytest.raises(TaskFailed, match="ZeroDivisionError"):
        await mem_engine.execute("broken", {"n": 0})
    with pytest.raises(TaskFailed, match="missing"):
        await mem_engine.execute("broken", {"n": 1})


async def test_context_annotated_through_the_module_is_recognised(mem_engine: Engine) -> None:
    # ``ctx: baton.TaskContext`` in a module with postponed annotations.
    out = await mem_engine.execute("t.ctx_by_module")
    record = (await mem_engine.store.list_runs(limit=1))[0]
    assert out == f"{record.id}:call"


async def test_a_run_timeout_cancels_what_is_left_and_fails_the_run(engine: Engine) -> None:
    started = time.monotonic()
    record = await engine.run(
        {
            "name": "slow",
            "policy": {"run_timeout_s": 0.5},
            "steps": [
                {"id": "quick", "task": "sleep", "with": {"seconds": 0.05}},
                {"id": "slow", "task": "sleep", "needs": ["quick"], "with": {"seconds": 30}},
                {"id": "after", "task": "echo", "needs": ["slow"]},
            ],
        }
    )
    assert time.monotonic() - started < 10
    assert record.status is R.FAILED
    assert record.error == "run timed out after 0.5s"
    steps = await step_map(engine, record.id)
    assert {k: s.status for k, s in steps.items()} == {
        "quick": S.SUCCEEDED,
        "slow": S.CANCELLED,
        "after": S.CANCELLED,
    }
    assert steps["after"].error == "run timed out after 0.5s"


async def test_each_attempt_sees_why_the_previous_failed_and_its_details_are_kept(engine: Engine) -> None:
    registry = engine.registry

    async def flaky(ctx: TaskContext) -> dict[str, Any]:
        ctx.details["temperature"] = ctx.temperature
        ctx.details["feedback"] = ctx.previous_error
        if ctx.attempt < 3:
            raise TaskFailed(f"bad answer {ctx.attempt}")
        return {"previous_details": ctx.previous_details}

    registry.add(flaky, name="t.flaky")
    retry = {"attempts": 4, "backoff_s": 0.01, "temperatures": [0.7, 0.5, 0.3]}
    record = await engine.run(plan(step("a", "t.flaky", retry=retry)))
    assert record.status is R.COMPLETED
    history = [(a.attempt, a.status, a.error, a.detail) for a in await engine.store.get_attempts(record.id)]
    assert history == [
        (1, "failed", "bad answer 1", {"temperature": 0.7, "feedback": None}),
        (2, "failed", "bad answer 2", {"temperature": 0.5, "feedback": "bad answer 1"}),
        (3, "succeeded", None, {"temperature": 0.3, "feedback": "bad answer 2"}),
    ]
    steps = await step_map(engine, record.id)
    assert steps["a"].output == {"previous_details": {"temperature": 0.5, "feedback": "bad answer 1"}}
