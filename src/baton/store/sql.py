"""What the SQL stores share: named queries and migrations kept in .sql files, and rows
turned into records."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Protocol

from baton.status import RunStatus, StepStatus
from baton.store.base import (
    ApiKey,
    AttemptRecord,
    AuditEntry,
    GoalRecord,
    JobRecord,
    OutcomeRecord,
    RunRecord,
    Schedule,
    StepRecord,
    WorkerRecord,
)


def load_queries(package: str) -> dict[str, str]:
    """The blocks of ``queries.sql`` in ``package``, each starting ``-- name: <name>``."""
    text = resources.files(package).joinpath("queries.sql").read_text(encoding="utf-8")
    queries: dict[str, str] = {}
    name = None
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = line.split(":", 1)[1].strip(), []
        elif name is not None and not line.startswith("--"):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


def load_migrations(package: str) -> list[tuple[int, list[str]]]:
    """``migrations/NNNN_name.sql`` of ``package`` in order, each as its statements."""
    folder = resources.files(package).joinpath("migrations")
    found: list[tuple[int, list[str]]] = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            script = entry.read_text(encoding="utf-8")
            code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("--"))
            statements = [s.strip() for s in code.split(";") if s.strip()]
            found.append((int(entry.name.split("_", 1)[0]), statements))
    return sorted(found)


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def attempt_from_row(row: Row) -> AttemptRecord:
    detail = row["detail"]
    return AttemptRecord(
        run_id=row["run_id"],
        step_id=row["step_id"],
        attempt=row["attempt"],
        status=row["status"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        owner=row["owner"],
        detail=json.loads(detail) if detail is not None else None,
    )


def run_params(run: RunRecord) -> dict[str, Any]:
    """A run as the named parameters of the stores' ``insert_run`` queries."""
    return {
        "id": run.id,
        "name": run.name,
        "status": str(run.status),
        "plan": json.dumps(run.plan, ensure_ascii=False),  # a lone surrogate cannot be kept
        "workdir": run.workdir,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "error": run.error,
        "total_steps": run.total_steps,
        "max_parallel": run.max_parallel,
        "barrier": run.barrier,
        "run_timeout_s": run.run_timeout_s,
        "queue": run.queue,
        "unfinished": run.total_steps,
    }


def run_from_row(row: Row) -> RunRecord:
    plan = row["plan"]
    return RunRecord(
        id=row["id"],
        name=row["name"],
        status=RunStatus(row["status"]),
        plan=json.loads(plan) if plan is not None else None,
        created_at=row["created_at"],
        workdir=row["workdir"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        total_steps=row["total_steps"],
        max_parallel=row["max_parallel"],
        barrier=bool(row["barrier"]),
        run_timeout_s=row["run_timeout_s"],
        queue=row["queue"],
        running=row["running"],
        unfinished=row["unfinished"],
    )


def step_from_row(row: Row) -> StepRecord:
    output = row["output"]
    return StepRecord(
        run_id=row["run_id"],
        idx=row["idx"],
        step_id=row["step_id"],
        task=row["task"],
        wave=row["wave"],
        status=StepStatus(row["status"]),
        attempt=row["attempt"],
        lease_owner=row["lease_owner"],
        not_before=row["not_before"],
        output=json.loads(output) if output is not None else None,
        error=row["error"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        waiting=row["waiting"],
        rank=row["rank"],
        id=row["id"],
    )


#: a job's state (the job-queue words) from its row's status.
JOB_STATES = {
    "ready": "available",
    "running": "running",
    "retrying": "retryable",
    "succeeded": "completed",
    "failed": "discarded",
    "cancelled": "cancelled",
    "pending": "scheduled",
}
#: the statuses a job state covers (for listing by state).
STATE_STATUSES = {state: status for status, state in JOB_STATES.items()}


def job_state(status: str) -> str:
    return JOB_STATES.get(status, status)


def job_from_row(row: Row) -> JobRecord:
    output, args = row["output"], row["args"]
    return JobRecord(
        id=row["id"],
        queue=row["queue"],
        task=row["task"],
        args=json.loads(args) if args else {},
        state=job_state(row["status"]),
        priority=row["priority"],
        attempt=row["attempt"],
        max_attempts=row["max_attempts"] + row["attempt_base"],
        run_at=row["not_before"],
        unique_key=row["unique_key"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        output=json.loads(output) if output is not None else None,
        error=row["error"],
        lease_owner=row["lease_owner"],
        timeout_s=row["timeout_s"],
    )


def job_params(job: Any, now: float) -> dict[str, Any]:
    """A NewJob as the named parameters of ``insert_job``."""
    scheduled = job.run_at is not None and job.run_at > now
    return {
        "task": job.task,
        "status": "pending" if scheduled else "ready",
        "queue": job.queue,
        "priority": job.priority,
        "args": json.dumps(job.args),
        "max_attempts": job.max_attempts,
        "timeout_s": job.timeout_s,
        "unique_key": job.unique_key,
        "role": job.role,
        "run_at": job.run_at if scheduled else None,
        "now": now,
    }


def schedule_params(s: Schedule) -> dict[str, Any]:
    return {
        "name": s.name,
        "task": s.task,
        "cron": s.cron,
        "args": json.dumps(s.args),
        "queue": s.queue,
        "priority": s.priority,
        "max_attempts": s.max_attempts,
        "timeout_s": s.timeout_s,
        "catch_up_s": s.catch_up_s,
        "next_at": s.next_at,
    }


def schedule_from_row(row: Row) -> Schedule:
    return Schedule(
        name=row["name"],
        task=row["task"],
        cron=row["cron"],
        args=json.loads(row["args"]),
        queue=row["queue"],
        priority=row["priority"],
        max_attempts=row["max_attempts"],
        timeout_s=row["timeout_s"],
        catch_up_s=row["catch_up_s"],
        next_at=row["next_at"],
    )


def worker_from_row(row: Row) -> WorkerRecord:
    queues = row["queues"]
    return WorkerRecord(
        id=row["id"],
        name=row["name"],
        queues=json.loads(queues) if queues else None,
        concurrency=row["concurrency"],
        started_at=row["started_at"],
        expires_at=row["expires_at"],
        running=row["running"],
    )


def api_key_from_row(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        role=row["role"],
        name=row["name"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def audit_from_row(row: Row) -> AuditEntry:
    return AuditEntry(
        seq=row["seq"],
        ts=row["ts"],
        actor=row["actor"],
        action=row["action"],
        subject=row["subject"],
        detail=json.loads(row["detail"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def goal_params(goal: GoalRecord) -> dict[str, Any]:
    return {
        "run_id": goal.run_id,
        "text": goal.text,
        "request": goal.request,
        "task_type": goal.task_type,
        "language": goal.language,
        "complexity": goal.complexity,
        "method": goal.method,
        "confidence": goal.confidence,
        "template_id": goal.template_id,
        "selection": json.dumps(goal.selection),
        "created_at": goal.created_at,
    }


def goal_from_row(row: Row) -> GoalRecord:
    return GoalRecord(
        run_id=row["run_id"],
        text=row["text"],
        task_type=row["task_type"],
        template_id=row["template_id"],
        created_at=row["created_at"],
        language=row["language"],
        complexity=row["complexity"],
        method=row["method"],
        confidence=row["confidence"],
        selection=json.loads(row["selection"]),
        collected_at=row["collected_at"],
        request=row["request"],
    )


def outcome_params(outcome: OutcomeRecord) -> dict[str, Any]:
    return {
        "run_id": outcome.run_id,
        "step_id": outcome.step_id,
        "template_id": outcome.template_id,
        "task_type": outcome.task_type,
        "language": outcome.language,
        "success": outcome.success,
        "quality": outcome.quality,
        "time_s": outcome.time_s,
        "cost_usd": outcome.cost_usd,
        "method": outcome.method,
        "recorded_at": outcome.recorded_at,
    }


def outcome_from_row(row: Row) -> OutcomeRecord:
    return OutcomeRecord(
        run_id=row["run_id"],
        step_id=row["step_id"],
        template_id=row["template_id"],
        task_type=row["task_type"],
        language=row["language"],
        success=bool(row["success"]),
        quality=row["quality"],
        time_s=row["time_s"],
        cost_usd=row["cost_usd"],
        method=row["method"],
        recorded_at=row["recorded_at"],
    )
