"""One exception root with stable codes.

Every error a user can see derives from :class:`BatonError`. Each class carries a stable
``code`` (for machines: JSON output, HTTP bodies) and an ``exit_code`` for the CLI, so the
interfaces map errors to exit codes and statuses in one place instead of guessing.
Cancellation, which user code must not swallow, derives from ``BaseException`` as
asyncio's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class BatonError(Exception):
    """Base of every error baton raises on purpose."""

    code = "baton_error"
    exit_code = 1
    http_status = 500

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.code).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class UsageError(BatonError):
    """The request is malformed."""

    code = "usage"
    exit_code = 2
    http_status = 400


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a plan: where (a dotted path into the plan) and what."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message

    def to_dict(self) -> dict[str, str]:
        return {"where": self.where, "message": self.message}


class PlanError(UsageError):
    """The plan is invalid."""

    code = "invalid_plan"
    http_status = 422

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"invalid plan {source}" if source else "invalid plan"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{head}: {len(self.problems)} problem(s)\n{lines}")

    def to_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "message": self.message,
            "problems": [p.to_dict() for p in self.problems],
        }


class UnknownTask(UsageError):
    """No task is registered under that name."""

    code = "unknown_task"


class NotFound(BatonError):
    """The thing asked for does not exist."""

    code = "not_found"
    exit_code = 2
    http_status = 404


class Conflict(BatonError):
    """The request conflicts with the current state (for example an illegal transition)."""

    code = "conflict"
    exit_code = 2
    http_status = 409


class StaleLease(Conflict):
    """A write came from a holder whose lease was taken over; it was rejected."""

    code = "stale_lease"


class TaskFailed(BatonError):
    """A task attempt failed; raised by handlers that want a clean error without a traceback."""

    code = "task_failed"


class StepTimeout(BatonError):
    """A step attempt ran past its timeout."""

    code = "timeout"


class BudgetExceeded(BatonError):
    """A budget would be exceeded."""

    code = "budget_exceeded"
    http_status = 402


class PolicyDenied(BatonError):
    """A policy forbids this action."""

    code = "policy_denied"
    exit_code = 2
    http_status = 403

    def __init__(self, message: str | None = None, problems: Sequence[Problem] = ()) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"{message or 'a policy forbids this action'}{lines}")

    def to_dict(self) -> dict[str, object]:
        doc = super().to_dict()
        if self.problems:
            doc["problems"] = [p.to_dict() for p in self.problems]
        return doc


class StoreError(BatonError):
    """The store cannot be opened or used.

    ``transient`` says whether trying again may succeed (a busy or restarting database, a
    lost connection) or not without someone's help (a full disk, a read-only or corrupt
    file): workers retry the first kind for as long as it lasts and stop on the second.
    """

    code = "store_error"
    exit_code = 2
    http_status = 503

    def __init__(self, message: str | None = None, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class StoreUnavailable(StoreError):
    """The database cannot take a connection for now (too many clients, starting up or
    shutting down, unreachable); the same call may succeed later."""

    code = "store_unavailable"


class WorkerFailed(BatonError):
    """This process's worker stopped on an error it cannot recover from; its jobs go to
    other workers once its lease lapses, or to this one's successor."""

    code = "worker_failed"
    exit_code = 1
    http_status = 503


class Cancelled(BaseException):
    """A run or step was cancelled; derives from BaseException so handlers do not swallow it."""
