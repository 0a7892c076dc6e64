"""baton: a durable orchestration engine for AI-agent and LLM workloads."""

from baton.engine import Engine, Event, RunHandle
from baton.errors import BatonError, Conflict, NotFound, PlanError, TaskFailed, UsageError
from baton.plan import Plan, Policy, RetryPolicy, Step
from baton.status import RunStatus, StepStatus
from baton.tasks import Registry, TaskContext, task

__version__ = "0.1.0"

__all__ = [
    "BatonError",
    "Conflict",
    "Engine",
    "Event",
    "NotFound",
    "Plan",
    "PlanError",
    "Policy",
    "Registry",
    "RetryPolicy",
    "RunHandle",
    "RunStatus",
    "Step",
    "StepStatus",
    "TaskContext",
    "TaskFailed",
    "UsageError",
    "task",
]
