"""What the SQL stores share: named queries and migrations kept in .sql files, and rows
turned into records."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Protocol

from baton.status import RunStatus, StepStatus
from baton.store.base import AttemptRecord, RunRecord, StepRecord


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
        "plan": json.dumps(run.plan),
        "workdir": run.workdir,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "owner": run.owner,
        "lease_expires_at": run.lease_expires_at,
        "error": run.error,
        "total_steps": run.total_steps,
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
        owner=row["owner"],
        lease_expires_at=row["lease_expires_at"],
        error=row["error"],
        total_steps=row["total_steps"],
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
    )
