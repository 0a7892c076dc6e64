"""The store suite: one set of tests, run against every backend (memory and SQLite).

A second store object on the same data ("peer") stands for another process: for SQLite it
is a second connection to the same file, for memory the same object.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from baton.errors import BudgetExceeded, Conflict, NotFound, StoreError, UsageError
from baton.status import RunStatus, StepStatus
from baton.store import (
    Batch,
    BudgetClaim,
    BudgetSettle,
    Claim,
    Finish,
    LedgerEntry,
    Mark,
    MemoryStore,
    RunRecord,
    SQLiteStore,
    StepRecord,
    Store,
    store_for,
)
from baton.store.postgres import PostgresStore
from baton.store.sql import load_migrations
from tests.conftest import PG_URL

R, S = RunStatus, StepStatus
T0 = 1_000_000.0
LEASE = 30.0


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = SQLiteStore(tmp_path / "baton.db")
    else:
        s = PostgresStore(PG_URL, schema=request.getfixturevalue("pg_schema"))
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def peer(store: Store) -> AsyncIterator[Store]:
    """The same data seen from another process."""
    if isinstance(store, MemoryStore):
        yield store
        return
    other = SQLiteStore(store.path) if isinstance(store, SQLiteStore) else store_for(store.url)
    await other.open()
    yield other
    await other.close()


async def new_run(
    store: Store,
    run_id: str = "run1",
    steps: tuple[str, ...] = ("a", "b", "c"),
    created_at: float = T0,
    status: RunStatus = R.PENDING,
) -> RunRecord:
    run = RunRecord(
        id=run_id,
        name=f"plan-{run_id}",
        status=status,
        plan={"name": f"plan-{run_id}", "steps": [{"id": s, "task": "echo"} for s in steps]},
        created_at=created_at,
        workdir="/work/dir",
        total_steps=len(steps),
    )
    await store.create_run(run, [StepRecord(run_id, i, sid, "echo", wave=i) for i, sid in enumerate(steps)])
    return run


async def statuses(store: Store, run_id: str = "run1") -> dict[str, StepStatus]:
    return {s.step_id: s.status for s in await store.get_steps(run_id)}


async def step(store: Store, step_id: str, run_id: str = "run1") -> StepRecord:
    return next(s for s in await store.get_steps(run_id) if s.step_id == step_id)


def batch(owner: str = "A", now: float = T0, run_id: str = "run1", **parts: Any) -> Batch:
    return Batch(run_id, owner, now=now, **parts)


def ok(idx: int, attempt: int = 1, output: str | None = '"done"', at: float = T0 + 1) -> Finish:
    return Finish(idx, attempt, S.SUCCEEDED, "succeeded", T0, at, output=output)


async def running(store: Store, *idx: int, owner: str = "A", now: float = T0, attempt: int = 1) -> None:
    """Claim steps as ``owner`` and check the claims went through."""
    result = await store.commit(batch(owner, now, claims=[Claim(i, attempt, now) for i in idx]))
    assert (result.lost, result.rejected_claims) == (False, [])


# -- runs and steps -----------------------------------------------------------------------


async def test_create_and_get_run(store: Store) -> None:
    created = await new_run(store)
    run = await store.get_run("run1")
    assert run == created
    assert run.plan == {
        "name": "plan-run1",
        "steps": [{"id": "a", "task": "echo"}, {"id": "b", "task": "echo"}, {"id": "c", "task": "echo"}],
    }
    assert (run.status, run.owner, run.started_at, run.finished_at, run.total_steps) == (
        R.PENDING,
        None,
        None,
        None,
        3,
    )


async def test_steps_come_back_in_plan_order(store: Store) -> None:
    await new_run(store, steps=("z", "y", "x", "w"))
    steps = await store.get_steps("run1")
    assert [(s.idx, s.step_id, s.wave, s.status, s.attempt) for s in steps] == [
        (0, "z", 0, S.PENDING, 0),
        (1, "y", 1, S.PENDING, 0),
        (2, "x", 2, S.PENDING, 0),
        (3, "w", 3, S.PENDING, 0),
    ]
    assert all(s.output is None and s.lease_owner is None for s in steps)
    assert await store.get_attempts("run1") == []


async def test_a_run_id_is_created_once(store: Store) -> None:
    await new_run(store)
    with pytest.raises(Conflict):
        await new_run(store)
    assert len(await store.list_runs()) == 1


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
        store.acquire_run("nope", "A", LEASE, T0),
        store.get_run(""),
    ):
        with pytest.raises(NotFound):
            await call


async def test_a_unique_id_prefix_names_the_run(store: Store) -> None:
    await new_run(store, "aaa111")
    await new_run(store, "aaa222", created_at=T0 + 1)
    await new_run(store, "bbb333", created_at=T0 + 2)
    assert (await store.get_run("aaa1")).id == "aaa111"
    assert (await store.get_run("b")).id == "bbb333"
    assert [s.run_id for s in await store.get_steps("aaa2")] == ["aaa222"] * 3
    assert await store.get_attempts("bb") == []
    assert (await store.acquire_run("aaa1", "A", LEASE, T0)).id == "aaa111"
    assert (await store.set_run_status("aaa2", R.PAUSED, T0)).id == "aaa222"
    assert (await store.get_run("aaa222")).status is R.PAUSED


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


# -- ownership ---------------------------------------------------------------------------


async def test_acquire_a_fresh_run(store: Store) -> None:
    await new_run(store)
    run = await store.acquire_run("run1", "A", LEASE, T0)
    assert (run.status, run.owner, run.lease_expires_at, run.started_at) == (R.RUNNING, "A", T0 + LEASE, T0)
    stored = await store.get_run("run1")
    assert (stored.status, stored.owner, stored.lease_expires_at, stored.started_at) == (
        R.RUNNING,
        "A",
        T0 + LEASE,
        T0,
    )
    assert stored.plan is not None and stored.plan["name"] == "plan-run1"


async def test_the_same_owner_may_acquire_again(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    run = await store.acquire_run("run1", "A", LEASE, T0 + 5)
    assert (run.owner, run.lease_expires_at, run.started_at) == ("A", T0 + 5 + LEASE, T0)


async def test_another_owner_with_a_live_lease_is_a_conflict(store: Store, peer: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    with pytest.raises(Conflict, match="A"):
        await peer.acquire_run("run1", "B", LEASE, T0 + LEASE - 1)
    run = await store.get_run("run1")
    assert (run.owner, run.lease_expires_at) == ("A", T0 + LEASE)


@pytest.mark.parametrize("status", [R.PAUSED, R.COMPLETED, R.FAILED, R.CANCELLED])
async def test_a_run_that_cannot_execute_cannot_be_acquired(store: Store, status: RunStatus) -> None:
    await new_run(store, status=status)
    with pytest.raises(Conflict):
        await store.acquire_run("run1", "A", LEASE, T0)
    run = await store.get_run("run1")
    assert (run.status, run.owner) == (status, None)


async def test_an_expired_lease_is_taken_over(store: Store, peer: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0, 1)
    await store.commit(batch("A", T0 + 1, finishes=[ok(1)], marks=[Mark(2, S.READY)]))

    later = T0 + LEASE + 1
    run = await peer.acquire_run("run1", "B", LEASE, later)
    assert (run.status, run.owner, run.lease_expires_at) == (R.RUNNING, "B", later + LEASE)

    a, b, c = await peer.get_steps("run1")
    assert (a.status, a.attempt, a.lease_owner) == (S.READY, 1, None)  # requeued, attempt kept
    assert (b.status, b.output) == (S.SUCCEEDED, "done")  # committed work stays
    assert c.status is S.READY
    lost = [x for x in await peer.get_attempts("run1") if x.status == "lost"]
    assert len(lost) == 1
    assert (lost[0].step_id, lost[0].attempt, lost[0].owner, lost[0].finished_at) == ("a", 1, "A", later)
    assert lost[0].error and "lease expired" in lost[0].error

    # The new owner claims the requeued step as the next attempt.
    result = await peer.commit(batch("B", later, claims=[Claim(0, 2, later)]))
    assert result.rejected_claims == []
    a = await step(peer, "a")
    assert (a.status, a.attempt, a.lease_owner) == (S.RUNNING, 2, "B")


async def test_a_holder_known_to_be_dead_is_taken_over_at_once(store: Store, peer: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0)
    with pytest.raises(Conflict):  # naming someone else as dead does not help
        await peer.acquire_run("run1", "B", LEASE, T0 + 1, dead_owner="C")
    run = await peer.acquire_run("run1", "B", LEASE, T0 + 1, dead_owner="A")  # A's lease is still live
    assert (run.owner, run.lease_expires_at) == ("B", T0 + 1 + LEASE)
    a = await step(peer, "a")
    assert (a.status, a.attempt, a.lease_owner) == (S.READY, 1, None)
    assert [(x.attempt, x.status, x.owner) for x in await peer.get_attempts("run1")] == [(1, "lost", "A")]


# -- commit ------------------------------------------------------------------------------


async def test_commit_applies_claims_finishes_marks_and_run_status(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)

    result = await store.commit(batch(claims=[Claim(0, 1, T0), Claim(2, 1, T0)]))
    assert (result.lost, result.rejected_claims, result.rejected_finishes, result.run_status) == (
        False,
        [],
        [],
        R.RUNNING,
    )
    a = await step(store, "a")
    assert (a.status, a.attempt, a.lease_owner, a.started_at) == (S.RUNNING, 1, "A", T0)

    # a succeeds; b (which needs it) becomes ready and is claimed in the same batch.
    await store.commit(
        batch(
            now=T0 + 1,
            finishes=[ok(0, output='{"x": [1, 2]}')],
            marks=[Mark(1, S.READY)],
            claims=[Claim(1, 1, T0 + 1)],
        )
    )
    a, b, c = await store.get_steps("run1")
    assert (a.status, a.output, a.finished_at, a.lease_owner) == (S.SUCCEEDED, {"x": [1, 2]}, T0 + 1, None)
    assert (b.status, b.attempt) == (S.RUNNING, 1)

    await store.commit(
        batch(now=T0 + 2, finishes=[Finish(2, 1, S.FAILED, "failed", T0, T0 + 2, error="boom")])
    )
    c = await step(store, "c")
    assert (c.status, c.error, c.output) == (S.FAILED, "boom", None)

    result = await store.commit(
        batch(now=T0 + 3, finishes=[ok(1, at=T0 + 3)], run_status=R.FAILED, run_error="c: failed")
    )
    assert result.run_status is R.FAILED
    run = await store.get_run("run1")
    assert (run.status, run.error, run.finished_at) == (R.FAILED, "c: failed", T0 + 3)
    attempts = await store.get_attempts("run1")
    assert [(x.step_id, x.attempt, x.status, x.owner) for x in attempts] == [
        ("a", 1, "succeeded", "A"),
        ("c", 1, "failed", "A"),
        ("b", 1, "succeeded", "A"),
    ]
    assert attempts[1].error == "boom"
    assert (attempts[0].started_at, attempts[0].finished_at) == (T0, T0 + 1)


async def test_a_retry_is_recorded_and_claimed_as_the_next_attempt(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0)
    await store.commit(
        batch(
            now=T0 + 1,
            finishes=[Finish(0, 1, S.RETRYING, "timeout", T0, T0 + 1, error="slow", not_before=T0 + 3)],
        )
    )
    a = await step(store, "a")
    assert (a.status, a.not_before, a.error, a.attempt) == (S.RETRYING, T0 + 3, "slow", 1)
    assert [(x.attempt, x.status) for x in await store.get_attempts("run1")] == [(1, "timeout")]

    result = await store.commit(batch(now=T0 + 3, claims=[Claim(0, 2, T0 + 3)]))
    assert result.rejected_claims == []
    a = await step(store, "a")
    assert (a.status, a.attempt, a.not_before, a.started_at) == (S.RUNNING, 2, None, T0 + 3)


async def test_skipped_marks_carry_their_reason(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await store.commit(batch(now=T0 + 4, marks=[Mark(1, S.SKIPPED, "needs 'a', which did not succeed")]))
    b = await step(store, "b")
    assert (b.status, b.error, b.finished_at) == (S.SKIPPED, "needs 'a', which did not succeed", T0 + 4)


async def test_illegal_step_transitions_are_not_applied(store: Store) -> None:
    await new_run(store, steps=("a", "b", "c", "d"))
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0, 1)
    await store.commit(batch(now=T0 + 1, finishes=[ok(0)]))
    # a: succeeded, b: running, c, d: pending
    await store.commit(
        batch(
            now=T0 + 2,
            marks=[
                Mark(0, S.READY),  # a finished step does not become ready again
                Mark(0, S.CANCELLED),  # nor cancelled
                Mark(1, S.SKIPPED),  # a running step is not skipped
                Mark(2, S.SUCCEEDED),  # a pending step cannot succeed without running
                Mark(3, S.FAILED),
            ],
        )
    )
    assert await statuses(store) == {"a": S.SUCCEEDED, "b": S.RUNNING, "c": S.PENDING, "d": S.PENDING}
    assert (await step(store, "a")).output == "done"
    assert (await step(store, "c")).finished_at is None


async def test_claims_need_a_claimable_step_and_the_next_attempt_number(store: Store) -> None:
    await new_run(store, steps=("a", "b", "c", "d"))
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0, 1)
    await store.commit(batch(now=T0 + 1, finishes=[ok(0)]))
    result = await store.commit(
        batch(
            now=T0 + 2,
            claims=[
                Claim(0, 2, T0 + 2),  # succeeded
                Claim(1, 2, T0 + 2),  # already running
                Claim(2, 3, T0 + 2),  # skips attempts 1 and 2
                Claim(3, 1, T0 + 2),  # fine
            ],
        )
    )
    assert sorted(result.rejected_claims) == [0, 1, 2]
    steps = {s.step_id: s for s in await store.get_steps("run1")}
    assert (steps["a"].status, steps["a"].attempt) == (S.SUCCEEDED, 1)
    assert (steps["b"].status, steps["b"].attempt, steps["b"].started_at) == (S.RUNNING, 1, T0)
    assert (steps["c"].status, steps["c"].attempt) == (S.PENDING, 0)
    assert (steps["d"].status, steps["d"].attempt) == (S.RUNNING, 1)


@pytest.mark.parametrize("status", [R.PAUSED, R.CANCELLED])
async def test_no_claim_while_the_run_is_paused_or_cancelled(store: Store, status: RunStatus) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0)
    await store.set_run_status("run1", status, T0 + 1)

    result = await store.commit(
        batch(now=T0 + 2, finishes=[ok(0, at=T0 + 2)], marks=[Mark(1, S.READY)], claims=[Claim(2, 1, T0 + 2)])
    )
    assert result.rejected_claims == [2]
    assert result.run_status is status
    assert not result.lost
    a, _, c = await store.get_steps("run1")
    # The running step's result is still recorded (pause: running ones finish and are recorded).
    assert (a.status, a.output) == (S.SUCCEEDED, "done")
    assert c.status is not S.RUNNING and c.attempt == 0
    assert (await store.get_run("run1")).status is status


async def test_a_stale_attempt_finish_is_rejected_and_the_rest_applies(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0, 1)
    result = await store.commit(
        batch(
            now=T0 + 1,
            finishes=[
                Finish(0, 7, S.SUCCEEDED, "succeeded", T0, T0 + 1, output='"stale"'),  # not attempt 1
                ok(1, output='"fresh"'),
            ],
            marks=[Mark(2, S.READY)],
        )
    )
    assert result.rejected_finishes == [0]
    assert not result.lost
    a, b, c = await store.get_steps("run1")
    assert (a.status, a.attempt, a.output) == (S.RUNNING, 1, None)
    assert (b.status, b.output) == (S.SUCCEEDED, "fresh")
    assert c.status is S.READY
    assert [(x.step_id, x.attempt) for x in await store.get_attempts("run1")] == [("b", 1)]


async def test_a_finish_for_a_step_that_is_not_running_is_rejected(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0)
    await store.commit(batch(now=T0 + 1, finishes=[ok(0, output='"first"')]))
    result = await store.commit(batch(now=T0 + 2, finishes=[ok(0, output='"second"', at=T0 + 2), ok(1)]))
    assert sorted(result.rejected_finishes) == [0, 1]
    a, b, _ = await store.get_steps("run1")
    assert (a.output, a.finished_at) == ("first", T0 + 1)
    assert b.status is S.PENDING
    assert len(await store.get_attempts("run1")) == 1


async def test_a_batch_from_a_non_owner_is_lost_and_changes_nothing(store: Store, peer: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0)
    before = await store.get_steps("run1")

    result = await peer.commit(
        batch(
            "B",
            T0 + 1,
            finishes=[ok(0)],
            marks=[Mark(1, S.READY)],
            claims=[Claim(2, 1, T0 + 1)],
            run_status=R.COMPLETED,
        )
    )
    assert result.lost
    assert result.rejected_finishes == [0]
    assert result.rejected_claims == [2]
    assert await store.get_steps("run1") == before
    assert await store.get_attempts("run1") == []
    run = await store.get_run("run1")
    assert (run.status, run.owner) == (R.RUNNING, "A")


async def test_after_release_the_old_owner_has_lost_the_run(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0)
    await store.release_run("run1", "A")
    result = await store.commit(batch(now=T0 + 1, finishes=[ok(0)]))
    assert result.lost and result.rejected_finishes == [0]
    assert (await step(store, "a")).status is S.RUNNING


async def test_commit_to_an_unknown_run_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.commit(batch(run_id="ghost", marks=[Mark(0, S.READY)]))


async def test_the_run_status_in_a_batch_is_guarded(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await store.set_run_status("run1", R.PAUSED, T0 + 1)
    result = await store.commit(batch(now=T0 + 2, run_status=R.COMPLETED))
    assert result.run_status is R.PAUSED
    assert (await store.get_run("run1")).status is R.PAUSED

    await store.set_run_status("run1", R.RUNNING, T0 + 3)
    result = await store.commit(batch(now=T0 + 4, run_status=R.COMPLETED))
    assert result.run_status is R.COMPLETED
    result = await store.commit(batch(now=T0 + 5, run_status=R.FAILED, run_error="late"))
    assert result.run_status is R.COMPLETED
    run = await store.get_run("run1")
    assert (run.status, run.error, run.finished_at) == (R.COMPLETED, None, T0 + 4)


# -- heartbeats, release, orphans -----------------------------------------------------------


async def test_heartbeat_renews_leases_and_reports_statuses(store: Store, peer: Store) -> None:
    await new_run(store, "run1", created_at=T0)
    await new_run(store, "run2", created_at=T0 + 1)
    await new_run(store, "run3", created_at=T0 + 2)
    await store.acquire_run("run1", "A", LEASE, T0)
    await store.acquire_run("run2", "A", LEASE, T0)
    await peer.acquire_run("run3", "B", LEASE, T0)
    await running(store, 0)
    await store.set_run_status("run2", R.PAUSED, T0 + 1)

    report = await store.heartbeat("A", 60.0, T0 + 10, ["run1", "run2", "run3", "ghost"])
    assert report == {"run1": R.RUNNING, "run2": R.PAUSED, "run3": None, "ghost": None}
    assert (await store.get_run("run1")).lease_expires_at == T0 + 70
    assert (await store.get_run("run2")).lease_expires_at == T0 + 70
    assert (await store.get_run("run3")).lease_expires_at == T0 + LEASE  # B's lease is B's

    # B takes run1 over after A's lease expired: A's next heartbeat says it lost it.
    await peer.acquire_run("run1", "B", LEASE, T0 + 71)
    report = await store.heartbeat("A", 60.0, T0 + 72, ["run1", "run2"])
    assert report == {"run1": None, "run2": R.PAUSED}
    assert (await store.get_run("run1")).lease_expires_at == T0 + 71 + LEASE


async def test_steps_of_a_released_run_are_requeued_even_while_the_old_owner_beats(
    store: Store, peer: Store
) -> None:
    # A gives a run up while one of its attempts is still running (shutdown); A keeps
    # beating for its other runs. The released step must be requeued by the next owner.
    await new_run(store, "run1")
    await new_run(store, "other", created_at=T0 + 1)
    await store.acquire_run("run1", "A", LEASE, T0)
    await store.acquire_run("other", "A", LEASE, T0)
    await running(store, 0)
    await store.release_run("run1", "A")
    await store.heartbeat("A", LEASE, T0 + 1, ["other"])

    await peer.acquire_run("run1", "B", LEASE, T0 + 2)
    a = await step(peer, "a")
    assert (a.status, a.lease_owner) == (S.READY, None)
    assert [(x.step_id, x.attempt, x.status) for x in await peer.get_attempts("run1")] == [("a", 1, "lost")]


async def test_release_lets_another_owner_take_over_at_once(store: Store, peer: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0)

    await store.release_run("run1", "B")  # not the owner: nothing happens
    assert (await store.get_run("run1")).owner == "A"

    await store.release_run("run1", "A")
    run = await store.get_run("run1")
    assert (run.status, run.owner, run.lease_expires_at) == (R.RUNNING, None, None)

    run = await peer.acquire_run("run1", "B", LEASE, T0 + 1)  # well inside A's old lease
    assert run.owner == "B"
    a = await step(peer, "a")
    assert (a.status, a.attempt) == (S.READY, 1)
    assert [(x.attempt, x.status) for x in await peer.get_attempts("run1")] == [(1, "lost")]


async def test_orphaned_runs(store: Store) -> None:
    await new_run(store, "released", created_at=T0 - 5)
    await new_run(store, "expired", created_at=T0 - 4)
    await new_run(store, "alive", created_at=T0 - 3)
    await new_run(store, "pending", created_at=T0 - 2)
    await new_run(store, "done", created_at=T0 - 1, status=R.COMPLETED)
    await new_run(store, "paused", created_at=T0)
    await store.acquire_run("released", "A", LEASE, T0)
    await store.release_run("released", "A")
    await store.acquire_run("expired", "A", LEASE, T0 - 100)
    await store.acquire_run("alive", "A", LEASE, T0)
    await store.acquire_run("paused", "A", LEASE, T0 - 100)
    await store.set_run_status("paused", R.PAUSED, T0 - 99)

    assert await store.orphaned_runs(T0) == ["released", "expired"]
    assert await store.orphaned_runs(T0 + LEASE + 1) == ["released", "expired", "alive"]


# -- set_run_status ----------------------------------------------------------------------


async def test_pause_resume_cancel_from_outside(store: Store) -> None:
    await new_run(store)
    run = await store.set_run_status("run1", R.PAUSED, T0)
    assert run.status is R.PAUSED
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
    assert set((await statuses(store)).values()) == {S.PENDING}


async def _mixed_run(store: Store, lease_s: float) -> None:
    """Steps: a succeeded, b running, c ready, d retrying, e pending; owner A from T0."""
    await new_run(store, steps=("a", "b", "c", "d", "e"))
    await store.acquire_run("run1", "A", lease_s, T0)
    await store.commit(Batch("run1", "A", now=T0, claims=[Claim(0, 1, T0), Claim(1, 1, T0), Claim(3, 1, T0)]))
    await store.commit(
        Batch(
            "run1",
            "A",
            now=T0 + 1,
            finishes=[ok(0), Finish(3, 1, S.RETRYING, "failed", T0, T0 + 1, error="x", not_before=T0 + 9)],
            marks=[Mark(2, S.READY)],
        )
    )
    assert await statuses(store) == {
        "a": S.SUCCEEDED,
        "b": S.RUNNING,
        "c": S.READY,
        "d": S.RETRYING,
        "e": S.PENDING,
    }


async def test_cancel_marks_idle_steps_cancelled(store: Store) -> None:
    await _mixed_run(store, LEASE)
    run = await store.set_run_status("run1", R.CANCELLED, T0 + 2)
    assert run.status is R.CANCELLED
    steps = {s.step_id: s for s in await store.get_steps("run1")}
    assert {k: s.status for k, s in steps.items()} == {
        "a": S.SUCCEEDED,
        "b": S.RUNNING,
        "c": S.CANCELLED,
        "d": S.CANCELLED,
        "e": S.CANCELLED,
    }
    for k in "cde":
        assert (steps[k].error, steps[k].finished_at) == ("run cancelled", T0 + 2)
    assert steps["a"].output == "done"

    # The live owner still records its running attempt's end.
    result = await store.commit(
        batch(now=T0 + 3, finishes=[Finish(1, 1, S.CANCELLED, "cancelled", T0, T0 + 3, error="cancelled")])
    )
    assert result.rejected_finishes == []
    assert (await step(store, "b")).status is S.CANCELLED


async def test_cancel_with_a_dead_owner_cancels_running_steps_too(store: Store) -> None:
    await _mixed_run(store, 5.0)
    await store.set_run_status("run1", R.CANCELLED, T0 + 60)
    assert await statuses(store) == {
        "a": S.SUCCEEDED,
        "b": S.CANCELLED,
        "c": S.CANCELLED,
        "d": S.CANCELLED,
        "e": S.CANCELLED,
    }


async def test_attempts_come_back_oldest_first(store: Store) -> None:
    await new_run(store)
    await store.acquire_run("run1", "A", LEASE, T0)
    await running(store, 0, 1, 2)
    await store.commit(batch(now=T0 + 3, finishes=[ok(2, at=T0 + 1)]))
    await store.commit(batch(now=T0 + 4, finishes=[ok(0, at=T0 + 3)]))
    await store.commit(batch(now=T0 + 5, finishes=[ok(1, at=T0 + 2)]))
    assert [x.step_id for x in await store.get_attempts("run1")] == ["c", "b", "a"]


async def test_fencing_between_two_owners(store: Store, peer: Store) -> None:
    """A's lease lapses, B takes over and re-runs the step; A's late result is refused."""
    await new_run(store)
    await store.acquire_run("run1", "A", 10.0, T0)
    await store.commit(Batch("run1", "A", now=T0, claims=[Claim(0, 1, T0)]))
    with pytest.raises(Conflict):
        await peer.acquire_run("run1", "B", LEASE, T0 + 5)

    await peer.acquire_run("run1", "B", LEASE, T0 + 11)
    await running(peer, 0, owner="B", now=T0 + 11, attempt=2)

    late = await store.commit(batch("A", T0 + 12, finishes=[ok(0, output='"from A"', at=T0 + 12)]))
    assert late.lost and late.rejected_finishes == [0]
    assert await store.heartbeat("A", LEASE, T0 + 12, ["run1"]) == {"run1": None}
    with pytest.raises(Conflict):
        await store.acquire_run("run1", "A", LEASE, T0 + 12)

    result = await peer.commit(batch("B", T0 + 13, finishes=[ok(0, 2, output='"from B"', at=T0 + 13)]))
    assert result.rejected_finishes == [] and not result.lost
    a = await step(store, "a")
    assert (a.status, a.attempt, a.output) == (S.SUCCEEDED, 2, "from B")
    assert [(x.attempt, x.status, x.owner) for x in await store.get_attempts("run1")] == [
        (1, "lost", "A"),
        (2, "succeeded", "B"),
    ]


# -- SQLite only ---------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "baton.db"


async def test_sqlite_survives_reopening(db_path: Path) -> None:
    first = SQLiteStore(db_path)
    await first.open()
    await new_run(first)
    await first.acquire_run("run1", "A", LEASE, T0)
    await running(first, 0, 1)
    await first.commit(batch(now=T0 + 1, finishes=[ok(0, output='{"kept": true}')], marks=[Mark(2, S.READY)]))
    await first.close()

    second = SQLiteStore(db_path)
    await second.open()
    try:
        run = await second.get_run("run1")
        assert (run.status, run.owner, run.plan["name"]) == (R.RUNNING, "A", "plan-run1")
        a, b, c = await second.get_steps("run1")
        assert (a.status, a.output) == (S.SUCCEEDED, {"kept": True})
        assert (b.status, b.lease_owner) == (S.RUNNING, "A")
        assert c.status is S.READY
        assert [(x.step_id, x.status) for x in await second.get_attempts("run1")] == [("a", "succeeded")]
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
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "steps", "attempts"} <= tables

    for _ in range(2):  # re-opening applies nothing again (and loses nothing)
        again = SQLiteStore(db_path)
        await again.open()
        try:
            assert again.db.execute("PRAGMA user_version").fetchone()[0] == latest
            assert [r.id for r in await again.list_runs()] == ["run1"]
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


async def test_two_sqlite_stores_on_one_file_see_each_others_writes(db_path: Path) -> None:
    one, two = SQLiteStore(db_path), SQLiteStore(db_path)
    await one.open()
    await two.open()
    try:
        await new_run(one)
        assert (await two.get_run("run1")).name == "plan-run1"
        await two.acquire_run("run1", "B", LEASE, T0)
        with pytest.raises(Conflict):
            await one.acquire_run("run1", "A", LEASE, T0 + 1)
        await running(two, 0, owner="B")
        assert (await step(one, "a")).lease_owner == "B"
        refused = await one.commit(batch("A", T0 + 1, claims=[Claim(1, 1, T0 + 1)]))
        assert refused.lost
        assert (await step(two, "b")).status is S.PENDING
        await two.commit(batch("B", T0 + 2, finishes=[ok(0, at=T0 + 2)], run_status=None))
        assert (await step(one, "a")).status is S.SUCCEEDED
        await one.set_run_status("run1", R.CANCELLED, T0 + 3)
        assert await two.heartbeat("B", LEASE, T0 + 4, ["run1"]) == {"run1": R.CANCELLED}
    finally:
        await one.close()
        await two.close()


def test_store_for_urls(tmp_path: Path) -> None:
    assert isinstance(store_for("memory://"), MemoryStore)
    by_url = store_for(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(by_url, SQLiteStore) and by_url.path == tmp_path / "a.db"
    by_path = store_for(str(tmp_path / "b.db"))
    assert isinstance(by_path, SQLiteStore) and by_path.path == tmp_path / "b.db"
    pg = store_for("postgresql://u@db.example:5432/baton?schema=jobs&sslmode=require")
    assert isinstance(pg, PostgresStore)
    # baton's option (schema) is taken out; libpq's (sslmode) go to the connection.
    assert pg.url == "postgresql://u@db.example:5432/baton?sslmode=require&schema=jobs"
    assert isinstance(store_for("postgres://localhost/db"), PostgresStore)


async def test_an_unreachable_postgres_is_a_clear_store_error() -> None:
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    with pytest.raises(
        StoreError, match=r"cannot connect to PostgreSQL at postgresql://nobody@127\.0\.0\.1:1"
    ):
        await store.open()


def test_database_urls_choose_the_store_and_its_durability(tmp_path: Path) -> None:
    assert isinstance(store_for("memory://"), MemoryStore)
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
    assert ledger["run"] == LedgerEntry("run", 0, 0.0, 30, pytest.approx(0.03))
    assert ledger["step:a"].reserved_tokens == 0 and ledger["step:a"].spent_tokens == 30
    await store.budget_reserve("r1", [BudgetClaim("run", 900, 0.9, 1000, 1.0)])
    with pytest.raises(BudgetExceeded, match=r"run USD budget: \$0\.930000 used or reserved \+ \$0\.100000"):
        await store.budget_reserve("r1", [BudgetClaim("run", 10, 0.1, None, 1.0)])
    assert await store.budget_ledger("other") == []
