"""The SQLite store: the embedded default.

WAL journal, a busy timeout and ``BEGIN IMMEDIATE`` for every write, so several processes
can share one file. Calls run on the caller's thread: a write transaction here takes tens
of microseconds, less than a hop to a worker thread would cost, and a batch per executor
turn keeps the number of transactions low.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def _sources(statuses: frozenset[Any]) -> str:
    return json.dumps(sorted(str(s) for s in statuses))


_STEP_SOURCES_JSON = {target: _sources(src) for target, src in STEP_SOURCES.items()}
_RUN_SOURCES_JSON = {target: _sources(src) for target, src in RUN_SOURCES.items()}


def _entry(row: sqlite3.Row) -> LedgerEntry:
    return LedgerEntry(
        row["scope"], row["reserved_tokens"], row["reserved_usd"], row["spent_tokens"], row["spent_usd"]
    )


class SQLiteStore:
    """Store on one SQLite file (``sqlite:///path`` or a plain path)."""

    def __init__(
        self, path: str | Path, *, busy_timeout_s: float = 10.0, synchronous: str = "NORMAL"
    ) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None

    # -- connection ------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    async def open(self) -> None:
        self.open_sync()

    def open_sync(self) -> None:
        if self._db is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        db.row_factory = sqlite3.Row
        try:
            db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
            db.execute("PRAGMA foreign_keys = ON")
            self._db = db
            self._migrate()
        except sqlite3.DatabaseError as exc:
            db.close()
            self._db = None
            raise StoreError(f"{self.path} is not a usable baton database: {exc}") from None

    def _migrate(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, statements in load_migrations(__package__):
                if number > version:
                    for statement in statements:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version = {number}")

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"database {self.path}: {exc}") from None
        try:
            yield db
        except sqlite3.OperationalError as exc:
            db.execute("ROLLBACK")
            raise StoreError(f"database {self.path}: {exc}") from None
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- runs ------------------------------------------------------------------------

    async def create_run(self, run: RunRecord, steps: list[StepRecord]) -> None:
        try:
            self._insert_run(run, steps)
        except sqlite3.IntegrityError:
            raise Conflict(f"run {run.id} exists") from None

    def _insert_run(self, run: RunRecord, steps: list[StepRecord]) -> None:
        with self._write() as db:
            base = db.execute(Q["next_step_base"]).fetchone()[0]
            db.execute(
                Q["insert_run"],
                {**run_params(run), "step_base": base},
            )
            db.executemany(
                Q["insert_step"],
                ((base + s.idx, run.id, s.idx, s.step_id, s.task, s.wave, str(s.status)) for s in steps),
            )

    def _range(self, db: sqlite3.Connection, run_id: str) -> tuple[int, int]:
        """The first and last step id of a run."""
        row = db.execute(Q["step_range"], (run_id,)).fetchone()
        return int(row[0]), int(row[1])

    def _resolve_id(self, run_id: str) -> str:
        if self.db.execute(Q["run_control"], (run_id,)).fetchone() is not None:
            return run_id
        escaped = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.db.execute(Q["find_run_by_prefix"], (escaped,)).fetchall() if run_id else []
        if len(rows) == 1:
            return str(rows[0]["id"])
        if len(rows) > 1:
            raise NotFound(f"run id prefix {run_id!r} is ambiguous")
        raise NotFound(f"no run {run_id!r}")

    async def get_run(self, run_id: str, *, with_plan: bool = True) -> RunRecord:
        query = Q["get_run"] if with_plan else Q["get_run_header"]
        return run_from_row(self.db.execute(query, (self._resolve_id(run_id),)).fetchone())

    async def list_runs(self, limit: int = 50, status: RunStatus | None = None) -> list[RunRecord]:
        if status is None:
            rows = self.db.execute(Q["list_runs"], (limit,)).fetchall()
        else:
            rows = self.db.execute(Q["list_runs_by_status"], (str(status), limit)).fetchall()
        return [run_from_row(r) for r in rows]

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        span = self._range(self.db, self._resolve_id(run_id))
        return [step_from_row(r) for r in self.db.execute(Q["get_steps"], span)]

    async def get_attempts(self, run_id: str) -> list[AttemptRecord]:
        span = self._range(self.db, self._resolve_id(run_id))
        rows = self.db.execute(Q["get_attempts"], span).fetchall()
        return [attempt_from_row(r) for r in rows]

    # -- ownership ---------------------------------------------------------------------

    async def acquire_run(
        self, run_id: str, owner: str, lease_s: float, now: float, *, dead_owner: str | None = None
    ) -> RunRecord:
        run_id = self._resolve_id(run_id)
        with self._write() as db:
            taken = db.execute(
                Q["take_run"],
                {"id": run_id, "owner": owner, "expires": now + lease_s, "now": now, "dead": dead_owner},
            ).rowcount
            if not taken:
                row = db.execute(Q["get_run_header"], (run_id,)).fetchone()
                status = row["status"]
                if status not in ("pending", "running"):
                    raise Conflict(f"run {run_id} is {status}; it cannot be executed")
                raise Conflict(f"run {run_id} is being executed by {row['owner']}")
            first, last = self._range(db, run_id)
            for lost in db.execute(Q["lost_running_steps"], (first, last, owner)).fetchall():
                db.execute(Q["requeue_lost_step"], (lost["id"], lost["attempt"]))
                db.execute(
                    Q["insert_attempt"],
                    (
                        lost["id"],
                        lost["attempt"],
                        "lost",
                        lost["started_at"],
                        now,
                        "lost: its worker stopped or its lease expired",
                        lost["lease_owner"],
                        None,
                    ),
                )
            return run_from_row(db.execute(Q["get_run_header"], (run_id,)).fetchone())

    async def release_run(self, run_id: str, owner: str) -> None:
        with self._write() as db:
            db.execute(Q["release_run"], (run_id, owner))
            db.execute(Q["orphan_running_steps"], (*self._range(db, run_id), owner))

    async def heartbeat(
        self, owner: str, lease_s: float, now: float, run_ids: list[str]
    ) -> dict[str, RunStatus | None]:
        with self._write() as db:
            db.execute(Q["renew_runs"], (now + lease_s, owner))
            out: dict[str, RunStatus | None] = {}
            for run_id in run_ids:
                row = db.execute(Q["run_control"], (run_id,)).fetchone()
                out[run_id] = RunStatus(row["status"]) if row and row["owner"] == owner else None
            return out

    async def budget_reserve(self, run_id: str, claims: list[BudgetClaim]) -> None:
        with self._write() as db:
            for claim in claims:
                db.execute(Q["ledger_open"], (run_id, claim.scope))
                refusal = _entry(db.execute(Q["ledger_get"], (run_id, claim.scope)).fetchone()).refusal(claim)
                if refusal is not None:
                    raise BudgetExceeded(refusal)
            for claim in claims:
                db.execute(Q["ledger_reserve"], (claim.tokens, claim.usd, run_id, claim.scope))

    async def budget_settle(self, run_id: str, settles: list[BudgetSettle]) -> None:
        with self._write() as db:
            for s in settles:
                db.execute(Q["ledger_open"], (run_id, s.scope))
                db.execute(
                    Q["ledger_settle"], (s.reserved_tokens, s.reserved_usd, s.tokens, s.usd, run_id, s.scope)
                )

    async def budget_ledger(self, run_id: str) -> list[LedgerEntry]:
        return [_entry(r) for r in self.db.execute(Q["ledger_of_run"], (run_id,))]

    async def cache_get(self, key: str, now: float) -> str | None:
        row = self.db.execute(Q["cache_get"], (key, now)).fetchone()
        return None if row is None else str(row["value"])

    async def cache_put(self, key: str, value: str, now: float, expires_at: float | None) -> None:
        with self._write() as db:
            db.execute(Q["cache_put"], (key, value, now, expires_at))

    async def orphaned_runs(self, now: float) -> list[str]:
        return [r["id"] for r in self.db.execute(Q["orphaned_runs"], (now,))]

    # -- the executor's batch --------------------------------------------------------

    async def commit(self, batch: Batch) -> CommitResult:
        result = CommitResult()
        with self._write() as db:
            row = db.execute(Q["run_control"], (batch.run_id,)).fetchone()
            if row is None:
                raise NotFound(f"no run {batch.run_id!r}")
            if row["owner"] != batch.owner:
                result.lost = True
                result.rejected_finishes = [f.idx for f in batch.finishes]
                result.rejected_claims = [c.idx for c in batch.claims]
                result.run_status = RunStatus(row["status"])
                return result
            run_status = RunStatus(row["status"])
            rid, owner, base = batch.run_id, batch.owner, row["step_base"]

            if batch.finishes:
                rows: list[tuple[Any, ...]] = [
                    (
                        str(f.status),
                        f.output,
                        f.error,
                        f.finished_at,
                        f.not_before,
                        base + f.idx,
                        f.attempt,
                        owner,
                    )
                    for f in batch.finishes
                ]
                applied = self._apply_many(db, Q["finish_step"], rows)
                result.rejected_finishes = [
                    f.idx for f, ok in zip(batch.finishes, applied, strict=True) if not ok
                ]
                attempts = [
                    (
                        base + f.idx,
                        f.attempt,
                        f.outcome,
                        f.started_at,
                        f.finished_at,
                        f.error,
                        owner,
                        f.detail,
                    )
                    for f, ok in zip(batch.finishes, applied, strict=True)
                    if ok
                ]
                if len(attempts) == 1:
                    db.execute(Q["insert_attempt"], attempts[0])
                elif attempts:
                    db.executemany(Q["insert_attempt"], attempts)

            if batch.marks:
                ready = [base + m.idx for m in batch.marks if m.status is StepStatus.READY]
                if ready:
                    db.execute(Q["mark_ready"], (json.dumps(ready),))
                marks: list[tuple[Any, ...]] = [
                    (
                        str(m.status),
                        m.error,
                        m.status.terminal,
                        batch.now,
                        base + m.idx,
                        _STEP_SOURCES_JSON[m.status],
                    )
                    for m in batch.marks
                    if m.status is not StepStatus.READY
                ]
                if marks:
                    db.executemany(Q["mark_step"], marks)

            if batch.claims:
                if run_status is RunStatus.RUNNING:
                    claims = [
                        (c.attempt, owner, c.started_at, base + c.idx, c.attempt - 1) for c in batch.claims
                    ]
                    applied = self._apply_many(db, Q["claim_step"], claims)
                    result.rejected_claims = [
                        c.idx for c, ok in zip(batch.claims, applied, strict=True) if not ok
                    ]
                else:
                    result.rejected_claims = [c.idx for c in batch.claims]

            final = batch.run_status
            if final is not None and self._set_run_status(db, rid, final, batch.now, batch.run_error):
                run_status = final
            result.run_status = run_status
        return result

    @staticmethod
    def _apply_many(db: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> list[bool]:
        """Run a guarded UPDATE per row; which rows it applied to.

        The fast path is one executemany; only when some row was guarded out does it redo
        the rows one by one (inside a savepoint) to learn which.
        """
        if len(rows) == 1:
            return [db.execute(sql, rows[0]).rowcount == 1]
        db.execute("SAVEPOINT many")
        changed = db.executemany(sql, rows).rowcount
        if changed == len(rows):
            db.execute("RELEASE many")
            return [True] * len(rows)
        db.execute("ROLLBACK TO many")
        applied = [db.execute(sql, row).rowcount == 1 for row in rows]
        db.execute("RELEASE many")
        return applied

    @staticmethod
    def _set_run_status(
        db: sqlite3.Connection, run_id: str, status: RunStatus, now: float, error: str | None
    ) -> bool:
        terminal = status.terminal
        return (
            db.execute(
                Q["set_run_status"],
                (str(status), error, terminal, now, run_id, _RUN_SOURCES_JSON[status]),
            ).rowcount
            == 1
        )

    async def set_run_status(self, run_id: str, status: RunStatus, now: float) -> RunRecord:
        run_id = self._resolve_id(run_id)
        with self._write() as db:
            row = db.execute(Q["get_run_header"], (run_id,)).fetchone()
            current = RunStatus(row["status"])
            if current is not status and not self._set_run_status(db, run_id, status, now, None):
                raise Conflict(f"run {run_id} is {current}; it cannot become {status}")
            if status is RunStatus.CANCELLED:
                first, last = self._range(db, run_id)
                db.execute(Q["cancel_idle_steps"], (now, first, last))
                owner_alive = row["owner"] is not None and (row["lease_expires_at"] or 0) >= now
                if not owner_alive:
                    db.execute(Q["cancel_orphan_running_steps"], (now, first, last))
            return run_from_row(db.execute(Q["get_run_header"], (run_id,)).fetchone())
