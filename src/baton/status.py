"""Run and step statuses and the transitions between them.

The tables here are the single source of truth; stores enforce them when they write
(a write whose current status is not an allowed source is rejected, not applied).
"""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _RUN_TERMINAL


class StepStatus(StrEnum):
    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _STEP_TERMINAL


_RUN_TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
_STEP_TERMINAL = frozenset(
    {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.CANCELLED}
)

R, S = RunStatus, StepStatus

#: target status -> statuses a run may be in before it.
RUN_SOURCES: dict[RunStatus, frozenset[RunStatus]] = {
    R.RUNNING: frozenset({R.PENDING, R.PAUSED, R.RUNNING}),
    R.PAUSED: frozenset({R.PENDING, R.RUNNING}),
    R.COMPLETED: frozenset({R.RUNNING}),
    R.FAILED: frozenset({R.RUNNING}),
    R.CANCELLED: frozenset({R.PENDING, R.RUNNING, R.PAUSED}),
}

#: target status -> statuses a step may be in before it.
STEP_SOURCES: dict[StepStatus, frozenset[StepStatus]] = {
    S.READY: frozenset({S.PENDING, S.RUNNING, S.RETRYING}),
    # pending -> running directly when the executor claims a step whose needs just
    # succeeded in the same batch (it would be ready for no observable time).
    S.RUNNING: frozenset({S.PENDING, S.READY, S.RETRYING}),
    S.RETRYING: frozenset({S.RUNNING}),
    S.SUCCEEDED: frozenset({S.RUNNING}),
    S.FAILED: frozenset({S.RUNNING}),
    S.SKIPPED: frozenset({S.PENDING}),
    S.CANCELLED: frozenset({S.PENDING, S.READY, S.RUNNING, S.RETRYING}),
}
