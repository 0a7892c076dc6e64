"""The Store protocol: the one seam between the engine and persistence.

The store is the queue. Every job is a row of it: a step of a run, or a standalone task
call (enqueued, scheduled, or a cron tick). Workers, in any number of processes, describe
one turn (what finished, how many new attempts they can start) as a :class:`Turn`, and
the store applies it in one transaction: the finishes, the dependents they make ready or
skipped, the ends of runs, and the claims. The database is the truth; a worker holds
nothing but the attempts it runs, under its worker lease.

Stores own the status rules (``baton.status``): a write from a status that does not
allow it, and a finish by a holder who lost the job (fenced by holder and attempt
number) are rejected, never silently applied.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from baton.errors import UsageError
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
    error: str | None = None
    total_steps: int = 0
    #: at most this many of the run's steps run at once, whichever workers run them.
    max_parallel: int = 8
    #: ``barrier: wave``: a step starts only once every earlier wave has finished.
    barrier: bool = False
    run_timeout_s: float | None = None
    queue: str = "default"
    #: steps running now and steps not finished yet (kept by the store as steps move).
    running: int = 0
    unfinished: int = 0


@dataclass(slots=True)
class StepRecord:
    """A step of a run, or (``run_id`` None) a standalone job: both are jobs in one queue."""

    run_id: str | None
    idx: int
    step_id: str
    task: str
    wave: int = 0
    status: StepStatus = StepStatus.PENDING
    attempt: int = 0
    #: the worker running the current attempt; it holds it under its worker lease.
    lease_owner: str | None = None
    #: not claimable before this time (a retry's backoff, a job's run_at).
    not_before: float | None = None
    output: Any = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    #: needs not yet succeeded; the step becomes ready when this reaches 0.
    waiting: int = 0
    #: the longest remaining (estimated) path from here: among ready steps, higher first.
    rank: float = 0.0
    #: the job's id in the queue (assigned by the store).
    id: int = 0


@dataclass(slots=True)
class AttemptRecord:
    run_id: str | None
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
class JobRecord:
    """A standalone job (an enqueued or scheduled task call, or a cron tick)."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    state: str  # available | scheduled | running | retryable | completed | discarded | cancelled
    priority: int
    attempt: int
    max_attempts: int
    run_at: float | None
    unique_key: str | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    output: Any = None
    error: str | None = None
    lease_owner: str | None = None
    timeout_s: float | None = None
    #: True when an enqueue found this job already there under its unique key.
    duplicate: bool = False


@dataclass(slots=True)
class NewJob:
    task: str
    args: dict[str, Any]
    queue: str = "default"
    priority: int = 0
    run_at: float | None = None
    unique_key: str | None = None
    max_attempts: int = 3
    timeout_s: float | None = None
    #: the step role it runs under (baton.policy): an API key holder's job is confined
    role: str | None = None


@dataclass(slots=True)
class Claimed:
    """A job a worker now holds: attempt number ``attempt`` of it is starting."""

    id: int
    run_id: str | None
    idx: int
    task: str
    attempt: int
    started_at: float
    #: a standalone job's inputs (JSON); a run's steps take theirs from the plan.
    args: str | None = None
    max_attempts: int = 1
    timeout_s: float | None = None
    #: why the previous attempt failed (fed back to the next one).
    previous_error: str | None = None
    #: since when it could have started: made, due, unblocked, requeued or its backoff over
    ready_at: float | None = None
    #: a standalone job's step role, when an API key holder enqueued it (it runs confined)
    role: str | None = None


@dataclass(slots=True)
class Done:
    """A finished attempt: running -> succeeded|failed|retrying|cancelled, fenced by
    ``attempt`` and the holder.

    ``output`` is JSON text; ``outcome`` is what the attempt record says (it differs from
    the status when a failed attempt leads to a retry, or when it timed out). ``unblocks``
    are the dependents whose needs it counts towards (on success), ``skips`` every step
    downstream of it (on failure), both as step indexes of the same run, so a worker that
    finishes a step marks what it makes ready or skipped in the same transaction.
    """

    id: int
    run_id: str | None
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
    unblocks: list[int] = field(default_factory=list)
    skips: list[int] = field(default_factory=list)
    skip_reason: str | None = None
    #: the task it ran (for events; the store does not need it)
    task: str = ""


@dataclass(slots=True)
class Turn:
    """One worker turn: what finished, and how many new attempts it can start."""

    owner: str
    now: float
    done: list[Done] = field(default_factory=list)
    claim: int = 0
    queues: list[str] | None = None  # None: every queue
    tasks: list[str] | None = None  # the tasks this worker can run; None: any
    #: also look at standalone and scheduled jobs (a worker busy with a run's steps asks
    #: for them only now and then, so steps do not pay for queries that find nothing).
    jobs: bool = True
    #: report the steps the turn made ready or skipped (for events).
    report: bool = True
    #: make sure the worker's lease holds before claiming. A worker asks now and then, not
    #: every turn: its heartbeat learns of a lapse too, and what a lapsed worker claims
    #: meanwhile is rescued by the next sweep (its late finishes are refused).
    check_lease: bool = True


@dataclass(slots=True)
class TurnResult:
    #: ids of finished attempts the store refused (the holder lost the job).
    rejected: list[int] = field(default_factory=list)
    claimed: list[Claimed] = field(default_factory=list)
    #: runs this turn brought to their end, with the status they ended in.
    ended: dict[str, RunStatus] = field(default_factory=dict)
    #: the worker's lease lapsed (others took its jobs over): it claimed nothing.
    lost: bool = False
    #: steps this turn marked ready or skipped: (run id, step index, status).
    marked: list[tuple[str, int, StepStatus]] = field(default_factory=list)
    #: True when the turn made work claimable that it did not claim itself (set by stores
    #: that tell other workers, as PostgreSQL does with NOTIFY; SQLite workers poll).
    left_ready: bool = False


@dataclass(slots=True)
class Beat:
    """A heartbeat's answer: ``lost`` when the worker's lease was taken over (everything
    it holds belongs to others now); ``stop`` the held jobs it must cancel (their run was
    cancelled or timed out, or the job was cancelled)."""

    lost: bool = False
    stop: list[int] = field(default_factory=list)


@dataclass(slots=True)
class WorkerRecord:
    id: str
    name: str
    queues: list[str] | None
    concurrency: int
    started_at: float
    expires_at: float
    running: int = 0


@dataclass(slots=True)
class Schedule:
    """A cron schedule: one job of ``task`` per tick of ``cron`` (UTC)."""

    name: str
    task: str
    cron: str
    args: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    max_attempts: int = 3
    timeout_s: float | None = None
    #: ticks missed by at most this much still fire when the schedulers come back; older
    #: ones are dropped (no burst after downtime).
    catch_up_s: float = 0.0
    next_at: float = 0.0


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


@dataclass(slots=True)
class ApiKey:
    """An API key as the store keeps it: never the secret, only its hash."""

    id: str  # public: shown in lists and in the audit trail
    role: str  # admin | operator | viewer
    name: str
    created_at: float
    revoked_at: float | None = None


@dataclass(slots=True)
class AuditEntry:
    """One entry of the audit trail, chained to the one before by hash."""

    seq: int
    ts: float
    actor: str  # key:<id>, cli:<user>@<host>, system, unauthenticated
    action: str  # run.pause, key.create, denied, run.completed...
    subject: str  # what it is about: a run id, a key id, a path
    detail: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass(slots=True)
class GoalRecord:
    """A goal carried out as a run: what it was, how it was read, the template chosen (and
    the draw that chose it, so that recovery never chooses again)."""

    run_id: str
    text: str
    task_type: str
    template_id: str
    created_at: float
    language: str | None = None
    complexity: str | None = None
    #: how the task type was found: rules, prototypes or fallback
    method: str = "rules"
    confidence: float = 0.0
    #: the selection: seed, candidates with their posteriors and draws, the level chosen
    selection: dict[str, Any] = field(default_factory=dict)
    #: set once the outcomes of its sub-tasks are recorded (exactly once)
    collected_at: float | None = None
    #: the request's fingerprint: the same goal asked again has the same
    request: str = ""


@dataclass(slots=True)
class OutcomeRecord:
    """How one sub-task of a goal went: what template selection learns from."""

    run_id: str
    step_id: str
    template_id: str
    task_type: str
    language: str | None
    success: bool
    #: 0..1: validators first, then the documented heuristic (baton.agents.quality)
    quality: float
    time_s: float
    cost_usd: float
    #: what answered: autonomous, cached, llm, fallback (or the task, for other steps)
    method: str
    recorded_at: float


@dataclass(slots=True)
class PruneResult:
    """What a prune removed (or, dry, would remove): finished runs with everything of theirs,
    finished standalone jobs, expired cache entries."""

    runs: int = 0
    #: the steps of those runs
    steps: int = 0
    #: standalone jobs (completed, discarded or cancelled)
    jobs: int = 0
    #: attempt records of both (a plain success has none: its step row is its record)
    attempts: int = 0
    #: cache entries that had expired before the cutoff
    cache: int = 0
    #: the text they held (plans, inputs, outputs, errors, attempt details), in bytes
    bytes: int = 0
    #: a batch stopped at its limit: there may be more to prune
    more: bool = False

    @property
    def removed(self) -> int:
        """Runs, jobs and cache entries: zero when there was nothing to prune."""
        return self.runs + self.jobs + self.cache

    def add(self, other: PruneResult) -> None:
        """Count another batch in (``more`` becomes the other's)."""
        self.runs += other.runs
        self.steps += other.steps
        self.jobs += other.jobs
        self.attempts += other.attempts
        self.cache += other.cache
        self.bytes += other.bytes
        self.more = other.more

    def counts(self) -> dict[str, int]:
        return {
            "runs": self.runs,
            "steps": self.steps,
            "jobs": self.jobs,
            "attempts": self.attempts,
            "cache": self.cache,
            "bytes": self.bytes,
        }


#: the statuses a prune may remove: a run's end, and the status of a standalone job that
#: ended the same way (completed, discarded, cancelled). Never a run or job under way.
PRUNABLE: dict[RunStatus, StepStatus] = {
    RunStatus.COMPLETED: StepStatus.SUCCEEDED,
    RunStatus.FAILED: StepStatus.FAILED,
    RunStatus.CANCELLED: StepStatus.CANCELLED,
}


def prunable(statuses: Iterable[RunStatus]) -> tuple[list[str], list[str]]:
    """The run statuses and the job (step) statuses a prune of ``statuses`` removes;
    UsageError for a status that is not an end (pending, running, paused)."""
    chosen = sorted(set(statuses))
    wrong = [str(s) for s in chosen if s not in PRUNABLE]
    if wrong:
        raise UsageError(
            f"cannot prune {', '.join(wrong)} runs: only ended ones ({', '.join(map(str, PRUNABLE))})"
        )
    return [str(s) for s in chosen], [str(PRUNABLE[s]) for s in chosen]


def whole_runs(steps: Sequence[int], limit: int) -> int:
    """How many runs (their step counts, oldest first) one prune batch takes: whole runs,
    while the steps of those before stay under ``limit`` (so at least one)."""
    taken = total = 0
    for n in steps:
        if total >= limit:
            break
        taken, total = taken + 1, total + n
    return taken


GENESIS = "0" * 64


def audit_hash(
    prev_hash: str,
    ts: float,
    actor: str,
    action: str,
    subject: str,
    detail: dict[str, Any],
    key: bytes | None = None,
) -> str:
    """The hash that chains an entry to the one before it (``GENESIS`` for the first):
    HMAC-SHA256 under the trail's ``key``, so that no one without the key (kept outside
    the database) can write a chain that verifies; plain SHA-256 without one."""
    canonical = json.dumps(
        [prev_hash, f"{ts:.6f}", actor, action, subject, detail],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    if key is not None:
        return hmac.new(key, canonical, hashlib.sha256).hexdigest()
    return hashlib.sha256(canonical).hexdigest()


class Store(Protocol):
    """Persistence for runs, steps and attempts. Every method is one transaction."""

    url: str
    #: the audit trail's HMAC key (baton.audit.load_key); None: entries are chained by
    #: plain SHA-256, which anyone with write access to the database can recompute
    audit_key: bytes | None

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def create_run(
        self,
        run: RunRecord,
        steps: list[StepRecord],
        *,
        idempotency: tuple[str, str] | None = None,
        goal: GoalRecord | None = None,
        parent: tuple[str, str] | None = None,
    ) -> str:
        """Insert a run and all its steps at once (and ``goal``, the goal it carries out;
        ``parent``, the run and step it is a sub-run of); the run's id.

        ``idempotency`` is (key, fingerprint of the request): a key seen before with the same
        fingerprint writes nothing and returns the run it made then; with another
        fingerprint it raises Conflict.
        """

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

    async def turn(self, turn: Turn) -> TurnResult:
        """Apply what finished and claim up to ``turn.claim`` attempts, in one transaction.

        Finishes first (so what they make ready can be claimed in the same turn), then
        claims: due scheduled jobs become available, runs with free slots give their ready
        steps (longest remaining path first; a barrier run only its lowest unfinished
        wave), then standalone jobs by priority. A run whose last step finishes ends here.
        A worker whose lease lapsed claims nothing (``lost``).
        """

    async def register_worker(self, worker: WorkerRecord) -> list[int]:
        """Record a worker and its lease. Jobs still held by an earlier worker of the same
        name (a restart) are rescued at once; their ids."""

    async def unregister_worker(self, owner: str, now: float) -> None:
        """A worker leaves: jobs it still holds go back to the queue uncounted."""

    async def heartbeat(self, owner: str, now: float, lease_s: float, held: list[int]) -> Beat:
        """Renew the worker's lease; what of ``held`` it must stop."""

    async def release(self, owner: str, ids: list[int], now: float) -> None:
        """Give jobs back unfinished (shutdown): ready again, the attempt not counted."""

    async def held(self, owner: str) -> list[int]:
        """The ids of the attempts ``owner`` holds (running under its lease)."""

    async def sweep(self, now: float, dead: list[str] | None = None) -> list[int]:
        """Rescue jobs whose worker's lease expired (or that is in ``dead``): a ``lost``
        attempt, then ready again (cancelled if their run was). Fail runs past their
        deadline. The rescued job ids."""

    async def list_workers(self) -> list[WorkerRecord]: ...

    async def watch(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` whenever another process makes work claimable, until cancelled
        (PostgreSQL: LISTEN/NOTIFY). Stores without notifications return at once and
        workers poll."""

    async def outputs(self, run_id: str, idxs: list[int]) -> dict[int, Any]:
        """The outputs of succeeded steps of a run, by step index."""

    async def attempt_detail(self, job_id: int, attempt: int) -> dict[str, Any] | None:
        """What an attempt recorded (for the next attempt's feedback)."""

    async def set_run_status(self, run_id: str, status: RunStatus, now: float) -> RunRecord:
        """Pause, resume or cancel from outside; Conflict if the status does not allow it.

        Cancelling marks every step that is not running or finished ``cancelled`` in the
        same transaction; running ones are stopped by their workers (told by heartbeat),
        or by the sweep when their worker is gone.
        """

    async def expire_run(self, run_id: str, now: float) -> bool:
        """The run is past its deadline: it fails, steps not running are cancelled, running
        ones are stopped by their workers. False when it had already ended."""

    # -- standalone jobs ------------------------------------------------------------

    async def enqueue(self, jobs: list[NewJob], now: float) -> list[JobRecord]:
        """Insert jobs; one with a unique key already taken returns the existing job
        (``duplicate``), however many inserts race."""

    async def get_job(self, job_id: int) -> JobRecord: ...

    async def list_jobs(
        self, *, state: str | None = None, queue: str | None = None, limit: int = 50
    ) -> list[JobRecord]: ...

    async def get_job_attempts(self, job_id: int) -> list[AttemptRecord]: ...

    async def retry_job(self, job_id: int, now: float) -> JobRecord:
        """A discarded or cancelled job back to available, with a fresh attempt budget."""

    async def cancel_job(self, job_id: int, now: float) -> JobRecord:
        """An available, scheduled or retryable job is cancelled; a running one is
        stopped by its worker."""

    # -- cron ------------------------------------------------------------------------

    async def put_schedule(self, schedule: Schedule) -> None:
        """Create or replace a schedule (its next tick kept when the cron is unchanged)."""

    async def list_schedules(self) -> list[Schedule]: ...

    async def delete_schedule(self, name: str) -> bool: ...

    async def fire_schedule(
        self, name: str, expected_next: float, next_at: float, jobs: list[NewJob], now: float
    ) -> bool:
        """Move a schedule from ``expected_next`` to ``next_at`` and enqueue the ticks'
        jobs, in one transaction; False when another scheduler moved it first."""

    async def budget_reserve(self, run_id: str, claims: list[BudgetClaim]) -> None:
        """Reserve every claim, or none: BudgetExceeded naming the scope that would overspend."""

    async def budget_settle(self, run_id: str, settles: list[BudgetSettle]) -> None:
        """Turn reservations into spend (what the calls really used)."""

    async def budget_ledger(self, run_id: str) -> list[LedgerEntry]:
        """Spent and reserved, per budget scope of the run."""

    async def llm_sources(self, limit: int = 1000) -> list[str]:
        """Where the answers of the latest ``limit`` model calls came from (``llm``,
        ``cached``, ``fallback``, ``autonomous``), newest first: the caches' hit rate."""

    async def cache_get(self, key: str, now: float) -> str | None:
        """A cached value that has not expired, or None."""

    async def cache_put(self, key: str, value: str, now: float, expires_at: float | None) -> None:
        """Keep ``value`` under ``key`` (replacing what was there) until ``expires_at``."""

    async def put_api_key(self, key: ApiKey, secret_hash: str) -> None:
        """Keep a new key (its secret only as a hash); Conflict if the id is taken."""

    async def api_key_by_hash(self, secret_hash: str) -> ApiKey | None:
        """The key with this secret hash, unless it was revoked."""

    async def list_api_keys(self) -> list[ApiKey]:
        """Every key, revoked ones included, oldest first."""

    async def revoke_api_key(self, key_id: str, now: float) -> bool:
        """Revoke a key; False when there is no such key or it was revoked already."""

    async def queue_depth(self) -> list[tuple[str, str, int]]:
        """(queue, state, count) of what waits or runs: ``available`` and ``retryable`` (ready
        to be claimed), ``scheduled`` (standalone jobs not due yet), ``running``."""

    async def wave_progress(self) -> list[tuple[str, int, int, int]]:
        """(run id, wave, steps, steps finished) of every wave of the runs under way
        (running or paused), by run and wave."""

    async def audit_append(
        self, ts: float, actor: str, action: str, subject: str, detail: dict[str, Any]
    ) -> AuditEntry:
        """Append an entry to the audit trail, chained to the last one; appends are serialized,
        so the chain has no forks however many processes write."""

    async def audit_entries(
        self, *, subject: str | None = None, after: int = 0, limit: int = 1000
    ) -> list[AuditEntry]:
        """Entries with ``seq`` above ``after``, oldest first (only ``subject``'s, if given)."""

    async def audit_tail(self) -> tuple[int, AuditEntry | None]:
        """How many entries the trail holds, and its newest (None when empty)."""

    async def prune(
        self, before: float, statuses: Sequence[RunStatus], *, limit: int = 500, dry_run: bool = False
    ) -> PruneResult:
        """Delete one batch of what ended before ``before``: runs in ``statuses`` (only ended
        ones: see ``prunable``) with their steps, attempts, plans, budget ledger and
        idempotency keys; standalone jobs that ended the same way, with their attempts; and
        cache entries that expired before it. Never the audit trail.

        A batch is a transaction or a few short ones: whole runs, oldest first, while the
        steps of those before stay under ``limit``; at most ``limit`` jobs and cache
        entries. ``more`` says a limit was reached (call again). A run with a step still
        running (cancelled, its worker not done) waits for it. ``dry_run`` deletes nothing
        and counts everything that would go, without a limit.
        """

    async def child_runs(self, run_id: str) -> list[tuple[str, str, RunStatus]]:
        """The sub-runs of a run: (child run id, the step that started it, its status)."""

    async def get_goal(self, run_id: str) -> GoalRecord | None:
        """The goal a run carries out (None: the run is not a goal's)."""

    async def list_goals(self, limit: int = 100) -> list[GoalRecord]:
        """The newest goals first."""

    async def goal_done_before(self, request: str) -> GoalRecord | None:
        """The newest goal of that request fingerprint whose run completed (None: none)."""

    async def pending_goals(self, limit: int = 100) -> list[GoalRecord]:
        """Goals whose run has ended (completed, failed or cancelled) and whose outcomes are
        not recorded yet, oldest first."""

    async def record_outcomes(self, run_id: str, outcomes: list[OutcomeRecord], now: float) -> bool:
        """Record the outcomes of a goal's sub-tasks, once: in one transaction, the goal is
        marked collected and its outcomes written; False (nothing written) when they were
        recorded already, by this process or another."""

    async def outcomes(self, task_type: str | None = None, limit: int = 10_000) -> list[OutcomeRecord]:
        """Recorded outcomes (of ``task_type``'s goals, if given), the newest ``limit``,
        oldest first."""

    async def reclaim(self) -> tuple[int, int] | None:
        """Give the space of deleted rows back to the file system (after a prune), taking
        the database for as long as that lasts; the database file's size before and after.
        None where the store does not (PostgreSQL: autovacuum makes the space reusable in
        place).
        """
