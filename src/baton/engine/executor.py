"""The executor: runs one run's steps as a dataflow under the run's policy.

One turn of the loop gathers what finished, decides what that makes ready, failed,
skipped or retrying, claims as many ready steps as there are free slots (longest
remaining critical path first), commits all of it in one store transaction, and only then
starts the claimed attempts. So a step's output is always committed before a dependent
starts, and a burst of finishing steps costs one transaction, not one each.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from baton.engine.events import Event
from baton.errors import BatonError, StepTimeout
from baton.plan.dag import Dag
from baton.plan.model import Plan, RetryPolicy
from baton.plan.refs import Ref, has_refs, resolve
from baton.status import RunStatus, StepStatus
from baton.store.base import Batch, Claim, Finish, Mark, RunRecord, StepRecord
from baton.tasks.registry import TaskContext, TaskDef
from baton.validators import FAILING, run_checks

if TYPE_CHECKING:
    from baton.engine.engine import Engine

S = StepStatus
_NO_RETRY = RetryPolicy()


@dataclass(slots=True)
class _Result:
    idx: int
    attempt: int
    started_at: float
    finished_at: float
    outcome: str  # succeeded | failed | timeout | cancelled
    output: Any = None
    output_json: str | None = None
    error: str | None = None
    details: dict[str, Any] | None = None
    details_json: str | None = None


class RunExecutor:
    """Executes one run in this process while it holds the run's lease."""

    def __init__(
        self, engine: Engine, run: RunRecord, plan: Plan, dag: Dag, records: list[StepRecord]
    ) -> None:
        self.engine = engine
        self.run_id = run.id
        self.plan = plan
        self.workdir = run.workdir
        registry = engine.registry
        self.dag = dag
        n = len(plan.steps)
        policy = plan.policy
        self.max_parallel = policy.effective_max_parallel(engine.default_max_parallel)
        self.barrier = policy.barrier == "wave"
        default_timeout = policy.effective_timeout_s()
        default_retry = policy.retry or _NO_RETRY
        by_name = {name: registry.get(name) for name in {s.task for s in plan.steps}}
        self.tasks: list[TaskDef] = [by_name[s.task] for s in plan.steps]
        self.timeouts: list[float | None] = [
            s.timeout_s if s.timeout_s is not None else default_timeout for s in plan.steps
        ]
        self.retries: list[RetryPolicy] = [s.retry or default_retry for s in plan.steps]
        self.templated = [bool(s.inputs) and has_refs(s.inputs) for s in plan.steps]
        self.validators = [[v.model_dump() for v in s.validate_] for s in plan.steps]

        self.status: list[StepStatus] = [r.status for r in records]
        # What the last failed attempt of a step said, for the next one (error feedback).
        self.last_error: list[str | None] = [r.error if r.status is S.RETRYING else None for r in records]
        self.last_details: dict[int, dict[str, Any]] = {}
        self.attempt: list[int] = [r.attempt for r in records]
        self.outputs: dict[int, Any] = {r.idx: r.output for r in records if r.status is S.SUCCEEDED}
        self.waiting: list[int] = [len(ns) for ns in dag.needs]
        for i in self.outputs:
            for d in dag.dependents[i]:
                self.waiting[d] -= 1
        self.unfinished_in_wave: list[int] = [0] * (max(dag.wave, default=0) + 1)
        for i, st in enumerate(self.status):
            if st not in _TERMINAL:
                self.unfinished_in_wave[dag.wave[i]] += 1
        self.unfinished = sum(self.unfinished_in_wave)
        self.current_wave = 0
        self.workdir_path = engine.workdir_path(run.workdir)
        self.index = {s.id: i for i, s in enumerate(plan.steps)}

        self.heap: list[tuple[float, int]] = []
        self.running: dict[int, asyncio.Task[None]] = {}
        self.started_at: dict[int, float] = {}
        self.results: list[_Result] = []
        self.wake = asyncio.Event()
        self.run_status = RunStatus.RUNNING
        self.lost = False
        self.rand = random.Random()
        self.pending_marks: list[Mark] = []
        self.fresh: list[int] = []  # pushed onto the heap this turn
        self.start_latencies: list[float] | None = [] if engine.measure_latency else None
        self.run_started_at = run.started_at or time.time()
        self.timed_out = False
        self.stopping = False  # no new attempts (the run timed out)
        self._committed_at = 0.0

        now = time.time()
        for i in range(n):
            st = self.status[i]
            if st is S.RETRYING:
                due = records[i].not_before or now
                self._retry_later(i, due - now)
            elif st in (S.PENDING, S.READY) and self.waiting[i] == 0:
                self._push_ready(i)
            elif st is S.PENDING:
                blocked = [j for j in self.dag.needs[i] if self.status[j] in _BLOCKING]
                if blocked:
                    self._skip([i], blocked[0])
        self.failed_any = any(st is S.FAILED for st in self.status)

    # -- decisions ---------------------------------------------------------------------

    def _push_ready(self, i: int) -> None:
        heapq.heappush(self.heap, (-self.dag.remaining[i], i))
        self.fresh.append(i)

    def _retry_later(self, i: int, delay: float) -> None:
        def due() -> None:
            if self.status[i] is S.RETRYING:
                self._push_ready(i)
                self.wake.set()

        asyncio.get_running_loop().call_later(max(0.0, delay), due)

    def _skip(self, start: list[int], failed: int) -> None:
        """Mark ``start`` and every pending step downstream of it skipped (failure isolation)."""
        stack = list(start)
        reason = f"needs {self.dag.ids[failed]!r}, which did not succeed"
        while stack:
            d = stack.pop()
            if self.status[d] is not S.PENDING:
                continue
            self.status[d] = S.SKIPPED
            self._finished(d)
            self.pending_marks.append(Mark(d, S.SKIPPED, reason))
            stack.extend(self.dag.dependents[d])

    def _finished(self, i: int) -> None:
        self.unfinished_in_wave[self.dag.wave[i]] -= 1
        self.unfinished -= 1

    def _absorb(self, r: _Result, batch: Batch) -> None:
        i = r.idx
        task = self.running.get(i)
        if task is None or (r.attempt != self.attempt[i]):
            return  # given up on after the cancel grace period; already recorded
        del self.running[i]
        self.started_at.pop(i, None)
        retry = self.retries[i]
        if r.outcome == "succeeded":
            status, not_before = S.SUCCEEDED, None
        elif r.outcome == "cancelled":
            status, not_before = S.CANCELLED, None
        elif r.attempt < retry.attempts and self.run_status is not RunStatus.CANCELLED and not self.stopping:
            # While paused the retry waits in the store; resume (here or elsewhere) runs it.
            status = S.RETRYING
            delay = retry.delay(r.attempt, self.rand.random())
            not_before = r.finished_at + delay
            self._retry_later(i, delay)
        else:
            status, not_before = S.FAILED, None
        self.status[i] = status
        if status is S.RETRYING:
            self.last_error[i] = r.error
            if r.details:
                self.last_details[i] = r.details
        batch.finishes.append(
            Finish(
                i,
                r.attempt,
                status,
                r.outcome,
                r.started_at,
                r.finished_at,
                r.output_json,
                r.error,
                not_before,
                r.details_json,
            )
        )
        if status is S.SUCCEEDED:
            self.outputs[i] = r.output
            self._finished(i)
            for d in self.dag.dependents[i]:
                self.waiting[d] -= 1
                if self.waiting[d] == 0 and self.status[d] is S.PENDING:
                    self._push_ready(d)
        elif status is not S.RETRYING:
            self._finished(i)
            if status is S.FAILED:
                self.failed_any = True
            self._skip(self.dag.dependents[i], i)

    def _claim(self, batch: Batch, now: float) -> list[tuple[int, int]]:
        """Pop ready steps into free slots; the (idx, attempt) pairs claimed."""
        if self.run_status is not RunStatus.RUNNING:
            return []
        if self.barrier:
            while (
                self.current_wave < len(self.unfinished_in_wave)
                and not self.unfinished_in_wave[self.current_wave]
            ):
                self.current_wave += 1
        claimed: list[tuple[int, int]] = []
        deferred: list[tuple[float, int]] = []
        free = self.max_parallel - len(self.running)
        while free > 0 and self.heap:
            item = heapq.heappop(self.heap)
            i = item[1]
            if self.status[i] not in (S.PENDING, S.READY, S.RETRYING) or i in self.running:
                continue  # stale heap entry
            if self.barrier and self.dag.wave[i] > self.current_wave:
                deferred.append(item)
                continue
            attempt = self.attempt[i] + 1
            self.attempt[i] = attempt
            self.status[i] = S.RUNNING
            batch.claims.append(Claim(i, attempt, now))
            claimed.append((i, attempt))
            free -= 1
        for item in deferred:
            heapq.heappush(self.heap, item)
        # Steps that became ready this turn but got no slot are recorded as ready.
        for i in self.fresh:
            if self.status[i] is S.PENDING:
                self.status[i] = S.READY
                self.pending_marks.append(Mark(i, S.READY))
        self.fresh.clear()
        return claimed

    # -- attempts ----------------------------------------------------------------------

    def _lookup(self, ref: Ref) -> Any:
        return ref.pick(self.outputs[self.index[ref.step]])

    def _context(self, i: int, attempt: int) -> TaskContext:
        temps = self.retries[i].temperatures
        first = attempt == 1
        return TaskContext(
            run_id=self.run_id,
            step_id=self.dag.ids[i],
            attempt=attempt,
            workdir=self.workdir_path,
            temperature=temps[min(attempt, len(temps)) - 1] if temps else None,
            previous_error=None if first else self.last_error[i],
            previous_details=None if first else self.last_details.get(i),
            run_budget=self.plan.budget,
            step_budget=self.plan.steps[i].budget,
            complexity=self.plan.policy.complexity,
        )

    async def _attempt(self, i: int, attempt: int) -> None:
        step = self.plan.steps[i]
        started = time.time()
        if self.start_latencies is not None:
            self.start_latencies.append(time.perf_counter() - self._committed_at)
        result = _Result(i, attempt, started, started, "failed")
        ctx: TaskContext | None = None
        try:
            inputs = resolve(step.inputs, self._lookup) if self.templated[i] else step.inputs
            task = self.tasks[i]
            ctx = self._context(i, attempt) if task.context_param is not None else None
            timeout = self.timeouts[i]
            if timeout is None:
                value = await task.invoke(inputs, ctx)
            else:
                deadline = asyncio.timeout(timeout)
                try:
                    async with deadline:
                        value = await task.invoke(inputs, ctx)
                except TimeoutError:
                    if not deadline.expired():
                        raise  # the handler's own timeout, not the step's
                    result.outcome = "timeout"
                    raise StepTimeout(f"attempt {attempt} timed out after {timeout}s") from None
            result.output_json = _encode(value)
            issues = (
                await run_checks(value, self.validators[i], self.workdir_path) if self.validators[i] else []
            )
            if issues:
                if ctx is None:
                    ctx = self._context(i, attempt)
                ctx.details["issues"] = [issue.to_dict() for issue in issues]
            failing = [str(issue) for issue in issues if issue.severity in FAILING]
            if failing:
                result.error = "validation failed: " + "; ".join(failing)
            else:
                result.outcome, result.output = "succeeded", value
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
        if ctx is not None and ctx.details:
            try:
                result.details_json = _encode(ctx.details)
                result.details = ctx.details
            except (TypeError, ValueError) as exc:
                result.details = {"unrecorded": f"details are not JSON: {exc}"}
                result.details_json = _encode(result.details)
        result.finished_at = time.time()
        self.results.append(result)
        self.wake.set()

    # -- the loop ----------------------------------------------------------------------

    async def execute(self) -> RunStatus:
        """Run until the run completes, fails, is paused or cancelled, or ownership is lost."""
        engine = self.engine
        store = engine.store
        engine.emit(Event("run.running", self.run_id))
        timer = self._arm_run_timeout()
        try:
            while True:
                self.wake.clear()
                now = time.time()
                batch = Batch(self.run_id, engine.owner, now=now)
                results, self.results = self.results, []
                for r in results:
                    self._absorb(r, batch)
                control = engine.control_of(self.run_id)
                if control is not None and control is not self.run_status:
                    self._apply_control(control)
                if self.timed_out and not self.stopping:
                    self._stop_for_timeout()
                claimed = self._claim(batch, now) if not self.stopping else []
                batch.marks, self.pending_marks = self.pending_marks, []
                finishing = self.run_status is RunStatus.RUNNING and not self.unfinished and not self.running
                if finishing:
                    batch.run_status = RunStatus.FAILED if self.failed_any else RunStatus.COMPLETED
                    if self.timed_out:
                        batch.run_error = f"run timed out after {self.plan.policy.run_timeout_s}s"
                    elif self.failed_any:
                        batch.run_error = "; ".join(
                            f"{self.dag.ids[i]}: failed" for i, st in enumerate(self.status) if st is S.FAILED
                        )[:2000]
                if batch:
                    outcome = await store.commit(batch)
                    self._committed_at = time.perf_counter()
                    if outcome.lost:
                        self.lost = True
                        return await self._abandon()
                    self._emit(batch, outcome.rejected_finishes, outcome.rejected_claims)
                    if outcome.rejected_claims:
                        rejected = set(outcome.rejected_claims)
                        self._unclaim(rejected)
                        claimed = [(i, a) for i, a in claimed if i not in rejected]
                    if outcome.run_status is not None and outcome.run_status is not self.run_status:
                        self._apply_control(outcome.run_status)
                    final = batch.run_status
                    if finishing and final is not None and outcome.run_status is final:
                        engine.emit(Event(f"run.{final}", self.run_id))
                        await store.release_run(self.run_id, engine.owner)
                        return final
                for i, attempt in claimed:
                    self.started_at[i] = now
                    self.running[i] = asyncio.create_task(self._attempt(i, attempt))
                if self.run_status is not RunStatus.RUNNING and not self.running and not self.results:
                    return await self._stop()
                if claimed:
                    # One pass of the event loop runs the new attempts; those that finish
                    # without waiting (no-op and cached work) are absorbed in the next turn
                    # without a second pass to wake this loop.
                    await asyncio.sleep(0)
                if not self.results:
                    await self.wake.wait()
        except asyncio.CancelledError:
            await self._abandon()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _arm_run_timeout(self) -> asyncio.TimerHandle | None:
        """Per-run timeout, counted from the run's first start (resumes do not reset it)."""
        limit = self.plan.policy.run_timeout_s
        if limit is None:
            return None

        def expire() -> None:
            self.timed_out = True
            self.wake.set()

        remaining = self.run_started_at + limit - time.time()
        return asyncio.get_running_loop().call_later(max(0.0, remaining), expire)

    def _stop_for_timeout(self) -> None:
        """The run ran out of time: nothing new starts, running attempts are cancelled
        (within the grace period) and every unfinished step ends cancelled; the run fails."""
        self.stopping = True
        self.failed_any = True
        reason = f"run timed out after {self.plan.policy.run_timeout_s}s"
        for i, st in enumerate(self.status):
            if st in (S.PENDING, S.READY, S.RETRYING):
                self.status[i] = S.CANCELLED
                self._finished(i)
                self.pending_marks.append(Mark(i, S.CANCELLED, reason))
        for task in self.running.values():
            task.cancel()
        if self.running:
            asyncio.get_running_loop().call_later(self.engine.cancel_grace_s, self._give_up_running)

    def _apply_control(self, status: RunStatus) -> None:
        """A pause, resume or cancel decided elsewhere (another process, the API)."""
        self.run_status = status
        if status is RunStatus.CANCELLED:
            for task in self.running.values():
                task.cancel()
            if self.running:
                loop = asyncio.get_running_loop()
                loop.call_later(self.engine.cancel_grace_s, self._give_up_running)
            for i, st in enumerate(self.status):
                if st in (S.PENDING, S.READY, S.RETRYING):
                    self.status[i] = S.CANCELLED  # the store cancelled these with the run
                    self.engine.emit(Event("step.cancelled", self.run_id, self.dag.ids[i]))
        elif status is RunStatus.RUNNING:
            for i, st in enumerate(self.status):
                if st in (S.READY, S.RETRYING) or (st is S.PENDING and self.waiting[i] == 0):
                    self._push_ready(i)

    def _unclaim(self, rejected: set[int]) -> None:
        for i in rejected:
            if self.status[i] is S.RUNNING and i not in self.running:
                self.attempt[i] -= 1
                self.status[i] = S.READY
                self._push_ready(i)

    async def _stop(self) -> RunStatus:
        """Paused or cancelled, and nothing is running any more."""
        if self.run_status is RunStatus.CANCELLED:
            # Steps that were pending when the cancel landed are cancelled by the store.
            self.engine.emit(Event("run.cancelled", self.run_id))
        else:
            self.engine.emit(Event(f"run.{self.run_status}", self.run_id))
        await self.engine.store.release_run(self.run_id, self.engine.owner)
        return self.run_status

    async def _abandon(self) -> RunStatus:
        """Ownership is gone: stop local work without writing anything."""
        for task in self.running.values():
            task.cancel()
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=self.engine.cancel_grace_s)
        self.running.clear()
        if self.lost:
            self.engine.emit(Event("run.lost", self.run_id, data={"owner": self.engine.owner}))
        else:  # shutting down: let another process take over without waiting for the lease
            await self.engine.store.release_run(self.run_id, self.engine.owner)
        return self.run_status

    def _give_up_running(self) -> None:
        """Attempts still running a grace period after a cancel are recorded as cancelled.

        Their tasks were asked to stop and ignored it (or run in a thread that cannot be
        interrupted); the run does not wait for them, and their late results are dropped.
        """
        now = time.time()
        for i in list(self.running):
            self.results.append(
                _Result(
                    i,
                    self.attempt[i],
                    self.started_at.get(i, now),
                    now,
                    "cancelled",
                    error=f"did not stop within the {self.engine.cancel_grace_s}s cancel grace period",
                )
            )
        self.wake.set()

    def _emit(self, batch: Batch, rejected_finishes: list[int], rejected_claims: list[int]) -> None:
        engine = self.engine
        if not engine.events.active:
            return
        ids = self.dag.ids
        bad_f, bad_c = set(rejected_finishes), set(rejected_claims)
        for f in batch.finishes:
            if f.idx not in bad_f:
                data: dict[str, Any] = {"attempt": f.attempt, "duration_s": f.finished_at - f.started_at}
                if f.error:
                    data["error"] = f.error
                engine.emit(Event(f"step.{f.status}", self.run_id, ids[f.idx], data))
        for m in batch.marks:
            engine.emit(Event(f"step.{m.status}", self.run_id, ids[m.idx]))
        for c in batch.claims:
            if c.idx not in bad_c:
                engine.emit(Event("step.running", self.run_id, ids[c.idx], {"attempt": c.attempt}))


_BLOCKING = frozenset({S.FAILED, S.SKIPPED, S.CANCELLED})
_TERMINAL = frozenset(st for st in StepStatus if st.terminal)
#: one encoder for every output (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
