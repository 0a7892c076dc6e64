"""The PostgreSQL store: for many processes on many machines sharing one database.

psycopg 3 with a bounded async connection pool: at more load than the pool holds, calls
wait for a connection instead of failing with "too many clients". The store is the queue:
a worker's turn is one transaction of very few statements whatever its size (batches go in
as arrays), sent in one round trip: one statement when it finishes and claims standalone
jobs, three pipelined ones (lock the runs, finish, end runs and claim) when it finishes
steps of runs. Claims take runs and jobs ``FOR UPDATE SKIP LOCKED``, so workers never wait
for each other's claims. Work made claimable is announced with NOTIFY, which ``watch``
turns into wake-ups. Migrations are versioned and applied at start under an advisory lock,
so processes starting together do not race. ``schema`` keeps baton's tables in their own
schema (created if missing); tests give each test its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import random
import re
import select
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from baton.errors import BudgetExceeded, Conflict, NotFound, StoreError, StoreUnavailable
from baton.status import RUN_SOURCES, RunStatus, StepStatus
from baton.store.base import (
    GENESIS,
    ApiKey,
    AttemptRecord,
    AuditEntry,
    Beat,
    BudgetClaim,
    BudgetSettle,
    Claimed,
    Done,
    GoalRecord,
    JobRecord,
    LedgerEntry,
    NewJob,
    OutcomeRecord,
    PruneResult,
    RunRecord,
    Schedule,
    StepRecord,
    Turn,
    TurnResult,
    WorkerRecord,
    audit_hash,
    prunable,
    whole_runs,
)
from baton.store.sql import (
    STATE_STATUSES,
    api_key_from_row,
    attempt_from_row,
    audit_from_row,
    goal_from_row,
    goal_params,
    job_from_row,
    job_params,
    job_state,
    load_migrations,
    load_queries,
    outcome_from_row,
    outcome_params,
    run_from_row,
    run_params,
    schedule_from_row,
    schedule_params,
    step_from_row,
    worker_from_row,
)

Q = load_queries(__package__)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_RUN_SOURCES = {target: sorted(str(s) for s in src) for target, src in RUN_SOURCES.items()}


class _Native:
    """A statement in PostgreSQL's own ``$n`` form, converted once from ``%(name)s``.

    psycopg converts a query's %(name)s parameters on every call and caches the result only for
    queries under 4 KiB; a turn's statements are longer, and converting them cost more
    than a job. A raw cursor takes this form as it is (each parameter sent once).
    """

    def __init__(self, query: str) -> None:
        names: dict[str, int] = {}

        def number(match: re.Match[str]) -> str:
            return f"${names.setdefault(match.group(1), len(names) + 1)}"

        self.text = re.sub(r"%\((\w+)\)s", number, query)
        self.names = list(names)

    def args(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


# A turn's statements, assembled from the fragments of queries.sql (see there).
_FINISH_JOBS = _Native(f"WITH {Q['finish_jobs_ctes']}\n{Q['finish_jobs_rows']}")
_CLAIM = _Native(f"WITH {Q['claim_ctes']}\n{Q['claim_rows']}")
_FINISH_JOBS_AND_CLAIM = _Native(
    f"WITH {Q['finish_jobs_ctes']},\n{Q['claim_ctes']}\n{Q['finish_jobs_rows']}\nUNION ALL\n{Q['claim_rows']}"
)
_FINISH_STEPS = _Native(f"WITH {Q['finish_jobs_ctes']},\n{Q['finish_steps_ctes']}\n{Q['finish_steps_rows']}")
_END_RUNS = _Native(f"WITH {Q['end_runs_ctes']}\n{Q['end_runs_rows']}")
_END_RUNS_AND_CLAIM = _Native(
    f"WITH {Q['end_runs_ctes']},\n{Q['claim_ctes']}\n{Q['end_runs_rows']}\nUNION ALL\n{Q['claim_rows']}"
)

#: a transaction that meets a deadlock or a serialization failure is tried again, this many
#: times in all (psycopg derives neither error from TransactionRollback, their SQLSTATE class).
_TRIES = 6
_RETRYABLE = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.TransactionRollback,
)

#: connections in one store's pool at most (``pool=N`` in the URL, ``--pool N``); it keeps
#: one open and grows under load. Each worker process also holds one for LISTEN.
DEFAULT_POOL_SIZE = 10

#: SQLSTATEs of a server that cannot take a connection for now: too many clients, shutting
#: down (by an administrator, or after a crash), starting up; and class 08, connection
#: exceptions. Trying again later may succeed.
_UNAVAILABLE_STATES = frozenset({"53300", "57P01", "57P02", "57P03"})
#: libpq keeps no SQLSTATE for a connection the server refused, or could not be reached at:
#: its message tells (the server's part in English unless its lc_messages says otherwise).
_UNAVAILABLE_MESSAGE = re.compile(
    r"too many clients|remaining connection slots are reserved|the database system is "
    r"(starting up|shutting down|in recovery mode|not (yet )?accepting connections)"
    r"|connection refused|timeout expired|server closed the connection unexpectedly"
    r"|could not (send|receive) data|connection reset|no route to host|network is unreachable"
    r"|the connection is (closed|lost)",
    re.IGNORECASE,
)

Row = dict[str, Any]
Cursor = psycopg.AsyncCursor[Row]
Connection = psycopg.AsyncConnection[Row]
T = TypeVar("T")
P = ParamSpec("P")


def _retried(
    method: Callable[Concatenate[PostgresStore, P], Awaitable[T]],
) -> Callable[Concatenate[PostgresStore, P], Coroutine[Any, Any, T]]:
    """The method (one transaction), run again after a deadlock or a serialization failure
    (with a short random backoff); a StoreError when they persist."""

    @functools.wraps(method)
    async def retried(self: PostgresStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        for attempt in range(_TRIES):
            try:
                return await method(self, *args, **kwargs)
            except _RETRYABLE as exc:
                if attempt == _TRIES - 1:
                    raise StoreError(f"database error: {exc}") from None
                await asyncio.sleep(random.uniform(0.001, 0.004) * 2**attempt)
        raise AssertionError("unreachable")

    return retried


class PostgresStore:
    """Store in a PostgreSQL database (``postgresql://user@host:port/db``)."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise StoreError(f"schema name {schema!r} must match {_SCHEMA_NAME.pattern}")
        if pool_size < 1:
            raise StoreError(f"the pool size must be at least 1 connection, not {pool_size}")
        self.url = url if schema is None else f"{url}{'&' if '?' in url else '?'}schema={schema}"
        self.audit_key: bytes | None = None
        self._conninfo = url
        self._schema = schema
        #: connections in the pool at most (another one for ``watch``, while it runs)
        self.pool_size = pool_size
        self._timeout_s = connect_timeout_s
        self._pool: AsyncConnectionPool[Connection] | None = None
        #: the NOTIFY channel: one per schema, so stores in different schemas do not wake
        #: each other's workers.
        self.channel = _channel(schema)

    # -- connection ------------------------------------------------------------------

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._schema is not None:
            await conn.execute(f'SET search_path TO "{self._schema}"')

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self._conninfo,
            # One connection is kept open; more are opened under load, up to pool_size,
            # and closed again after ten idle minutes (the pool's max_idle).
            min_size=1,
            max_size=self.pool_size,
            # Autocommit: a one-statement call is one round trip; several statements go in
            # an explicit transaction, or in a pipeline (one implicit transaction).
            kwargs={
                "row_factory": dict_row,
                "autocommit": True,
                "connect_timeout": max(1, int(self._timeout_s)),
            },
            configure=self._configure,
            open=False,
            timeout=self._timeout_s * 3,
            name="baton",
        )
        try:
            # One direct connection first: an unreachable server fails here, at once and
            # with libpq's reason, instead of as a pool that retries until its timeout.
            async with await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=max(1, int(self._timeout_s))
            ) as conn:
                # (IF NOT EXISTS still races with a process creating it at the same moment)
                if self._schema is not None:
                    with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema):
                        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
            await pool.open(wait=True, timeout=self._timeout_s)
        except (psycopg.Error, PoolTimeout) as exc:
            await pool.close()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = _redacted(self._conninfo)
            error = StoreUnavailable if _unavailable(exc) else StoreError
            raise error(f"cannot connect to PostgreSQL at {where}: {reason}") from None
        except BaseException:  # cancelled while connecting: leave no pool behind
            await pool.close()
            raise
        self._pool = pool
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        """A pooled connection (autocommit), database errors turned into StoreError:
        StoreUnavailable when the server cannot be reached or take a connection for now."""
        if self._pool is None:
            raise StoreError("store is not open")
        try:
            async with self._live_connection(self._pool) as conn:
                yield conn
        except PoolTimeout as exc:
            # Every connection busy, or none could be opened (the pool keeps trying).
            raise StoreUnavailable(f"no database connection free in time: {exc}") from None
        except _RETRYABLE:
            raise  # a deadlock or serialization failure: the caller may try again
        except psycopg.OperationalError as exc:
            error = StoreUnavailable if _unavailable(exc) else StoreError
            raise error(f"database error: {exc}") from None

    @asynccontextmanager
    async def _live_connection(self, pool: AsyncConnectionPool[Connection]) -> AsyncIterator[Connection]:
        """A connection of the pool that the server has not closed while it sat idle.

        A restart or a failover of the server closes every idle connection of the pool,
        which the pool hands out unchecked: each would fail the call it serves, one after
        the other (and a client that calls less often than the server restarts would be
        handed nothing else, the pool being a queue). A closed connection has something to
        read (the server's goodbye, or the end of the stream), which one poll of its socket
        tells, with no round trip; only then is it tested, and when dead, closed (the pool
        opens another in its place) and the next one taken, with no backoff in between
        (the pool's own ``check=`` hook backs off a second and more between failed checks:
        seconds lost after each restart with a pool of dead connections).
        """
        for _ in range(self.pool_size):
            async with pool.connection() as conn:
                if await _alive(conn):
                    yield conn
                    return
        # as many dead ones in a row as the pool holds: what the pool gives now is new
        async with pool.connection() as conn:
            yield conn

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Cursor]:
        """A cursor inside a transaction on a pooled connection."""
        async with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    async def _rows(self, query: str, params: dict[str, Any] | None = None) -> list[Row]:
        """The rows of one statement (its own transaction)."""
        async with self._connection() as conn, conn.cursor() as cur:
            await cur.execute(query, params)
            return await cur.fetchall()

    async def _execute(self, query: str, params: dict[str, Any] | None = None) -> None:
        """One statement that returns no rows (its own transaction)."""
        async with self._connection() as conn:
            await conn.execute(query, params)

    async def _row(self, query: str, params: dict[str, Any] | None = None) -> Row | None:
        rows = await self._rows(query, params)
        return rows[0] if rows else None

    async def _migrate(self) -> None:
        async with self._tx() as cur:
            await cur.execute(Q["migration_lock"])
            await cur.execute(Q["create_version_table"])
            await cur.execute(Q["schema_version"])
            row = await cur.fetchone()
            version = int(row["version"]) if row else 0
            for number, statements in load_migrations(__package__):
                if number > version:
                    for statement in statements:
                        await cur.execute(statement.encode())
                    await cur.execute(Q["record_version"], {"version": number})

    # -- runs ------------------------------------------------------------------------

    @_retried
    async def create_run(
        self,
        run: RunRecord,
        steps: list[StepRecord],
        *,
        idempotency: tuple[str, str] | None = None,
        goal: GoalRecord | None = None,
        parent: tuple[str, str] | None = None,
    ) -> str:
        step_params = {
            "run_id": run.id,
            "queue": run.queue,
            "now": run.created_at,
            "idx": [s.idx for s in steps],
            "step_id": [s.step_id for s in steps],
            "task": [s.task for s in steps],
            "wave": [s.wave for s in steps],
            "status": [str(s.status) for s in steps],
            "waiting": [s.waiting for s in steps],
            "rank": [s.rank for s in steps],
        }
        ready = any(s.status in (StepStatus.READY, StepStatus.RETRYING) for s in steps)
        try:
            async with self._connection() as conn:
                if idempotency is None and goal is None and parent is None:
                    # one implicit transaction, one round trip
                    ids = await self._insert_run(conn, run, step_params, ready)
                else:
                    # The key first, then the run (and its goal), in one transaction: a
                    # request with the same key meanwhile waits for this one's outcome.
                    async with conn.transaction():
                        if idempotency is not None:
                            earlier = await self._claim_request(conn, run, *idempotency)
                            if earlier is not None:
                                return earlier
                        ids = await self._insert_run(conn, run, step_params, ready)
                        if goal is not None:
                            await conn.execute(Q["insert_goal"], goal_params(goal))
                        if parent is not None:
                            subrun = {"child": run.id, "parent": parent[0], "step_id": parent[1]}
                            await conn.execute(Q["insert_subrun"], subrun)
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"run {run.id} exists") from None
        for s in steps:
            s.id = ids.get(s.idx, s.id)
        return run.id

    async def _insert_run(
        self, conn: Connection, run: RunRecord, step_params: dict[str, Any], ready: bool
    ) -> dict[int, int]:
        """Insert the run and its steps, pipelined; the steps' ids by index."""
        async with conn.pipeline():
            await conn.execute(Q["insert_run"], run_params(run))
            cur = conn.cursor()
            await cur.execute(Q["insert_steps"], step_params)
            if ready:
                await conn.execute(Q["notify"], {"channel": self.channel})
        return {r["idx"]: r["id"] for r in await cur.fetchall()}

    @staticmethod
    async def _claim_request(conn: Connection, run: RunRecord, key: str, fingerprint: str) -> str | None:
        """Claim an idempotency key for ``run`` (inside the run's transaction): None when it
        is this run's now, the run it was claimed for when the same request came before;
        Conflict when another request took it."""
        params = {"key": key, "fingerprint": fingerprint, "run_id": run.id, "now": run.created_at}
        async with conn.cursor() as cur:
            await cur.execute(Q["put_run_request"], params)
            if await cur.fetchone() is not None:
                return None
            # Taken: the insert waited until the transaction holding the key committed; this
            # statement's snapshot (read committed) sees that row.
            await cur.execute(Q["run_request"], {"key": key})
            seen = await cur.fetchone()
        if seen is None:  # never deleted: a rollback would have let the insert through
            raise StoreError(f"idempotency key {key!r} vanished while it was being read")
        if seen["fingerprint"] != fingerprint:
            raise Conflict(f"idempotency key {key!r} was used for another request")
        return str(seen["run_id"])

    async def _resolve(self, cur: Cursor, run_id: str) -> str:
        await cur.execute(Q["run_exists"], {"id": run_id})
        if await cur.fetchone() is not None:
            return run_id
        rows = []
        if run_id:
            await cur.execute(Q["find_run_by_prefix"], {"prefix": run_id})
            rows = await cur.fetchall()
        if len(rows) == 1:
            return str(rows[0]["id"])
        if rows:
            raise NotFound(f"run id prefix {run_id!r} is ambiguous")
        raise NotFound(f"no run {run_id!r}")

    @_retried
    async def get_run(self, run_id: str, *, with_plan: bool = True) -> RunRecord:
        query = Q["get_run"] if with_plan else Q["get_run_header"]
        async with self._connection() as conn, conn.cursor() as cur:
            await cur.execute(query, {"id": run_id})
            row = await cur.fetchone()
            if row is None:  # not the whole id: a unique prefix of one
                await cur.execute(query, {"id": await self._resolve(cur, run_id)})
                row = await cur.fetchone()
        return run_from_row(_one(row))

    @_retried
    async def list_runs(self, limit: int = 50, status: RunStatus | None = None) -> list[RunRecord]:
        rows = await self._rows(Q["list_runs"], {"limit": limit, "status": str(status) if status else None})
        return [run_from_row(r) for r in rows]

    @_retried
    async def get_steps(self, run_id: str) -> list[StepRecord]:
        async with self._connection() as conn, conn.cursor() as cur:
            await cur.execute(Q["get_steps"], {"id": await self._resolve(cur, run_id)})
            return [step_from_row(r) for r in await cur.fetchall()]

    @_retried
    async def get_attempts(self, run_id: str) -> list[AttemptRecord]:
        async with self._connection() as conn, conn.cursor() as cur:
            await cur.execute(Q["get_attempts"], {"id": await self._resolve(cur, run_id)})
            return [attempt_from_row(r) for r in await cur.fetchall()]

    @_retried
    async def outputs(self, run_id: str, idxs: list[int]) -> dict[int, Any]:
        rows = await self._rows(Q["outputs"], {"id": run_id, "idxs": idxs})
        return {r["idx"]: json.loads(r["output"]) if r["output"] is not None else None for r in rows}

    @_retried
    async def attempt_detail(self, job_id: int, attempt: int) -> dict[str, Any] | None:
        row = await self._row(Q["attempt_detail"], {"id": job_id, "attempt": attempt})
        if row is None or row["detail"] is None:
            return None
        detail: dict[str, Any] = json.loads(row["detail"])
        return detail

    # -- the queue ---------------------------------------------------------------------

    @_retried
    async def turn(self, turn: Turn) -> TurnResult:
        result = TurnResult()
        done = sorted(turn.done, key=lambda d: d.id)  # rows locked in id order
        runs = sorted({d.run_id for d in done if d.run_id is not None})
        claim = turn.claim > 0
        params: dict[str, Any] = {"owner": turn.owner, "now": turn.now, "channel": self.channel}
        if claim:
            params.update(n=turn.claim, queues=turn.queues, tasks=turn.tasks, jobs=turn.jobs)
        if done:
            params.update(_done_params(done, with_runs=bool(runs)))
        rows: list[Row] = []
        async with self._connection() as conn:
            if not runs:
                if not (done or claim):
                    return result
                # Standalone jobs only: one statement finishes them and claims the next.
                query = _FINISH_JOBS_AND_CLAIM if done and claim else _FINISH_JOBS if done else _CLAIM
                async with psycopg.AsyncRawCursor(conn) as cur:
                    await cur.execute(query.text, query.args(params))
                    rows = await cur.fetchall()
            else:
                # Steps of runs: lock the runs (id order), finish (the dependents they make
                # ready or skipped, the runs' counters), then end runs and claim, seeing the
                # finishes. Pipelined: one implicit transaction, one round trip.
                params.update(ids=runs, claimless=not claim, report=turn.report)
                finish, tail = psycopg.AsyncRawCursor(conn), psycopg.AsyncRawCursor(conn)
                end = _END_RUNS_AND_CLAIM if claim else _END_RUNS
                async with conn.pipeline():
                    await conn.execute(Q["lock_runs"], {"ids": runs})
                    await finish.execute(_FINISH_STEPS.text, _FINISH_STEPS.args(params))
                    await tail.execute(end.text, end.args(params))
                rows = await finish.fetchall()
                rows.extend(await tail.fetchall())
        applied: set[int] = set()
        steps: list[tuple[Any, ...]] = []
        jobs: list[tuple[Any, ...]] = []
        position = {q: i for i, q in enumerate(turn.queues or [])}
        for r in rows:
            kind = r["kind"]
            if kind == "c":
                if r["run_id"] is not None:  # oldest run first, then priority, rank, id
                    steps.append((r["k1"], r["run_id"], -r["k3"], -r["k2"], r["id"], _claimed(r, turn.now)))
                else:  # the worker's queue order, then priority, id
                    jobs.append((position.get(r["queue"], 0), -r["k3"], r["id"], _claimed(r, turn.now)))
            elif kind == "a":
                applied.add(r["id"])
            elif kind == "m":
                result.marked.append((r["run_id"], r["idx"], StepStatus(r["status"])))
            elif kind == "e":
                result.ended[r["run_id"]] = RunStatus(r["status"])
            elif kind == "n":
                result.left_ready = True
            elif kind == "l":
                result.lost = True
        result.rejected = [d.id for d in turn.done if d.id not in applied] if done else []
        steps.sort(key=lambda c: c[:-1])
        jobs.sort(key=lambda c: c[:-1])
        result.claimed = [c[-1] for c in steps] + [c[-1] for c in jobs]
        return result

    # -- workers -----------------------------------------------------------------------

    @_retried
    async def register_worker(self, worker: WorkerRecord) -> list[int]:
        async with self._connection() as conn, conn.cursor() as cur:
            await cur.execute(
                Q["put_worker"],
                {
                    "id": worker.id,
                    "name": worker.name,
                    "queues": json.dumps(worker.queues) if worker.queues is not None else None,
                    "concurrency": worker.concurrency,
                    "started_at": worker.started_at,
                    "expires_at": worker.expires_at,
                },
            )
            await cur.execute(Q["same_name_workers"], {"name": worker.name, "id": worker.id})
            earlier = [r["id"] for r in await cur.fetchall()]
        return await self._sweep(worker.started_at, earlier, expire=False) if earlier else []

    @_retried
    async def unregister_worker(self, owner: str, now: float) -> None:
        async with self._tx() as cur:
            await self._release(cur, owner, None, now)
            await cur.execute(Q["delete_workers"], {"ids": [owner]})

    @_retried
    async def heartbeat(self, owner: str, now: float, lease_s: float, held: list[int]) -> Beat:
        rows = await self._rows(Q["heartbeat"], {"owner": owner, "expires": now + lease_s, "held": held})
        if not any(r["kind"] == "r" for r in rows):
            return Beat(lost=True, stop=list(held))
        return Beat(stop=[r["id"] for r in rows if r["kind"] == "s"])

    @_retried
    async def release(self, owner: str, ids: list[int], now: float) -> None:
        if not ids:
            return
        async with self._tx() as cur:
            await self._release(cur, owner, ids, now)

    async def held(self, owner: str) -> list[int]:
        return [int(r["id"]) for r in await self._rows(Q["held_by"], {"owner": owner, "ids": None})]

    async def _release(self, cur: Cursor, owner: str, ids: list[int] | None, now: float) -> None:
        """Give back (uncounted) what ``owner`` holds, of ``ids`` or all of it."""
        await cur.execute(Q["held_by"], {"owner": owner, "ids": ids})
        held = await cur.fetchall()
        if held:
            await self._requeue(cur, held, now, lost=False, owner=owner)

    @_retried
    async def sweep(self, now: float, dead: list[str] | None = None) -> list[int]:
        return await self._sweep(now, list(dead or []), expire=True)

    async def _sweep(self, now: float, dead: list[str], *, expire: bool) -> list[int]:
        """Rescue running attempts whose holder is gone, forget expired workers (and the
        ``dead``), and (``expire``) fail runs past their deadline."""
        scan = await self._rows(Q["sweep_scan"], {"now": now, "dead": dead})
        orphans = [r for r in scan if r["kind"] == "o"]
        gone = dead + [r["run_id"] for r in scan if r["kind"] == "w"]
        overdue = [r["run_id"] for r in scan if r["kind"] == "r"] if expire else []
        if not (orphans or gone or overdue):
            return []

        async with self._tx() as cur:
            # every run this touches, locked up front in id order
            runs = sorted({r["run_id"] for r in orphans if r["run_id"] is not None} | set(overdue))
            if runs:
                await cur.execute(Q["lock_runs"], {"ids": runs})
            rescued = await self._requeue(cur, orphans, now, lost=True, dead=dead) if orphans else []
            if gone:
                await cur.execute(Q["delete_workers"], {"ids": gone})
            for run_id in overdue:
                await self._expire(cur, run_id, now)
            return rescued

    async def _requeue(
        self,
        cur: Cursor,
        held: Iterable[Row],
        now: float,
        *,
        lost: bool,
        owner: str | None = None,
        dead: list[str] | None = None,
    ) -> list[int]:
        """Running attempts (rows with id and run_id) back to the queue: ``lost`` ones are
        recorded and counted; released ones are not. Those of a run that ended (or a job
        cancelled) are cancelled. Their runs are locked first, in id order. The ids requeued."""
        held = list(held)
        runs = sorted({r["run_id"] for r in held if r["run_id"] is not None})
        if runs:
            await cur.execute(Q["lock_runs"], {"ids": runs})
        await cur.execute(
            Q["requeue"],
            {
                "ids": [r["id"] for r in held],
                "owner": owner,
                "dead": dead or [],
                "now": now,
                "lost": lost,
                "channel": self.channel,
            },
        )
        requeued = await cur.fetchall()
        if runs:
            async with psycopg.AsyncRawCursor(cur.connection) as raw:
                await raw.execute(_END_RUNS.text, _END_RUNS.args({"ids": runs, "now": now}))
        return [r["id"] for r in requeued]

    @_retried
    async def list_workers(self) -> list[WorkerRecord]:
        return [worker_from_row(r) for r in await self._rows(Q["list_workers"])]

    async def watch(self, wake: Callable[[], None]) -> None:
        """LISTEN on a connection of its own (not the pool's) and ``wake`` on each NOTIFY,
        until cancelled. A lost connection is opened again (with a short backoff), and the
        worker woken then, as notifications may have been missed meanwhile."""
        delay = 0.1
        reconnected = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=max(1, int(self._timeout_s))
                )
            except psycopg.Error:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                reconnected = True
                continue
            try:
                await conn.execute(f'LISTEN "{self.channel}"')
                delay = 0.1
                if reconnected:
                    wake()
                async for _ in conn.notifies():
                    wake()
            except psycopg.Error:
                reconnected = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                await conn.close()

    # -- control -----------------------------------------------------------------------

    @_retried
    async def set_run_status(self, run_id: str, status: RunStatus, now: float) -> RunRecord:
        async with self._tx() as cur:
            rid = await self._resolve(cur, run_id)
            await cur.execute(Q["lock_run"], {"id": rid})
            current = RunStatus(_one(await cur.fetchone())["status"])
            if current is not status:
                await cur.execute(
                    Q["set_run_status"],
                    {
                        "id": rid,
                        "status": str(status),
                        "error": None,
                        "terminal": status.terminal,
                        "now": now,
                        "sources": _RUN_SOURCES[status],
                    },
                )
                if await cur.fetchone() is None:
                    raise Conflict(f"run {rid} is {current}; it cannot become {status}")
                if status is RunStatus.RUNNING:
                    await cur.execute(Q["notify"], {"channel": self.channel})
            if status is RunStatus.CANCELLED:
                await cur.execute(Q["cancel_idle_steps"], {"id": rid, "error": "run cancelled", "now": now})
            await cur.execute(Q["get_run_header"], {"id": rid})
            return run_from_row(_one(await cur.fetchone()))

    @_retried
    async def expire_run(self, run_id: str, now: float) -> bool:
        async with self._tx() as cur:
            return await self._expire(cur, run_id, now)

    @staticmethod
    async def _expire(cur: Cursor, run_id: str, now: float) -> bool:
        await cur.execute(Q["expire_run"], {"id": run_id, "now": now})
        row = await cur.fetchone()
        if row is None:
            return False
        await cur.execute(Q["cancel_idle_steps"], {"id": run_id, "error": row["error"], "now": now})
        return True

    # -- standalone jobs ---------------------------------------------------------------

    @_retried
    async def enqueue(self, jobs: list[NewJob], now: float) -> list[JobRecord]:
        if not jobs:
            return []
        return await self._enqueue(None, jobs, now)

    async def _enqueue(self, cur: Cursor | None, jobs: list[NewJob], now: float) -> list[JobRecord]:
        """Insert ``jobs`` in one statement (on ``cur``'s transaction, or in their own); a
        unique key already taken gives the job holding it, marked duplicate."""
        ps = [job_params(j, now) for j in jobs]
        params: dict[str, Any] = {
            key: [p[key] for p in ps]
            for key in (
                "task",
                "status",
                "queue",
                "priority",
                "args",
                "max_attempts",
                "timeout_s",
                "unique_key",
                "run_at",
                "role",
            )
        }
        params.update(now=now, channel=self.channel)
        if cur is None:
            rows = await self._rows(Q["insert_jobs"], params)
        else:
            await cur.execute(Q["insert_jobs"], params)
            rows = await cur.fetchall()
        inserted = iter(r for r in rows if r["unique_key"] is None)
        by_key = {r["unique_key"]: r for r in rows if r["unique_key"] is not None}
        out: list[JobRecord | None] = []
        missing: list[str] = []
        for job in jobs:
            if job.unique_key is None:
                out.append(job_from_row(next(inserted)))
            elif (row := by_key.pop(job.unique_key, None)) is not None:
                out.append(job_from_row(row))
            else:
                out.append(None)
                missing.append(job.unique_key)
        if missing:
            # Taken by a job committed before (or by one of this batch): read it back, in a
            # statement of its own, whose snapshot sees what the insert waited for.
            if cur is None:
                found = await self._rows(Q["jobs_by_key"], {"keys": missing})
            else:
                await cur.execute(Q["jobs_by_key"], {"keys": missing})
                found = await cur.fetchall()
            existing = {r["unique_key"]: r for r in found}
            for i, job in enumerate(jobs):
                if out[i] is None:
                    record = job_from_row(existing[job.unique_key])
                    record.duplicate = True
                    out[i] = record
        return [r for r in out if r is not None]

    async def _job(self, job_id: int) -> JobRecord:
        row = await self._row(Q["get_job"], {"id": job_id})
        if row is None:
            raise NotFound(f"no job {job_id}")
        return job_from_row(row)

    @_retried
    async def get_job(self, job_id: int) -> JobRecord:
        return await self._job(job_id)

    @_retried
    async def list_jobs(
        self, *, state: str | None = None, queue: str | None = None, limit: int = 50
    ) -> list[JobRecord]:
        statuses = [STATE_STATUSES[state]] if state is not None else None
        rows = await self._rows(Q["list_jobs"], {"queue": queue, "statuses": statuses, "limit": limit})
        return [job_from_row(r) for r in rows]

    @_retried
    async def queue_depth(self) -> list[tuple[str, str, int]]:
        return [
            (r["queue"], job_state(r["status"]), int(r["n"])) for r in await self._rows(Q["queue_depth"], {})
        ]

    @_retried
    async def wave_progress(self) -> list[tuple[str, int, int, int]]:
        rows = await self._rows(Q["wave_progress"], {})
        return [(r["run_id"], r["wave"], int(r["steps"]), int(r["finished"])) for r in rows]

    @_retried
    async def get_job_attempts(self, job_id: int) -> list[AttemptRecord]:
        await self._job(job_id)
        return [attempt_from_row(r) for r in await self._rows(Q["job_attempts"], {"id": job_id})]

    @_retried
    async def retry_job(self, job_id: int, now: float) -> JobRecord:
        row = await self._row(Q["retry_job"], {"id": job_id, "now": now, "channel": self.channel})
        if row is None:
            job = await self._job(job_id)
            raise Conflict(f"job {job_id} is {job.state}; only discarded or cancelled jobs can be retried")
        return job_from_row(row)

    @_retried
    async def cancel_job(self, job_id: int, now: float) -> JobRecord:
        row = await self._row(Q["cancel_job"], {"id": job_id, "now": now})
        if row is None:
            job = await self._job(job_id)
            raise Conflict(f"job {job_id} is {job.state}; there is nothing to cancel")
        return job_from_row(row)

    # -- cron --------------------------------------------------------------------------

    @_retried
    async def put_schedule(self, schedule: Schedule) -> None:
        await self._execute(Q["put_schedule"], schedule_params(schedule))

    @_retried
    async def list_schedules(self) -> list[Schedule]:
        return [schedule_from_row(r) for r in await self._rows(Q["list_schedules"])]

    @_retried
    async def delete_schedule(self, name: str) -> bool:
        return await self._row(Q["delete_schedule"], {"name": name}) is not None

    @_retried
    async def fire_schedule(
        self, name: str, expected_next: float, next_at: float, jobs: list[NewJob], now: float
    ) -> bool:
        async with self._tx() as cur:
            await cur.execute(
                Q["move_schedule"], {"name": name, "expected": expected_next, "next_at": next_at}
            )
            if await cur.fetchone() is None:
                return False
            if jobs:
                await self._enqueue(cur, jobs, now)
            return True

    # -- budgets and the cache ---------------------------------------------------------

    @_retried
    async def budget_reserve(self, run_id: str, claims: list[BudgetClaim]) -> None:
        async with self._tx() as cur:
            for claim in claims:
                key = {"run_id": run_id, "scope": claim.scope}
                await cur.execute(Q["ledger_open"], key)
                await cur.execute(Q["ledger_get"], key)  # locks the row until commit
                refusal = _entry(_one(await cur.fetchone())).refusal(claim)
                if refusal is not None:
                    raise BudgetExceeded(refusal)
            for claim in claims:
                await cur.execute(
                    Q["ledger_reserve"],
                    {"run_id": run_id, "scope": claim.scope, "tokens": claim.tokens, "usd": claim.usd},
                )

    @_retried
    async def budget_settle(self, run_id: str, settles: list[BudgetSettle]) -> None:
        async with self._tx() as cur:
            for s in settles:
                await cur.execute(Q["ledger_open"], {"run_id": run_id, "scope": s.scope})
                await cur.execute(
                    Q["ledger_settle"],
                    {
                        "run_id": run_id,
                        "scope": s.scope,
                        "reserved_tokens": s.reserved_tokens,
                        "reserved_usd": s.reserved_usd,
                        "tokens": s.tokens,
                        "usd": s.usd,
                    },
                )

    @_retried
    async def llm_sources(self, limit: int = 1000) -> list[str]:
        rows = await self._rows(Q["llm_sources"], {"limit": limit})
        return [str(r["source"]) for r in rows if r["source"] is not None]

    async def budget_ledger(self, run_id: str) -> list[LedgerEntry]:
        return [_entry(r) for r in await self._rows(Q["ledger_of_run"], {"run_id": run_id})]

    @_retried
    async def cache_get(self, key: str, now: float) -> str | None:
        row = await self._row(Q["cache_get"], {"key": key, "now": now})
        return None if row is None else str(row["value"])

    @_retried
    async def cache_put(self, key: str, value: str, now: float, expires_at: float | None) -> None:
        await self._execute(
            Q["cache_put"], {"key": key, "value": value, "now": now, "expires_at": expires_at}
        )

    # -- API keys ----------------------------------------------------------------------

    @_retried
    async def put_api_key(self, key: ApiKey, secret_hash: str) -> None:
        params = {
            "id": key.id,
            "secret_hash": secret_hash,
            "role": key.role,
            "name": key.name,
            "created_at": key.created_at,
        }
        try:
            await self._execute(Q["put_api_key"], params)
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"API key {key.id} exists") from None

    @_retried
    async def api_key_by_hash(self, secret_hash: str) -> ApiKey | None:
        row = await self._row(Q["api_key_by_hash"], {"secret_hash": secret_hash})
        return None if row is None else api_key_from_row(row)

    @_retried
    async def list_api_keys(self) -> list[ApiKey]:
        return [api_key_from_row(r) for r in await self._rows(Q["list_api_keys"])]

    @_retried
    async def revoke_api_key(self, key_id: str, now: float) -> bool:
        return await self._row(Q["revoke_api_key"], {"id": key_id, "now": now}) is not None

    # -- goals and their outcomes ------------------------------------------------------

    @_retried
    async def child_runs(self, run_id: str) -> list[tuple[str, str, RunStatus]]:
        rows = await self._rows(Q["child_runs"], {"parent": run_id})
        return [(str(r["id"]), str(r["step_id"]), RunStatus(r["status"])) for r in rows]

    @_retried
    async def get_goal(self, run_id: str) -> GoalRecord | None:
        row = await self._row(Q["get_goal"], {"run_id": run_id})
        return None if row is None else goal_from_row(row)

    @_retried
    async def list_goals(self, limit: int = 100) -> list[GoalRecord]:
        return [goal_from_row(r) for r in await self._rows(Q["list_goals"], {"limit": limit})]

    @_retried
    async def goal_done_before(self, request: str) -> GoalRecord | None:
        row = await self._row(Q["goal_done_before"], {"request": request})
        return None if row is None else goal_from_row(row)

    @_retried
    async def pending_goals(self, limit: int = 100) -> list[GoalRecord]:
        return [goal_from_row(r) for r in await self._rows(Q["pending_goals"], {"limit": limit})]

    @_retried
    async def record_outcomes(self, run_id: str, outcomes: list[OutcomeRecord], now: float) -> bool:
        async with self._tx() as cur:
            await cur.execute(Q["collect_goal"], {"run_id": run_id, "now": now})
            if await cur.fetchone() is None:  # recorded already, here or by another worker
                return False
            if outcomes:
                await cur.executemany(Q["insert_outcome"], [outcome_params(o) for o in outcomes])
        return True

    @_retried
    async def outcomes(self, task_type: str | None = None, limit: int = 10_000) -> list[OutcomeRecord]:
        rows = await self._rows(Q["outcomes"], {"task_type": task_type, "limit": limit})
        return [outcome_from_row(r) for r in rows]

    # -- the audit trail ---------------------------------------------------------------

    @_retried
    async def audit_append(
        self, ts: float, actor: str, action: str, subject: str, detail: dict[str, Any]
    ) -> AuditEntry:
        ts = round(ts, 6)
        text = json.dumps(detail)
        async with self._tx() as cur:
            # One appender at a time (per schema) until this commits: the last hash read
            # next is the one the previous append committed, and the seq drawn by the insert
            # is above every seq before it, so seq order is chain order.
            await cur.execute(Q["audit_lock"])
            await cur.execute(Q["audit_last_hash"])
            row = await cur.fetchone()
            prev = str(row["hash"]) if row is not None else GENESIS
            digest = audit_hash(prev, ts, actor, action, subject, detail, self.audit_key)
            params = {
                "ts": ts,
                "actor": actor,
                "action": action,
                "subject": subject,
                "detail": text,
                "prev_hash": prev,
                "hash": digest,
            }
            await cur.execute(Q["audit_insert"], params)
            inserted = await cur.fetchone()
            if inserted is None:  # (RETURNING always returns the row) roll back
                raise StoreError("the audit entry was inserted without a seq")
        return AuditEntry(int(inserted["seq"]), ts, actor, action, subject, detail, prev, digest)

    @_retried
    async def audit_tail(self) -> tuple[int, AuditEntry | None]:
        (row,) = await self._rows(Q["audit_tail"], {})
        return int(row["entries"]), audit_from_row(row) if row["seq"] is not None else None

    async def audit_entries(
        self, *, subject: str | None = None, after: int = 0, limit: int = 1000
    ) -> list[AuditEntry]:
        if subject is None:
            rows = await self._rows(Q["audit_entries"], {"after": after, "limit": limit})
        else:
            params = {"subject": subject, "after": after, "limit": limit}
            rows = await self._rows(Q["audit_entries_of_subject"], params)
        return [audit_from_row(r) for r in rows]

    # -- retention ---------------------------------------------------------------------

    async def prune(
        self, before: float, statuses: Sequence[RunStatus], *, limit: int = 500, dry_run: bool = False
    ) -> PruneResult:
        runs, jobs = prunable(statuses)
        params: dict[str, Any] = {"before": before, "runs": runs, "jobs": jobs, "limit": limit}
        if dry_run:
            row = _one(await self._row(Q["prune_count"], params))
            return PruneResult(
                int(row["runs"]),
                int(row["steps"]),
                int(row["jobs"]),
                int(row["attempts"]),
                int(row["cache"]),
                int(row["bytes"]),
            )
        # One statement each for runs, jobs and the cache (each its own transaction).
        result = PruneResult()
        if runs:
            await self._prune_runs(params, result)
        if jobs:
            row = _one(await self._prune_rows(Q["prune_jobs"], params))
            result.jobs, result.attempts = int(row["jobs"]), result.attempts + int(row["attempts"])
            result.bytes += int(row["bytes"])
            result.more = result.more or result.jobs >= limit
        row = _one(await self._prune_rows(Q["prune_cache"], params))
        result.cache, result.bytes = int(row["cache"]), result.bytes + int(row["bytes"])
        result.more = result.more or result.cache >= limit
        return result

    async def _prune_runs(self, params: dict[str, Any], result: PruneResult) -> None:
        picked = await self._rows(Q["prune_pick_runs"], params)
        take = whole_runs([int(r["total_steps"]) for r in picked], params["limit"])
        result.more = take < len(picked) or len(picked) >= params["limit"]
        if not take:
            return
        row = _one(await self._prune_rows(Q["prune_runs"], {"ids": [r["id"] for r in picked[:take]]}))
        result.runs, result.steps = int(row["runs"]), int(row["steps"])
        result.attempts, result.bytes = int(row["attempts"]), int(row["bytes"])

    @_retried
    async def _prune_rows(self, query: str, params: dict[str, Any]) -> Row | None:
        return await self._row(query, params)

    async def reclaim(self) -> tuple[int, int] | None:
        """Nothing to do: autovacuum makes the space of deleted rows reusable in place (giving
        it back to the file system would take VACUUM FULL, which locks the tables out)."""
        return None


def _done_params(done: list[Done], *, with_runs: bool) -> dict[str, Any]:
    """Finished attempts as the parameters of ``finish_jobs_ctes`` (and ``finish_steps_ctes``)."""
    params: dict[str, Any] = {
        "done_ids": [d.id for d in done],
        "done": json.dumps(
            {
                str(d.id): {
                    "a": d.attempt,
                    "s": str(d.status),
                    "o": d.outcome,
                    "out": d.output,
                    "e": d.error,
                    "sa": d.started_at,
                    "fa": d.finished_at,
                    "nb": d.not_before,
                    "dt": d.detail,
                    "r": d.run_id,
                    "sr": d.skip_reason,
                }
                for d in done
            }
        ),
    }
    if with_runs:
        dep_of: list[int] = []
        dep_run: list[str] = []
        dep_idx: list[int] = []
        dep_skip: list[bool] = []
        for d in done:
            if d.run_id is None:
                continue
            if d.status is StepStatus.SUCCEEDED and d.unblocks:
                deps, skip = d.unblocks, False
            elif d.skips:
                deps, skip = d.skips, True
            else:
                continue
            dep_of.extend([d.id] * len(deps))
            dep_run.extend([d.run_id] * len(deps))
            dep_idx.extend(deps)
            dep_skip.extend([skip] * len(deps))
        params.update(dep_of=dep_of, dep_run=dep_run, dep_idx=dep_idx, dep_skip=dep_skip)
    return params


def _claimed(r: Row, now: float) -> Claimed:
    if r["run_id"] is not None:
        return Claimed(
            r["id"],
            r["run_id"],
            r["idx"],
            r["task"],
            r["attempt"],
            now,
            previous_error=r["error"],
            ready_at=r["ready_at"],
        )
    return Claimed(
        r["id"],
        None,
        0,
        r["task"],
        r["attempt"],
        now,
        args=r["args"],
        max_attempts=r["max_attempts"],
        timeout_s=r["timeout_s"],
        previous_error=r["error"],
        ready_at=r["ready_at"],
        role=r["role"],
    )


def _channel(schema: str | None) -> str:
    """The NOTIFY channel of a schema (an identifier of at most 63 bytes)."""
    if schema is None:
        return "baton_work"
    name = f"baton_work_{schema}"
    return name if len(name) <= 63 else f"baton_work_{hashlib.sha1(schema.encode()).hexdigest()[:20]}"


def _entry(row: Row) -> LedgerEntry:
    return LedgerEntry(
        row["scope"],
        int(row["reserved_tokens"]),
        float(row["reserved_usd"]),
        int(row["spent_tokens"]),
        float(row["spent_usd"]),
    )


def _one(row: Row | None) -> Row:
    if row is None:
        raise NotFound("the run vanished while it was being read")
    return row


async def _alive(conn: Connection) -> bool:
    """Whether an idle pooled connection still works; False after closing it.

    An idle connection that has something to read was (almost surely) closed by the server;
    a stray notice aside, which the empty query of the test reads away. One that has nothing
    to read is taken as live: a server unreachable without a word (a partition, a machine
    gone) shows only when a call times out, as before.
    """
    if conn.closed:
        return False
    try:
        if not _readable(conn.pgconn.socket):
            return True
        await conn.execute("")
        return True
    except psycopg.Error:
        await conn.close()
        return False


def _readable(fd: int) -> bool:
    """Whether a socket has data (or its end) waiting, without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # (Windows: no poll; sockets select)


def _unavailable(exc: Exception) -> bool:
    """Whether the error says the server cannot be reached or take a connection for now
    (trying again later may succeed), not that something is wrong with the request."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    if exc.sqlstate is not None:
        return exc.sqlstate in _UNAVAILABLE_STATES or exc.sqlstate.startswith("08")
    return _UNAVAILABLE_MESSAGE.search(str(exc)) is not None


def _redacted(conninfo: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", conninfo)
