"""What runs, steps, attempts and jobs look like from outside: `baton ... --json` and the
REST API give the same shapes (pydantic models, so the API's OpenAPI document has them)."""

from __future__ import annotations

import math
import time
from collections import Counter
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

from baton.status import StepStatus
from baton.store import ApiKey, AttemptRecord, AuditEntry, JobRecord, RunRecord, StepRecord


def iso(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC, to the microsecond: ``2026-11-21T08:02:14.110950+00:00``.

    Views of a run format many times from the same few seconds, so the date and time of day
    are kept per second; the fraction is added each time.
    """
    if ts is None:
        return None
    whole = math.floor(ts)
    micro = round((ts - whole) * 1_000_000)
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    return f"{_second(whole)}.{micro:06d}+00:00"


@lru_cache(maxsize=4096)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def seconds(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)


class RunView(BaseModel):
    id: str
    name: str
    status: str
    error: str | None
    total_steps: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    running: int

    @classmethod
    def of(cls, run: RunRecord) -> RunView:
        return cls(**cls.fields(run))

    @staticmethod
    def fields(run: RunRecord) -> dict[str, Any]:
        """The view's fields, for models that extend it (a run with its steps)."""
        return {
            "id": run.id,
            "name": run.name,
            "status": str(run.status),
            "error": run.error,
            "total_steps": run.total_steps,
            "created_at": iso(run.created_at),
            "started_at": iso(run.started_at),
            "finished_at": iso(run.finished_at),
            "duration_s": seconds(run.started_at, run.finished_at),
            "running": run.running,
        }


class StepView(BaseModel):
    id: str
    task: str
    wave: int
    status: str
    attempts: int
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    error: str | None
    output: Any = None

    @classmethod
    def of(cls, step: StepRecord) -> StepView:
        return cls(**cls.fields(step))

    @staticmethod
    def fields(step: StepRecord) -> dict[str, Any]:
        """The view's fields, for models that extend it (a step with its attempts)."""
        return {
            "id": step.step_id,
            "task": step.task,
            "wave": step.wave,
            "status": str(step.status),
            "attempts": step.attempt,
            "started_at": iso(step.started_at),
            "finished_at": iso(step.finished_at),
            "duration_s": seconds(step.started_at, step.finished_at),
            "error": step.error,
            "output": step.output,
        }


class RunDetail(RunView):
    """A run with its steps: what ``GET /runs/{id}``, NATS ``runs.get`` and ``baton show
    --json`` give."""

    steps: list[StepView]


def run_detail(run: RunRecord, steps: list[StepRecord]) -> dict[str, Any]:
    """A RunDetail as plain data, built without the models: views that are polled often
    are serialized from this as they are."""
    return {**RunView.fields(run), "steps": [StepView.fields(s) for s in steps]}


class AttemptView(BaseModel):
    step: str
    attempt: int
    status: str
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    error: str | None
    #: the worker that ran it
    worker: str | None
    #: what the attempt recorded (a model call: prompt, answer, tokens, cost...)
    detail: dict[str, Any] | None = None

    @classmethod
    def of(cls, attempt: AttemptRecord) -> AttemptView:
        return cls(
            step=attempt.step_id,
            attempt=attempt.attempt,
            status=attempt.status,
            started_at=iso(attempt.started_at),
            finished_at=iso(attempt.finished_at),
            duration_s=seconds(attempt.started_at, attempt.finished_at),
            error=attempt.error,
            worker=attempt.owner,
            detail=attempt.detail,
        )


class JobView(BaseModel):
    id: int
    task: str
    queue: str
    state: str
    priority: int
    attempt: int
    max_attempts: int
    run_at: str | None
    unique_key: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    args: dict[str, Any]
    output: Any = None
    error: str | None
    worker: str | None
    #: an enqueue found this job already there under its unique key
    duplicate: bool = False

    @classmethod
    def of(cls, job: JobRecord) -> JobView:
        return cls(
            id=job.id,
            task=job.task,
            queue=job.queue,
            state=job.state,
            priority=job.priority,
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            run_at=iso(job.run_at),
            unique_key=job.unique_key,
            created_at=iso(job.created_at),
            started_at=iso(job.started_at),
            finished_at=iso(job.finished_at),
            args=job.args,
            output=job.output,
            error=job.error,
            worker=job.lease_owner,
            duplicate=job.duplicate,
        )


class ProgressView(BaseModel):
    """Where a run stands: how much is done, what runs now, what it cost, when it ends."""

    id: str
    status: str
    total_steps: int
    #: steps finished for good (succeeded, failed, skipped, cancelled), in percent
    percent: float
    counts: dict[str, int]
    #: the waves that have steps not finished yet (the lowest first)
    current_waves: list[int]
    waves: int
    cost_usd: float
    elapsed_s: float | None
    #: the time left at the pace so far (None before a step finished, or once it ended)
    eta_s: float | None

    @classmethod
    def of(cls, run: RunRecord, steps: list[StepRecord], cost_usd: float, now: float) -> ProgressView:
        counts = Counter(str(s.status) for s in steps)
        finished = sum(1 for s in steps if s.status.terminal)
        open_waves = sorted({s.wave for s in steps if not s.status.terminal})
        elapsed = None if run.started_at is None else (run.finished_at or now) - run.started_at
        eta = None
        if elapsed is not None and finished and not run.status.terminal and finished < len(steps):
            eta = elapsed / finished * (len(steps) - finished)
        return cls(
            id=run.id,
            status=str(run.status),
            total_steps=len(steps),
            percent=round(100.0 * finished / len(steps), 2) if steps else 100.0,
            counts={str(status): counts.get(str(status), 0) for status in StepStatus},
            current_waves=open_waves,
            waves=max((s.wave for s in steps), default=-1) + 1,
            cost_usd=round(cost_usd, 6),
            elapsed_s=elapsed,
            eta_s=eta,
        )


class KeyView(BaseModel):
    """An API key as lists show it (never its secret)."""

    id: str
    role: str
    name: str
    created_at: str | None
    revoked_at: str | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyView:
        return cls(
            id=key.id,
            role=key.role,
            name=key.name,
            created_at=iso(key.created_at),
            revoked_at=iso(key.revoked_at),
        )


class AuditView(BaseModel):
    """One entry of the audit trail."""

    seq: int
    at: str | None
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]
    hash: str

    @classmethod
    def of(cls, e: AuditEntry) -> AuditView:
        return cls(
            seq=e.seq,
            at=iso(e.ts),
            actor=e.actor,
            action=e.action,
            subject=e.subject,
            detail=e.detail,
            hash=e.hash,
        )


def run_cost(attempts: list[AttemptRecord]) -> float:
    """What a run's model calls cost so far (the attempts' recorded cost)."""
    total = 0.0
    for attempt in attempts:
        cost = (attempt.detail or {}).get("cost_usd")
        if isinstance(cost, int | float):
            total += cost
    return total


__all__ = [
    "AttemptView",
    "AuditView",
    "JobView",
    "KeyView",
    "ProgressView",
    "RunView",
    "StepView",
    "iso",
    "run_cost",
    "seconds",
]
