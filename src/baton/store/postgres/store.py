"""The PostgreSQL store: for many processes on many machines sharing one database.

psycopg 3 with a bounded async connection pool: at more load than the pool holds, calls
wait for a connection instead of failing with "too many clients". Each method is one
transaction; a batch goes in as arrays, so one executor turn is a handful of statements
whatever its size. Migrations are versioned and applied at start under an advisory lock,
so processes starting together do not race. ``schema`` keeps baton's tables in their own
schema (created if missing); tests give each test its own.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from baton.errors import BudgetExceeded, Conflict, NotFound, StoreError
from baton.status import RUN_SOURCES, STEP_SOURCES, RunStatus, StepStatus
from baton.store.base import (
    AttemptRecord,
    Batch,
    BudgetClaim,
    BudgetSettle,
    CommitResult,
    LedgerEntry,
    RunRecord,
    StepRecord,
)
from baton.store.sql import (
    attempt_from_row,
    load_migrations,
    load_queries,
    run_from_row,
    run_params,
    step_from_row,
)

Q = load_queries(__package__)
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_STEP_SOURCES = {target: sorted(str(s) for s in src) for target, src in STEP_SOURCES.items()}
_RUN_SOURCES = {target: sorted(str(s) for s in src) for target, src in RUN_SOURCES.items()}

Cursor = psycopg.AsyncCursor[dict[str, Any]]


class PostgresStore:
    """Store in a PostgreSQL database (``postgresql://user@host:port/db``)."""

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = 10,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise StoreError(f"schema name {schema!r} must match {_SCHEMA_NAME.pattern}")
        self.url = url if schema is None else f"{url}{'&' if '?' in url else '?'}schema={schema}"
        self._conninfo = url
        self._schema = schema
        self._pool_size = pool_size
        self._timeout_s = connect_timeout_s
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]] | None = None

    # -- connection ------------------------------------------------------------------

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self._schema is not None:
            await conn.execute(f'SET search_path TO "{self._schema}"')
            await conn.commit()

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool: AsyncConnectionPool[psycopg.AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, int(self._timeout_s))},
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
                if self._schema is not None:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
            await pool.open(wait=True, timeout=self._timeout_s)
        except (psycopg.Error, PoolTimeout) as exc:
            await pool.close()
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = _redacted(self._conninfo)
            raise StoreError(f"cannot connect to PostgreSQL at {where}: {reason}") from None
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
    async def _tx(self) -> AsyncIterator[Cursor]:
        """A cursor inside a transaction on a pooled connection."""
        if self._pool is None:
            raise StoreError("store is not open")
        try:
            async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
                yield cur
        except PoolTimeout as exc:
            raise StoreError(f"no database connection free in time: {exc}") from None
        except psycopg.OperationalError as exc:
            raise StoreError(f"database error: {exc}") from None

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

    async def create_run(self, run: RunRecord, steps: list[StepRecord]) -> None:
        try:
            async with self._tx() as cur:
                await cur.execute(
                    Q["insert_run"],
                    run_params(run),
                )
                async with cur.copy(Q["copy_steps"].rstrip(";").encode()) as copy:
                    for s in steps:
                        await copy.write_row((run.id, s.idx, s.step_id, s.task, s.wave, str(s.status)))
        except psycopg.errors.UniqueViolation:
            raise Conflict(f"run {run.id} exists") from None

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

    async def get_run(self, run_id: str, *, with_plan: bool = True) -> RunRecord:
        async with self._tx() as cur:
            resolved = await self._resolve(cur, run_id)
            await cur.execute(Q["get_run"] if with_plan else Q["get_run_header"], {"id": resolved})
            return run_from_row(_one(await cur.fetchone()))

    async def list_runs(self, limit: int = 50, status: RunStatus | None = None) -> list[RunRecord]:
        async with self._tx() as cur:
            await cur.execute(Q["list_runs"], {"limit": limit, "status": str(status) if status else None})
            return [run_from_row(r) for r in await cur.fetchall()]

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        async with self._tx() as cur:
            await cur.execute(Q["get_steps"], {"id": await self._resolve(cur, run_id)})
            return [step_from_row(r) for r in await cur.fetchall()]

    async def get_attempts(self, run_id: str) -> list[AttemptRecord]:
        async with self._tx() as cur:
            await cur.execute(Q["get_attempts"], {"id": await self._resolve(cur, run_id)})
            return [attempt_from_row(r) for r in await cur.fetchall()]

    # -- ownership ---------------------------------------------------------------------

    async def acquire_run(
        self, run_id: str, owner: str, lease_s: float, now: float, *, dead_owner: str | None = None
    ) -> RunRecord:
        async with self._tx() as cur:
            rid = await self._resolve(cur, run_id)
            await cur.execute(
                Q["take_run"],
                {"id": rid, "owner": owner, "expires": now + lease_s, "now": now, "dead": dead_owner},
            )
            if await cur.fetchone() is None:
                await cur.execute(Q["get_run_header"], {"id": rid})
                row = _one(await cur.fetchone())
                if row["status"] not in ("pending", "running"):
                    raise Conflict(f"run {rid} is {row['status']}; it cannot be executed")
                raise Conflict(f"run {rid} is being executed by {row['owner']}")
            await cur.execute(Q["requeue_lost_steps"], {"id": rid, "owner": owner, "now": now})
            await cur.execute(Q["get_run_header"], {"id": rid})
            return run_from_row(_one(await cur.fetchone()))

    async def release_run(self, run_id: str, owner: str) -> None:
        async with self._tx() as cur:
            await cur.execute(Q["release_run"], {"id": run_id, "owner": owner})
            await cur.execute(Q["orphan_running_steps"], {"id": run_id, "owner": owner})

    async def heartbeat(
        self, owner: str, lease_s: float, now: float, run_ids: list[str]
    ) -> dict[str, RunStatus | None]:
        async with self._tx() as cur:
            await cur.execute(Q["renew_runs"], {"expires": now + lease_s, "owner": owner})
            await cur.execute(Q["runs_control"], {"ids": run_ids})
            found = {r["id"]: r for r in await cur.fetchall()}
        out: dict[str, RunStatus | None] = {}
        for run_id in run_ids:
            row = found.get(run_id)
            out[run_id] = RunStatus(row["status"]) if row and row["owner"] == owner else None
        return out

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

    async def budget_ledger(self, run_id: str) -> list[LedgerEntry]:
        async with self._tx() as cur:
            await cur.execute(Q["ledger_of_run"], {"run_id": run_id})
            return [_entry(r) for r in await cur.fetchall()]

    async def cache_get(self, key: str, now: float) -> str | None:
        async with self._tx() as cur:
            await cur.execute(Q["cache_get"], {"key": key, "now": now})
            row = await cur.fetchone()
        return None if row is None else str(row["value"])

    async def cache_put(self, key: str, value: str, now: float, expires_at: float | None) -> None:
        async with self._tx() as cur:
            await cur.execute(
                Q["cache_put"], {"key": key, "value": value, "now": now, "expires_at": expires_at}
            )

    async def orphaned_runs(self, now: float) -> list[str]:
        async with self._tx() as cur:
            await cur.execute(Q["orphaned_runs"], {"now": now})
            return [r["id"] for r in await cur.fetchall()]

    # -- the executor's batch --------------------------------------------------------

    async def commit(self, batch: Batch) -> CommitResult:
        result = CommitResult()
        rid, owner = batch.run_id, batch.owner
        async with self._tx() as cur:
            # The run row is locked for the transaction: pause, cancel and takeovers wait.
            await cur.execute(Q["lock_run"], {"id": rid})
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no run {rid!r}")
            run_status = RunStatus(row["status"])
            if row["owner"] != owner:
                result.lost = True
                result.rejected_finishes = [f.idx for f in batch.finishes]
                result.rejected_claims = [c.idx for c in batch.claims]
                result.run_status = run_status
                return result

            if batch.finishes:
                fs = batch.finishes
                await cur.execute(
                    Q["finish_steps"],
                    {
                        "id": rid,
                        "owner": owner,
                        "idx": [f.idx for f in fs],
                        "attempt": [f.attempt for f in fs],
                        "status": [str(f.status) for f in fs],
                        "output": [f.output for f in fs],
                        "error": [f.error for f in fs],
                        "finished_at": [f.finished_at for f in fs],
                        "not_before": [f.not_before for f in fs],
                    },
                )
                applied = {r["idx"] for r in await cur.fetchall()}
                result.rejected_finishes = [f.idx for f in fs if f.idx not in applied]
                done = [f for f in fs if f.idx in applied]
                if done:
                    await cur.execute(
                        Q["insert_attempts"],
                        {
                            "id": rid,
                            "owner": owner,
                            "idx": [f.idx for f in done],
                            "attempt": [f.attempt for f in done],
                            "status": [f.outcome for f in done],
                            "started_at": [f.started_at for f in done],
                            "finished_at": [f.finished_at for f in done],
                            "error": [f.error for f in done],
                            "detail": [f.detail for f in done],
                        },
                    )

            by_target: dict[StepStatus, list[tuple[int, str | None]]] = {}
            for m in batch.marks:
                by_target.setdefault(m.status, []).append((m.idx, m.error))
            for target, marks in by_target.items():
                await cur.execute(
                    Q["mark_steps"],
                    {
                        "id": rid,
                        "status": str(target),
                        "terminal": target.terminal,
                        "now": batch.now,
                        "idx": [i for i, _ in marks],
                        "error": [e for _, e in marks],
                        "sources": _STEP_SOURCES[target],
                    },
                )

            if batch.claims:
                if run_status is RunStatus.RUNNING:
                    cs = batch.claims
                    await cur.execute(
                        Q["claim_steps"],
                        {
                            "id": rid,
                            "owner": owner,
                            "idx": [c.idx for c in cs],
                            "attempt": [c.attempt for c in cs],
                            "started_at": [c.started_at for c in cs],
                        },
                    )
                    claimed = {r["idx"] for r in await cur.fetchall()}
                    result.rejected_claims = [c.idx for c in cs if c.idx not in claimed]
                else:
                    result.rejected_claims = [c.idx for c in batch.claims]

            final = batch.run_status
            if final is not None and await self._set_status(cur, rid, final, batch.now, batch.run_error):
                run_status = final
            result.run_status = run_status
        return result

    @staticmethod
    async def _set_status(cur: Cursor, run_id: str, status: RunStatus, now: float, error: str | None) -> bool:
        await cur.execute(
            Q["set_run_status"],
            {
                "id": run_id,
                "status": str(status),
                "error": error,
                "terminal": status.terminal,
                "now": now,
                "sources": _RUN_SOURCES[status],
            },
        )
        return await cur.fetchone() is not None

    async def set_run_status(self, run_id: str, status: RunStatus, now: float) -> RunRecord:
        async with self._tx() as cur:
            rid = await self._resolve(cur, run_id)
            await cur.execute(Q["lock_run"], {"id": rid})
            row = _one(await cur.fetchone())
            current = RunStatus(row["status"])
            if current is not status and not await self._set_status(cur, rid, status, now, None):
                raise Conflict(f"run {rid} is {current}; it cannot become {status}")
            if status is RunStatus.CANCELLED:
                await cur.execute(Q["cancel_idle_steps"], {"id": rid, "now": now})
                owner_alive = row["owner"] is not None and (row["lease_expires_at"] or 0) >= now
                if not owner_alive:
                    await cur.execute(Q["cancel_orphan_running_steps"], {"id": rid, "now": now})
            await cur.execute(Q["get_run_header"], {"id": rid})
            return run_from_row(_one(await cur.fetchone()))


def _entry(row: dict[str, Any]) -> LedgerEntry:
    return LedgerEntry(
        row["scope"],
        int(row["reserved_tokens"]),
        float(row["reserved_usd"]),
        int(row["spent_tokens"]),
        float(row["spent_usd"]),
    )


def _one(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        raise NotFound("the run vanished while it was being read")
    return row


def _redacted(conninfo: str) -> str:
    """The URL without its password."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", conninfo)
