"""The Store protocol: the one seam between the engine and persistence.

The engine describes what happened as a :class:`Batch` of guarded transitions and the
store applies it in one transaction. Stores own the status rules (``baton.status``): a
transition from a status that does not allow it, a claim on a run that is not running or
not owned by the claimer, and a write by a holder whose lease was taken over (fenced by
the attempt number) are all rejected, never silently applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from baton.status import RunStatus, StepStatus


@dataclass(slots=True)
class RunRecord:
    id: str
    name: str
    status: RunStatus
    #: the plan in file form; None where a call does not load it (only get_run does).
    plan: dict[str, Any] | None
    created_at: float
    workdir: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None
    lease_expires_at: float | None = None
    error: str | None = None
    total_steps: int = 0


@dataclass(slots=True)
class StepRecord:
    run_id: str
    idx: int
    step_id: str
    task: str
    wave: int
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    #: who runs the current attempt; it holds it under the run's lease.
    lease_owner: str | None = None
    not_before: float | None = None
    output: Any = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(slots=True)
class AttemptRecord:
    run_id: str
    step_id: str
    attempt: int
    status: str  # succeeded | failed | timeout | cancelled | lost
    started_at: float | None
    finished_at: float | None
    error: str | None = None
    owner: str | None = None
    #: what the handler recorded about the attempt (TaskContext.details).
    detail: dict[str, Any] | None = None


@dataclass(slots=True)
class Claim:
    """ready|retrying -> running, as attempt number ``attempt`` held by the batch's owner."""

    idx: int
    attempt: int
    started_at: float


@dataclass(slots=True)
class Finish:
    """running -> succeeded|failed|retrying|cancelled, fenced by ``attempt``.

    ``output`` is JSON text. ``outcome`` is what the attempt record says (it differs from
    the step status when a failed attempt leads to a retry, or when it timed out).
    """

    idx: int
    attempt: int
    status: StepStatus
    outcome: str
    started_at: float
    finished_at: float
    output: str | None = None
    error: str | None = None
    not_before: float | None = None
    detail: str | None = None  # JSON


@dataclass(slots=True)
class Mark:
    """pending -> ready|skipped, or a not-running step -> cancelled."""

    idx: int
    status: StepStatus
    error: str | None = None


@dataclass(slots=True)
class Batch:
    """What one executor turn decided; applied atomically by :meth:`Store.commit`."""

    run_id: str
    owner: str
    finishes: list[Finish] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    run_status: RunStatus | None = None
    run_error: str | None = None
    now: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.finishes or self.marks or self.claims or self.run_status)


@dataclass(slots=True)
class CommitResult:
    """What the store refused; everything else in the batch was applied."""

    rejected_finishes: list[int] = field(default_factory=list)
    rejected_claims: list[int] = field(default_factory=list)
    run_status: RunStatus | None = None
    lost: bool = False  # the batch's owner no longer owns the run


@dataclass(frozen=True, slots=True)
class BudgetClaim:
    """A reservation asked of one budget scope of a run (``run`` or ``step:<id>``)."""

    scope: str
    tokens: int
    usd: float
    limit_tokens: int | None
    limit_usd: float | None


@dataclass(frozen=True, slots=True)
class BudgetSettle:
    """A finished call: its reservation goes, what it really used is spent."""

    scope: str
    reserved_tokens: int
    reserved_usd: float
    tokens: int
    usd: float


@dataclass(slots=True)
class LedgerEntry:
    scope: str
    reserved_tokens: int = 0
    reserved_usd: float = 0.0
    spent_tokens: int = 0
    spent_usd: float = 0.0

    def refusal(self, claim: BudgetClaim) -> str | None:
        """Why ``claim`` does not fit (None when it does)."""
        if claim.limit_tokens is not None:
            used = self.spent_tokens + self.reserved_tokens
            if used + claim.tokens > claim.limit_tokens:
                return (
                    f"{claim.scope} token budget: {used:,} used or reserved + {claim.tokens:,} estimated"
                    f" > {claim.limit_tokens:,}"
                )
        if claim.limit_usd is not None:
            used_usd = self.spent_usd + self.reserved_usd
            if used_usd + claim.usd > claim.limit_usd + 1e-12:
                return (
                    f"{claim.scope} USD budget: ${used_usd:.6f} used or reserved + ${claim.usd:.6f} estimated"
                    f" > ${claim.limit_usd:.6f}"
                )
        return None


class Store(Protocol):
    """Persistence for runs, steps and attempts. Every method is one transaction."""

    url: str

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def create_run(self, run: RunRecord, steps: list[StepRecord]) -> None:
        """Insert a run and all its steps at once."""

    async def get_run(self, run_id: str, *, with_plan: bool = True) -> RunRecord:
        """The run; NotFound if there is none (a unique id prefix is accepted).

        ``with_plan=False`` leaves ``plan`` None: reading a large plan back is not free.
        """

    async def list_runs(self, limit: int = 50, status: RunStatus | None = None) -> list[RunRecord]:
        """Newest first."""

    async def get_steps(self, run_id: str) -> list[StepRecord]:
        """All steps of a run in plan order."""

    async def get_attempts(self, run_id: str) -> list[AttemptRecord]:
        """All finished attempts of a run, oldest first."""

    async def acquire_run(
        self, run_id: str, owner: str, lease_s: float, now: float, *, dead_owner: str | None = None
    ) -> RunRecord:
        """Take ownership of a run to execute it.

        Allowed when the run is pending or running and has no owner, is owned by ``owner``
        already, its owner's lease expired, or its owner is ``dead_owner`` (a holder the
        caller knows is dead, such as a killed process on this host). A pending run becomes
        running. Steps left ``running`` by anyone else (their holder's lease is gone with
        the run's) get a ``lost`` attempt and go back to ready.
        Conflict when someone else holds a live lease or the run cannot execute.
        """

    async def release_run(self, run_id: str, owner: str) -> None:
        """Give up ownership (a paused run, or a worker shutting down).

        Steps still running under the owner's lease lose their holder: whoever acquires
        the run next requeues them, and a late write from the old holder is rejected.
        """

    async def heartbeat(
        self, owner: str, lease_s: float, now: float, run_ids: list[str]
    ) -> dict[str, RunStatus | None]:
        """Renew the owner's leases; the status of each run, or None where it lost ownership."""

    async def commit(self, batch: Batch) -> CommitResult:
        """Apply a batch atomically, skipping (and reporting) every guarded-out write."""

    async def set_run_status(self, run_id: str, status: RunStatus, now: float) -> RunRecord:
        """Pause, resume or cancel from outside; Conflict if the status does not allow it.

        Cancelling marks every step that is not running or finished ``cancelled`` in the
        same transaction; running ones are left to their owner (or to the next acquirer).
        """

    async def orphaned_runs(self, now: float) -> list[str]:
        """Runs that are running but whose owner's lease expired (or that have no owner)."""

    async def budget_reserve(self, run_id: str, claims: list[BudgetClaim]) -> None:
        """Reserve every claim, or none: BudgetExceeded naming the scope that would overspend."""

    async def budget_settle(self, run_id: str, settles: list[BudgetSettle]) -> None:
        """Turn reservations into spend (what the calls really used)."""

    async def budget_ledger(self, run_id: str) -> list[LedgerEntry]:
        """Spent and reserved, per budget scope of the run."""

    async def cache_get(self, key: str, now: float) -> str | None:
        """A cached value that has not expired, or None."""

    async def cache_put(self, key: str, value: str, now: float, expires_at: float | None) -> None:
        """Keep ``value`` under ``key`` (replacing what was there) until ``expires_at``."""
