"""The in-memory store: same rules as the durable ones, nothing kept.

For tests (ours and users') and for throwaway runs. Every method runs without awaiting,
so each is atomic with respect to the event loop.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

from baton.errors import BudgetExceeded, Conflict, NotFound
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


class MemoryStore:
    """Store kept in dictionaries of this process."""

    def __init__(self) -> None:
        self.url = "memory://"
        self._runs: dict[str, RunRecord] = {}
        self._steps: dict[str, list[StepRecord]] = {}
        self._attempts: dict[str, list[AttemptRecord]] = {}
        self._cache: dict[str, tuple[str, float | None]] = {}
        self._ledger: dict[tuple[str, str], LedgerEntry] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _resolve(self, run_id: str) -> RunRecord:
        if run_id in self._runs:
            return self._runs[run_id]
        matches = [r for key, r in self._runs.items() if run_id and key.startswith(run_id)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise NotFound(f"run id prefix {run_id!r} is ambiguous")
        raise NotFound(f"no run {run_id!r}")

    async def create_run(self, run: RunRecord, steps: list[StepRecord]) -> None:
        if run.id in self._runs:
            raise Conflict(f"run {run.id} exists")
        self._runs[run.id] = replace(run, plan=copy.deepcopy(run.plan))
        self._steps[run.id] = [replace(s) for s in steps]
        self._attempts[run.id] = []

    async def get_run(self, run_id: str, *, with_plan: bool = True) -> RunRecord:
        run = self._resolve(run_id)
        return replace(run) if with_plan else replace(run, plan=None)

    async def list_runs(self, limit: int = 50, status: RunStatus | None = None) -> list[RunRecord]:
        runs = [r for r in self._runs.values() if status is None or r.status is status]
        runs.sort(key=lambda r: r.created_at, reverse=True)
        return [replace(r, plan=None) for r in runs[:limit]]

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        return [replace(s) for s in self._steps[self._resolve(run_id).id]]

    async def get_attempts(self, run_id: str) -> list[AttemptRecord]:
        attempts = self._attempts[self._resolve(run_id).id]
        return [replace(a) for a in sorted(attempts, key=lambda a: a.finished_at or 0.0)]

    async def acquire_run(
        self, run_id: str, owner: str, lease_s: float, now: float, *, dead_owner: str | None = None
    ) -> RunRecord:
        run = self._resolve(run_id)
        if run.status not in (RunStatus.PENDING, RunStatus.RUNNING):
            raise Conflict(f"run {run.id} is {run.status}; it cannot be executed")
        live = run.owner not in (None, owner, dead_owner) and (run.lease_expires_at or 0.0) >= now
        if live:
            raise Conflict(f"run {run.id} is being executed by {run.owner}")
        run.owner, run.lease_expires_at = owner, now + lease_s
        run.status = RunStatus.RUNNING
        run.started_at = run.started_at or now
        for step in self._steps[run.id]:
            if step.status is StepStatus.RUNNING and step.lease_owner != owner:
                self._attempts[run.id].append(
                    AttemptRecord(
                        run.id,
                        step.step_id,
                        step.attempt,
                        "lost",
                        step.started_at,
                        now,
                        "lost: its worker stopped or its lease expired",
                        step.lease_owner,
                    )
                )
                step.status, step.lease_owner = StepStatus.READY, None
        return replace(run, plan=None)

    async def release_run(self, run_id: str, owner: str) -> None:
        run = self._resolve(run_id)
        if run.owner == owner:
            run.owner = run.lease_expires_at = None
            for step in self._steps[run.id]:
                if step.status is StepStatus.RUNNING and step.lease_owner == owner:
                    step.lease_owner = None

    async def heartbeat(
        self, owner: str, lease_s: float, now: float, run_ids: list[str]
    ) -> dict[str, RunStatus | None]:
        for run in self._runs.values():
            if run.owner == owner:
                run.lease_expires_at = now + lease_s
        out: dict[str, RunStatus | None] = {}
        for run_id in run_ids:
            held = self._runs.get(run_id)
            out[run_id] = held.status if held is not None and held.owner == owner else None
        return out

    async def budget_reserve(self, run_id: str, claims: list[BudgetClaim]) -> None:
        entries = [self._ledger.setdefault((run_id, c.scope), LedgerEntry(c.scope)) for c in claims]
        for entry, claim in zip(entries, claims, strict=True):
            refusal = entry.refusal(claim)
            if refusal is not None:
                raise BudgetExceeded(refusal)
        for entry, claim in zip(entries, claims, strict=True):
            entry.reserved_tokens += claim.tokens
            entry.reserved_usd += claim.usd

    async def budget_settle(self, run_id: str, settles: list[BudgetSettle]) -> None:
        for s in settles:
            entry = self._ledger.setdefault((run_id, s.scope), LedgerEntry(s.scope))
            entry.reserved_tokens = max(0, entry.reserved_tokens - s.reserved_tokens)
            entry.reserved_usd = max(0.0, entry.reserved_usd - s.reserved_usd)
            entry.spent_tokens += s.tokens
            entry.spent_usd += s.usd

    async def budget_ledger(self, run_id: str) -> list[LedgerEntry]:
        return [replace(e) for (rid, _), e in sorted(self._ledger.items()) if rid == run_id]

    async def cache_get(self, key: str, now: float) -> str | None:
        entry = self._cache.get(key)
        if entry is None or (entry[1] is not None and entry[1] < now):
            return None
        return entry[0]

    async def cache_put(self, key: str, value: str, now: float, expires_at: float | None) -> None:
        self._cache[key] = (value, expires_at)

    async def orphaned_runs(self, now: float) -> list[str]:
        return [
            r.id
            for r in sorted(self._runs.values(), key=lambda r: r.created_at)
            if r.status is RunStatus.RUNNING and (r.owner is None or (r.lease_expires_at or 0.0) < now)
        ]

    async def commit(self, batch: Batch) -> CommitResult:
        run = self._runs.get(batch.run_id)
        if run is None:
            raise NotFound(f"no run {batch.run_id!r}")
        result = CommitResult(run_status=run.status)
        if run.owner != batch.owner:
            result.lost = True
            result.rejected_finishes = [f.idx for f in batch.finishes]
            result.rejected_claims = [c.idx for c in batch.claims]
            return result
        steps = self._steps[run.id]
        for f in batch.finishes:
            s = steps[f.idx]
            if s.status is not StepStatus.RUNNING or s.attempt != f.attempt or s.lease_owner != batch.owner:
                result.rejected_finishes.append(f.idx)
                continue
            s.status, s.error, s.finished_at, s.not_before = f.status, f.error, f.finished_at, f.not_before
            s.output = json.loads(f.output) if f.output is not None else None
            s.lease_owner = None
            self._attempts[run.id].append(
                AttemptRecord(
                    run.id,
                    s.step_id,
                    f.attempt,
                    f.outcome,
                    f.started_at,
                    f.finished_at,
                    f.error,
                    batch.owner,
                    json.loads(f.detail) if f.detail is not None else None,
                )
            )
        for m in batch.marks:
            s = steps[m.idx]
            if s.status in STEP_SOURCES[m.status]:
                s.status = m.status
                s.error = m.error if m.error is not None else s.error
                if m.status.terminal:
                    s.finished_at = batch.now
        for c in batch.claims:
            s = steps[c.idx]
            if (
                run.status is not RunStatus.RUNNING
                or s.status not in STEP_SOURCES[StepStatus.RUNNING]
                or s.attempt != c.attempt - 1
            ):
                result.rejected_claims.append(c.idx)
                continue
            s.status, s.attempt, s.started_at = StepStatus.RUNNING, c.attempt, c.started_at
            s.lease_owner = batch.owner
            s.finished_at = s.not_before = None
        if batch.run_status is not None and run.status in RUN_SOURCES[batch.run_status]:
            self._set(run, batch.run_status, batch.now, batch.run_error)
        result.run_status = run.status
        return result

    @staticmethod
    def _set(run: RunRecord, status: RunStatus, now: float, error: str | None) -> None:
        run.status = status
        run.error = error if error is not None else run.error
        if status.terminal:
            run.finished_at = now

    async def set_run_status(self, run_id: str, status: RunStatus, now: float) -> RunRecord:
        run = self._resolve(run_id)
        if run.status is not status:
            if run.status not in RUN_SOURCES[status]:
                raise Conflict(f"run {run.id} is {run.status}; it cannot become {status}")
            self._set(run, status, now, None)
        if status is RunStatus.CANCELLED:
            owner_alive = run.owner is not None and (run.lease_expires_at or 0.0) >= now
            for s in self._steps[run.id]:
                idle = s.status in (StepStatus.PENDING, StepStatus.READY, StepStatus.RETRYING)
                if idle or (s.status is StepStatus.RUNNING and not owner_alive):
                    s.status, s.error, s.finished_at = StepStatus.CANCELLED, "run cancelled", now
                    s.lease_owner = None
        return replace(run, plan=None)
