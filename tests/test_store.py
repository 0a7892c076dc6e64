"""The store suite: the Store protocol, run against every backend.

The store is a job queue. These tests drive it as baton's workers do, through the API
alone: a fake worker registers, claims attempts with ``turn``, reports them done (with the
dependents each success counts towards and the steps each failure skips), beats, and is
swept when it disappears. They check what a user of the queue sees: statuses, counts, ids,
errors.

Every test that is not about one backend runs on memory, SQLite (a real file) and
PostgreSQL (a schema of its own per test). A second store object on the same data
("peer") stands for another process: a second connection to the SQLite file, a second
pool on the PostgreSQL schema, the same object for memory.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from baton.errors import BudgetExceeded, Conflict, NotFound, StoreError, UsageError
from baton.plan.dag import Dag
from baton.status import RunStatus, StepStatus
from baton.store import (
    Beat,
    BudgetClaim,
    BudgetSettle,
    Claimed,
    Done,
    JobRecord,
    LedgerEntry,
    MemoryStore,
    NewJob,
    RunRecord,
    Schedule,
    SQLiteStore,
    StepRecord,
    Store,
    Turn,
    TurnResult,
    WorkerRecord,
    store_for,
)
from baton.store.sql import load_migrations
from tests.conftest import PG_URL

R, S = RunStatus, StepStatus
T0 = 1_000_000.0
LEASE = 30.0
#: id -> needs: a three-step chain.
CHAIN = {"a": [], "b": ["a"], "c": ["b"]}

# -- backends -----------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    #: a new store object on this test's data (another "process"); keyword arguments go to
    #: the PostgreSQL store.
    make: Callable[..., Store]


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        shared = MemoryStore()
        return Backend("memory", lambda **_: shared)
    if request.param == "sqlite":
        path = tmp_path / "baton.db"
        return Backend("sqlite", lambda **_: SQLiteStore(path))
    schema = request.getfixturevalue("pg_schema")
    from baton.store.postgres import PostgresStore

    return Backend("postgres", lambda **kw: PostgresStore(PG_URL, schema=schema, **kw))


OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
async def open_store(backend: Backend) -> AsyncIterator[OpenStore]:
    """Open another store object on the test's data (closed after the test)."""
    opened: list[Store] = []

    async def open_one(**kw: Any) -> Store:
        store = backend.make(**kw)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in reversed(opened):
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()


@pytest.fixture
async def peer(store: Store, open_store: OpenStore) -> Store:
    """The same data seen from another process."""
    return await open_store()


# -- runs as baton submits them -----------------------------------------------------------


@dataclass
class Run:
    id: str
    dag: Dag

    def idx(self, step_id: str) -> int:
        return self.dag.ids.index(step_id)

    def names(self, claims: Iterable[Claimed]) -> list[str]:
        """The step ids of this run's claims, sorted."""
        return sorted(self.dag.ids[c.idx] for c in claims if c.run_id == self.id)

    def downstream(self, i: int) -> list[int]:
        seen: set[int] = set()
        stack = list(self.dag.dependents[i])
        while stack:
            d = stack.pop()
            if d not in seen:
                seen.add(d)
                stack.extend(self.dag.dependents[d])
        return sorted(seen)


async def new_run(
    store: Store,
    run_id: str = "run1",
    graph: dict[str, list[str]] | None = None,
    *,
    created_at: float = T0,
    status: RunStatus = R.PENDING,
    max_parallel: int = 8,
    barrier: bool = False,
    run_timeout_s: float | None = None,
    queue: str = "default",
    tasks: dict[str, str] | None = None,
) -> Run:
    """A run as ``Engine.submit`` writes it: steps without needs ready, the others pending
    with ``waiting`` = their number of needs, ``rank`` = the longest path from them."""
    graph = CHAIN if graph is None else graph
    ids = list(graph)
    needs = [[ids.index(n) for n in graph[s]] for s in ids]
    dag = Dag.build(ids, needs, [1.0] * len(ids))
    task = {s: (tasks or {}).get(s, "echo") for s in ids}
    plan = {
        "name": f"plan-{run_id}",
        "steps": [{"id": s, "task": task[s], **({"needs": graph[s]} if graph[s] else {})} for s in ids],
    }
    run = RunRecord(
        id=run_id,
        name=f"plan-{run_id}",
        status=status,
        plan=plan,
        created_at=created_at,
        workdir="/work/dir",
        total_steps=len(ids),
        max_parallel=max_parallel,
        barrier=barrier,
        run_timeout_s=run_timeout_s,
        queue=queue,
    )
    steps = [
        StepRecord(
            run_id,
            i,
            s,
            task[s],
            dag.wave[i],
            S.PENDING if needs[i] else S.READY,
            waiting=len(needs[i]),
            rank=dag.remaining[i],
        )
        for i, s in enumerate(ids)
    ]
    await store.create_run(run, steps)
    return Run(run_id, dag)


async def statuses(store: Store, run_id: str = "run1") -> dict[str, StepStatus]:
    return {s.step_id: s.status for s in await store.get_steps(run_id)}


async def step(store: Store, step_id: str, run_id: str = "run1") -> StepRecord:
    return next(s for s in await store.get_steps(run_id) if s.step_id == step_id)


# -- a fake worker ------------------------------------------------------------------------


class FakeWorker:
    """Calls the store as baton's workers do: register, turns (finish and claim), beats."""

    def __init__(self, store: Store, worker_id: str = "w1", name: str | None = None) -> None:
        self.store = store
        self.id = worker_id
        self.name = name or worker_id

    async def register(self, now: float = T0, lease_s: float = LEASE) -> list[int]:
        record = WorkerRecord(self.id, self.name, None, 8, now, now + lease_s)
        return await self.store.register_worker(record)

    async def turn(
        self, now: float, done: Sequence[Done] = (), claim: int = 0, **kw: Any
    ) -> TurnResult:
        return await self.store.turn(Turn(self.id, now, list(done), claim, **kw))

    async def claim(self, now: float = T0, n: int = 10, **kw: Any) -> list[Claimed]:
        result = await self.turn(now, claim=n, **kw)
        assert not result.lost
        return result.claimed

    async def finish(self, *done: Done, now: float | None = None, claim: int = 0) -> TurnResult:
        """Report attempts done; they must be accepted."""
        at = now if now is not None else max(d.finished_at for d in done)
        result = await self.turn(at, done, claim)
        assert result.rejected == []
        return result

    async def beat(self, now: float, held: Iterable[int], lease_s: float = LEASE) -> Beat:
        return await self.store.heartbeat(self.id, now, lease_s, list(held))


async def worker(store: Store, worker_id: str = "w1", now: float = T0, lease_s: float = LEASE) -> FakeWorker:
    w = FakeWorker(store, worker_id)
    await w.register(now, lease_s)
    return w


def ok(c: Claimed, at: float, run: Run | None = None, output: Any = "done") -> Done:
    """A success; on a run, counted towards the step's dependents."""
    unblocks = list(run.dag.dependents[c.idx]) if run is not None else []
    return Done(
        c.id,
        c.run_id,
        c.idx,
        c.attempt,
        S.SUCCEEDED,
        "succeeded",
        c.started_at,
        at,
        output=json.dumps(output),
        unblocks=unblocks,
    )


def failed(c: Claimed, at: float, run: Run | None = None, error: str = "boom") -> Done:
    """The last attempt failed; on a run, everything downstream is skipped."""
    done = Done(c.id, c.run_id, c.idx, c.attempt, S.FAILED, "failed", c.started_at, at, error=error)
    if run is not None:
        done.skips = run.downstream(c.idx)
        done.skip_reason = f"needs {run.dag.ids[c.idx]!r}, which did not succeed"
    return done


def retrying(
    c: Claimed, at: float, not_before: float, error: str = "boom", outcome: str = "failed"
) -> Done:
    """A failed attempt that will be tried again from ``not_before``."""
    return Done(
        c.id,
        c.run_id,
        c.idx,
        c.attempt,
        S.RETRYING,
        outcome,
        c.started_at,
        at,
        error=error,
        not_before=not_before,
    )


def cancelled(c: Claimed, at: float) -> Done:
    return Done(c.id, c.run_id, c.idx, c.attempt, S.CANCELLED, "cancelled", c.started_at, at, error="cancelled")


def by_idx(claims: Iterable[Claimed], run: Run) -> dict[str, Claimed]:
    return {run.dag.ids[c.idx]: c for c in claims if c.run_id == run.id}


# -- runs and steps -----------------------------------------------------------------------


async def test_create_and_get_run(store: Store) -> None:
    await new_run(store, max_parallel=3, barrier=True, run_timeout_s=60.0)
    run = await store.get_run("run1")
    assert run.plan == {
        "name": "plan-run1",
        "steps": [
            {"id": "a", "task": "echo"},
            {"id": "b", "task": "echo", "needs": ["a"]},
            {"id": "c", "task": "echo", "needs": ["b"]},
        ],
    }
    assert (run.id, run.name, run.status, run.workdir, run.created_at) == (
        "run1",
        "plan-run1",
        R.PENDING,
        "/work/dir",
        T0,
    )
    assert (run.started_at, run.finished_at, run.error) == (None, None, None)
    assert (run.total_steps, run.max_parallel, run.barrier, run.run_timeout_s, run.queue) == (
        3,
        3,
        True,
        60.0,
        "default",
    )
    assert (run.running, run.unfinished) == (0, 3)
    header = await store.get_run("run1", with_plan=False)
    assert header.plan is None and header.name == "plan-run1"


async def test_steps_come_back_in_plan_order(store: Store) -> None:
    await new_run(store, graph={"z": [], "y": ["z"], "x": [], "w": ["y", "x"]})
    steps = await store.get_steps("run1")
    assert [(s.idx, s.step_id, s.wave, s.status, s.waiting, s.rank, s.attempt) for s in steps] == [
        (0, "z", 0, S.READY, 0, 3.0, 0),
        (1, "y", 1, S.PENDING, 1, 2.0, 0),
        (2, "x", 0, S.READY, 0, 2.0, 0),
        (3, "w", 2, S.PENDING, 2, 1.0, 0),
    ]
    assert all(s.run_id == "run1" and s.output is None and s.lease_owner is None for s in steps)
    assert len({s.id for s in steps}) == 4
    assert await store.get_attempts("run1") == []


async def test_a_run_id_is_created_once(store: Store) -> None:
    await new_run(store)
    with pytest.raises(Conflict):
        await new_run(store, graph={"other": []})
    assert [r.id for r in await store.list_runs()] == ["run1"]
    assert [s.step_id for s in await store.get_steps("run1")] == ["a", "b", "c"]


async def test_list_runs_newest_first_with_limit_and_status(store: Store) -> None:
    await new_run(store, "r-old", created_at=T0)
    await new_run(store, "r-mid", created_at=T0 + 1, status=R.COMPLETED)
    await new_run(store, "r-new", created_at=T0 + 2)
    assert [r.id for r in await store.list_runs()] == ["r-new", "r-mid", "r-old"]
    assert [r.id for r in await store.list_runs(limit=2)] == ["r-new", "r-mid"]
    assert [r.id for r in await store.list_runs(status=R.PENDING)] == ["r-new", "r-old"]
    assert [r.id for r in await store.list_runs(status=R.COMPLETED)] == ["r-mid"]
    assert await store.list_runs(status=R.FAILED) == []


async def test_unknown_run_is_not_found(store: Store) -> None:
    await new_run(store)
    for call in (
        store.get_run("nope"),
        store.get_steps("nope"),
        store.get_attempts("nope"),
        store.set_run_status("nope", R.PAUSED, T0),
        store.get_run(""),
    ):
        with pytest.raises(NotFound):
            await call


async def test_a_unique_id_prefix_names_the_run(store: Store) -> None:
    await new_run(store, "aaa111")
    await new_run(store, "aaa222", created_at=T0 + 1)
    await new_run(store, "bbb333", created_at=T0 + 2)
    assert (await store.get_run("aaa1")).id == "aaa111"
    assert (await store.get_run("b", with_plan=False)).id == "bbb333"
    assert [s.run_id for s in await store.get_steps("aaa2")] == ["aaa222"] * 3
    assert await store.get_attempts("bb") == []
    assert (await store.set_run_status("aaa2", R.PAUSED, T0)).id == "aaa222"
    assert (await store.get_run("aaa222")).status is R.PAUSED
    assert (await store.get_run("aaa111")).status is R.PENDING


async def test_an_ambiguous_prefix_is_not_found(store: Store) -> None:
    await new_run(store, "aaa111")
    await new_run(store, "aaa222")
    with pytest.raises(NotFound, match="ambiguous"):
        await store.get_run("aaa")
    with pytest.raises(NotFound, match="ambiguous"):
        await store.set_run_status("a", R.CANCELLED, T0)
    assert (await store.get_run("aaa111")).status is R.PENDING
    assert (await store.get_run("aaa222")).status is R.PENDING


async def test_prefix_wildcard_characters_are_literal(store: Store) -> None:
    await new_run(store, "abc")
    for pattern in ("%", "_", "a%", "a_c"):
        with pytest.raises(NotFound):
            await store.get_run(pattern)


# -- set_run_status -------------------------------------------------------------------------


async def test_pause_resume_cancel_from_outside(store: Store) -> None:
    await new_run(store)
    assert (await store.set_run_status("run1", R.PAUSED, T0)).status is R.PAUSED
    assert (await store.set_run_status("run1", R.PAUSED, T0 + 1)).status is R.PAUSED  # idempotent
    assert (await store.set_run_status("run1", R.RUNNING, T0 + 2)).status is R.RUNNING
    assert (await store.set_run_status("run1", R.PAUSED, T0 + 3)).status is R.PAUSED
    run = await store.set_run_status("run1", R.CANCELLED, T0 + 4)
    assert (run.status, run.finished_at) == (R.CANCELLED, T0 + 4)
    assert (await store.get_run("run1")).status is R.CANCELLED


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (R.COMPLETED, R.PAUSED),
        (R.COMPLETED, R.RUNNING),
        (R.COMPLETED, R.CANCELLED),
        (R.FAILED, R.RUNNING),
        (R.FAILED, R.CANCELLED),
        (R.CANCELLED, R.RUNNING),
        (R.CANCELLED, R.PAUSED),
        (R.PENDING, R.COMPLETED),
        (R.PAUSED, R.COMPLETED),
    ],
)
async def test_illegal_run_transitions_are_conflicts(
    store: Store, start: RunStatus, target: RunStatus
) -> None:
    await new_run(store, status=start)
    with pytest.raises(Conflict, match=str(start)):
        await store.set_run_status("run1", target, T0)
    run = await store.get_run("run1")
    assert (run.status, run.finished_at) == (start, None)
    assert await statuses(store) == {"a": S.READY, "b": S.PENDING, "c": S.PENDING}


# -- a DAG through turns ------------------------------------------------------------------


async def test_a_dag_runs_to_completion_through_turns(store: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": [], "join": ["a", "b"], "last": ["join"]})
    w = await worker(store)

    first = await w.claim(T0)
    assert run.names(first) == ["a", "b"]
    assert all(c.attempt == 1 and c.started_at == T0 and c.task == "echo" for c in first)
    record = await store.get_run("run1")
    assert (record.status, record.started_at, record.running, record.unfinished) == (R.RUNNING, T0, 2, 4)
    a, b = by_idx(first, run)["a"], by_idx(first, run)["b"]

    # a fan-in waits for both of its needs
    result = await w.finish(ok(a, T0 + 1, run, output={"n": 1}), claim=10)
    assert result.claimed == [] and result.ended == {}
    join = await step(store, "join")
    assert (join.status, join.waiting) == (S.PENDING, 1)

    result = await w.finish(ok(b, T0 + 2, run, output={"n": 2}), claim=10)
    assert run.names(result.claimed) == ["join"]
    assert ("run1", run.idx("join"), S.READY) in result.marked
    assert (await step(store, "last")).status is S.PENDING

    result = await w.finish(ok(result.claimed[0], T0 + 3, run), claim=10)
    assert run.names(result.claimed) == ["last"]

    result = await w.finish(ok(result.claimed[0], T0 + 4, run), claim=10)
    assert result.claimed == []
    assert result.ended == {"run1": R.COMPLETED}
    record = await store.get_run("run1")
    assert (record.status, record.finished_at, record.error, record.running, record.unfinished) == (
        R.COMPLETED,
        T0 + 4,
        None,
        0,
        0,
    )
    steps = await store.get_steps("run1")
    assert [(s.step_id, s.status, s.attempt, s.lease_owner) for s in steps] == [
        ("a", S.SUCCEEDED, 1, None),
        ("b", S.SUCCEEDED, 1, None),
        ("join", S.SUCCEEDED, 1, None),
        ("last", S.SUCCEEDED, 1, None),
    ]
    assert await store.outputs("run1", [0, 1]) == {0: {"n": 1}, 1: {"n": 2}}
    attempts = await store.get_attempts("run1")
    assert [(x.step_id, x.attempt, x.status, x.owner) for x in attempts] == [
        ("a", 1, "succeeded", "w1"),
        ("b", 1, "succeeded", "w1"),
        ("join", 1, "succeeded", "w1"),
        ("last", 1, "succeeded", "w1"),
    ]
    assert (attempts[0].started_at, attempts[0].finished_at) == (T0, T0 + 1)
    assert await w.claim(T0 + 5) == []


async def test_ready_steps_are_claimed_longest_remaining_path_first(store: Store) -> None:
    run = await new_run(
        store,
        graph={
            "short": [],
            "twin": [],
            "mid1": [],
            "mid2": ["mid1"],
            "long1": [],
            "long2": ["long1"],
            "long3": ["long2"],
        },
    )
    w = await worker(store)
    order = []
    for i in range(4):
        (claim,) = await w.claim(T0 + i, n=1)
        order.append(run.dag.ids[claim.idx])
    # the critical path first; equal ranks in plan order
    assert order == ["long1", "mid1", "short", "twin"]


async def test_standalone_jobs_are_claimed_by_priority_then_age(store: Store) -> None:
    jobs = await store.enqueue(
        [
            NewJob("echo", {"name": "low-1"}),
            NewJob("echo", {"name": "high-1"}, priority=5),
            NewJob("echo", {"name": "low-2"}),
            NewJob("echo", {"name": "high-2"}, priority=5),
            NewJob("echo", {"name": "urgent"}, priority=9),
        ],
        T0,
    )
    assert jobs[0].id < jobs[1].id < jobs[2].id < jobs[3].id < jobs[4].id
    w = await worker(store)
    order = []
    for i in range(5):
        (claim,) = await w.claim(T0 + i, n=1)
        assert claim.run_id is None and claim.args is not None
        order.append(json.loads(claim.args)["name"])
    assert order == ["urgent", "high-1", "high-2", "low-1", "low-2"]


async def test_max_parallel_holds_across_workers(store: Store, peer: Store) -> None:
    run = await new_run(store, graph={s: [] for s in "abcdef"}, max_parallel=2)
    w1 = await worker(store, "w1")
    w2 = await worker(peer, "w2")

    held1 = await w1.claim(T0)
    assert len(held1) == 2
    assert await w2.claim(T0) == []
    assert (await store.get_run("run1")).running == 2

    # a finish frees one slot: the other worker gets it, and nobody gets a third
    await w1.finish(ok(held1.pop(), T0 + 1, run))
    held2 = await w2.claim(T0 + 1)
    assert len(held2) == 1
    assert await w1.claim(T0 + 1) == []
    assert (await peer.get_run("run1")).running == 2

    # a second run has slots of its own
    other = await new_run(store, "run2", graph={"x": [], "y": []}, max_parallel=1, created_at=T0 + 1)
    assert other.names(await w2.claim(T0 + 2)) == ["x"]

    # finishing and claiming in turns, whichever worker: never more than 2 of run1 at once
    workers = {w1: held1, w2: [c for c in held2 if c.run_id == "run1"]}
    now = T0 + 3
    for _ in range(10):
        for w, held in workers.items():
            result = await w.turn(now, [ok(c, now, run) for c in held], claim=10)
            assert result.rejected == []
            workers[w] = [c for c in result.claimed if c.run_id == "run1"]
            running = sum(len(h) for h in workers.values())
            assert running <= 2
            assert (await store.get_run("run1")).running == running
            now += 1
    record = await store.get_run("run1")
    assert (record.status, record.unfinished) == (R.COMPLETED, 0)
    assert set((await statuses(store)).values()) == {S.SUCCEEDED}


# -- failures and retries -----------------------------------------------------------------


async def test_a_failure_skips_what_follows_and_fails_the_run(store: Store) -> None:
    run = await new_run(
        store,
        graph={"fetch": [], "parse": ["fetch"], "load": ["parse"], "log": ["fetch"], "other": []},
    )
    w = await worker(store)
    claims = by_idx(await w.claim(T0), run)
    assert sorted(claims) == ["fetch", "other"]

    result = await w.finish(failed(claims["fetch"], T0 + 1, run, error="HTTP 500"), claim=10)
    assert result.claimed == [] and result.ended == {}
    assert sorted(m for m in result.marked if m[2] is S.SKIPPED) == [
        ("run1", run.idx("parse"), S.SKIPPED),
        ("run1", run.idx("load"), S.SKIPPED),
        ("run1", run.idx("log"), S.SKIPPED),
    ]
    steps = {s.step_id: s for s in await store.get_steps("run1")}
    assert (steps["fetch"].status, steps["fetch"].error) == (S.FAILED, "HTTP 500")
    for name in ("parse", "load", "log"):
        assert steps[name].status is S.SKIPPED
        assert steps[name].error and "fetch" in steps[name].error
        assert steps[name].finished_at == T0 + 1
    # the independent step still runs; the run ends when it does
    record = await store.get_run("run1")
    assert (record.status, record.running, record.unfinished, record.finished_at) == (R.RUNNING, 1, 1, None)

    result = await w.finish(ok(claims["other"], T0 + 2, run))
    assert result.ended == {"run1": R.FAILED}
    record = await store.get_run("run1")
    assert (record.status, record.finished_at, record.unfinished) == (R.FAILED, T0 + 2, 0)
    assert record.error and "fetch" in record.error
    assert "other" not in record.error
    assert [(x.step_id, x.status, x.error) for x in await store.get_attempts("run1")] == [
        ("fetch", "failed", "HTTP 500"),
        ("other", "succeeded", None),
    ]


async def test_a_retry_is_not_claimable_before_its_time(store: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": ["a"]})
    w = await worker(store)
    (a,) = await w.claim(T0)
    done = retrying(a, T0 + 1, not_before=T0 + 10, error="slow", outcome="timeout")
    done.detail = json.dumps({"tokens": 7})
    await w.finish(done)

    a_step = await step(store, "a")
    assert (a_step.status, a_step.attempt, a_step.not_before, a_step.error) == (S.RETRYING, 1, T0 + 10, "slow")
    record = await store.get_run("run1")
    assert (record.status, record.running, record.unfinished) == (R.RUNNING, 0, 2)
    assert [(x.attempt, x.status, x.error) for x in await store.get_attempts("run1")] == [
        (1, "timeout", "slow")
    ]
    assert await store.attempt_detail(a.id, 1) == {"tokens": 7}
    assert await store.attempt_detail(a.id, 2) is None

    assert await w.claim(T0 + 9.9) == []
    (again,) = await w.claim(T0 + 10)
    assert (again.id, again.idx, again.attempt, again.previous_error) == (a.id, 0, 2, "slow")
    a_step = await step(store, "a")
    assert (a_step.status, a_step.attempt, a_step.lease_owner) == (S.RUNNING, 2, "w1")

    result = await w.finish(ok(again, T0 + 11, run), claim=10)
    assert run.names(result.claimed) == ["b"]


async def test_attempts_come_back_oldest_first(store: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": [], "c": []})
    w = await worker(store)
    c = by_idx(await w.claim(T0), run)
    await w.finish(ok(c["c"], T0 + 1, run), now=T0 + 3)
    await w.finish(ok(c["a"], T0 + 3, run), now=T0 + 4)
    await w.finish(ok(c["b"], T0 + 2, run), now=T0 + 5)
    assert [x.step_id for x in await store.get_attempts("run1")] == ["c", "b", "a"]


# -- fencing ------------------------------------------------------------------------------


async def test_a_finish_with_the_wrong_attempt_or_holder_is_rejected(store: Store, peer: Store) -> None:
    run = await new_run(store)
    w1 = await worker(store, "w1")
    w2 = await worker(peer, "w2")
    (a,) = await w1.claim(T0)
    steps_before = await store.get_steps("run1")
    run_before = await store.get_run("run1")

    wrong_attempt = ok(a, T0 + 1, run)
    wrong_attempt.attempt = 2
    result = await w1.turn(T0 + 1, [wrong_attempt])
    assert result.rejected == [a.id]
    result = await w2.turn(T0 + 1, [ok(a, T0 + 1, run)])  # w2 does not hold it
    assert result.rejected == [a.id]

    assert await store.get_steps("run1") == steps_before
    assert await store.get_run("run1") == run_before
    assert await store.get_attempts("run1") == []
    assert await w2.claim(T0 + 2) == []  # b is still waiting for a

    await w1.finish(ok(a, T0 + 3, run, output="first"))
    # a second report of the same attempt is refused: a is not running any more
    result = await w1.turn(T0 + 4, [ok(a, T0 + 4, run, output="second")])
    assert result.rejected == [a.id]
    a_step = await step(store, "a")
    assert (a_step.status, a_step.output, a_step.finished_at) == (S.SUCCEEDED, "first", T0 + 3)
    assert [(x.attempt, x.status) for x in await store.get_attempts("run1")] == [(1, "succeeded")]
    b_step = await step(store, "b")
    assert (b_step.status, b_step.waiting) == (S.READY, 0)


async def test_a_rejected_finish_does_not_stop_the_rest_of_the_turn(store: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": [], "after_b": ["b"]})
    w = await worker(store)
    c = by_idx(await w.claim(T0), run)
    stale = ok(c["a"], T0 + 1, run)
    stale.attempt = 7
    result = await w.turn(T0 + 1, [stale, ok(c["b"], T0 + 1, run)], claim=10)
    assert result.rejected == [c["a"].id]
    assert run.names(result.claimed) == ["after_b"]
    assert await statuses(store) == {"a": S.RUNNING, "b": S.SUCCEEDED, "after_b": S.RUNNING}


async def test_a_job_finish_from_a_worker_that_does_not_hold_it_is_rejected(
    store: Store, peer: Store
) -> None:
    (job,) = await store.enqueue([NewJob("echo", {})], T0)
    w1 = await worker(store, "w1")
    w2 = await worker(peer, "w2")
    (claim,) = await w1.claim(T0)
    result = await w2.turn(T0 + 1, [ok(claim, T0 + 1)])
    assert result.rejected == [job.id]
    record = await store.get_job(job.id)
    assert (record.state, record.lease_owner, record.output) == ("running", "w1", None)
    await w1.finish(ok(claim, T0 + 2, output="mine"))
    record = await store.get_job(job.id)
    assert (record.state, record.output) == ("completed", "mine")


# -- leases, rescue, release ----------------------------------------------------------------


async def test_a_worker_whose_lease_lapsed_claims_nothing_and_its_jobs_are_rescued(
    store: Store, peer: Store
) -> None:
    run = await new_run(store, graph={"a": [], "b": []})
    w1 = await worker(store, "w1", lease_s=LEASE)
    (a,) = await w1.claim(T0, n=1)
    assert await peer.sweep(T0 + LEASE - 1) == []  # the lease is live

    result = await w1.turn(T0 + LEASE + 1, claim=10)
    assert result.lost and result.claimed == []
    assert (await step(store, "b")).status is S.READY

    assert await peer.sweep(T0 + LEASE + 1) == [a.id]
    a_step = await step(peer, "a")
    assert (a_step.status, a_step.attempt, a_step.lease_owner) == (S.READY, 1, None)
    lost = await peer.get_attempts("run1")
    assert [(x.step_id, x.attempt, x.status, x.owner, x.finished_at) for x in lost] == [
        ("a", 1, "lost", "w1", T0 + LEASE + 1)
    ]
    assert lost[0].error and "lost" in lost[0].error
    assert (await peer.get_run("run1")).running == 0
    assert (await w1.beat(T0 + LEASE + 2, [a.id])).lost

    w2 = await worker(peer, "w2", now=T0 + LEASE + 2)
    claims = by_idx(await w2.claim(T0 + LEASE + 2), run)
    assert (claims["a"].attempt, claims["b"].attempt) == (2, 1)
    # the first worker's late result is refused
    result = await w1.turn(T0 + LEASE + 3, [ok(a, T0 + LEASE + 3, run)])
    assert result.rejected == [a.id]
    await w2.finish(ok(claims["a"], T0 + LEASE + 4, run, output="from w2"))
    a_step = await step(store, "a")
    assert (a_step.status, a_step.attempt, a_step.output) == (S.SUCCEEDED, 2, "from w2")
    assert [(x.attempt, x.status, x.owner) for x in await store.get_attempts("run1") if x.step_id == "a"] == [
        (1, "lost", "w1"),
        (2, "succeeded", "w2"),
    ]


async def test_a_dead_worker_is_rescued_at_once(store: Store, peer: Store) -> None:
    await new_run(store, graph={"a": []})
    w1 = await worker(store, "w1", lease_s=LEASE)
    (a,) = await w1.claim(T0)
    assert await peer.sweep(T0 + 1, dead=["somebody-else"]) == []
    assert (await step(peer, "a")).status is S.RUNNING
    assert await peer.sweep(T0 + 1, dead=["w1"]) == [a.id]  # w1's lease is still live
    a_step = await step(peer, "a")
    assert (a_step.status, a_step.lease_owner) == (S.READY, None)
    assert [(x.attempt, x.status, x.owner) for x in await peer.get_attempts("run1")] == [(1, "lost", "w1")]
    w2 = await worker(peer, "w2", now=T0 + 2)
    (again,) = await w2.claim(T0 + 2)
    assert (again.id, again.attempt) == (a.id, 2)


async def test_a_restarted_worker_rescues_what_its_predecessor_held(store: Store, peer: Store) -> None:
    await new_run(store, graph={"a": [], "b": []})
    (job,) = await store.enqueue([NewJob("echo", {})], T0)
    before = FakeWorker(store, "host:1:old", name="host")
    await before.register(T0)
    held = await before.claim(T0)
    assert len(held) == 3  # two steps of the run and the job

    stranger = FakeWorker(peer, "elsewhere:2:x", name="elsewhere")
    assert await stranger.register(T0 + 1) == []
    assert await statuses(peer) == {"a": S.RUNNING, "b": S.RUNNING}

    after = FakeWorker(peer, "host:1:new", name="host")
    rescued = await after.register(T0 + 2)
    assert sorted(rescued) == sorted(c.id for c in held)
    assert await statuses(peer) == {"a": S.READY, "b": S.READY}
    assert (await peer.get_job(job.id)).state == "available"
    assert [(x.attempt, x.status, x.owner) for x in await peer.get_attempts("run1")] == [
        (1, "lost", "host:1:old"),
        (1, "lost", "host:1:old"),
    ]
    assert [(x.attempt, x.status, x.owner) for x in await peer.get_job_attempts(job.id)] == [
        (1, "lost", "host:1:old")
    ]
    again = await after.claim(T0 + 3)
    assert sorted((c.id, c.attempt) for c in again) == sorted((c.id, 2) for c in held)


async def test_release_gives_jobs_back_without_counting_the_attempt(store: Store, peer: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": []})
    (job,) = await store.enqueue([NewJob("echo", {"k": 1})], T0)
    w1 = await worker(store, "w1")
    w2 = await worker(peer, "w2")
    claims = await w1.claim(T0)
    steps = by_idx(claims, run)
    assert len(claims) == 3

    await w2.store.release("w2", [steps["b"].id], T0 + 1)  # not the holder: nothing happens
    assert (await step(store, "b")).lease_owner == "w1"

    await store.release("w1", [steps["a"].id, job.id], T0 + 1)
    a_step = await step(store, "a")
    assert (a_step.status, a_step.attempt, a_step.lease_owner) == (S.READY, 0, None)
    record = await store.get_job(job.id)
    assert (record.state, record.attempt, record.lease_owner) == ("available", 0, None)
    assert (await step(store, "b")).status is S.RUNNING
    assert (await store.get_run("run1")).running == 1
    assert await store.get_attempts("run1") == []
    assert await store.get_job_attempts(job.id) == []

    again = await w2.claim(T0 + 2)
    assert sorted((c.id, c.attempt) for c in again) == sorted([(steps["a"].id, 1), (job.id, 1)])


async def test_a_worker_that_leaves_gives_back_everything_it_holds(store: Store) -> None:
    await new_run(store, graph={"a": [], "b": []})
    w1 = await worker(store, "w1")
    await w1.claim(T0)
    assert [w.id for w in await store.list_workers()] == ["w1"]
    await store.unregister_worker("w1", T0 + 1)
    assert await statuses(store) == {"a": S.READY, "b": S.READY}
    assert [s.attempt for s in await store.get_steps("run1")] == [0, 0]
    assert await store.list_workers() == []
    assert (await store.get_run("run1")).running == 0
    assert (await w1.beat(T0 + 2, [])).lost


# -- heartbeats ---------------------------------------------------------------------------


async def test_heartbeat_renews_the_lease(store: Store, peer: Store) -> None:
    await new_run(store, graph={"a": []})
    w1 = await worker(store, "w1", now=T0, lease_s=30.0)
    (a,) = await w1.claim(T0)
    assert await w1.beat(T0 + 20, [a.id], lease_s=30.0) == Beat(lost=False, stop=[])
    (record,) = await store.list_workers()
    assert (record.id, record.name, record.expires_at, record.running) == ("w1", "w1", T0 + 50, 1)
    assert await peer.sweep(T0 + 40) == []  # the old lease (T0 + 30) would have lapsed
    result = await w1.turn(T0 + 45, claim=1)
    assert not result.lost
    assert await peer.sweep(T0 + 51) == [a.id]


async def test_heartbeat_of_a_worker_that_is_gone_is_lost(store: Store) -> None:
    beat = await store.heartbeat("ghost", T0, LEASE, [11, 12])
    assert beat.lost
    assert sorted(beat.stop) == [11, 12]


async def test_heartbeat_tells_a_worker_what_to_stop(store: Store, peer: Store) -> None:
    await new_run(store, "run1", graph={"a": []})
    await new_run(store, "run2", graph={"a": []}, created_at=T0 + 1)
    (job,) = await store.enqueue([NewJob("echo", {})], T0)
    w1 = await worker(store, "w1")
    held = await w1.claim(T0)
    assert len(held) == 3
    one = next(c for c in held if c.run_id == "run1")
    two = next(c for c in held if c.run_id == "run2")
    ids = [one.id, two.id, job.id]
    assert (await w1.beat(T0 + 1, ids)).stop == []

    await peer.set_run_status("run1", R.CANCELLED, T0 + 2)
    assert (await w1.beat(T0 + 3, ids)).stop == [one.id]

    cancelling = await peer.cancel_job(job.id, T0 + 4)
    assert cancelling.state == "running"  # its worker stops it
    beat = await w1.beat(T0 + 5, ids)
    assert not beat.lost
    assert sorted(beat.stop) == sorted([one.id, job.id])

    # a job it thinks it holds but does not (held by another worker) is to stop too
    await new_run(store, "run3", graph={"a": []}, created_at=T0 + 2)
    w2 = await worker(peer, "w2")
    (three,) = await w2.claim(T0 + 6)
    assert (await w1.beat(T0 + 7, [two.id, three.id])).stop == [three.id]

    # the worker records the stopped attempts as cancelled
    job_claim = next(c for c in held if c.run_id is None)
    await w1.finish(cancelled(one, T0 + 8), cancelled(job_claim, T0 + 8))
    record = await store.get_run("run1")
    assert (record.status, record.running) == (R.CANCELLED, 0)
    assert (await step(store, "a", "run1")).status is S.CANCELLED
    assert (await store.get_job(job.id)).state == "cancelled"
    assert (await step(store, "a", "run2")).status is S.RUNNING


# -- pause, resume, cancel, deadlines -------------------------------------------------------


async def test_a_paused_run_gives_no_claims_and_resume_makes_it_claimable(store: Store, peer: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": [], "after_a": ["a"]})
    w = await worker(store)
    (a,) = await w.claim(T0, n=1)
    assert run.dag.ids[a.idx] == "a"  # the longer path first

    paused = await peer.set_run_status("run1", R.PAUSED, T0 + 1)
    assert (paused.status, paused.running) == (R.PAUSED, 1)
    assert await w.claim(T0 + 2) == []  # b is ready, but the run is paused
    assert (await w.beat(T0 + 2, [a.id])).stop == []  # running steps may finish

    result = await w.finish(ok(a, T0 + 3, run), claim=10)
    assert result.claimed == [] and result.ended == {}
    assert await statuses(store) == {"a": S.SUCCEEDED, "b": S.READY, "after_a": S.READY}
    record = await store.get_run("run1")
    assert (record.status, record.running, record.unfinished) == (R.PAUSED, 0, 2)

    assert (await peer.set_run_status("run1", R.RUNNING, T0 + 4)).status is R.RUNNING
    result = await w.turn(T0 + 5, claim=10)
    assert run.names(result.claimed) == ["after_a", "b"]
    result = await w.finish(*(ok(c, T0 + 6, run) for c in result.claimed))
    assert result.ended == {"run1": R.COMPLETED}


async def test_cancel_cancels_idle_steps_at_once(store: Store, peer: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": [], "after_a": ["a"], "d": []})
    w = await worker(store)
    c = by_idx(await w.claim(T0, n=2), run)
    assert sorted(c) == ["a", "b"]
    await w.finish(retrying(c["b"], T0 + 1, not_before=T0 + 100))
    assert await statuses(store) == {"a": S.RUNNING, "b": S.RETRYING, "after_a": S.PENDING, "d": S.READY}

    record = await peer.set_run_status("run1", R.CANCELLED, T0 + 5)
    assert (record.status, record.finished_at) == (R.CANCELLED, T0 + 5)
    steps = {s.step_id: s for s in await store.get_steps("run1")}
    assert steps["a"].status is S.RUNNING  # its worker stops it
    for name in ("b", "after_a", "d"):
        assert (steps[name].status, steps[name].error, steps[name].finished_at) == (
            S.CANCELLED,
            "run cancelled",
            T0 + 5,
        )
    assert await w.claim(T0 + 200) == []
    assert (await w.beat(T0 + 6, [c["a"].id])).stop == [c["a"].id]

    result = await w.finish(cancelled(c["a"], T0 + 7))
    assert result.ended.get("run1", R.CANCELLED) is R.CANCELLED
    record = await store.get_run("run1")
    assert (record.status, record.running, record.finished_at) == (R.CANCELLED, 0, T0 + 5)
    assert (await step(store, "a")).status is S.CANCELLED


async def test_the_sweep_cancels_the_running_steps_of_a_cancelled_run_whose_worker_is_gone(
    store: Store, peer: Store
) -> None:
    await new_run(store, graph={"a": [], "b": []})
    w = await worker(store, lease_s=10.0)
    (a, b) = await w.claim(T0)
    await peer.set_run_status("run1", R.CANCELLED, T0 + 1)
    assert sorted(await peer.sweep(T0 + 11)) == sorted([a.id, b.id])
    assert await statuses(peer) == {"a": S.CANCELLED, "b": S.CANCELLED}
    record = await peer.get_run("run1")
    assert (record.status, record.running) == (R.CANCELLED, 0)


async def test_expire_run_fails_the_run_saying_it_timed_out(store: Store, peer: Store) -> None:
    await new_run(store, graph={"a": [], "b": ["a"], "x": []}, run_timeout_s=60.0)
    w = await worker(store)
    (a,) = await w.claim(T0, n=1)
    assert await peer.expire_run("run1", T0 + 61)
    record = await store.get_run("run1")
    assert (record.status, record.finished_at) == (R.FAILED, T0 + 61)
    assert record.error and "timed out" in record.error
    assert await statuses(store) == {"a": S.RUNNING, "b": S.CANCELLED, "x": S.CANCELLED}
    assert (await w.beat(T0 + 62, [a.id])).stop == [a.id]
    assert await w.claim(T0 + 62) == []
    assert not await peer.expire_run("run1", T0 + 63)  # it had already ended
    assert (await store.get_run("run1")).finished_at == T0 + 61


async def test_the_sweep_fails_runs_past_their_deadline(store: Store, peer: Store) -> None:
    await new_run(store, graph={"a": [], "b": ["a"]}, run_timeout_s=60.0)
    w = await worker(store, lease_s=1000.0)
    (a,) = await w.claim(T0 + 5)  # the deadline counts from the run's first start
    assert await peer.sweep(T0 + 64) == []
    assert (await store.get_run("run1")).status is R.RUNNING
    await peer.sweep(T0 + 66)
    record = await store.get_run("run1")
    assert (record.status, record.finished_at) == (R.FAILED, T0 + 66)
    assert record.error and "timed out" in record.error
    assert await statuses(store) == {"a": S.RUNNING, "b": S.CANCELLED}
    assert (await w.beat(T0 + 67, [a.id], lease_s=1000.0)).stop == [a.id]


@pytest.mark.parametrize("barrier", [True, False])
async def test_a_wave_barrier_holds_later_waves_until_earlier_ones_finish(store: Store, barrier: bool) -> None:
    run = await new_run(store, graph={"a": [], "slow": [], "after_a": ["a"]}, barrier=barrier)
    w = await worker(store)
    c = by_idx(await w.claim(T0), run)
    assert sorted(c) == ["a", "slow"]
    result = await w.finish(ok(c["a"], T0 + 1, run), claim=10)
    if barrier:
        # after_a's need is done, but wave 0 is not
        assert result.claimed == []
        assert (await step(store, "after_a")).status is S.READY
        result = await w.finish(ok(c["slow"], T0 + 2, run), claim=10)
    assert run.names(result.claimed) == ["after_a"]


async def test_a_turn_says_when_it_left_work_it_did_not_claim(store: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": ["a"], "c": ["a"]})
    w = await worker(store)
    (a,) = await w.claim(T0)
    result = await w.finish(ok(a, T0 + 1, run), claim=1)
    assert len(result.claimed) == 1
    assert result.left_ready  # one of b and c is ready for another worker


async def test_another_process_sees_the_queue(store: Store, peer: Store) -> None:
    run = await new_run(store)
    theirs = await worker(peer, "w2")
    (a,) = await theirs.claim(T0)
    assert (await step(store, "a")).lease_owner == "w2"
    mine = await worker(store, "w1")
    assert (await mine.turn(T0 + 1, [ok(a, T0 + 1, run)])).rejected == [a.id]
    await theirs.finish(ok(a, T0 + 2, run))
    assert (await step(store, "a")).status is S.SUCCEEDED
    (b,) = await mine.claim(T0 + 3)
    assert run.dag.ids[b.idx] == "b"
    await store.set_run_status("run1", R.CANCELLED, T0 + 4)
    assert (await peer.heartbeat("w1", T0 + 5, LEASE, [b.id])).stop == [b.id]
