"""The executor: a worker that claims jobs from the store's queue, runs them, records them.

Every kind of work goes through here: the steps of every run (any worker may take any
ready step), and standalone jobs (enqueued calls, scheduled calls, cron ticks). One turn
of the loop hands the store what finished (with the dependents each success counts
towards, or the steps each failure skips) and asks for as many new attempts as there are
free slots; the store applies both in one transaction, and only then do the claimed
attempts start. So a step's output is committed before any dependent starts, and a burst
of finishing steps costs one transaction, not one each.

The database is the truth. A worker keeps the (immutable) plans of the runs it executes
steps of, outputs it has seen, and the attempts it is running, which it holds under its
worker lease, renewed by heartbeat. When that lease lapses, any other worker's sweep
gives them back to the queue, and a late write from this one is rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog
from structlog.contextvars import bind_contextvars

from baton.engine.events import Event
from baton.errors import BatonError, StepTimeout, StoreError, TaskFailed, WorkerFailed
from baton.plan.analysis import analyze
from baton.plan.dag import Dag
from baton.plan.model import Plan, RetryPolicy, Step
from baton.plan.refs import Ref, has_refs, plan_inputs, referenced_steps, resolve_inputs
from baton.status import StepStatus
from baton.store.base import Claimed, Done, RunRecord, Turn, TurnResult, WorkerRecord
from baton.tasks.registry import TaskContext, TaskDef, retry_policy
from baton.tasks.threads import sync_threads
from baton.validators import FAILING, Issue, run_checks

if TYPE_CHECKING:
    from baton.engine.engine import Engine

T = TypeVar("T")
log = structlog.get_logger("baton.worker")

S = StepStatus
#: standalone jobs retry with exponential backoff and jitter, from 1 s up to 5 minutes.
JOB_RETRY = RetryPolicy(attempts=100, backoff_s=1.0, max_backoff_s=300.0, jitter=0.2)
#: a turn the store refused is tried again after this, doubling up to STORE_RETRY_MAX_S
STORE_RETRY_S = 0.1
STORE_RETRY_MAX_S = 5.0
#: a store error that trying again will not mend (a full disk) stops the worker after
#: this many turns in a row
STORE_GIVE_UP = 3
#: how long an attempt waits for a database that restarts to read what it needs to start
READ_WAIT_S = 60.0
#: the error of a lost attempt, as the stores write it
LOST = "lost:"


@dataclass(slots=True)
class _Result:
    id: int
    attempt: int
    started_at: float
    finished_at: float
    outcome: str  # succeeded | failed | timeout | cancelled
    output: Any = None
    output_json: str | None = None
    error: str | None = None
    details: dict[str, Any] | None = None
    details_json: str | None = None
    #: no attempt follows this one, whatever the retry policy says
    final: bool = False


class RunPlan:
    """What a worker keeps of a run whose steps it executes (a plan does not change)."""

    def __init__(
        self,
        engine: Engine,
        run_id: str,
        plan: Plan,
        dag: Dag,
        workdir: Path,
        *,
        run_timeout_s: float | None = None,
        started_at: float | None = None,
    ) -> None:
        self.run_id = run_id
        self.plan = plan
        self.dag = dag
        self.workdir = workdir
        policy = plan.policy
        default_timeout = policy.effective_timeout_s()
        registry = engine.registry
        self.tasks: list[TaskDef | None] = [registry.find(s.task) for s in plan.steps]
        self.timeouts: list[float | None] = [
            s.timeout_s if s.timeout_s is not None else default_timeout for s in plan.steps
        ]
        self.retries = [retry_policy(s, t, policy.retry) for s, t in zip(plan.steps, self.tasks, strict=True)]
        self.templated = [bool(s.inputs) and has_refs(s.inputs) for s in plan.steps]
        self.validators = [_checks(s, t) for s, t in zip(plan.steps, self.tasks, strict=True)]
        #: what the programs of each step run in when the run is confined (baton.sandbox)
        self.confinements = [
            engine.policy.confinement(s.role, workdir, engine.sandbox.user, engine.sandbox.timeout_s)
            if policy.sandbox
            else None
            for s in plan.steps
        ]
        self.index = {s.id: i for i, s in enumerate(plan.steps)}
        #: outputs of succeeded steps seen here (the store has them all).
        self.outputs: dict[int, Any] = {}
        self.last_details: dict[int, dict[str, Any]] = {}
        self.run_timeout_s = run_timeout_s
        self.started_at = started_at  # None: not known here until this worker starts a step
        self.deadline: asyncio.TimerHandle | None = None
        self.announced = False  # run.running emitted, the deadline armed
        self.used_at = time.monotonic()

    def downstream(self, i: int) -> list[int]:
        """Every step that (transitively) needs step ``i``."""
        seen: set[int] = set()
        stack = list(self.dag.dependents[i])
        while stack:
            d = stack.pop()
            if d not in seen:
                seen.add(d)
                stack.extend(self.dag.dependents[d])
        return sorted(seen)


@dataclass(slots=True)
class _Attempt:
    claim: Claimed
    plan: RunPlan | None  # None: a standalone job
    retry: RetryPolicy
    task: asyncio.Task[None] | None = None
    given_up: bool = False


class Worker:
    """Claims and executes jobs for one Engine: ``await worker.start()``, ``await worker.stop()``."""

    def __init__(
        self,
        engine: Engine,
        *,
        name: str | None = None,
        concurrency: int = 64,
        queues: list[str] | None = None,
        sweep_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.id = engine.owner
        self.name = name or engine.owner
        self.concurrency = concurrency
        self.queues = queues
        self.sweep_s = sweep_s
        self.plans: dict[str, RunPlan] = {}
        self.running: dict[int, _Attempt] = {}
        self.results: list[_Result] = []
        #: finishes decided but not committed yet: a turn the store refused keeps them
        #: for the next one, so no result is dropped while the database is away
        self.pending: list[Done] = []
        #: why the loop stopped, when it stopped on an error (it then holds nothing)
        self.failure: BaseException | None = None
        #: a job that may have killed its worker runs alone: claim nothing meanwhile
        self.solo = False
        self._store_errors = 0
        self.wake = asyncio.Event()
        self.hungry = True  # something may be claimable that the last turn did not see
        #: a turn that claimed failed: it may have committed, its claims held here unknown
        self._unsure = False
        self.completed = 0  # attempts this worker finished and recorded
        self.accepting = True
        self.lost = False
        self.rand = random.Random()
        self.start_latencies: list[float] | None = [] if engine.measure_latency else None
        self._committed_at = 0.0
        self._jobs_checked = 0.0
        self._tasks = engine.registry.names()
        self._loop_task: asyncio.Task[None] | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()  # set when a turn leaves nothing running here

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        store = self.engine.store
        now = time.time()
        record = WorkerRecord(
            self.id, self.name, self.queues, self.concurrency, now, now + self.engine.lease_s
        )
        rescued = await store.register_worker(record)
        if rescued:
            log.info(
                "rescued jobs of an earlier worker of the same name", worker=self.name, jobs=len(rescued)
            )
        self._loop_task = asyncio.create_task(self._main(), name=f"baton-worker-{self.name}")
        self._beat_task = asyncio.create_task(self._beat(), name=f"baton-heartbeat-{self.name}")
        self._watch_task = asyncio.create_task(store.watch(self.poke), name=f"baton-watch-{self.name}")

    @property
    def active(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def finished(self) -> None:
        """Wait until the loop stops (stop() was called, or it failed: see ``failure``)."""
        if self._loop_task is not None:
            await asyncio.wait([self._loop_task])

    def poke(self) -> None:
        """Something may have become claimable (a submit, a notification, a retry due)."""
        self.hungry = True
        self.wake.set()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming; let running attempts finish for ``grace_s`` (default: none),
        then cancel and give back what is left, unfinished and uncounted."""
        if self._loop_task is None:
            return
        self.accepting = False
        self.wake.set()
        if grace_s and self.running:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._idle.wait()
        # What is still running is given back (uncounted) when the worker unregisters.
        # What has finished is recorded by the loop's last turn: its effect happened, and
        # giving it back would have another worker run it again.
        still = {i: a for i, a in self.running.items() if a.task is not None and not a.task.done()}
        tasks = [a.task for a in still.values() if a.task is not None]
        for i, attempt in still.items():
            attempt.given_up = True
            del self.running[i]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=self.engine.cancel_grace_s)
        self._stopped.set()
        self.wake.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._loop_task
        for helper in (self._beat_task, self._watch_task):
            if helper is not None:
                helper.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await helper
        for plan in self.plans.values():
            if plan.deadline is not None:
                plan.deadline.cancel()
        if not self.lost:
            try:
                await self.engine.store.unregister_worker(self.id, time.time())
            except BatonError as exc:
                log.warning("could not unregister worker", worker=self.id, error=exc.message)
        if self.abandoned:
            log.warning(
                "sync task calls left running in their threads (they end on their own, never hold the exit)",
                worker=self.id,
                abandoned=self.abandoned,
            )
        self._loop_task = None

    @property
    def abandoned(self) -> int:
        """Sync task calls that ran past their timeout or cancel and still run in their
        thread (a thread cannot be stopped; it does not keep the process from exiting)."""
        return sync_threads.abandoned

    # -- the loop ----------------------------------------------------------------------

    async def _main(self) -> None:
        """The loop, and what becomes of the worker when it breaks: an error nothing here
        expected stops it for good, heartbeat included, so its lease lapses and other
        workers (or this process's successor) take its jobs over. Never a live heartbeat
        over a dead loop."""
        try:
            await self._loop()
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.failure = exc
        self.accepting = False
        # a traceback only for what nothing expected (a bug to report), not a full disk
        trace = None if isinstance(exc, BatonError) else exc
        log.error("worker stopped on an error", worker=self.id, error=_describe(exc), exc_info=trace)
        for helper in (self._beat_task, self._watch_task):
            if helper is not None:
                helper.cancel()
        for attempt in self.running.values():
            attempt.given_up = True
            if attempt.task is not None:
                attempt.task.cancel()
        self.running.clear()
        self.results.clear()
        self.pending.clear()
        self.engine.emit(Event("worker.failed", "", data={"worker": self.id, "error": _describe(exc)}))
        self.engine.worker_failed(self)

    async def _loop(self) -> None:
        store = self.engine.store
        while True:
            self.wake.clear()
            now = time.time()
            results, self.results = self.results, []
            done = self.pending + [d for d in (self._decide(r) for r in results) if d is not None]
            self.pending = []
            free = self.concurrency - len(self.running) if self.accepting and not self.lost else 0
            if self.solo and self.running:
                free = 0  # a job that may kill its worker runs alone
            want = free if free > 0 and (self.hungry or done) else 0
            claimed: list[Claimed] = []
            if done or want:
                # Standalone jobs are looked for when woken (a notification, a poll, a
                # submit) and at least every poll interval, not on every step's turn.
                jobs = self.hungry or now - self._jobs_checked >= self.engine.poll_s
                if jobs:
                    self._jobs_checked = now
                self.hungry = False
                turn = Turn(
                    self.id,
                    now,
                    done,
                    want,
                    self.queues,
                    self._tasks,
                    jobs=jobs,
                    report=self.engine.events.active,
                    check_lease=jobs,
                )
                try:
                    outcome = await store.turn(turn)
                except BatonError as exc:
                    # A busy, restarting or vanished database: keep what finished (it is
                    # recorded by the next turn that goes through) and try again shortly.
                    # The turn may have committed all the same (its answer lost): what it
                    # claimed is then held here unknown, until reconciled.
                    self.pending = done
                    self.hungry = self.hungry or want > 0
                    self._unsure = self._unsure or want > 0
                    if self._give_up_on_store(exc):
                        return
                    await asyncio.sleep(min(STORE_RETRY_S * 2 ** (self._store_errors - 1), STORE_RETRY_MAX_S))
                    continue
                self._store_errors = 0
                self._committed_at = time.perf_counter()
                self.completed += len(done) - len(outcome.rejected)
                self._after(done, outcome)
                if outcome.rejected:
                    await self._ended_unseen(done, outcome)
                if outcome.lost:
                    await self._lose()
                    continue
                claimed = outcome.claimed
                if want and len(claimed) >= want:
                    self.hungry = True  # there may be more
                await self._start_all(claimed, now)
                if self._unsure:
                    await self._reconcile()
            if not self.running and not self.results and not self.pending:
                self.solo = False
                self._idle.set()
                if self._stopped.is_set():
                    return
            if claimed:
                # One pass of the event loop runs the new attempts; those that finish
                # without waiting (no-op and cached work) are absorbed in the next turn.
                await asyncio.sleep(0)
            if not self.results and not (self.hungry and free > len(claimed)):
                with contextlib.suppress(TimeoutError):  # (not wait_for: see Engine.wait)
                    async with asyncio.timeout(self.engine.poll_s):
                        await self.wake.wait()
                if not self.wake.is_set():
                    self.hungry = True  # polling: others may have made work claimable

    def _give_up_on_store(self, exc: BatonError) -> bool:
        """A turn failed: True when the loop should stop trying (it is being stopped, or
        the error is one that trying again will not mend)."""
        self._store_errors += 1
        transient = exc.transient if isinstance(exc, StoreError) else True
        log.warning(
            "turn failed; trying again",
            worker=self.id,
            error=exc.message,
            tries=self._store_errors,
            unrecorded=len(self.pending),
        )
        if self._store_errors < STORE_GIVE_UP:
            return False
        if not transient:
            raise WorkerFailed(f"the store cannot record work: {exc.message}") from exc
        # Being stopped: what is still unrecorded goes back to the queue when the lease lapses.
        return self._stopped.is_set()

    def _decide(self, r: _Result) -> Done | None:
        """What a finished attempt means for its job: success, a retry, or the end."""
        attempt = self.running.get(r.id)
        if attempt is None or attempt.claim.attempt != r.attempt:
            return None  # already recorded (given up on after the cancel grace period)
        del self.running[r.id]
        claim, plan = attempt.claim, attempt.plan
        done = Done(
            r.id,
            claim.run_id,
            claim.idx,
            r.attempt,
            S.FAILED,
            r.outcome,
            r.started_at,
            r.finished_at,
            r.output_json,
            r.error,
            detail=r.details_json,
            task=claim.task,
        )
        if r.outcome == "succeeded":
            done.status = S.SUCCEEDED
            if plan is not None:
                plan.outputs[claim.idx] = r.output
                done.unblocks = list(plan.dag.dependents[claim.idx])
            return done
        if r.outcome == "cancelled":
            done.status = S.CANCELLED
            return done
        retry = attempt.retry
        if r.attempt < self._limit(claim, plan) and self.accepting and not r.final:
            done.status = S.RETRYING
            delay = retry.delay(r.attempt, self.rand.random())
            done.not_before = r.finished_at + delay
            asyncio.get_running_loop().call_later(delay, self.poke)
            if plan is not None and r.details:
                plan.last_details[claim.idx] = r.details
            return done
        if plan is not None:
            done.skips = plan.downstream(claim.idx)
            done.skip_reason = f"needs {plan.dag.ids[claim.idx]!r}, which did not succeed"
        return done

    @staticmethod
    def _limit(claim: Claimed, plan: RunPlan | None) -> int:
        """How many attempts the job may have (lost ones count)."""
        return plan.retries[claim.idx].attempts if plan is not None else claim.max_attempts

    def _after(self, done: list[Done], outcome: TurnResult) -> None:
        """Events for what the store applied; runs that ended."""
        engine = self.engine
        rejected = set(outcome.rejected)
        if rejected:
            log.warning("finishes refused: this worker no longer held them", jobs=sorted(rejected))
            for d in done:
                if d.id in rejected:
                    self._emit("step.lost", d.run_id, d.idx, {"attempt": d.attempt, "worker": self.id}, d.id)
        if engine.events.active:
            for d in done:
                if d.id in rejected:
                    continue
                data: dict[str, Any] = {
                    "task": d.task,
                    "attempt": d.attempt,
                    "duration_s": d.finished_at - d.started_at,
                }
                if d.error:
                    data["error"] = d.error
                if d.detail is not None:
                    model_call = _model_call(d.detail)
                    if model_call:
                        data["llm"] = model_call
                self._emit(f"step.{d.status}", d.run_id, d.idx, data, d.id)
            taken = {(c.run_id, c.idx) for c in outcome.claimed}
            for run_id, idx, status in outcome.marked:
                if (run_id, idx) not in taken:  # ready and claimed at once: just running
                    self._emit(f"step.{status}", run_id, idx, {})
        for run_id, final in outcome.ended.items():
            self._forget(run_id)
            engine.emit(Event(f"run.{final}", run_id))
        engine.runs_changed(set(outcome.ended))

    def _emit(self, kind: str, run_id: str | None, idx: int, data: dict[str, Any], job: int = 0) -> None:
        """A step event (by run and step index), or a standalone job's (by job id)."""
        plan = self.plans.get(run_id) if run_id is not None else None
        if plan is not None:
            self.engine.emit(Event(kind, plan.run_id, plan.dag.ids[idx], data))
        else:
            self.engine.emit(Event(kind, run_id or "", None, {**data, "job": job}))

    def _forget(self, run_id: str) -> None:
        plan = self.plans.get(run_id)
        if plan is not None and not any(a.plan is plan for a in self.running.values()):
            if plan.deadline is not None:
                plan.deadline.cancel()
            del self.plans[run_id]

    async def _ended_unseen(self, done: list[Done], outcome: TurnResult) -> None:
        """Runs of refused finishes that ended: a turn that committed with its answer lost
        (a database restarting) ended them unseen. Their ending is said now (the event, so
        the audit trail has it, and whoever waits)."""
        rejected = set(outcome.rejected)
        runs = {d.run_id for d in done if d.id in rejected and d.run_id is not None} - set(outcome.ended)
        for run_id in sorted(r for r in runs if r is not None):
            try:
                run = await self.engine.store.get_run(run_id, with_plan=False)
            except BatonError:
                continue  # gone (pruned), or the store away again: nothing more to say
            if run.status.terminal:
                self._forget(run_id)
                self.engine.emit(Event(f"run.{run.status}", run_id))
                self.engine.runs_changed({run_id})

    async def _reconcile(self) -> None:
        """Give back what the store says this worker holds and it does not run: claims of a
        turn that committed though its answer was lost (a database restarting at that
        moment). Left alone they would stay running for good under a live lease."""
        store = self.engine.store
        try:
            held = await store.held(self.id)
            known = set(self.running) | {r.id for r in self.results} | {d.id for d in self.pending}
            unknown = [i for i in held if i not in known]
            if unknown:
                await store.release(self.id, unknown, time.time())
                log.warning("gave back attempts claimed by a turn whose answer was lost", count=len(unknown))
                self.hungry = True
        except BatonError:
            return  # still unsure: the next turn that goes through tries again
        self._unsure = False

    # -- starting attempts -------------------------------------------------------------

    async def _start_all(self, claimed: list[Claimed], now: float) -> None:
        if not claimed:
            return
        give_back: list[int] = []
        plans: dict[int, RunPlan | None] = {}
        for claim in claimed:
            if claim.run_id is not None:
                plan = self.plans.get(claim.run_id) or await self._load(claim)
                if plan is None:
                    give_back.append(claim.id)
                    continue
                plans[claim.id] = plan
            else:
                plans[claim.id] = None
        verdicts: dict[int, str] = {}
        if any(c.previous_error and c.previous_error.startswith(LOST) for c in claimed):
            verdicts = await self._suspects([c for c in claimed if c.id in plans], plans)
            give_back.extend(i for i, v in verdicts.items() if v == "give back")
        for claim in claimed:
            if claim.id not in plans or verdicts.get(claim.id) == "give back":
                continue
            plan = plans[claim.id]
            if plan is not None:
                if not plan.announced:
                    plan.announced = True
                    self.engine.emit(Event("run.running", plan.run_id))
                    if plan.run_timeout_s is not None:
                        self._arm_deadline(plan, claim.started_at)
                plan.used_at = time.monotonic()
            attempt = _Attempt(claim, plan, JOB_RETRY if plan is None else plan.retries[claim.idx])
            self.running[claim.id] = attempt
            verdict = verdicts.get(claim.id, "")
            if verdict.startswith("worker died"):  # it will not run again
                self.results.append(
                    _Result(claim.id, claim.attempt, now, now, "failed", error=verdict, final=True)
                )
                self.wake.set()
                continue
            if self.engine.events.active:
                data: dict[str, Any] = {"task": claim.task, "attempt": claim.attempt}
                if claim.ready_at is not None:  # how long it waited in the queue
                    data["waited_s"] = max(0.0, claim.started_at - claim.ready_at)
                self._emit("step.running", claim.run_id, claim.idx, data, claim.id)
            attempt.task = asyncio.create_task(self._attempt(attempt))
        if give_back:
            await self.engine.store.release(self.id, give_back, time.time())

    async def _suspects(self, claimed: list[Claimed], plans: dict[int, RunPlan | None]) -> dict[int, str]:
        """What becomes of claims whose last attempt was lost with its worker.

        A job lost once runs as any other: its worker was killed from outside, or lost its
        machine. Lost twice or more in a row, it may be what kills its worker (``os._exit``,
        a crash in native code): it runs alone, so that the jobs claimed beside it are not
        lost with it again, and a loss while it ran alone is its own doing. Once its worker
        has died running it alone and its attempts are used up (at least two), it fails
        with that reason instead of running again.

        By claim id: ``alone`` (run it with nothing beside it), ``give back`` (to the
        queue, uncounted, for now), or the reason it fails; claims not named run as usual.
        """
        verdicts: dict[int, str] = {}
        loners: list[Claimed] = []
        for claim in claimed:
            if not (claim.previous_error and claim.previous_error.startswith(LOST)):
                continue
            streak, alone = await self._lost_streak(claim)
            if streak >= max(self._limit(claim, plans[claim.id]), 2) and alone:
                verdicts[claim.id] = f"worker died {streak} times running it"
            elif streak >= 2:
                loners.append(claim)
        if not loners:
            return verdicts
        self.solo = True  # no claims until the one chosen (or the next turn's) runs alone
        if self.running:
            chosen = None  # others run here: first let them finish
        else:
            chosen = loners[0]
            log.warning(
                "running alone a job its worker died running",
                job=chosen.id,
                run_id=chosen.run_id,
                task=chosen.task,
                attempt=chosen.attempt,
            )
        for claim in claimed:
            if chosen is not None and claim.id == chosen.id:
                verdicts[claim.id] = "alone"
            elif chosen is not None or claim in loners:
                verdicts.setdefault(claim.id, "give back")
        return verdicts

    async def _lost_streak(self, claim: Claimed) -> tuple[int, bool]:
        """How many of the job's last attempts in a row were lost with their worker, and
        whether its worker was running it alone the last time."""
        streak, alone = 0, False
        for n in range(claim.attempt - 1, 0, -1):
            detail = await self.engine.store.attempt_detail(claim.id, n)
            if detail is None or "held" not in detail:
                break
            if streak == 0:
                alone = detail["held"] == 1
            streak += 1
        return max(streak, 1), alone

    async def _load(self, claim: Claimed) -> RunPlan | None:
        """The plan of a run this worker has not executed steps of yet."""
        assert claim.run_id is not None
        engine = self.engine
        try:
            run = await engine.store.get_run(claim.run_id)
            assert run.plan is not None
            plan = Plan.model_validate(run.plan)
            dag = analyze(plan, engine.registry)
        except (BatonError, ValueError) as exc:
            log.error("cannot execute the steps of this run here", run_id=claim.run_id, error=str(exc))
            return None
        info = RunPlan(
            engine,
            run.id,
            plan,
            dag,
            engine.workdir_path(run.workdir, run.id, plan),
            run_timeout_s=run.run_timeout_s,
            started_at=run.started_at,
        )
        self.plans[run.id] = info
        return info

    def adopt(self, run: RunRecord, plan: Plan, dag: Dag) -> None:
        """A run this process just submitted: its steps start here without reading the
        plan back from the store."""
        if run.id not in self.plans:
            engine = self.engine
            self.plans[run.id] = RunPlan(
                engine,
                run.id,
                plan,
                dag,
                engine.workdir_path(run.workdir, run.id, plan),
                run_timeout_s=run.run_timeout_s,
            )

    def _arm_deadline(self, plan: RunPlan, claimed_at: float) -> None:
        """The run fails when its deadline passes (the first claim started its clock)."""
        assert plan.run_timeout_s is not None
        started = plan.started_at if plan.started_at is not None else claimed_at
        remaining = started + plan.run_timeout_s - time.time()
        run_id = plan.run_id
        plan.deadline = asyncio.get_running_loop().call_later(
            max(0.0, remaining), lambda: asyncio.ensure_future(self._expire(run_id))
        )

    def _forget_idle_plans(self, idle_s: float = 60.0) -> None:
        """Plans of runs this worker has not started a step of for a while (others may
        have ended them): dropped, and read again should a step of theirs come here."""
        limit = time.monotonic() - idle_s
        busy = {a.plan.run_id for a in self.running.values() if a.plan is not None}
        for run_id, plan in list(self.plans.items()):
            if plan.used_at < limit and run_id not in busy:
                if plan.deadline is not None:
                    plan.deadline.cancel()
                del self.plans[run_id]

    async def _expire(self, run_id: str) -> None:
        """A run's deadline passed: it fails; its steps running here stop now."""
        with contextlib.suppress(BatonError):
            if await self.engine.store.expire_run(run_id, time.time()):
                self.engine.emit(Event("run.failed", run_id, data={"error": "run timed out"}))
                self.engine.runs_changed({run_id})
        self.stop_jobs([i for i, a in self.running.items() if a.claim.run_id == run_id])

    # -- one attempt -------------------------------------------------------------------

    def _lookup(self, plan: RunPlan) -> Any:
        def pick(ref: Ref) -> Any:
            return ref.pick(plan.outputs[plan.index[ref.step]])

        return pick

    async def _inputs(self, attempt: _Attempt) -> Any:
        claim, plan = attempt.claim, attempt.plan
        if plan is None:
            return json.loads(claim.args) if claim.args else {}
        step = plan.plan.steps[claim.idx]
        if not plan.templated[claim.idx]:
            return step.inputs
        referenced = referenced_steps(plan_inputs(step.task, step.inputs))
        missing = [plan.index[ref] for ref in referenced if plan.index[ref] not in plan.outputs]
        if missing:
            outputs = await self._read(lambda: self.engine.store.outputs(plan.run_id, missing))
            plan.outputs.update(outputs)
        return resolve_inputs(step.task, step.inputs, self._lookup(plan))

    async def _read(self, read: Callable[[], Awaitable[T]]) -> T:
        """A read an attempt needs before its task runs (its needs' outputs, its last
        attempt's details): a database restarting is waited out, with backoff, for up to
        READ_WAIT_S, rather than failing the attempt."""
        deadline, pause = time.monotonic() + READ_WAIT_S, STORE_RETRY_S
        while True:
            try:
                return await read()
            except StoreError as exc:
                if not exc.transient or time.monotonic() + pause > deadline or self._stopped.is_set():
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, STORE_RETRY_MAX_S)

    async def _context(self, attempt: _Attempt) -> TaskContext:
        claim, plan = attempt.claim, attempt.plan
        first = claim.attempt == 1
        details = None
        if not first and plan is not None:
            details = plan.last_details.get(claim.idx)
            if details is None:
                details = await self._read(
                    lambda: self.engine.store.attempt_detail(claim.id, claim.attempt - 1)
                )
        if plan is None:
            engine = self.engine
            workdir, confinement = engine.workdir, None
            if claim.role is not None:  # an API key holder's job: confined, as a run's step
                workdir = engine.sandbox.workspace(f"job-{claim.id}")
                sandbox = engine.sandbox
                confinement = engine.policy.confinement(claim.role, workdir, sandbox.user, sandbox.timeout_s)
            return TaskContext(
                run_id=f"job-{claim.id}",
                step_id=claim.task,
                attempt=claim.attempt,
                workdir=workdir,
                confinement=confinement,
                previous_error=None if first else claim.previous_error,
            )
        temps = attempt.retry.temperatures
        needs = plan.dag.needs[claim.idx]

        async def load_needs() -> dict[str, Any]:
            missing = [i for i in needs if i not in plan.outputs]
            if missing:
                plan.outputs.update(await self._read(lambda: self.engine.store.outputs(plan.run_id, missing)))
            return {plan.dag.ids[i]: plan.outputs.get(i) for i in needs}

        return TaskContext(
            run_id=plan.run_id,
            step_id=plan.dag.ids[claim.idx],
            attempt=claim.attempt,
            workdir=plan.workdir,
            confinement=plan.confinements[claim.idx],
            temperature=temps[min(claim.attempt, len(temps)) - 1] if temps else None,
            previous_error=None if first else claim.previous_error,
            previous_details=details,
            run_budget=plan.plan.budget,
            step_budget=plan.plan.steps[claim.idx].budget,
            complexity=plan.plan.policy.complexity,
            needs=tuple(plan.dag.ids[i] for i in needs),
            load_needs=load_needs,
        )

    async def _attempt(self, attempt: _Attempt) -> None:
        claim, plan = attempt.claim, attempt.plan
        # The attempt's record starts when its step row says it did (the claim): one start
        # time, whichever record a reader sees, so the event stream never tells it twice.
        started = claim.started_at
        if self.start_latencies is not None:
            self.start_latencies.append(time.perf_counter() - self._committed_at)
        result = _Result(claim.id, claim.attempt, started, started, "failed")
        ctx: TaskContext | None = None
        # This attempt's task has a context of its own: what it logs says which attempt.
        bind_contextvars(
            run_id=claim.run_id or f"job-{claim.id}",
            step_id=plan.dag.ids[claim.idx] if plan is not None else claim.task,
            attempt=claim.attempt,
        )
        try:
            # A task not registered here raises UnknownTask, which fails the attempt.
            task = (plan.tasks[claim.idx] if plan is not None else None) or self.engine.registry.get(
                claim.task
            )
            inputs = await self._inputs(attempt)
            ctx = await self._context(attempt) if task.context_param is not None else None
            timeout = plan.timeouts[claim.idx] if plan is not None else claim.timeout_s

            async def run_and_check() -> tuple[Any, list[Issue]]:
                value = await task.invoke(inputs, ctx)
                result.output_json = _storable(_encode(value), "its output")
                redactor = self.engine.redactor
                if redactor:  # the server's secrets are not kept, nor passed on to dependents
                    redacted = redactor.redact(result.output_json)
                    if redacted != result.output_json:
                        result.output_json, value = redacted, json.loads(redacted)
                if plan is None or not plan.validators[claim.idx]:
                    return value, []
                checks = plan.validators[claim.idx]
                return value, await run_checks(value, checks, plan.workdir, plan.confinements[claim.idx])

            if timeout is None:
                value, issues = await run_and_check()
            else:
                # the step's time limit holds its checks too
                deadline = asyncio.timeout(timeout)
                try:
                    async with deadline:
                        value, issues = await run_and_check()
                except TimeoutError:
                    if not deadline.expired():
                        raise  # the handler's own timeout, not the step's
                    result.outcome = "timeout"
                    raise StepTimeout(f"attempt {claim.attempt} timed out after {timeout}s") from None
            if issues:
                if ctx is None:
                    ctx = await self._context(attempt)
                ctx.details["issues"] = [issue.to_dict() for issue in issues]
            failing = [str(issue) for issue in issues if issue.severity in FAILING]
            if failing:
                result.error = "validation failed: " + "; ".join(failing)
            else:
                result.outcome, result.output = "succeeded", value
                if ctx is not None:
                    await _accepted(ctx)
        except asyncio.CancelledError:
            result.outcome, result.error = "cancelled", "cancelled"
        except (TypeError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        except BatonError as exc:
            result.error = exc.message
        except KeyError as exc:
            result.error = f"missing value: {exc.args[0] if exc.args else exc}"
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        except (SystemExit, KeyboardInterrupt) as exc:
            # what the task did, so the attempt's failure: never the worker's exit
            said = f"({exc.args[0]!r})" if exc.args else ""
            result.error = f"the task raised {type(exc).__name__}{said}"
        if result.error is not None:
            result.error = self.engine.redactor.redact(_mended(result.error))
        if ctx is not None and ctx.details:
            try:
                result.details_json = self.engine.redactor.redact(
                    _storable(_encode(ctx.details), "its details")
                )
                result.details = ctx.details
            except (TypeError, ValueError, BatonError) as exc:
                result.details = {"unrecorded": f"details are not JSON: {_mended(str(exc))}"}
                result.details_json = _encode(result.details)
        result.finished_at = time.time()
        if attempt.given_up:
            return
        self.results.append(result)
        self.wake.set()

    # -- heartbeat, control, rescue ----------------------------------------------------

    async def _beat(self) -> None:
        """Renew the lease; stop what was cancelled elsewhere; rescue what others lost."""
        engine = self.engine
        store = engine.store
        next_sweep = 0.0
        while True:
            await asyncio.sleep(engine.poll_s)
            now = time.time()
            try:
                beat = await store.heartbeat(self.id, now, engine.lease_s, list(self.running))
                if beat.lost:
                    await self._lose()
                    continue
                if beat.stop:
                    self.stop_jobs(beat.stop)
                if now >= next_sweep:
                    next_sweep = now + self.sweep_s
                    rescued = await store.sweep(now, engine.dead_workers(await store.list_workers()))
                    if rescued:
                        log.info("rescued jobs of a worker that is gone", jobs=len(rescued))
                        self.poke()
                    await engine.fire_schedules(now)
                    await engine.apply_retention(now)  # (when due: a few small batches)
                    self._forget_idle_plans()
            except BatonError as exc:  # a busy or vanished database: try again next beat
                log.warning("heartbeat failed", worker=self.id, error=exc.message)

    def stop_run(self, run_id: str) -> None:
        """The run was cancelled here: stop its attempts now (others learn by heartbeat)."""
        self.stop_jobs([i for i, a in self.running.items() if a.claim.run_id == run_id])

    def stop_jobs(self, ids: list[int]) -> None:
        """Cancel these attempts; any still running after the grace period are given up."""
        tasks = [a.task for i in ids if (a := self.running.get(i)) is not None and a.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            loop = asyncio.get_running_loop()
            loop.call_later(self.engine.cancel_grace_s, self._give_up, list(ids))

    def _give_up(self, ids: list[int]) -> None:
        """Attempts still running a grace period after a cancel are recorded as cancelled.

        Their tasks were asked to stop and ignored it (or run in a thread that cannot be
        interrupted); nothing waits for them, and their late results are dropped.
        """
        now = time.time()
        for i in ids:
            attempt = self.running.get(i)
            if attempt is None or attempt.given_up:
                continue
            attempt.given_up = True
            self.results.append(
                _Result(
                    i,
                    attempt.claim.attempt,
                    attempt.claim.started_at,
                    now,
                    "cancelled",
                    error=f"did not stop within the {self.engine.cancel_grace_s}s cancel grace period",
                )
            )
        self.wake.set()

    async def _lose(self) -> None:
        """Our lease lapsed and what we held was (or will be) taken over: drop it all
        without writing anything, then come back as a fresh worker."""
        if self.lost:
            return
        self.lost = True
        for attempt in self.running.values():
            attempt.given_up = True
            if attempt.task is not None:
                attempt.task.cancel()
        self.running.clear()
        self.results.clear()
        self.pending.clear()  # the store refuses them now: they belong to others
        self.engine.emit(Event("worker.lost", "", data={"worker": self.id}))
        log.error("worker lease lapsed; its jobs go to other workers", worker=self.id)
        now = time.time()
        record = WorkerRecord(
            self.id, self.name, self.queues, self.concurrency, now, now + self.engine.lease_s
        )
        try:
            await self.engine.store.register_worker(record)
        except BatonError as exc:
            log.warning("could not register again", worker=self.id, error=exc.message)
            return  # the next heartbeat finds the lease gone and tries again
        self.lost = False
        self.poke()


#: what an attempt's details say of a model call, as events carry it (not prompt or answer)
_MODEL_CALL = ("model", "usage", "cost_usd", "source", "cache", "budget")


def _model_call(detail_json: str) -> dict[str, Any]:
    detail = json.loads(detail_json)
    if not isinstance(detail, dict):
        return {}
    return {k: detail[k] for k in _MODEL_CALL if k in detail}


#: one encoder for every output (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


def _storable(text: str, what: str) -> str:
    """``text`` if a database can keep it: a lone surrogate (``"\\ud800"``, which
    Python strings allow and UTF-8 does not) fails the attempt, not the worker."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TaskFailed(
                f"{what} cannot be stored: it is not valid Unicode "
                f"(a lone surrogate {text[exc.start]!a} at character {exc.start})"
            ) from None
    return text


def _checks(step: Step, task: TaskDef | None) -> list[dict[str, Any]]:
    """A step's validators as run: reading the task's answer (``text`` of llm.generate)
    when they name no ``field``."""
    checks = [v.model_dump() for v in step.validate_]
    if task is not None and task.answer_field is not None:
        checks = [c if c.get("field") is not None else {**c, "field": task.answer_field} for c in checks]
    return checks


async def _accepted(ctx: TaskContext) -> None:
    """What the task asked to do once its attempt is accepted (an answer into the cache)."""
    for action in ctx.on_accepted:
        try:
            await action()
        except Exception as exc:  # the attempt stands: what it accepted is recorded anyway
            log.warning("an action on acceptance failed", error=f"{type(exc).__name__}: {exc}")


def _mended(text: str) -> str:
    """An error message a database can keep (lone surrogates written as escapes)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(exc: BaseException) -> str:
    return exc.message if isinstance(exc, BatonError) else f"{type(exc).__name__}: {exc}"


__all__ = ["RunPlan", "Worker"]
