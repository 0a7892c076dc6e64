"""The SQLite store: the embedded default.

WAL journal, a busy timeout and ``BEGIN IMMEDIATE`` for every write, so several processes
can share one file. Calls run on the caller's thread: a write transaction here takes tens
of microseconds, less than a hop to a worker thread would cost, and a batch per executor
turn keeps the number of transactions low.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from baton.errors import BudgetExceeded, Conflict, NotFound, StoreError
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


def _sources(statuses: frozenset[Any]) -> str:
    return json.dumps(sorted(str(s) for s in statuses))


_RUN_SOURCES_JSON = {target: _sources(src) for target, src in RUN_SOURCES.items()}


def _apply_many(db: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> list[bool]:
    """Run a guarded UPDATE per row; which rows it applied to.

    The fast path is one executemany; only when some row was guarded out does it redo the
    rows one by one (inside a savepoint) to learn which.
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


def _entry(row: sqlite3.Row) -> LedgerEntry:
    return LedgerEntry(
        row["scope"], row["reserved_tokens"], row["reserved_usd"], row["spent_tokens"], row["spent_usd"]
    )


def _owner_only(path: Path) -> None:
    """A database (and its -wal and -shm files) an earlier version made readable by others
    becomes its owner's alone, when this process owns it."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            info = file.stat()
            if info.st_uid == os.geteuid() and info.st_mode & 0o077:
                file.chmod(info.st_mode & 0o700)


class SQLiteStore:
    """Store on one SQLite file (``sqlite:///path`` or a plain path)."""

    def __init__(
        self, path: str | Path, *, busy_timeout_s: float = 10.0, synchronous: str = "NORMAL"
    ) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.audit_key: bytes | None = None
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._json_cache: dict[int, tuple[list[str], str, frozenset[str]]] = {}

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
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # only its owner may read it (SQLite gives its -wal and -shm files the same mode)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                _owner_only(self.path)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        db.row_factory = sqlite3.Row
        try:
            db.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA wal_autocheckpoint = 10000")
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
            raise self._error(exc) from None
        try:
            yield db
            db.execute("COMMIT")  # a full disk may refuse the commit itself
        except sqlite3.OperationalError as exc:
            self._rollback()
            raise self._error(exc) from None
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """End the transaction, if SQLite has not ended it already (it may, on a full disk),
        so that the next one can begin."""
        if self.db.in_transaction:
            with suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")

    def _error(self, exc: sqlite3.Error) -> StoreError:
        """A busy or locked database may be free next time; a full disk, a read-only or
        damaged file or an I/O error will not be without someone's help."""
        name = getattr(exc, "sqlite_errorname", "")
        transient = name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or not name
        hint = "; free some space, then resume" if name == "SQLITE_FULL" else ""
        return StoreError(f"database {self.path}: {exc}{hint}", transient=transient)

    # -- runs ------------------------------------------------------------------------

    async def create_run(
        self,
        run: RunRecord,
        steps: list[StepRecord],
        *,
        idempotency: tuple[str, str] | None = None,
        goal: GoalRecord | None = None,
        parent: tuple[str, str] | None = None,
    ) -> str:
        try:
            return self._insert_run(run, steps, idempotency, goal, parent)
        except sqlite3.IntegrityError:
            raise Conflict(f"run {run.id} exists") from None

    def _insert_run(
        self,
        run: RunRecord,
        steps: list[StepRecord],
        idempotency: tuple[str, str] | None,
        goal: GoalRecord | None = None,
        parent: tuple[str, str] | None = None,
    ) -> str:
        with self._write() as db:
            if idempotency is not None:
                key, fingerprint = idempotency
                seen = db.execute(Q["run_request"], (key,)).fetchone()
                if seen is not None:
                    if seen["fingerprint"] != fingerprint:
                        raise Conflict(f"idempotency key {key!r} was used for another request")
                    return str(seen["run_id"])
                db.execute(Q["put_run_request"], (key, fingerprint, run.id, run.created_at))
            base = db.execute(Q["next_step_base"]).fetchone()[0]
            params = {**run_params(run), "step_base": base}
            db.execute(Q["insert_run"], params)
            db.execute(Q["insert_plan"], params)
            db.executemany(
                Q["insert_step"],
                (
                    (
                        base + s.idx,
                        run.id,
                        s.idx,
                        s.step_id,
                        s.task,
                        s.wave,
                        str(s.status),
                        s.waiting,
                        s.rank,
                        run.queue,
                        run.created_at,
                    )
                    for s in steps
                ),
            )
            if goal is not None:
                db.execute(Q["insert_goal"], goal_params(goal))
            if parent is not None:
                db.execute(Q["insert_subrun"], {"child": run.id, "parent": parent[0], "step_id": parent[1]})
            for s in steps:
                s.id = base + s.idx
        return run.id

    def _range(self, db: sqlite3.Connection, run_id: str) -> tuple[int, int]:
        """The first and last step id of a run."""
        row = db.execute(Q["step_range"], (run_id,)).fetchone()
        return int(row[0]), int(row[1])

    def _resolve_id(self, run_id: str) -> str:
        if self.db.execute(Q["run_exists"], (run_id,)).fetchone() is not None:
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
        first, last = span
        rows = self.db.execute(Q["get_attempts"], {"first": first, "last": last}).fetchall()
        return [attempt_from_row(r) for r in rows]

    async def outputs(self, run_id: str, idxs: list[int]) -> dict[int, Any]:
        first, _ = self._range(self.db, run_id)
        rows = self.db.execute(Q["outputs"], (json.dumps([first + i for i in idxs]),)).fetchall()
        return {r["idx"]: json.loads(r["output"]) if r["output"] is not None else None for r in rows}

    async def attempt_detail(self, job_id: int, attempt: int) -> dict[str, Any] | None:
        row = self.db.execute(Q["attempt_detail"], (job_id, attempt)).fetchone()
        if row is None or row["detail"] is None:
            return None
        detail: dict[str, Any] = json.loads(row["detail"])
        return detail

    # -- the queue ---------------------------------------------------------------------

    async def turn(self, turn: Turn) -> TurnResult:
        result = TurnResult()
        # Per run: [steps done, steps finished for good, steps failed, steps claimed]; each
        # run's counters move once, at the end of the turn.
        counts: dict[str, list[int]] = {}
        with self._write() as db:
            if turn.done:
                self._finish(db, turn, result, counts)
            if turn.claim > 0:
                live = db.execute(Q["worker_live"], (turn.owner, turn.now)) if turn.check_lease else None
                if live is not None and live.fetchone() is None:
                    result.lost = True
                else:
                    self._claim(db, turn, result, counts)
            for run_id, (done, finished, failed, claimed) in counts.items():
                self._count(db, run_id, done, finished, failed, claimed, turn.now, result)
        return result

    def _finish(
        self, db: sqlite3.Connection, turn: Turn, result: TurnResult, counts: dict[str, list[int]]
    ) -> None:
        owner, now = turn.owner, turn.now
        attempts: list[tuple[Any, ...]] = []
        # Dependent step id -> needs of it that succeeded this turn (a fan-in counts once).
        tally: dict[int, int] = {}
        rows = [
            (str(d.status), d.output, d.error, d.finished_at, d.not_before, d.id, d.attempt, owner)
            for d in turn.done
        ]
        for d, applied in zip(turn.done, _apply_many(db, Q["finish_step"], rows), strict=True):
            if not applied:
                result.rejected.append(d.id)
                continue
            if d.status is not StepStatus.SUCCEEDED or d.detail is not None:
                # (a plain success is on record in its step row: see get_attempts)
                attempts.append(
                    (d.id, d.attempt, d.outcome, d.started_at, d.finished_at, d.error, owner, d.detail)
                )
            if d.run_id is None:
                continue
            c = counts.setdefault(d.run_id, [0, 0, 0, 0])
            c[0] += 1
            if d.status.terminal:
                c[1] += 1
            if d.status is StepStatus.FAILED:
                c[2] += 1
            base = d.id - d.idx
            if d.status is StepStatus.SUCCEEDED and d.unblocks:
                for dep in d.unblocks:
                    tally[base + dep] = tally.get(base + dep, 0) + 1
            elif d.skips:
                reason = d.skip_reason or "a step it needs did not succeed"
                for dep in d.skips:
                    if db.execute(Q["skip_step"], (reason, now, base + dep)).rowcount:
                        c[1] += 1
                        result.marked.append((d.run_id, dep, StepStatus.SKIPPED))
        if len(attempts) == 1:
            db.execute(Q["insert_attempt"], attempts[0])
        elif attempts:
            db.executemany(Q["insert_attempt"], attempts)
        if tally:
            db.executemany(Q["unblock_step"], [{"n": n, "now": now, "id": dep} for dep, n in tally.items()])
        if tally and turn.report:
            for row in db.execute(Q["now_ready"], (json.dumps(list(tally)),)):
                result.marked.append((row["run_id"], row["idx"], StepStatus.READY))

    def _count(
        self,
        db: sqlite3.Connection,
        run_id: str,
        done: int,
        finished: int,
        failed: int,
        claimed: int,
        now: float,
        result: TurnResult,
    ) -> None:
        """Move a run's counters; the run ends when nothing of it is left unfinished."""
        params = {"id": run_id, "done": done, "finished": finished, "failed": failed, "claimed": claimed}
        if db.execute(Q["count_open_run"], params).rowcount:
            return
        row = db.execute(Q["count_run"], params).fetchone()
        if row is None or row["unfinished"] > 0 or row["status"] not in ("pending", "running", "paused"):
            return
        if row["failed"]:
            base = row["step_base"]
            names = [r[0] for r in db.execute(Q["failed_steps"], (base, base + row["total_steps"] - 1))]
            status, error = RunStatus.FAILED, "; ".join(f"{n}: failed" for n in names)
        else:
            status, error = RunStatus.COMPLETED, None
        db.execute(Q["end_run"], (str(status), error, now, run_id))
        result.ended[run_id] = status

    def _encoded(self, names: list[str] | None) -> str | None:
        """A worker's task or queue list as a JSON parameter (kept: it is the same list each turn)."""
        if names is None:
            return None
        cached = self._json_cache.get(id(names))
        if cached is None or cached[0] is not names:
            cached = (names, json.dumps(names), frozenset(names))
            self._json_cache[id(names)] = cached
        return cached[1]

    def _ready(
        self, db: sqlite3.Connection, query: str, params: dict[str, Any], tasks: list[str] | None
    ) -> list[sqlite3.Row]:
        """The first ready rows a query finds, of tasks this worker knows.

        Asked first without the task filter (a list the database would unpack on every
        call); only when that finds a task unknown here is the filtered query run.
        """
        rows = db.execute(query, {**params, "tasks": None}).fetchall()
        if tasks is None or not rows:
            return rows
        self._encoded(tasks)
        known = self._json_cache[id(tasks)][2]
        if all(r["task"] in known for r in rows):
            return rows
        return db.execute(query, {**params, "tasks": self._encoded(tasks)}).fetchall()

    def _claim(
        self, db: sqlite3.Connection, turn: Turn, result: TurnResult, counts: dict[str, list[int]]
    ) -> None:
        owner, now = turn.owner, turn.now
        left = turn.claim
        queues = self._encoded(turn.queues)
        for run in db.execute(Q["runs_with_slots"], {"queues": queues}).fetchall():
            if left <= 0:
                break
            c = counts.get(run["id"])
            n = min(left, run["free"] + (c[0] if c else 0))  # c[0]: slots this turn freed
            if n <= 0:
                continue
            params = {"run": run["id"], "now": now, "n": n}
            if run["barrier"]:
                params.update(first=run["step_base"], last=run["step_last"])
                rows = self._ready(db, Q["ready_steps_of_barrier_run"], params, turn.tasks)
            else:
                rows = self._ready(db, Q["ready_steps_of_run"], params, turn.tasks)
            if not rows:
                continue
            db.executemany(Q["claim_step"], [(owner, now, r["id"]) for r in rows])
            run_id = run["id"]
            if run["started_at"] is None:
                # Its first claim: the run starts. (Status, start time and deadline are
                # written once: a turn does not rewrite the indexed status column.)
                db.execute(Q["start_run"], {"id": run_id, "now": now})
            counts.setdefault(run_id, [0, 0, 0, 0])[3] += len(rows)
            result.claimed.extend(
                Claimed(
                    r["id"],
                    run_id,
                    r["idx"],
                    r["task"],
                    r["attempt"] + 1,
                    now,
                    previous_error=r["error"],
                    ready_at=r["ready_at"],
                )
                for r in rows
            )
            left -= len(rows)
        if left <= 0 or not turn.jobs:
            return
        db.execute(Q["promote_scheduled"], (now,))
        for queue in turn.queues if turn.queues is not None else [None]:
            if left <= 0:
                break
            params = {"queue": queue, "now": now, "n": left}
            rows = self._ready(
                db, Q["ready_jobs" if queue is None else "ready_jobs_of_queue"], params, turn.tasks
            )
            if not rows:
                continue
            db.executemany(Q["claim_step"], [(owner, now, r["id"]) for r in rows])
            result.claimed.extend(
                Claimed(
                    r["id"],
                    None,
                    0,
                    r["task"],
                    r["attempt"] + 1,
                    now,
                    args=r["args"],
                    max_attempts=r["max_attempts"],
                    timeout_s=r["timeout_s"],
                    previous_error=r["error"],
                    ready_at=r["ready_at"],
                    role=r["role"],
                )
                for r in rows
            )
            left -= len(rows)

    # -- workers -----------------------------------------------------------------------

    async def register_worker(self, worker: WorkerRecord) -> list[int]:
        with self._write() as db:
            db.execute(
                Q["put_worker"],
                (
                    worker.id,
                    worker.name,
                    json.dumps(worker.queues) if worker.queues is not None else None,
                    worker.concurrency,
                    worker.started_at,
                    worker.expires_at,
                ),
            )
            earlier = [r[0] for r in db.execute(Q["same_name_workers"], (worker.name, worker.id))]
            return self._rescue(db, worker.started_at, earlier) if earlier else []

    async def unregister_worker(self, owner: str, now: float) -> None:
        with self._write() as db:
            self._requeue(db, db.execute(Q["held_by"], (owner,)).fetchall(), now, lost=False, owner=owner)
            db.execute(Q["delete_worker"], (owner,))

    async def heartbeat(self, owner: str, now: float, lease_s: float, held: list[int]) -> Beat:
        with self._write() as db:
            if not db.execute(Q["renew_worker"], (now + lease_s, owner)).rowcount:
                return Beat(lost=True, stop=list(held))
            if not held:
                return Beat()
            rows = db.execute(Q["to_stop"], {"held": json.dumps(held), "owner": owner}).fetchall()
            return Beat(stop=[r[0] for r in rows])

    async def release(self, owner: str, ids: list[int], now: float) -> None:
        if not ids:
            return
        with self._write() as db:
            rows = [r for r in db.execute(Q["held_by"], (owner,)).fetchall() if r["id"] in set(ids)]
            self._requeue(db, rows, now, lost=False, owner=owner)

    async def held(self, owner: str) -> list[int]:
        return [int(r["id"]) for r in self.db.execute(Q["held_by"], (owner,))]

    async def sweep(self, now: float, dead: list[str] | None = None) -> list[int]:
        with self._write() as db:
            rescued = self._rescue(db, now, list(dead or []))
            for row in db.execute(Q["overdue_runs"], (now,)).fetchall():
                self._expire(db, row["id"], now)
            return rescued

    def _rescue(self, db: sqlite3.Connection, now: float, dead: list[str]) -> list[int]:
        """Requeue running attempts whose holder is gone; forget expired workers."""
        dead = dead + [r[0] for r in db.execute(Q["expired_workers"], (now,))]
        rows = db.execute(Q["orphaned_steps"], {"dead": json.dumps(dead), "now": now}).fetchall()
        self._requeue(db, rows, now, lost=True)
        for worker_id in dead:
            db.execute(Q["delete_worker"], (worker_id,))
        return [r["id"] for r in rows]

    def _requeue(
        self,
        db: sqlite3.Connection,
        rows: Sequence[sqlite3.Row],
        now: float,
        *,
        lost: bool,
        owner: str | None = None,
    ) -> None:
        """Running attempts back to the queue: ``lost`` ones are recorded and counted;
        released ones are not. Those of a run that ended (or a job cancelled) are cancelled."""
        counts: dict[str, list[int]] = {}
        # how many attempts each worker held when it was lost: one alone says which job it
        # died running (baton.engine.executor counts those towards the job's attempts)
        held = Counter(r["lease_owner"] for r in rows) if lost else Counter[str | None]()
        for r in rows:
            run_status = r["run_status"]
            stop = run_status in ("cancelled", "failed", "completed") or bool(r["cancel_requested"])
            status = "cancelled" if stop else "ready"
            error = None
            if lost:
                error = "lost: its worker stopped or its lease expired"
                detail = json.dumps({"held": held[r["lease_owner"]]})
                db.execute(
                    Q["insert_attempt"],
                    (r["id"], r["attempt"], "lost", r["started_at"], now, error, r["lease_owner"], detail),
                )
            if stop:
                error = "run cancelled" if run_status == "cancelled" else "cancelled"
            released = 0 if lost else 1
            params = {"status": status, "released": released, "error": error, "now": now, "id": r["id"]}
            db.execute(Q["requeue_step"], params)
            if r["run_id"] is not None:
                c = counts.setdefault(r["run_id"], [0, 0])
                c[0] += 1
                c[1] += 1 if stop else 0
        result = TurnResult()
        for run_id, (running, finished) in counts.items():
            self._count(db, run_id, running, finished, 0, 0, now, result)

    async def list_workers(self) -> list[WorkerRecord]:
        return [worker_from_row(r) for r in self.db.execute(Q["list_workers"])]

    async def watch(self, wake: Callable[[], None]) -> None:
        """SQLite has no notifications: workers poll (and wake each other in-process)."""

    # -- control -----------------------------------------------------------------------

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
                self._cancel_idle(db, run_id, "run cancelled", now)
            return run_from_row(db.execute(Q["get_run_header"], (run_id,)).fetchone())

    async def expire_run(self, run_id: str, now: float) -> bool:
        with self._write() as db:
            return self._expire(db, run_id, now)

    def _expire(self, db: sqlite3.Connection, run_id: str, now: float) -> bool:
        if not db.execute(Q["expire_run"], {"id": run_id, "now": now}).rowcount:
            return False
        row = db.execute(Q["get_run_header"], (run_id,)).fetchone()
        self._cancel_idle(db, run_id, row["error"], now)
        return True

    def _cancel_idle(self, db: sqlite3.Connection, run_id: str, reason: str, now: float) -> None:
        """A run that ended from outside: its steps not running are cancelled, and no longer
        count as unfinished."""
        first, last = self._range(db, run_id)
        cancelled = db.execute(Q["cancel_idle_steps"], (reason, now, first, last)).rowcount
        db.execute(Q["uncount_run"], (cancelled, run_id))

    # -- standalone jobs ---------------------------------------------------------------

    async def enqueue(self, jobs: list[NewJob], now: float) -> list[JobRecord]:
        out: list[JobRecord] = []
        with self._write() as db:
            for job in jobs:
                cur = db.execute(Q["insert_job"], job_params(job, now))
                if cur.rowcount:
                    out.append(job_from_row(db.execute(Q["get_job"], (cur.lastrowid,)).fetchone()))
                else:
                    record = job_from_row(db.execute(Q["job_by_key"], (job.unique_key,)).fetchone())
                    record.duplicate = True
                    out.append(record)
        return out

    def _job(self, job_id: int) -> JobRecord:
        row = self.db.execute(Q["get_job"], (job_id,)).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}")
        return job_from_row(row)

    async def get_job(self, job_id: int) -> JobRecord:
        return self._job(job_id)

    async def list_jobs(
        self, *, state: str | None = None, queue: str | None = None, limit: int = 50
    ) -> list[JobRecord]:
        statuses = json.dumps([STATE_STATUSES[state]]) if state is not None else None
        rows = self.db.execute(
            Q["list_jobs"], {"queue": queue, "statuses": statuses, "limit": limit}
        ).fetchall()
        return [job_from_row(r) for r in rows]

    async def get_job_attempts(self, job_id: int) -> list[AttemptRecord]:
        self._job(job_id)
        return [attempt_from_row(r) for r in self.db.execute(Q["job_attempts"], {"id": job_id})]

    async def retry_job(self, job_id: int, now: float) -> JobRecord:
        with self._write() as db:
            if not db.execute(Q["retry_job"], (now, job_id)).rowcount:
                job = self._job(job_id)
                raise Conflict(
                    f"job {job_id} is {job.state}; only discarded or cancelled jobs can be retried"
                )
        return self._job(job_id)

    async def cancel_job(self, job_id: int, now: float) -> JobRecord:
        with self._write() as db:
            if not (
                db.execute(Q["cancel_idle_job"], (now, job_id)).rowcount
                or db.execute(Q["cancel_running_job"], (job_id,)).rowcount
            ):
                job = self._job(job_id)
                raise Conflict(f"job {job_id} is {job.state}; there is nothing to cancel")
        return self._job(job_id)

    # -- cron --------------------------------------------------------------------------

    async def put_schedule(self, schedule: Schedule) -> None:
        with self._write() as db:
            db.execute(Q["put_schedule"], schedule_params(schedule))

    async def list_schedules(self) -> list[Schedule]:
        return [schedule_from_row(r) for r in self.db.execute(Q["list_schedules"])]

    async def delete_schedule(self, name: str) -> bool:
        with self._write() as db:
            return db.execute(Q["delete_schedule"], (name,)).rowcount == 1

    async def fire_schedule(
        self, name: str, expected_next: float, next_at: float, jobs: list[NewJob], now: float
    ) -> bool:
        with self._write() as db:
            if not db.execute(Q["move_schedule"], (next_at, name, expected_next)).rowcount:
                return False
            for job in jobs:
                db.execute(Q["insert_job"], job_params(job, now))
            return True

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

    async def llm_sources(self, limit: int = 1000) -> list[str]:
        rows = self.db.execute(Q["llm_sources"], {"limit": limit})
        return [str(r["source"]) for r in rows if r["source"] is not None]

    async def cache_get(self, key: str, now: float) -> str | None:
        row = self.db.execute(Q["cache_get"], (key, now)).fetchone()
        return None if row is None else str(row["value"])

    async def cache_put(self, key: str, value: str, now: float, expires_at: float | None) -> None:
        with self._write() as db:
            db.execute(Q["cache_put"], (key, value, now, expires_at))

    # -- API keys ----------------------------------------------------------------------

    async def put_api_key(self, key: ApiKey, secret_hash: str) -> None:
        try:
            with self._write() as db:
                db.execute(Q["put_api_key"], (key.id, secret_hash, key.role, key.name, key.created_at))
        except sqlite3.IntegrityError:
            raise Conflict(f"API key {key.id} exists") from None

    async def api_key_by_hash(self, secret_hash: str) -> ApiKey | None:
        row = self.db.execute(Q["api_key_by_hash"], (secret_hash,)).fetchone()
        return None if row is None else api_key_from_row(row)

    async def list_api_keys(self) -> list[ApiKey]:
        return [api_key_from_row(r) for r in self.db.execute(Q["list_api_keys"])]

    async def revoke_api_key(self, key_id: str, now: float) -> bool:
        with self._write() as db:
            return db.execute(Q["revoke_api_key"], (now, key_id)).rowcount == 1

    async def child_runs(self, run_id: str) -> list[tuple[str, str, RunStatus]]:
        rows = self.db.execute(Q["child_runs"], {"parent": run_id})
        return [(str(r["id"]), str(r["step_id"]), RunStatus(r["status"])) for r in rows]

    async def get_goal(self, run_id: str) -> GoalRecord | None:
        row = self.db.execute(Q["get_goal"], {"run_id": run_id}).fetchone()
        return None if row is None else goal_from_row(row)

    async def list_goals(self, limit: int = 100) -> list[GoalRecord]:
        return [goal_from_row(r) for r in self.db.execute(Q["list_goals"], {"limit": limit})]

    async def goal_done_before(self, request: str) -> GoalRecord | None:
        row = self.db.execute(Q["goal_done_before"], {"request": request}).fetchone()
        return None if row is None else goal_from_row(row)

    async def pending_goals(self, limit: int = 100) -> list[GoalRecord]:
        return [goal_from_row(r) for r in self.db.execute(Q["pending_goals"], {"limit": limit})]

    async def record_outcomes(self, run_id: str, outcomes: list[OutcomeRecord], now: float) -> bool:
        with self._write() as db:
            if db.execute(Q["collect_goal"], {"run_id": run_id, "now": now}).rowcount != 1:
                return False
            if outcomes:
                db.executemany(Q["insert_outcome"], [outcome_params(o) for o in outcomes])
        return True

    async def outcomes(self, task_type: str | None = None, limit: int = 10_000) -> list[OutcomeRecord]:
        rows = self.db.execute(Q["outcomes"], {"task_type": task_type, "limit": limit})
        return [outcome_from_row(r) for r in rows]

    async def queue_depth(self) -> list[tuple[str, str, int]]:
        return [(r["queue"], job_state(r["status"]), r["n"]) for r in self.db.execute(Q["queue_depth"])]

    async def wave_progress(self) -> list[tuple[str, int, int, int]]:
        rows = self.db.execute(Q["wave_progress"])
        return [(r["run_id"], r["wave"], r["steps"], r["finished"]) for r in rows]

    # -- the audit trail ---------------------------------------------------------------

    async def audit_append(
        self, ts: float, actor: str, action: str, subject: str, detail: dict[str, Any]
    ) -> AuditEntry:
        ts = round(ts, 6)
        with self._write() as db:  # BEGIN IMMEDIATE: one writer at a time, so no fork
            row = db.execute(Q["audit_last_hash"]).fetchone()
            prev = row[0] if row is not None else GENESIS
            digest = audit_hash(prev, ts, actor, action, subject, detail, self.audit_key)
            cur = db.execute(
                Q["audit_insert"], (ts, actor, action, subject, json.dumps(detail), prev, digest)
            )
            seq = int(cur.lastrowid or 0)
        return AuditEntry(seq, ts, actor, action, subject, detail, prev, digest)

    async def audit_entries(
        self, *, subject: str | None = None, after: int = 0, limit: int = 1000
    ) -> list[AuditEntry]:
        params = {"subject": subject, "after": after, "limit": limit}
        return [audit_from_row(r) for r in self.db.execute(Q["audit_entries"], params)]

    async def audit_tail(self) -> tuple[int, AuditEntry | None]:
        db = self.db
        count = int(db.execute(Q["audit_count"]).fetchone()[0])
        row = db.execute(Q["audit_newest"]).fetchone()
        return count, audit_from_row(row) if row is not None else None

    # -- retention ---------------------------------------------------------------------

    async def prune(
        self, before: float, statuses: Sequence[RunStatus], *, limit: int = 500, dry_run: bool = False
    ) -> PruneResult:
        runs, jobs = prunable(statuses)
        params = {"before": before, "runs": json.dumps(runs), "jobs": json.dumps(jobs), "limit": limit}
        if dry_run:
            row = self.db.execute(Q["prune_count"], params).fetchone()
            return PruneResult(
                row["runs"], row["steps"], row["jobs"], row["attempts"], row["cache"], row["bytes"]
            )
        result = PruneResult()
        # Short transactions, one each for runs, jobs and the cache: a writer waits for none long.
        if runs:
            with self._write() as db:
                picked = db.execute(Q["prune_pick_runs"], params).fetchall()
                take = whole_runs([r["total_steps"] for r in picked], limit)
                for r in picked[:take]:
                    self._prune_run(db, r, result)
            result.more = take < len(picked) or len(picked) >= limit
        if jobs:
            with self._write() as db:
                gone = db.execute(Q["prune_jobs"], params).fetchall()
                ids = json.dumps([r["id"] for r in gone])
                attempts = db.execute(Q["prune_job_attempts"], {"ids": ids}).fetchall() if gone else []
            result.jobs, result.attempts = len(gone), result.attempts + len(attempts)
            result.bytes += sum(r["size"] for r in (*gone, *attempts))
            result.more = result.more or len(gone) >= limit
        with self._write() as db:
            cache = db.execute(Q["prune_cache"], params).fetchall()
        result.cache, result.bytes = len(cache), result.bytes + sum(r["size"] for r in cache)
        result.more = result.more or len(cache) >= limit
        return result

    @staticmethod
    def _prune_run(db: sqlite3.Connection, row: sqlite3.Row, result: PruneResult) -> None:
        """Delete one ended run and everything of it (its steps are one id range)."""
        span = {"id": row["id"], "first": row["first"], "last": row["last"]}
        if not db.execute(Q["prune_run"], span).fetchall():
            return
        steps = db.execute(Q["prune_run_steps"], span).fetchall()
        attempts = db.execute(Q["prune_run_attempts"], span).fetchall()
        plan = db.execute(Q["prune_run_plan"], span).fetchall()
        db.execute(Q["prune_run_ledger"], span)
        db.execute(Q["prune_run_requests"], span)
        result.runs += 1
        result.steps += len(steps)
        result.attempts += len(attempts)
        result.bytes += sum(r["size"] for r in (*steps, *attempts, *plan))

    async def reclaim(self) -> tuple[int, int] | None:
        """VACUUM (the database is rewritten without its free pages), then a checkpoint that
        moves the rewrite from the WAL into the file and empties the WAL; the file's size
        before and after. (Deleted rows leave free pages in the file, not a smaller file.)"""
        if str(self.path) == ":memory:":
            return None
        before = self.path.stat().st_size
        try:
            self.db.execute(Q["vacuum"])
            self.db.execute(Q["checkpoint"]).fetchall()
        except sqlite3.OperationalError as exc:
            raise StoreError(f"database {self.path}: {exc}") from None
        return before, self.path.stat().st_size
