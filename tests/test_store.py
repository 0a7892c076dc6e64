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
    ApiKey,
    Beat,
    BudgetClaim,
    BudgetSettle,
    Claimed,
    Done,
    JobRecord,
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
from baton.store.base import GENESIS, PRUNABLE, AuditEntry, PruneResult, audit_hash
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

    @classmethod
    def of(cls, run_id: str, graph: dict[str, list[str]]) -> Run:
        """``graph``: step id -> the ids it needs, in plan order."""
        ids = list(graph)
        needs = [[ids.index(n) for n in graph[s]] for s in ids]
        return cls(run_id, Dag.build(ids, needs, [1.0] * len(ids)))

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
    made = Run.of(run_id, graph)
    dag, ids, needs = made.dag, made.dag.ids, made.dag.needs
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
    return made


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

    async def turn(self, now: float, done: Sequence[Done] = (), claim: int = 0, **kw: Any) -> TurnResult:
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


def retrying(c: Claimed, at: float, not_before: float, error: str = "boom", outcome: str = "failed") -> Done:
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
    return Done(
        c.id, c.run_id, c.idx, c.attempt, S.CANCELLED, "cancelled", c.started_at, at, error="cancelled"
    )


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


def run_and_steps(run_id: str, step_ids: list[str]) -> tuple[RunRecord, list[StepRecord]]:
    run = RunRecord(
        id=run_id,
        name="r",
        status=R.PENDING,
        plan={"name": "r", "steps": []},
        created_at=T0,
        total_steps=len(step_ids),
    )
    return run, [StepRecord(run_id, i, s, "echo", 0, S.READY) for i, s in enumerate(step_ids)]


async def test_an_idempotency_key_makes_one_run(store: Store, peer: Store) -> None:
    made = await store.create_run(*run_and_steps("first", ["a"]), idempotency=("k1", "body-1"))
    assert made == "first"
    # The same request again (from anywhere): nothing written, the first run's id.
    again = await peer.create_run(*run_and_steps("second", ["a"]), idempotency=("k1", "body-1"))
    assert again == "first"
    with pytest.raises(Conflict, match="idempotency key 'k1' was used for another request"):
        await peer.create_run(*run_and_steps("third", ["a"]), idempotency=("k1", "body-2"))
    assert [r.id for r in await store.list_runs()] == ["first"]
    # Another key, or none, makes a run as usual.
    assert await store.create_run(*run_and_steps("fourth", ["a"]), idempotency=("k2", "body-1")) == "fourth"
    assert await store.create_run(*run_and_steps("fifth", ["a"])) == "fifth"
    assert sorted(r.id for r in await store.list_runs()) == ["fifth", "first", "fourth"]


async def test_api_keys_are_kept_by_hash_and_revoked(store: Store, peer: Store) -> None:
    await store.put_api_key(ApiKey("key1", "admin", "ops", T0), "hash-1")
    await store.put_api_key(ApiKey("key2", "viewer", "dashboard", T0 + 1), "hash-2")
    with pytest.raises(Conflict):
        await store.put_api_key(ApiKey("key1", "viewer", "again", T0 + 2), "hash-3")
    found = await peer.api_key_by_hash("hash-2")
    assert found is not None and (found.id, found.role, found.name) == ("key2", "viewer", "dashboard")
    assert await peer.api_key_by_hash("hash-9") is None
    assert await peer.revoke_api_key("key2", T0 + 5) is True
    assert await peer.revoke_api_key("key2", T0 + 6) is False  # once
    assert await peer.revoke_api_key("nope", T0 + 6) is False
    assert await store.api_key_by_hash("hash-2") is None
    listed = await store.list_api_keys()
    assert [(k.id, k.role, k.revoked_at) for k in listed] == [
        ("key1", "admin", None),
        ("key2", "viewer", T0 + 5),
    ]


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
        assert "fetch" in (steps[name].error or "")
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
    assert (a_step.status, a_step.attempt, a_step.not_before, a_step.error) == (
        S.RETRYING,
        1,
        T0 + 10,
        "slow",
    )
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


async def test_a_claim_says_since_when_the_step_could_have_started(store: Store, peer: Store) -> None:
    """What the enqueue -> start latency is measured from: a step's creation, its last need's
    success, its retry's backoff, a lost worker's requeue, a scheduled job's time."""
    run = await new_run(store, graph={"a": [], "b": ["a"], "c": ["b"]})
    w = await worker(store)
    (a,) = await w.claim(T0 + 2)
    assert a.ready_at == T0  # ready since the run was made
    result = await w.finish(ok(a, T0 + 3, run), claim=10)
    (b,) = result.claimed
    assert b.ready_at == T0 + 3  # its need succeeded in this turn
    await w.finish(retrying(b, T0 + 4, not_before=T0 + 6))
    (b2,) = await w.claim(T0 + 7)
    assert b2.ready_at == T0 + 6  # its backoff ended
    await w.finish(ok(b2, T0 + 8, run))
    (c,) = await w.claim(T0 + 9)
    assert c.ready_at == T0 + 8
    # Its worker lost, the step is back in the queue from when that was noticed.
    other = await worker(peer, "w2", now=T0 + 9)
    await peer.sweep(T0 + 20, ["w1"])
    (c2,) = await other.claim(T0 + 21)
    assert (c2.id, c2.ready_at) == (c.id, T0 + 20)
    (job,) = await store.enqueue([NewJob("echo", {}, run_at=T0 + 30)], T0 + 10)
    (claim,) = await other.claim(T0 + 31)
    assert (claim.id, claim.ready_at) == (job.id, T0 + 30)


async def test_wave_progress_of_the_runs_under_way(store: Store) -> None:
    run = await new_run(store, graph={"a": [], "b": [], "c": ["a", "b"], "d": ["c"]})
    w = await worker(store)
    (first,) = await w.claim(T0 + 1, n=1)  # a or b
    await w.finish(ok(first, T0 + 2, run))
    await new_run(store, "idle")  # pending, not under way: not listed
    assert await store.wave_progress() == [("run1", 0, 2, 1), ("run1", 1, 1, 0), ("run1", 2, 1, 0)]
    await store.set_run_status("run1", R.CANCELLED, T0 + 3)
    assert await store.wave_progress() == []


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
    w = await worker(store, lease_s=1000.0)
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
async def test_a_wave_barrier_holds_later_waves_until_earlier_ones_finish(
    store: Store, barrier: bool
) -> None:
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


async def test_postgres_says_when_a_turn_left_work_for_other_workers(pg_schema: str) -> None:
    """What it notifies other workers about (SQLite workers poll instead)."""
    from baton.store.postgres import PostgresStore

    store = PostgresStore(PG_URL, schema=pg_schema)
    await store.open()
    try:
        await _left_work(store)
    finally:
        await store.close()


async def _left_work(store: Store) -> None:
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


# -- standalone jobs ----------------------------------------------------------------------


async def test_an_enqueued_job_is_available_and_runs_with_its_inputs(store: Store, peer: Store) -> None:
    (job,) = await store.enqueue([NewJob("echo", {"x": [1, 2]}, max_attempts=4, timeout_s=5.0)], T0)
    assert (job.state, job.task, job.args, job.queue, job.priority) == (
        "available",
        "echo",
        {"x": [1, 2]},
        "default",
        0,
    )
    assert (job.attempt, job.max_attempts, job.timeout_s, job.run_at, job.created_at) == (0, 4, 5.0, None, T0)
    assert (job.duplicate, job.unique_key, job.lease_owner) == (False, None, None)
    assert await peer.get_job(job.id) == job

    w = await worker(peer)
    (claim,) = await w.claim(T0 + 1)
    assert (claim.id, claim.run_id, claim.task, claim.attempt, claim.max_attempts, claim.timeout_s) == (
        job.id,
        None,
        "echo",
        1,
        4,
        5.0,
    )
    assert claim.args is not None and json.loads(claim.args) == {"x": [1, 2]}
    running = await store.get_job(job.id)
    assert (running.state, running.attempt, running.lease_owner, running.started_at) == (
        "running",
        1,
        "w1",
        T0 + 1,
    )

    result = await w.finish(ok(claim, T0 + 2, output={"y": 3}))
    assert result.ended == {}
    done = await store.get_job(job.id)
    assert (done.state, done.output, done.finished_at, done.error) == ("completed", {"y": 3}, T0 + 2, None)
    assert [(x.attempt, x.status, x.owner, x.run_id) for x in await store.get_job_attempts(job.id)] == [
        (1, "succeeded", "w1", None)
    ]
    assert await w.claim(T0 + 3) == []


async def test_a_job_scheduled_for_later_waits_until_it_is_due(store: Store) -> None:
    later, past = await store.enqueue(
        [NewJob("echo", {"when": "later"}, run_at=T0 + 60), NewJob("echo", {"when": "past"}, run_at=T0 - 5)],
        T0,
    )
    assert (later.state, later.run_at) == ("scheduled", T0 + 60)
    assert past.state == "available"
    assert [j.id for j in await store.list_jobs(state="scheduled")] == [later.id]
    w = await worker(store, lease_s=1000.0)
    assert [c.id for c in await w.claim(T0 + 1)] == [past.id]
    assert await w.claim(T0 + 59.9) == []
    assert [c.id for c in await w.claim(T0 + 60)] == [later.id]
    assert (await store.get_job(later.id)).state == "running"


async def test_a_failing_job_retries_then_is_discarded_and_can_be_retried(store: Store) -> None:
    (job,) = await store.enqueue([NewJob("flaky", {}, max_attempts=2)], T0)
    w = await worker(store, lease_s=1000.0)
    (first,) = await w.claim(T0)
    assert (first.attempt, first.max_attempts, first.previous_error) == (1, 2, None)
    await w.finish(retrying(first, T0 + 1, not_before=T0 + 10, error="e1"))
    record = await store.get_job(job.id)
    assert (record.state, record.attempt, record.error) == ("retryable", 1, "e1")
    assert [j.id for j in await store.list_jobs(state="retryable")] == [job.id]

    assert await w.claim(T0 + 5) == []
    (second,) = await w.claim(T0 + 10)
    assert (second.attempt, second.previous_error) == (2, "e1")
    await w.finish(failed(second, T0 + 11, error="e2"))
    record = await store.get_job(job.id)
    assert (record.state, record.attempt, record.error, record.finished_at) == ("discarded", 2, "e2", T0 + 11)
    assert [(x.attempt, x.status, x.error) for x in await store.get_job_attempts(job.id)] == [
        (1, "failed", "e1"),
        (2, "failed", "e2"),
    ]
    assert [j.id for j in await store.list_jobs(state="discarded")] == [job.id]
    assert await w.claim(T0 + 100) == []

    again = await store.retry_job(job.id, T0 + 200)
    assert (again.state, again.attempt, again.max_attempts) == ("available", 2, 4)  # a fresh budget
    (third,) = await w.claim(T0 + 201)
    assert (third.attempt, third.max_attempts) == (3, 4)
    await w.finish(ok(third, T0 + 202))
    assert (await store.get_job(job.id)).state == "completed"


async def test_list_jobs_by_state_and_queue(store: Store) -> None:
    jobs = await store.enqueue(
        [
            NewJob("echo", {"n": 0}),
            NewJob("echo", {"n": 1}, queue="mail"),
            NewJob("echo", {"n": 2}, run_at=T0 + 60),
            NewJob("echo", {"n": 3}),
            NewJob("echo", {"n": 4}, queue="mail"),
        ],
        T0,
    )
    ids = [j.id for j in jobs]
    await new_run(store, graph={"step": []})  # steps of runs are not standalone jobs
    w = await worker(store)
    (claim,) = await w.claim(T0, n=1, queues=["mail"])
    assert claim.id == ids[1]
    await w.finish(ok(claim, T0 + 1))
    await store.cancel_job(ids[3], T0 + 2)

    assert [j.id for j in await store.list_jobs()] == ids[::-1]  # newest first
    assert [j.id for j in await store.list_jobs(limit=2)] == [ids[4], ids[3]]
    assert [j.id for j in await store.list_jobs(state="available")] == [ids[4], ids[0]]
    assert [j.id for j in await store.list_jobs(state="scheduled")] == [ids[2]]
    assert [j.id for j in await store.list_jobs(state="completed")] == [ids[1]]
    assert [j.id for j in await store.list_jobs(state="cancelled")] == [ids[3]]
    assert await store.list_jobs(state="running") == []
    assert [j.id for j in await store.list_jobs(queue="mail")] == [ids[4], ids[1]]
    assert [j.id for j in await store.list_jobs(queue="mail", state="available")] == [ids[4]]
    assert await store.list_jobs(queue="nowhere") == []


async def test_cancel_and_retry_jobs(store: Store) -> None:
    available, scheduled, running, done = await store.enqueue(
        [
            NewJob("echo", {"n": 1}),
            NewJob("echo", {"n": 2}, run_at=T0 + 60),
            NewJob("echo", {"n": 3}),
            NewJob("echo", {"n": 4}),
        ],
        T0,
    )
    w = await worker(store, lease_s=1000.0)
    await store.cancel_job(available.id, T0)
    claims = {c.id: c for c in await w.claim(T0 + 1)}
    assert sorted(claims) == [running.id, done.id]
    await w.finish(ok(claims[done.id], T0 + 2))

    record = await store.get_job(available.id)
    assert (record.state, record.finished_at) == ("cancelled", T0)
    assert (await store.cancel_job(scheduled.id, T0 + 3)).state == "cancelled"
    assert await w.claim(T0 + 100) == []  # neither runs, even when due

    # a running job is stopped by its worker, which records it cancelled
    assert (await store.cancel_job(running.id, T0 + 4)).state == "running"
    await w.finish(cancelled(claims[running.id], T0 + 5))
    assert (await store.get_job(running.id)).state == "cancelled"

    with pytest.raises(Conflict):
        await store.retry_job(done.id, T0 + 6)  # completed
    with pytest.raises(Conflict):
        await store.cancel_job(done.id, T0 + 6)
    with pytest.raises(Conflict):
        await store.cancel_job(available.id, T0 + 6)  # already cancelled
    assert (await store.get_job(done.id)).state == "completed"

    back = await store.retry_job(available.id, T0 + 7)
    assert back.state == "available"
    with pytest.raises(Conflict):
        await store.retry_job(available.id, T0 + 8)  # available: nothing to retry
    assert [c.id for c in await w.claim(T0 + 9)] == [available.id]


async def test_unknown_jobs_are_not_found(store: Store) -> None:
    run = await new_run(store, graph={"a": []})
    w = await worker(store)
    (step_claim,) = await w.claim(T0)
    assert step_claim.run_id == run.id
    for call in (
        store.get_job(999_999),
        store.get_job(step_claim.id),  # a step of a run is not a standalone job
        store.get_job_attempts(999_999),
        store.retry_job(999_999, T0),
        store.cancel_job(999_999, T0),
    ):
        with pytest.raises(NotFound):
            await call


async def test_a_turn_claims_only_from_its_queues(store: Store) -> None:
    jobs = await store.enqueue(
        [NewJob("echo", {}, queue="mail"), NewJob("echo", {}), NewJob("echo", {}, queue="bulk")], T0
    )
    mail, default, bulk = (j.id for j in jobs)
    await new_run(store, "run-default", graph={"a": []})
    await new_run(store, "run-mail", graph={"a": []}, queue="mail", created_at=T0 + 1)
    w = await worker(store)

    claims = await w.claim(T0, queues=["mail"])
    assert {c.id for c in claims if c.run_id is None} == {mail}
    assert {c.run_id for c in claims if c.run_id is not None} == {"run-mail"}

    claims = await w.claim(T0 + 1, queues=["bulk", "nowhere"])
    assert [c.id for c in claims] == [bulk]

    claims = await w.claim(T0 + 2)  # every queue
    assert {c.id for c in claims if c.run_id is None} == {default}
    assert {c.run_id for c in claims if c.run_id is not None} == {"run-default"}


async def test_a_turn_claims_only_the_tasks_it_can_run(store: Store) -> None:
    jobs = await store.enqueue([NewJob("send", {}), NewJob("echo", {}), NewJob("resize", {})], T0)
    send, echo, resize = (j.id for j in jobs)
    run = await new_run(store, graph={"a": [], "b": []}, tasks={"a": "send", "b": "echo"})
    w = await worker(store)

    claims = await w.claim(T0, tasks=["send"])
    assert {c.id for c in claims if c.run_id is None} == {send}
    assert run.names(claims) == ["a"]
    assert all(c.task == "send" for c in claims)

    assert await w.claim(T0 + 1, tasks=["unknown"]) == []
    claims = await w.claim(T0 + 2, tasks=["resize", "echo"])
    assert {c.id for c in claims if c.run_id is None} == {echo, resize}
    assert run.names(claims) == ["b"]


async def test_a_unique_key_admits_one_job_however_many_enqueue_at_once(
    backend: Backend, store: Store, open_store: OpenStore
) -> None:
    key = "report:2026-11-21"
    n = 50
    # 50 "processes", each with a connection of its own (memory: the one store)
    stores = [await open_store(pool_size=1) for _ in range(n)]

    async def enqueue(s: Store, i: int) -> JobRecord:
        jobs = [NewJob("echo", {"n": i}, unique_key=key)]
        if backend.name == "sqlite":
            # SQLite calls do not yield to the event loop: threads make them race.
            (record,) = await asyncio.to_thread(lambda: asyncio.run(s.enqueue(jobs, T0 + i)))
        else:
            (record,) = await s.enqueue(jobs, T0 + i)
        return record

    records = await asyncio.gather(*(enqueue(s, i) for i, s in enumerate(stores)))
    originals = [r for r in records if not r.duplicate]
    assert len(originals) == 1
    assert sum(r.duplicate for r in records) == n - 1
    assert {r.id for r in records} == {originals[0].id}
    assert all(r.unique_key == key for r in records)
    (job,) = await store.list_jobs()
    assert (job.id, job.args, job.state) == (originals[0].id, originals[0].args, "available")

    # another key is another job; one batch may carry its own duplicates
    one, two, again = await store.enqueue(
        [
            NewJob("echo", {}, unique_key="k1"),
            NewJob("echo", {}, unique_key="k2"),
            NewJob("echo", {}, unique_key="k1"),
        ],
        T0 + 100,
    )
    assert (one.duplicate, two.duplicate, again.duplicate) == (False, False, True)
    assert again.id == one.id != two.id
    assert len(await store.list_jobs()) == 3


# -- cron schedules -----------------------------------------------------------------------


def nightly(**kw: Any) -> Schedule:
    fields: dict[str, Any] = {
        "name": "nightly",
        "task": "echo",
        "cron": "0 3 * * *",
        "args": {"report": "daily"},
        "next_at": T0 + 100,
    }
    fields.update(kw)
    return Schedule(**fields)


async def test_schedules_are_put_listed_and_deleted(store: Store, peer: Store) -> None:
    await store.put_schedule(nightly())
    await store.put_schedule(nightly(name="hourly", cron="0 * * * *", queue="q", priority=3, catch_up_s=60.0))
    assert await peer.list_schedules() == [
        nightly(name="hourly", cron="0 * * * *", queue="q", priority=3, catch_up_s=60.0),
        nightly(),
    ]
    assert await peer.delete_schedule("hourly")
    assert not await peer.delete_schedule("hourly")
    assert await store.list_schedules() == [nightly()]


async def test_put_schedule_keeps_the_next_tick_unless_the_cron_changed(store: Store) -> None:
    await store.put_schedule(nightly(next_at=T0 + 100))
    # same cron (a restart re-declares it): the tick is kept, the rest replaced
    await store.put_schedule(nightly(next_at=T0 + 999, args={"report": "v2"}, max_attempts=5))
    (schedule,) = await store.list_schedules()
    assert (schedule.next_at, schedule.args, schedule.max_attempts) == (T0 + 100, {"report": "v2"}, 5)
    # another cron: the tick is the new one's
    await store.put_schedule(nightly(cron="0 4 * * *", next_at=T0 + 200))
    (schedule,) = await store.list_schedules()
    assert (schedule.cron, schedule.next_at) == ("0 4 * * *", T0 + 200)


async def test_fire_schedule_is_compare_and_set(store: Store, peer: Store) -> None:
    await store.put_schedule(nightly(next_at=T0 + 100))
    tick = [NewJob("echo", {"report": "daily", "tick": T0 + 100})]
    assert await store.fire_schedule("nightly", T0 + 100, T0 + 200, tick, T0 + 100)
    # another scheduler read the same next tick: its fire is refused and inserts nothing
    assert not await peer.fire_schedule("nightly", T0 + 100, T0 + 200, tick, T0 + 101)
    assert not await peer.fire_schedule("missing", T0 + 100, T0 + 200, tick, T0 + 101)
    (schedule,) = await peer.list_schedules()
    assert schedule.next_at == T0 + 200
    (job,) = await store.list_jobs()
    assert (job.task, job.args, job.state) == ("echo", {"report": "daily", "tick": T0 + 100}, "available")

    # schedulers racing for the next tick: exactly one wins
    fires = await asyncio.gather(
        *(
            s.fire_schedule("nightly", T0 + 200, T0 + 300, [NewJob("echo", {"tick": T0 + 200})], T0 + 200)
            for s in (store, peer, store, peer)
        )
    )
    assert sorted(fires) == [False, False, False, True]
    assert len(await store.list_jobs()) == 2


# -- the cache and budgets ----------------------------------------------------------------


async def test_the_cache_keeps_values_until_they_expire(store: Store, peer: Store) -> None:
    await store.cache_put("k", '{"text": "a"}', T0, T0 + 10)
    await store.cache_put("forever", "f", T0, None)
    assert await peer.cache_get("k", T0 + 5) == '{"text": "a"}'  # shared with other processes
    assert await store.cache_get("k", T0 + 11) is None
    assert await store.cache_get("forever", T0 + 1e9) == "f"
    assert await store.cache_get("missing", T0) is None
    await store.cache_put("k", "b", T0 + 20, T0 + 30)  # replaced, with a new expiry
    assert await store.cache_get("k", T0 + 25) == "b"


async def test_budget_reservations_are_all_or_nothing_and_settle_into_spend(
    store: Store, peer: Store
) -> None:
    run_claim = BudgetClaim("run", 400, 0.4, 1000, 1.0)
    step_claim = BudgetClaim("step:a", 400, 0.4, 500, None)
    await store.budget_reserve("r1", [run_claim, step_claim])
    # The step scope is full (400 reserved + 400 > 500): neither scope is charged.
    with pytest.raises(
        BudgetExceeded, match=r"step:a token budget: 400 used or reserved \+ 400 estimated > 500"
    ):
        await peer.budget_reserve("r1", [run_claim, step_claim])
    await peer.budget_settle(
        "r1", [BudgetSettle("run", 400, 0.4, 30, 0.03), BudgetSettle("step:a", 400, 0.4, 30, 0.03)]
    )
    ledger = {e.scope: e for e in await store.budget_ledger("r1")}
    run_entry = ledger["run"]
    assert (run_entry.reserved_tokens, run_entry.reserved_usd, run_entry.spent_tokens) == (0, 0.0, 30)
    assert run_entry.spent_usd == pytest.approx(0.03)
    assert ledger["step:a"].reserved_tokens == 0 and ledger["step:a"].spent_tokens == 30
    await store.budget_reserve("r1", [BudgetClaim("run", 900, 0.9, 1000, 1.0)])
    with pytest.raises(BudgetExceeded, match=r"run USD budget: \$0\.930000 used or reserved \+ \$0\.100000"):
        await store.budget_reserve("r1", [BudgetClaim("run", 10, 0.1, None, 1.0)])
    assert await store.budget_ledger("other") == []


# -- SQLite only --------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "baton.db"


async def test_sqlite_survives_reopening(db_path: Path) -> None:
    first = SQLiteStore(db_path)
    await first.open()
    run = await new_run(first)
    w = await worker(first)
    (a,) = await w.claim(T0)
    await w.finish(ok(a, T0 + 1, run, output={"kept": True}), claim=1)
    (job,) = await first.enqueue([NewJob("echo", {"n": 1}, unique_key="once")], T0)
    await first.close()

    second = SQLiteStore(db_path)
    await second.open()
    try:
        record = await second.get_run("run1")
        assert record.plan is not None
        assert (record.status, record.plan["name"], record.running, record.unfinished) == (
            R.RUNNING,
            "plan-run1",
            1,
            2,
        )
        a_step, b_step, c_step = await second.get_steps("run1")
        assert (a_step.status, a_step.output) == (S.SUCCEEDED, {"kept": True})
        assert (b_step.status, b_step.lease_owner) == (S.RUNNING, "w1")
        assert (c_step.status, c_step.waiting) == (S.PENDING, 1)
        assert [(x.step_id, x.status) for x in await second.get_attempts("run1")] == [("a", "succeeded")]
        (again,) = await second.enqueue([NewJob("echo", {"n": 2}, unique_key="once")], T0 + 1)
        assert again.duplicate and again.id == job.id
    finally:
        await second.close()


async def test_sqlite_uses_wal(db_path: Path) -> None:
    store = SQLiteStore(db_path)
    await store.open()
    try:
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with sqlite3.connect(db_path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    finally:
        await store.close()


async def test_sqlite_migrations_are_versioned_and_applied_once(db_path: Path) -> None:
    latest = max(number for number, _ in load_migrations("baton.store.sqlite"))
    store = SQLiteStore(db_path)
    await store.open()
    await new_run(store)
    await store.close()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == latest

    for _ in range(2):  # re-opening applies nothing again (and loses nothing)
        again = SQLiteStore(db_path)
        await again.open()
        try:
            assert again.db.execute("PRAGMA user_version").fetchone()[0] == latest
            assert [r.id for r in await again.list_runs()] == ["run1"]
            assert await statuses(again) == {"a": S.READY, "b": S.PENDING, "c": S.PENDING}
        finally:
            await again.close()


async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    store = SQLiteStore(path)
    with pytest.raises(StoreError):
        await store.open()
    with pytest.raises(StoreError):
        await store.list_runs()


def _version_4_database(path: Path) -> None:
    """A database as baton wrote it before the queue (migrations 1 to 4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for number, statements in load_migrations("baton.store.sqlite"):
            if number <= 4:
                for statement in statements:
                    db.execute(statement)
        db.execute("PRAGMA user_version = 4")
    finally:
        db.close()


def _v4_run(
    db: sqlite3.Connection,
    run_id: str,
    status: str,
    graph: dict[str, list[str]],
    steps: list[tuple[str, int, str | None, str | None]],  # (status, attempt, lease owner, output)
    step_base: int,
    policy: dict[str, Any] | None = None,
) -> None:
    plan = {
        "name": run_id,
        "policy": policy or {},
        "steps": [{"id": s, "task": "echo", **({"needs": n} if n else {})} for s, n in graph.items()],
    }
    owner = "gone-host:1:abc" if status == "running" else None
    db.execute(
        "INSERT INTO runs (id, name, status, plan, workdir, created_at, started_at, owner,"
        " lease_expires_at, total_steps, step_base) VALUES (?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            run_id,
            status,
            json.dumps(plan),
            T0,
            T0 if owner else None,
            owner,
            T0 + LEASE if owner else None,
            len(graph),
            step_base,
        ),
    )
    ids = list(graph)
    waves: dict[str, int] = {}
    for s in ids:
        waves[s] = max((waves[n] + 1 for n in graph[s]), default=0)
    for i, (s, (st, attempt, lease_owner, output)) in enumerate(zip(ids, steps, strict=True)):
        db.execute(
            "INSERT INTO steps (id, run_id, idx, step_id, task, wave, status, attempt, lease_owner,"
            " output, started_at, finished_at) VALUES (?, ?, ?, ?, 'echo', ?, ?, ?, ?, ?, ?, ?)",
            (
                step_base + i,
                run_id,
                i,
                s,
                waves[s],
                st,
                attempt,
                lease_owner,
                output,
                T0 if attempt else None,
                T0 + 1 if st == "succeeded" else None,
            ),
        )
        if st == "succeeded":
            db.execute(
                "INSERT INTO attempts (step, attempt, status, started_at, finished_at, owner)"
                " VALUES (?, ?, 'succeeded', ?, ?, ?)",
                (step_base + i, attempt, T0, T0 + 1, "gone-host:1:abc"),
            )


DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"]}


async def test_sqlite_migrates_a_version_4_database_with_a_run_in_flight(db_path: Path) -> None:
    _version_4_database(db_path)
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        # a succeeded, b running (its process is gone), c ready, d and e waiting
        _v4_run(
            db,
            "old1",
            "running",
            DIAMOND,
            [
                ("succeeded", 1, None, '"A"'),
                ("running", 1, "gone-host:1:abc", None),
                ("ready", 0, None, None),
                ("pending", 0, None, None),
                ("pending", 0, None, None),
            ],
            step_base=1,
            policy={"max_parallel": 3},
        )
    finally:
        db.close()

    store = SQLiteStore(db_path)
    await store.open()
    try:
        latest = max(number for number, _ in load_migrations("baton.store.sqlite"))
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == latest
        record = await store.get_run("old1")
        assert (record.status, record.started_at, record.max_parallel) == (R.RUNNING, T0, 3)
        assert (record.running, record.unfinished) == (1, 4)
        steps = {s.step_id: s for s in await store.get_steps("old1")}
        assert {k: (s.status, s.waiting) for k, s in steps.items()} == {
            "a": (S.SUCCEEDED, 0),
            "b": (S.RUNNING, 0),
            "c": (S.READY, 0),
            "d": (S.PENDING, 2),
            "e": (S.PENDING, 1),
        }
        assert steps["a"].output == "A"
        assert [(x.step_id, x.status) for x in await store.get_attempts("old1")] == [("a", "succeeded")]

        # the run goes on: b's holder is gone, so the sweep rescues it; then to the end
        run = Run.of("old1", DIAMOND)
        now = T0 + 1000
        w = await worker(store, "w-new", now=now)
        assert await store.sweep(now) == [steps["b"].id]
        claims = by_idx(await w.claim(now), run)
        assert sorted(claims) == ["b", "c"]
        assert (claims["b"].attempt, claims["c"].attempt) == (2, 1)
        result = await w.finish(ok(claims["b"], now + 1, run), ok(claims["c"], now + 1, run), claim=10)
        assert run.names(result.claimed) == ["d"]
        result = await w.finish(ok(result.claimed[0], now + 2, run), claim=10)
        assert run.names(result.claimed) == ["e"]
        result = await w.finish(ok(result.claimed[0], now + 3, run))
        assert result.ended == {"old1": R.COMPLETED}
        assert [(x.step_id, x.attempt, x.status) for x in await store.get_attempts("old1")] == [
            ("a", 1, "succeeded"),
            ("b", 1, "lost"),
            ("b", 2, "succeeded"),
            ("c", 1, "succeeded"),
            ("d", 1, "succeeded"),
            ("e", 1, "succeeded"),
        ]
    finally:
        await store.close()


async def test_sqlite_migrates_a_version_4_run_that_had_not_started(db_path: Path) -> None:
    """Before the queue, every step of a new run was written pending (its process worked out
    which could start). After the migration, its first steps must be claimable."""
    _version_4_database(db_path)
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        _v4_run(
            db,
            "old2",
            "pending",
            {"x": [], "y": ["x"]},
            [("pending", 0, None, None), ("pending", 0, None, None)],
            step_base=1,
        )
    finally:
        db.close()

    store = SQLiteStore(db_path)
    await store.open()
    try:
        record = await store.get_run("old2")
        assert (record.status, record.running, record.unfinished) == (R.PENDING, 0, 2)
        assert [(s.step_id, s.waiting) for s in await store.get_steps("old2")] == [("x", 0), ("y", 1)]
        w = await worker(store, now=T0 + 1000)
        claims = await w.claim(T0 + 1000)
        assert [(c.run_id, c.idx) for c in claims] == [("old2", 0)]
    finally:
        await store.close()


def test_store_for_urls(tmp_path: Path) -> None:
    assert isinstance(store_for("memory://"), MemoryStore)
    by_url = store_for(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(by_url, SQLiteStore) and by_url.path == tmp_path / "a.db"
    by_path = store_for(str(tmp_path / "b.db"))
    assert isinstance(by_path, SQLiteStore) and by_path.path == tmp_path / "b.db"


def test_database_urls_choose_the_store_and_its_durability(tmp_path: Path) -> None:
    plain = store_for(str(tmp_path / "a.db"))
    full = store_for(f"sqlite:///{tmp_path / 'b.db'}?synchronous=full")
    assert isinstance(plain, SQLiteStore) and isinstance(full, SQLiteStore)
    plain.open_sync()
    full.open_sync()
    try:
        # PRAGMA synchronous: 1 is NORMAL, 2 is FULL.
        assert plain.db.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert full.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        plain.db.close()
        full.db.close()
    with pytest.raises(UsageError, match="the one option is synchronous"):
        store_for(f"sqlite:///{tmp_path / 'c.db'}?synchronous=sometimes")
    with pytest.raises(UsageError, match="unsupported database URL scheme 'mysql'"):
        store_for("mysql://localhost/x")


# -- PostgreSQL only ----------------------------------------------------------------------


def test_postgres_urls_choose_the_postgres_store() -> None:
    from baton.store.postgres import PostgresStore

    pg = store_for("postgresql://u@db.example:5432/baton?schema=jobs&sslmode=require")
    assert isinstance(pg, PostgresStore)
    # baton's option (schema) is taken out; libpq's (sslmode) go to the connection.
    assert pg.url == "postgresql://u@db.example:5432/baton?sslmode=require&schema=jobs"
    assert isinstance(store_for("postgres://localhost/db"), PostgresStore)


async def test_an_unreachable_postgres_is_a_clear_store_error() -> None:
    from baton.store.postgres import PostgresStore

    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    with pytest.raises(
        StoreError, match=r"cannot connect to PostgreSQL at postgresql://nobody@127\.0\.0\.1:1"
    ):
        await store.open()


def _with_option(url: str, option: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{option}"


async def test_postgres_keeps_its_pool_bounded_under_load(pg_schema: str) -> None:
    """200 calls at once through a pool of 3 connections: all are served (they wait for a
    connection), and the store never holds more than 3."""
    from baton.store.postgres import PostgresStore

    app = f"baton_pool_{uuid.uuid4().hex[:8]}"
    store = PostgresStore(_with_option(PG_URL, f"application_name={app}"), schema=pg_schema, pool_size=3)
    await store.open()
    seen: list[int] = []
    try:
        await new_run(store, graph={f"s{i}": [] for i in range(20)}, max_parallel=100)
        await worker(store)
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as probe:
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    cur = await probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    seen.append(int(row[0]))
                    await asyncio.sleep(0.002)

            async def load() -> list[Any]:
                calls: list[Awaitable[Any]] = []
                for i in range(50):
                    calls.append(store.enqueue([NewJob("echo", {"n": i})], T0))
                    calls.append(store.get_run("run1", with_plan=False))
                    calls.append(store.turn(Turn("w1", T0, claim=1)))
                    calls.append(store.cache_put(f"k{i}", "v", T0, None))
                try:
                    return await asyncio.gather(*calls)
                finally:
                    done.set()

            _, results = await asyncio.gather(sample(), load())
        assert len(results) == 200
        claimed = [c for r in results if isinstance(r, TurnResult) for c in r.claimed]
        assert len(claimed) == 50 and len({c.id for c in claimed}) == 50  # no job claimed twice
        assert len(await store.list_jobs(limit=100)) == 50
    finally:
        await store.close()
    assert 1 <= max(seen) <= 3, seen


async def test_postgres_schemas_keep_stores_apart(pg_schema: str) -> None:
    from baton.store.postgres import PostgresStore

    other_schema = f"{pg_schema}_other"
    mine = PostgresStore(PG_URL, schema=pg_schema)
    theirs = PostgresStore(PG_URL, schema=other_schema)
    try:
        await mine.open()
        await theirs.open()
        await new_run(mine)
        (job,) = await theirs.enqueue([NewJob("echo", {})], T0)
        assert [r.id for r in await mine.list_runs()] == ["run1"]
        assert await theirs.list_runs() == []
        with pytest.raises(NotFound):
            await theirs.get_run("run1")
        assert await mine.list_jobs() == []
        w = await worker(mine)
        claims = await w.claim(T0)
        assert [(c.run_id, c.idx) for c in claims] == [("run1", 0)]  # not the other schema's job
        assert (await theirs.get_job(job.id)).state == "available"
        assert (await theirs.heartbeat("w1", T0, LEASE, [])).lost  # workers are per schema too
    finally:
        await mine.close()
        await theirs.close()
        async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{other_schema}" CASCADE')


async def test_postgres_stores_starting_together_migrate_once(pg_schema: str) -> None:
    """Processes starting at once on a fresh schema: every one opens (creating the schema
    and applying the migrations exactly once between them) and they share the data."""
    from baton.store.postgres import PostgresStore

    stores = [PostgresStore(PG_URL, schema=pg_schema, pool_size=1) for _ in range(12)]
    try:
        # every open is awaited (no pool left half-open behind a failure) before checking
        opened = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
        errors = [str(e) for e in opened if isinstance(e, BaseException)]
        assert not errors, errors
        await new_run(stores[0])
        (job,) = await stores[1].enqueue([NewJob("echo", {})], T0)
        for s in stores:
            assert [r.id for r in await s.list_runs()] == ["run1"]
            assert (await s.get_job(job.id)).state == "available"
    finally:
        for s in stores:
            await s.close()
    again = PostgresStore(PG_URL, schema=pg_schema)
    await again.open()  # nothing left to apply, nothing lost
    try:
        assert await statuses(again) == {"a": S.READY, "b": S.PENDING, "c": S.PENDING}
    finally:
        await again.close()


async def test_concurrent_requests_with_one_idempotency_key_make_one_run(
    backend: Backend, store: Store, open_store: OpenStore
) -> None:
    """Requests with one Idempotency-Key at once, each from a "process" of its own: exactly
    one run is made; the same request gets its id, another request a Conflict."""
    n = 10
    # each with a connection of its own (memory: the one store)
    stores = [await open_store(pool_size=1) for _ in range(n)]

    async def create(s: Store, run_id: str, key: str, fingerprint: str) -> str:
        made = run_and_steps(run_id, ["a"])
        if backend.name == "sqlite":
            # SQLite calls do not yield to the event loop: threads make them race.
            return await asyncio.to_thread(
                lambda: asyncio.run(s.create_run(*made, idempotency=(key, fingerprint)))
            )
        return await s.create_run(*made, idempotency=(key, fingerprint))

    # the same request n times: one run, every caller gets its id
    ids = await asyncio.gather(*(create(s, f"same{i}", "k-same", "body") for i, s in enumerate(stores)))
    (run,) = await store.list_runs()
    assert set(ids) == {run.id}
    assert run.id.startswith("same")

    # two different requests under one key: one run; the request that made it gets its id,
    # the other a Conflict
    bodies = ["body-A" if i % 2 else "body-B" for i in range(n)]
    results = await asyncio.gather(
        *(create(s, f"mixed{i}", "k-mixed", bodies[i]) for i, s in enumerate(stores)),
        return_exceptions=True,
    )
    mixed = [r for r in await store.list_runs() if r.id.startswith("mixed")]
    assert len(mixed) == 1
    winner = bodies[int(mixed[0].id.removeprefix("mixed"))]
    for body, result in zip(bodies, results, strict=True):
        if body == winner:
            assert result == mixed[0].id
        else:
            assert isinstance(result, Conflict), result
            assert "idempotency key 'k-mixed' was used for another request" in str(result)
    assert len(await store.list_runs()) == 2


# -- the audit trail ------------------------------------------------------------------------


def assert_chain(entries: list[AuditEntry]) -> None:
    """One unbroken chain from GENESIS: each entry's prev_hash is the hash of the entry before
    it in seq order, and each hash is the one its content gives."""
    assert [e.seq for e in entries] == sorted({e.seq for e in entries})
    prev = GENESIS
    for e in entries:
        assert e.prev_hash == prev, e
        assert e.hash == audit_hash(e.prev_hash, e.ts, e.actor, e.action, e.subject, e.detail)
        prev = e.hash


async def test_audit_entries_chain_by_hash_and_read_back_by_subject_and_seq(
    store: Store, peer: Store
) -> None:
    assert await store.audit_entries() == []
    e1 = await store.audit_append(T0 + 0.1234567, "key:k1", "run.pause", "r1", {"b": 1, "a": [1, "x"]})
    e2 = await peer.audit_append(T0 + 1, "system", "run.completed", "r2", {})
    e3 = await store.audit_append(T0 + 2, "cli:me@host", "run.resume", "r1", {"why": "ünïcode"})
    assert e1.ts == round(T0 + 0.1234567, 6)
    assert e1.prev_hash == GENESIS
    assert (e2.prev_hash, e3.prev_hash) == (e1.hash, e2.hash)
    assert e1.seq < e2.seq < e3.seq

    # read back as appended, from either store object
    entries = await peer.audit_entries()
    assert entries == [e1, e2, e3]
    assert entries[0].detail == {"b": 1, "a": [1, "x"]}
    assert_chain(entries)
    assert await store.audit_entries() == entries

    # one subject's entries; after a seq; at most so many
    assert await store.audit_entries(subject="r1") == [e1, e3]
    assert await store.audit_entries(subject="r2") == [e2]
    assert await store.audit_entries(subject="nothing") == []
    assert await store.audit_entries(after=e1.seq) == [e2, e3]
    assert await store.audit_entries(after=e3.seq) == []
    assert await store.audit_entries(limit=1) == [e1]
    assert await store.audit_entries(after=e1.seq, limit=1) == [e2]
    assert await store.audit_entries(subject="r1", after=e1.seq) == [e3]
    assert await store.audit_entries(subject="r1", limit=1) == [e1]


async def test_concurrent_audit_appends_make_one_chain(
    backend: Backend, store: Store, open_store: OpenStore
) -> None:
    """Appends at once from many "processes": one unbroken chain, no fork."""
    n, each = 10, 5
    # each with a connection of its own (memory: the one store)
    stores = [await open_store(pool_size=1) for _ in range(n)]

    async def append_all(s: Store, who: int) -> list[AuditEntry]:
        return [
            await s.audit_append(T0 + i, f"key:k{who}", "run.pause", f"r{i}", {"who": who, "i": i})
            for i in range(each)
        ]

    async def appender(s: Store, who: int) -> list[AuditEntry]:
        if backend.name == "sqlite":
            # SQLite calls do not yield to the event loop: threads make them race.
            return await asyncio.to_thread(lambda: asyncio.run(append_all(s, who)))
        return await append_all(s, who)

    appended = await asyncio.gather(*(appender(s, who) for who, s in enumerate(stores)))
    entries = await store.audit_entries()
    assert len(entries) == n * each
    assert_chain(entries)
    assert len({e.prev_hash for e in entries}) == n * each  # no two entries after one
    # what each append returned is what was stored, and each appender's entries are in its order
    assert sorted((e for batch in appended for e in batch), key=lambda e: e.seq) == entries
    for who in range(n):
        mine = [e.detail["i"] for e in entries if e.actor == f"key:k{who}"]
        assert mine == list(range(each))


async def test_queue_depth_counts_what_waits_and_runs_by_queue(store: Store) -> None:
    await new_run(store, "run1", {"a": [], "b": [], "c": ["a"]}, queue="plans")
    jobs = [NewJob("echo", {"i": i}, "mail") for i in range(3)]
    jobs.append(NewJob("echo", {}, "mail", run_at=T0 + 3600))
    await store.enqueue(jobs, T0)
    w = await worker(store)
    assert len(await w.claim(T0, n=1, queues=["mail"], jobs=True)) == 1
    depth = sorted(await store.queue_depth())
    # run1: a and b ready (c waits for a need: not queued yet); mail: 2 available, 1 running, 1 due later
    assert depth == [
        ("mail", "available", 2),
        ("mail", "running", 1),
        ("mail", "scheduled", 1),
        ("plans", "available", 2),
    ]


# -- retention ----------------------------------------------------------------------------

#: prune cutoffs: everything in `_history` ended before CUT but the recent run and job
CUT = T0 + 1000
ENDED = list(PRUNABLE)


async def _complete(w: FakeWorker, run: Run, at: float) -> None:
    """Every step of ``run`` (the only claimable work) succeeds at ``at``."""
    while claims := await w.claim(at):
        await w.finish(*(ok(c, at, run) for c in claims))


async def _history(store: Store) -> dict[str, int]:
    """Runs and jobs of every kind, all made at T0, ended before CUT but for one run and one
    job; cache entries; audit entries. The ids of the jobs, by name."""
    w = await worker(store, lease_s=1e9)
    # old1 completed at T0 + 10: a retried step (its failed attempt is on record), a step whose
    # attempt recorded details, a budget ledger
    old1 = await new_run(store, "old1")
    (a,) = await w.claim(T0 + 1)
    await w.finish(ok(a, T0 + 1, old1))
    (b,) = await w.claim(T0 + 2)
    await w.finish(retrying(b, T0 + 2, not_before=T0 + 2))
    (b,) = await w.claim(T0 + 3)
    await w.finish(ok(b, T0 + 3, old1))
    (c,) = await w.claim(T0 + 4)
    done = ok(c, T0 + 10, old1, output="x" * 1000)
    done.detail = json.dumps({"prompt": "p" * 500})
    assert (await w.finish(done)).ended == {"old1": R.COMPLETED}
    await store.budget_settle("old1", [BudgetSettle("run", 0, 0.0, 10, 0.01)])
    # old2 failed at T0 + 20 (its second step skipped)
    old2 = await new_run(store, "old2", {"a": [], "b": ["a"]})
    (a,) = await w.claim(T0 + 20)
    assert (await w.finish(failed(a, T0 + 20, old2))).ended == {"old2": R.FAILED}
    # old3 cancelled before it started; keyed (an idempotency key) cancelled too
    await new_run(store, "old3")
    await store.set_run_status("old3", R.CANCELLED, T0 + 30)
    keyed = RunRecord("keyed", "keyed", R.PENDING, {"name": "keyed", "steps": []}, T0, total_steps=1)
    await store.create_run(keyed, [StepRecord("keyed", 0, "a", "echo")], idempotency=("key-1", "fp-1"))
    await store.set_run_status("keyed", R.CANCELLED, T0 + 40)
    # new completed after the cutoff
    await _complete(w, await new_run(store, "new", {"a": []}), CUT + 4000)
    # standalone jobs: completed, discarded, cancelled, a retry due later, one scheduled for
    # later, one still running, one completed after the cutoff
    jobs = await store.enqueue(
        [
            NewJob("echo", {"job": "done"}),
            NewJob("echo", {"job": "discarded"}, max_attempts=1),
            NewJob("echo", {"job": "cancelled"}),
            NewJob("echo", {"job": "retry"}),
            NewJob("echo", {"job": "later"}, run_at=T0 + 1e8),
            NewJob("echo", {"job": "stuck"}),
            NewJob("echo", {"job": "recent"}),
        ],
        T0,
    )
    ids = {j.args["job"]: j.id for j in jobs}
    await store.cancel_job(ids["cancelled"], T0 + 45)
    claims = {c.id: c for c in await w.claim(T0 + 50)}
    assert set(claims) == {ids[n] for n in ("done", "discarded", "retry", "stuck", "recent")}
    await w.finish(
        ok(claims[ids["done"]], T0 + 60),
        failed(claims[ids["discarded"]], T0 + 60),
        retrying(claims[ids["retry"]], T0 + 60, not_before=T0 + 1e8),
        ok(claims[ids["recent"]], CUT + 4000),
    )
    # a paused run and a running one, made long ago
    await new_run(store, "paused")
    await store.set_run_status("paused", R.PAUSED, T0 + 5)
    running = await new_run(store, "running")
    assert running.names(await w.claim(T0 + 70)) == ["a"]
    await store.cache_put("expired", "v" * 100, T0, T0 + 10)
    await store.cache_put("later", "v", T0, T0 + 1e8)
    await store.cache_put("forever", "v", T0, None)
    await store.audit_append(T0, "cli:me@host", "run.cancel", "old3", {})
    await store.audit_append(T0 + 1, "system", "run.completed", "old1", {})
    return ids


#: what prune removes of `_history`: the old runs (3 + 2 + 3 + 1 steps); the completed,
#: discarded and cancelled jobs; the attempts on record (old1's failed try and detailed
#: success, old2's failure, the discarded job's); the expired cache entry
HISTORY_PRUNED = {"runs": 4, "steps": 9, "jobs": 3, "attempts": 4, "cache": 1}


async def test_prune_removes_what_ended_before_the_cutoff_and_nothing_under_way(
    store: Store, peer: Store
) -> None:
    ids = await _history(store)
    trail = await store.audit_entries()

    result = await peer.prune(CUT, ENDED, limit=100)
    assert {k: v for k, v in result.counts().items() if k != "bytes"} == HISTORY_PRUNED
    assert result.bytes > 1000 + 500 + 100  # old1's output and details, the cache entry
    assert not result.more

    for gone in ("old1", "old2", "old3", "keyed"):
        with pytest.raises(NotFound):
            await store.get_run(gone)
    assert sorted(r.id for r in await store.list_runs()) == ["new", "paused", "running"]
    assert await statuses(store, "paused") == {"a": S.READY, "b": S.PENDING, "c": S.PENDING}
    assert await statuses(store, "running") == {"a": S.RUNNING, "b": S.PENDING, "c": S.PENDING}
    assert (await store.get_run("paused")).status is R.PAUSED
    assert (await store.get_run("new")).status is R.COMPLETED
    assert [a.step_id for a in await store.get_attempts("new")] == ["a"]
    assert await store.budget_ledger("old1") == []
    for name in ("done", "discarded", "cancelled"):
        with pytest.raises(NotFound):
            await store.get_job(ids[name])
    assert sorted(j.id for j in await store.list_jobs()) == sorted(
        ids[n] for n in ("retry", "later", "stuck", "recent")
    )
    assert (await store.get_job(ids["stuck"])).state == "running"
    assert await store.cache_get("expired", T0 + 5) is None  # (it had not expired then)
    assert await store.cache_get("later", T0 + 5) == "v"
    assert await store.cache_get("forever", T0 + 5) == "v"
    # the pruned run's idempotency key is free again; the audit trail is untouched
    again = RunRecord("again", "again", R.PENDING, {"name": "again", "steps": []}, CUT, total_steps=1)
    again_steps = [StepRecord("again", 0, "a", "echo")]
    assert await store.create_run(again, again_steps, idempotency=("key-1", "fp-2")) == "again"
    assert await store.audit_entries() == trail

    # a worker of the running run still finishes it, and nothing else is left to prune
    assert await store.prune(CUT, ENDED, limit=100) == PruneResult()


async def test_a_dry_run_counts_what_a_prune_removes_and_deletes_nothing(store: Store) -> None:
    await _history(store)
    dry = await store.prune(CUT, ENDED, limit=1, dry_run=True)  # (a dry run has no limit)
    assert {k: v for k, v in dry.counts().items() if k != "bytes"} == HISTORY_PRUNED
    assert len(await store.list_runs()) == 7
    assert len(await store.list_jobs()) == 7
    assert await store.cache_get("expired", T0 + 5) == "v" * 100
    assert await store.prune(CUT, ENDED, limit=100, dry_run=True) == dry

    real = await store.prune(CUT, ENDED, limit=100)
    assert real.counts() == dry.counts()  # bytes included
    assert await store.prune(CUT, ENDED, dry_run=True) == PruneResult()


async def test_prune_takes_whole_runs_oldest_first_in_batches(store: Store) -> None:
    w = await worker(store, lease_s=1e9)
    await _complete(w, await new_run(store, "big", {f"s{i}": [] for i in range(10)}), T0)
    for i in range(5):
        await _complete(w, await new_run(store, f"r{i}"), T0 + 1 + i)  # three steps each
    jobs = await store.enqueue([NewJob("echo", {"i": i}) for i in range(5)], T0)
    await w.finish(*(ok(c, T0 + 20 + i) for i, c in enumerate(await w.claim(T0 + 20))))

    # a batch takes runs while the steps of those before stay under the limit (a run larger
    # than the limit goes whole, alone), and at most the limit in jobs, oldest first
    first = await store.prune(CUT, ENDED, limit=4)
    assert (first.runs, first.steps, first.jobs, first.more) == (1, 10, 4, True)
    assert sorted(r.id for r in await store.list_runs()) == ["r0", "r1", "r2", "r3", "r4"]
    assert [j.id for j in await store.list_jobs()] == [jobs[4].id]
    second = await store.prune(CUT, ENDED, limit=4)
    assert (second.runs, second.steps, second.jobs, second.more) == (2, 6, 1, True)
    assert sorted(r.id for r in await store.list_runs()) == ["r2", "r3", "r4"]
    third = await store.prune(CUT, ENDED, limit=4)
    assert (third.runs, third.steps, third.jobs, third.more) == (2, 6, 0, True)
    fourth = await store.prune(CUT, ENDED, limit=4)
    assert (fourth.runs, fourth.steps, fourth.more) == (1, 3, False)
    assert await store.list_runs() == []


async def test_prune_removes_only_the_statuses_asked_and_never_runs_under_way(store: Store) -> None:
    ids = await _history(store)
    result = await store.prune(CUT, [R.FAILED], limit=100)
    assert (result.runs, result.steps, result.jobs, result.attempts) == (1, 2, 1, 2)
    left = sorted(r.id for r in await store.list_runs())
    assert left == ["keyed", "new", "old1", "old3", "paused", "running"]
    with pytest.raises(NotFound):
        await store.get_job(ids["discarded"])
    await store.get_job(ids["done"])
    for status in (R.PENDING, R.RUNNING, R.PAUSED):
        with pytest.raises(UsageError, match=f"cannot prune {status} runs"):
            await store.prune(CUT, [R.COMPLETED, status])
        with pytest.raises(UsageError):
            await store.prune(CUT, [status], dry_run=True)
    # whatever the cutoff, runs under way stay
    everything = await store.prune(CUT + 1e9, ENDED, limit=100)
    assert everything.runs == 4  # old1, old3, keyed, new
    assert sorted(r.id for r in await store.list_runs()) == ["paused", "running"]


async def test_a_cancelled_run_is_pruned_once_its_running_steps_are_done(store: Store, peer: Store) -> None:
    await new_run(store, "run1", {"a": [], "b": []})
    w = await worker(store, lease_s=1e9)
    a, b = await w.claim(T0)
    await store.set_run_status("run1", R.CANCELLED, T0 + 1)  # a and b still run on their worker
    assert await peer.prune(CUT, ENDED) == PruneResult()
    assert await peer.prune(CUT, ENDED, dry_run=True) == PruneResult()
    await w.finish(cancelled(a, T0 + 2))
    assert await peer.prune(CUT, ENDED) == PruneResult()
    await w.finish(cancelled(b, T0 + 3))
    assert (await peer.prune(CUT, ENDED)).runs == 1


async def test_prunes_from_many_processes_at_once_remove_each_thing_once(
    store: Store, open_store: OpenStore
) -> None:
    await _history(store)
    peers = [await open_store(pool_size=2) for _ in range(4)]

    async def drain(s: Store) -> PruneResult:
        total = PruneResult()
        while True:
            done = await s.prune(CUT, ENDED, limit=1)
            total.add(done)
            if not done.more:
                return total

    summed = PruneResult()
    for total in await asyncio.gather(*(drain(s) for s in peers)):
        summed.add(total)
    assert {k: v for k, v in summed.counts().items() if k != "bytes"} == HISTORY_PRUNED
    assert await store.prune(CUT, ENDED, dry_run=True) == PruneResult()
    assert sorted(r.id for r in await store.list_runs()) == ["new", "paused", "running"]
