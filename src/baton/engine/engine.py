"""The Engine: the facade every interface calls (Python API, CLI, later REST and NATS).

It validates plans, writes runs to the store, executes them through the one executor,
keeps this process's leases alive, and recovers runs whose owner died.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from baton import audit
from baton.engine.events import Event, EventBus, Subscriber
from baton.engine.executor import Worker
from baton.errors import Conflict, NotFound, PlanError, PolicyDenied, Problem, UsageError, WorkerFailed
from baton.llm.config import LLMConfig
from baton.llm.forecast import Forecast, forecast_plan, over_budget
from baton.llm.gateway import Gateway
from baton.llm.tasks import make_llm_tasks
from baton.llm.types import ProviderError
from baton.plan.analysis import analyze
from baton.plan.model import Plan, Step
from baton.plan.validate import MAX_PLAN_STEPS, load_plan, parse_plan, validate_plan
from baton.policy import Policy
from baton.queue.cron import cron_problem, fire_due, next_tick
from baton.sandbox import Sandbox
from baton.secrets import Redactor
from baton.status import RunStatus, StepStatus
from baton.store import (
    JobRecord,
    NewJob,
    RunRecord,
    Schedule,
    SQLiteStore,
    StepRecord,
    Store,
    WorkerRecord,
    store_for,
)
from baton.store.base import PRUNABLE, GoalRecord, PruneResult
from baton.tasks.http import http_task
from baton.tasks.registry import Registry, TaskDef
from baton.tasks.subrun import make_plan_task

if TYPE_CHECKING:
    from baton.agents.goals import Agents, GoalResult

log = structlog.get_logger("baton.engine")

#: how long a process's hold on a run lasts without a heartbeat (renewed every poll_s).
DEFAULT_LEASE_S = 15.0
#: a worker with a retention applies it at most this often, in at most RETENTION_BATCHES
#: batches of RETENTION_BATCH steps, jobs or cache entries (each batch a short transaction)
RETENTION_EVERY_S = 600.0
RETENTION_BATCH = 200
RETENTION_BATCHES = 10

PlanSource = Plan | Mapping[str, Any] | str | Path


def new_owner_id() -> str:
    """``host:pid:random``: unique per process, and tells whether the holder is alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def owner_is_dead(owner: str | None) -> bool:
    """True when ``owner`` names a process of this host that no longer exists.

    Lets a restart on the same machine take over at once after a crash (``kill -9``)
    instead of waiting for the lease to lapse; holders on other hosts wait for the lease.
    """
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def new_run_id() -> str:
    """Time-ordered and unique: 12 hex digits of milliseconds, 8 random."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(4)}"


@dataclass(slots=True)
class RunHandle:
    """A submitted run; ``await handle.wait()`` for its end, whichever worker runs it."""

    run_id: str
    engine: Engine
    #: False when an idempotency key named a run submitted before (nothing was written)
    created: bool = True

    @property
    def worker(self) -> Worker | None:
        return self.engine.worker

    async def wait(self, timeout_s: float | None = None) -> RunRecord:
        """Wait until the run stops: it ended, or it is paused and nothing of it runs.

        The record comes without its plan (``engine.get_run`` reads that too).
        """
        return await self.engine.wait(self.run_id, timeout_s=timeout_s)


class Engine:
    """One process's entry to baton: ``async with Engine("sqlite:///x.db") as engine: ...``.

    Submitting a plan or enqueueing a job writes rows to the store's queue; the engine's
    worker (started on first use, or by ``baton worker``) claims and executes them, as do
    the workers of any other process on the same database.
    """

    def __init__(
        self,
        db: str | Store | None = None,
        *,
        registry: Registry | None = None,
        owner: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
        poll_s: float = 0.2,
        cancel_grace_s: float = 5.0,
        default_max_parallel: int = 8,
        concurrency: int = 256,
        queues: list[str] | None = None,
        workdir: str | Path | None = None,
        measure_latency: bool = False,
        llm: LLMConfig | str | Path | None = None,
        retention_s: float | None = None,
        policy: Policy | str | Path | None = None,
        http_allow: Sequence[str] | None = None,
        max_plan_steps: int = MAX_PLAN_STEPS,
        sandbox: Sandbox | None = None,
        audit_key: bytes | None = None,
    ) -> None:
        self.store: Store = db if db is not None and not isinstance(db, str) else store_for(db)
        # the audit trail's key: given, or BATON_AUDIT_KEY(_FILE), or audit.key beside SQLite
        #: the audit trail's key as given (else found when the engine opens: audit.load_key)
        self._audit_key = audit_key
        self._agents: Agents | None = None
        self.registry = registry or Registry.default()
        config = llm if isinstance(llm, LLMConfig) or llm is None else LLMConfig.load(llm)
        self.gateway = Gateway(config, self.store)
        self.gateway.on_overrun = lambda run_id, data: self.emit(Event("budget.overrun", run_id, data=data))
        #: the values of this process's secrets, kept out of outputs, errors and details
        keys = [m.key_env() for m in config.models.values()] if config is not None else []
        self.redactor = Redactor.from_environ(extra=[k for k in keys if k])
        self.registry.extend(make_llm_tasks(self.gateway))
        self.registry.extend([make_plan_task(self)])  # sub-runs: a step that runs a plan
        if http_allow is not None:  # what the http task may reach that is not public (else BATON_HTTP_ALLOW)
            self.registry.extend([http_task(http_allow)])
        self.owner = owner or new_owner_id()
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.cancel_grace_s = cancel_grace_s
        self.default_max_parallel = default_max_parallel
        self.concurrency = concurrency
        self.queues = queues
        self.workdir = Path(workdir) if workdir is not None else Path.cwd()
        #: where confined runs' workspaces are, who their programs run as (baton.sandbox)
        self.sandbox = sandbox or Sandbox.of(self.workdir / ".baton" / "workspaces")
        self.measure_latency = measure_latency
        #: a plan with more steps is refused before any step is looked at
        self.max_plan_steps = max_plan_steps
        #: what API callers may run, by the role of their key (local callers are not checked)
        self.policy = (
            policy if isinstance(policy, Policy) else Policy() if policy is None else Policy.load(policy)
        )
        if retention_s is not None and not retention_s > 0:
            raise UsageError("retention_s must be more than 0 seconds")
        #: the worker prunes what ended longer ago than this (None: it keeps everything)
        self.retention_s = retention_s
        self._retention_due = 0.0
        self.events = EventBus()
        self.worker: Worker | None = None
        #: why this process's worker stopped on an error (it does not start again)
        self.failure: WorkerFailed | None = None
        self._waiters: dict[str, asyncio.Event] = {}
        self._open = False
        self._endings: audit.RunEndings | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if not self._open:
            made = self._find_audit_key()
            await self.store.open()
            self._open = True
            if made:  # the key was made now: a trail written before it had one takes it
                await audit.adopt_key(self.store, self.store.audit_key)
            # how the runs this process sees end goes on the audit trail, whoever started them
            self._endings = audit.RunEndings(self)

    def _find_audit_key(self) -> bool:
        """Give the store the trail's key: as given, BATON_AUDIT_KEY(_FILE), or audit.key
        beside a SQLite database (made if missing). Whether it was made now."""
        store = self.store
        if self._audit_key is not None:
            store.audit_key = self._audit_key
            return False
        beside = None
        if isinstance(store, SQLiteStore) and str(store.path) != ":memory:":
            beside = store.path.parent
        made = (
            beside is not None
            and not audit.key_configured()
            and not (beside / audit.DEFAULT_KEY_FILE).exists()
        )
        store.audit_key = audit.load_key(beside=beside)
        return made

    async def close(self, grace_s: float | None = None) -> None:
        """Stop this process's worker (what it still runs goes back to the queue) and close."""
        if self.worker is not None:
            await self.worker.stop(grace_s)
            self.worker = None
        await self.gateway.aclose()
        if self._open:
            if self._endings is not None:
                await self._endings.close()  # before the store closes
                self._endings = None
            await self.store.close()
            self._open = False

    async def start_worker(
        self, *, name: str | None = None, concurrency: int | None = None, queues: list[str] | None = None
    ) -> Worker:
        """Start executing jobs from the queue in this process (once; later calls return it).

        WorkerFailed when this process's worker stopped on an error: its successor is a new
        process (its jobs wait for that one, or go to the other workers)."""
        await self.open()
        if self.failure is not None:
            raise self.failure
        if self.worker is None or not self.worker.active:
            self.registry.refresh()
            worker = Worker(
                self,
                name=name,
                concurrency=concurrency or self.concurrency,
                queues=queues if queues is not None else self.queues,
            )
            await worker.start()
            self.worker = worker
        return self.worker

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        return self.events.subscribe(fn)

    def emit(self, event: Event) -> None:
        self.events.emit(event)

    def workdir_path(self, recorded: str, run_id: str | None = None, plan: Plan | None = None) -> Path:
        """Where the steps of a run run: a confined run's workspace under this process's
        sandbox root (made if missing), else the directory the run recorded."""
        if run_id is not None and plan is not None and plan.policy.sandbox:
            return self.sandbox.workspace(run_id)
        return Path(recorded) if recorded else self.workdir

    def runs_changed(self, run_ids: set[str]) -> None:
        """Wake whoever waits on these runs (the worker ended them, or moved them on)."""
        for run_id in run_ids:
            waiter = self._waiters.get(run_id)
            if waiter is not None:
                waiter.set()

    def worker_failed(self, worker: Worker) -> None:
        """The worker stopped on an error: whoever waits here is told (see ``wait``)."""
        assert worker.failure is not None
        exc = worker.failure
        reason = exc.message if isinstance(exc, WorkerFailed | UsageError) else f"{type(exc).__name__}: {exc}"
        self.failure = exc if isinstance(exc, WorkerFailed) else WorkerFailed(f"the worker stopped: {reason}")
        self.runs_changed(set(self._waiters))

    def dead_workers(self, workers: list[WorkerRecord]) -> list[str]:
        """Workers of this host whose process is gone: rescued at once, not at lease end."""
        return [w.id for w in workers if w.id != self.owner and owner_is_dead(w.id)]

    # -- plans -------------------------------------------------------------------------------

    def load(self, source: PlanSource) -> Plan:
        """A validated plan from a Plan, plain data, a file path or YAML/JSON text."""
        self.registry.refresh()
        if isinstance(source, Plan):
            return validate_plan(source, self.registry, max_steps=self.max_plan_steps)
        if isinstance(source, Path):
            return load_plan(source, self.registry, max_steps=self.max_plan_steps)
        if isinstance(source, str):
            text = source.lstrip()
            if "\n" not in text and not text.startswith(("{", "name:")):
                return load_plan(source, self.registry, max_steps=self.max_plan_steps)
            from baton.plan.validate import read_plan_text

            return parse_plan(read_plan_text(source), self.registry, max_steps=self.max_plan_steps)
        return parse_plan(source, self.registry, max_steps=self.max_plan_steps)

    async def submit(
        self,
        source: PlanSource,
        *,
        start: bool = True,
        idempotency_key: str | None = None,
        actor: str | None = None,
        key_role: str | None = None,
        goal: GoalRecord | None = None,
        fingerprint: str | None = None,
        parent: tuple[str, str] | None = None,
    ) -> RunHandle:
        """Validate the plan and put its run in the queue; by default, this process's
        worker starts on it (and any other worker on the database may help).

        A bad plan raises PlanError before anything is written. With ``idempotency_key``,
        submitting the same plan again under the same key gives the run made the first
        time (``created`` False); another plan under that key raises Conflict. The start
        goes on the audit trail with ``actor`` (the Python API's caller when not given).

        ``key_role``: the caller holds an API key of that role (REST, NATS), and the policy
        decides what its plan may run; PolicyDenied, every offending step named, and a
        ``denied`` audit entry, before anything is written.

        ``goal``: the goal (baton.agents) the run carries out, written with it; and
        ``fingerprint``, what makes two requests under one idempotency key the same (by
        default, the plan). ``parent``: the (run, step) it is a sub-run of (task: plan).
        """
        actor = actor or audit.python_actor()
        return await self._submit(source, start, idempotency_key, actor, key_role, goal, fingerprint, parent)

    async def _submit(
        self,
        source: PlanSource,
        start: bool,
        idempotency_key: str | None,
        actor: str | None,
        key_role: str | None = None,
        goal: GoalRecord | None = None,
        fingerprint: str | None = None,
        parent: tuple[str, str] | None = None,
    ) -> RunHandle:
        plan = self.load(source)
        await self.open()
        if key_role is not None:
            problems = self.policy.check_plan(plan, self.registry, key_role)
            if problems:
                await self._deny(actor, "run.start", plan.name, key_role, problems)
            plan = self._confined(plan, key_role)
        dag = analyze(plan, self.registry)
        if plan.budget is not None or any(s.budget is not None for s in plan.steps):
            try:
                costs, total = await forecast_plan(self.gateway, self.registry, plan)
            except ProviderError:  # a model that cannot be called: its steps say so when they run
                costs, total = {}, Forecast()
            problems = over_budget(plan, costs, total)
            if problems:  # it cannot finish within its budget: said now, not after spending
                raise PlanError(problems)
        run_id = new_run_id()
        now = time.time()
        policy = plan.policy
        run = RunRecord(
            id=run_id,
            name=plan.name,
            status=RunStatus.PENDING,
            plan=plan.to_dict(),
            created_at=now,
            workdir=str(self.sandbox.root / run_id if plan.policy.sandbox else self.workdir),
            total_steps=len(plan.steps),
            max_parallel=policy.effective_max_parallel(self.default_max_parallel),
            barrier=policy.barrier == "wave",
            run_timeout_s=policy.run_timeout_s,
        )
        steps = [
            StepRecord(
                run_id,
                i,
                s.id,
                s.task,
                dag.wave[i],
                StepStatus.READY if not dag.needs[i] else StepStatus.PENDING,
                waiting=len(dag.needs[i]),
                rank=dag.remaining[i],
            )
            for i, s in enumerate(plan.steps)
        ]
        idempotency = None
        if idempotency_key is not None:
            if fingerprint is None:
                fingerprint = hashlib.sha256(json.dumps(run.plan, sort_keys=True).encode()).hexdigest()
            idempotency = (idempotency_key, fingerprint)
        if goal is not None:
            goal = replace(goal, run_id=run_id, created_at=now)
        try:
            made = await self.store.create_run(run, steps, idempotency=idempotency, goal=goal, parent=parent)
        except UnicodeEncodeError as exc:  # "\ud800": a Python string, not Unicode text
            bad = exc.object[exc.start]
            problem = Problem("", f"it is not valid Unicode text: a lone surrogate {bad!a} cannot be stored")
            raise PlanError([problem]) from None
        if made != run_id:
            return RunHandle(made, self, created=False)
        if actor is not None:
            await audit.record(self.store, actor, "run.start", run_id, name=plan.name)
        self.emit(Event("run.pending", run_id, data={"name": plan.name, "steps": len(steps)}))
        if start:
            worker = await self.start_worker()
            worker.adopt(run, plan, dag)
            worker.poke()
        return RunHandle(run_id, self)

    @property
    def agents(self) -> Agents:
        """The goal layer (baton.agents): templates, learning, goals as runs."""
        if self._agents is None:
            from baton.agents.goals import Agents

            self._agents = Agents(self)
        return self._agents

    async def achieve(
        self,
        goal: str,
        *,
        language: str | None = None,
        complexity: str | None = None,
        context: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> GoalResult:
        """Carry out a task given in words (classified, a template chosen by what was
        learned, decomposed into a plan this engine runs) and wait for its result."""
        return await self.agents.achieve(
            goal, language=language, complexity=complexity, context=context, timeout_s=timeout_s
        )

    async def run(self, source: PlanSource, *, actor: str | None = None) -> RunRecord:
        """Submit a plan and wait for it to stop (completed, failed, paused or cancelled)."""
        handle = await self.submit(source, actor=actor)
        return await handle.wait()

    async def execute(
        self,
        task: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        key_role: str | None = None,
        actor: str | None = None,
        **policy: Any,
    ) -> Any:
        """Call one task directly, through the same executor, store and policies as plans
        (``key_role`` and ``actor`` as for ``submit``)."""
        step = Step.model_validate({"id": "call", "task": task, "with": dict(inputs or {}), **policy})
        # a call's run is how it goes through the executor, not a run anyone started
        call = Plan(name=f"call:{task}", steps=[step])
        if key_role is not None:
            problems = self.policy.check_plan(self.load(call), self.registry, key_role)
            if problems:
                await self._deny(actor, "task.execute", task, key_role, problems)
            call = self._confined(call, key_role)
        handle = await self._submit(call, True, None, None)
        record = await handle.wait()
        steps = await self.store.get_steps(record.id)
        if record.status is not RunStatus.COMPLETED:
            from baton.errors import TaskFailed

            raise TaskFailed(steps[0].error or f"{task} {record.status}")
        return steps[0].output

    def _confined(self, plan: Plan, key_role: str) -> Plan:
        """A key holder's plan as it runs: confined, each step under the role it named or
        the first its key grants (what the policy checked)."""
        grants = self.policy.keys.get(key_role, ())
        default = grants[0] if grants else None
        steps = [s if s.role else s.model_copy(update={"role": default}) for s in plan.steps]
        policy = plan.policy.model_copy(update={"sandbox": True})
        return plan.model_copy(update={"steps": steps, "policy": policy})

    async def forecast(self, source: PlanSource) -> tuple[dict[str, Forecast], Forecast, float | None]:
        """What the plan's model calls will cost (baton.llm.forecast): by step, in all, and
        the share of recent calls the caches answered (None: no history to tell)."""
        plan = self.load(source)
        hit_rate = None
        if self._open:
            sources = await self.store.llm_sources()
            if sources:
                hit_rate = sum(1 for s in sources if s == "cached") / len(sources)
        steps, total = await forecast_plan(self.gateway, self.registry, plan, hit_rate or 0.0)
        return steps, total, hit_rate

    async def _deny(
        self, actor: str | None, action: str, subject: str, role: str, problems: list[Problem]
    ) -> NoReturn:
        """Refuse what the policy does not allow a key of ``role``, on the audit trail."""
        await self.open()
        detail = {"refused": action, "role": role, "problems": [p.to_dict() for p in problems]}
        await audit.record(self.store, actor or audit.python_actor(), "denied", subject, **detail)
        article = "an" if role[:1] in "aeiou" else "a"
        raise PolicyDenied(f"{article} {role} key may not {action.replace('.', ' ')} {subject!r}", problems)

    # -- control ----------------------------------------------------------------------------

    # Each control action goes on the audit trail with who did it (``actor``: an API key,
    # a command-line user...; the Python API's caller when not given) before its event.

    async def pause(self, run_id: str, *, actor: str | None = None) -> RunRecord:
        """No new step starts; running ones finish and are recorded. Its sub-runs pause too."""
        record = await self._set_status(run_id, RunStatus.PAUSED, "run.pause", actor)
        await self._children(record.id, (RunStatus.PENDING, RunStatus.RUNNING), self.pause, actor)
        return record

    async def cancel(self, run_id: str, *, actor: str | None = None) -> RunRecord:
        """No new step starts; running ones are cancelled within the grace period, and its
        sub-runs are cancelled."""
        record = await self._set_status(run_id, RunStatus.CANCELLED, "run.cancel", actor)
        if self.worker is not None:
            self.worker.stop_run(record.id)
        live = (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.PAUSED)
        await self._children(record.id, live, self.cancel, actor)
        return record

    async def _children(
        self,
        run_id: str,
        statuses: tuple[RunStatus, ...],
        action: Callable[..., Awaitable[Any]],
        actor: str | None,
    ) -> None:
        """Apply a pause, resume or cancel of ``run_id`` to its sub-runs in ``statuses``."""
        for child, _, status in await self.store.child_runs(run_id):
            if status in statuses:
                with contextlib.suppress(Conflict):  # it ended or moved meanwhile: nothing to carry
                    await action(child, actor=actor)

    async def _set_status(self, run_id: str, status: RunStatus, action: str, actor: str | None) -> RunRecord:
        await self.open()
        record = await self.store.set_run_status(run_id, status, time.time())
        await audit.record(self.store, actor or audit.python_actor(), action, record.id)
        self.emit(Event(f"run.{status}", record.id))
        self.runs_changed({record.id})
        return record

    async def resume(self, run_id: str, *, actor: str | None = None) -> RunHandle:
        """Continue a paused run, or one whose workers died, with this process's worker.

        Conflict when the run ended, or when live workers are executing it (it needs no
        resuming: ``wait`` for it, or start more workers).
        """
        await self.open()
        run = await self.store.get_run(run_id, with_plan=False)
        if run.status.terminal:
            raise Conflict(f"run {run.id} is {run.status}; there is nothing to resume")
        self._check_tasks(run.id, await self.store.get_steps(run.id))
        if run.status is RunStatus.PAUSED:
            await self.store.set_run_status(run.id, RunStatus.RUNNING, time.time())
        else:
            await self.store.sweep(time.time(), self.dead_workers(await self.store.list_workers()))
            held = sorted(
                {s.lease_owner for s in await self.store.get_steps(run.id) if s.lease_owner is not None}
            )
            if held and (self.worker is None or held != [self.worker.id]):
                raise Conflict(
                    f"run {run.id} is being executed by {', '.join(held)}; there is nothing to resume"
                )
        await audit.record(self.store, actor or audit.python_actor(), "run.resume", run.id)
        self.emit(Event("run.resumed", run.id))
        await self._children(run.id, (RunStatus.PAUSED,), self.resume, actor)
        worker = await self.start_worker()
        worker.poke()
        return RunHandle(run.id, self)

    def _check_tasks(self, run_id: str, steps: list[StepRecord]) -> None:
        """UsageError naming the tasks of the run's unfinished steps that this process
        cannot run: resuming without them would wait for ever."""
        self.registry.refresh()
        missing = sorted({s.task for s in steps if not s.status.terminal and s.task not in self.registry})
        if missing:
            names = ", ".join(repr(t) for t in missing)
            raise UsageError(
                f"run {run_id} needs tasks not registered in this process: {names}; "
                "add the modules that define them with --import MODULE"
            )

    async def recover(self) -> list[RunHandle]:
        """Runs left behind by workers that are gone, now executed here too: steps those
        workers held go back to the queue, and this process's worker takes them (as would
        any worker on the database)."""
        await self.open()
        worker = await self.start_worker()
        await self.store.sweep(time.time(), self.dead_workers(await self.store.list_workers()))
        worker.poke()
        orphans = await self.store.list_runs(limit=1000, status=RunStatus.RUNNING)
        return [RunHandle(run.id, self) for run in orphans if run.running == 0]

    # -- standalone jobs and cron ------------------------------------------------------------

    def _check_call(self, task: str, inputs: Mapping[str, Any]) -> TaskDef:
        """The task, if it exists here and ``inputs`` fit its parameters (else UsageError)."""
        self.registry.refresh()
        if task not in self.registry:
            known = ", ".join(self.registry.names())
            raise UsageError(f"unknown task {task!r} (known: {known}; add yours with --import)")
        definition = self.registry.get(task)
        problems = definition.check_inputs(inputs)
        if problems:
            raise UsageError(f"task {task!r}: " + "; ".join(problems))
        return definition

    async def enqueue(
        self,
        task: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        run_at: float | None = None,
        delay_s: float | None = None,
        unique_key: str | None = None,
        max_attempts: int = 3,
        queue: str = "default",
        timeout_s: float | None = None,
        key_role: str | None = None,
        actor: str | None = None,
    ) -> JobRecord:
        """Put one task call in the queue for any worker; with ``unique_key``, a call
        whose key is taken returns the job already there (``duplicate``). ``key_role`` and
        ``actor`` as for ``submit``."""
        args = dict(inputs or {})
        self._check_call(task, args)
        role = None
        if key_role is not None:  # the job runs confined, under the first role that may run it
            role = self.policy.job_role(task, self.registry, key_role)
            if role is None:
                problems = self.policy.check_task(task, self.registry, key_role)
            else:
                step = Step.model_validate({"id": "job", "task": task, "with": args, "role": role})
                problems = self.policy.check_plan(Plan(name=task, steps=[step]), self.registry, key_role)
            if problems:
                await self._deny(actor, "job.enqueue", task, key_role, problems)
        if max_attempts < 1:
            raise UsageError("max_attempts must be at least 1")
        if run_at is not None and not 0 <= run_at <= 253402300799.0:
            raise UsageError("run_at must be a Unix time between 1970 and the end of the year 9999")
        if not queue or len(queue) > 100:
            raise UsageError("queue must be a name of 1 to 100 characters")
        try:
            json.dumps(args, ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:  # UnicodeEncodeError: a lone surrogate
            raise UsageError(f"job inputs must be JSON text: {exc}") from None
        await self.open()
        now = time.time()
        when = run_at if run_at is not None else (now + delay_s if delay_s else None)
        job = NewJob(task, args, queue, priority, when, unique_key, max_attempts, timeout_s, role)
        (record,) = await self.store.enqueue([job], now)
        if self.worker is not None:
            self.worker.poke()
        return record

    async def schedule(
        self,
        task: str,
        *,
        cron: str,
        inputs: Mapping[str, Any] | None = None,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_attempts: int = 3,
        timeout_s: float | None = None,
        catch_up_s: float = 60.0,
    ) -> Schedule:
        """Run ``task`` on every tick of ``cron`` (UTC): one job per tick, however many
        workers run the scheduler."""
        problem = cron_problem(cron)
        if problem:
            raise UsageError(problem)
        args = dict(inputs or {})
        self._check_call(task, args)
        await self.open()
        schedule = Schedule(
            name=name or task,
            task=task,
            cron=cron,
            args=args,
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout_s,
            catch_up_s=catch_up_s,
            next_at=next_tick(cron, time.time()),
        )
        await self.store.put_schedule(schedule)
        return schedule

    async def fire_schedules(self, now: float | None = None) -> dict[str, int]:
        """Enqueue the due ticks of every schedule (each worker's sweep calls this)."""
        fired = await fire_due(self.store, now)
        if fired and self.worker is not None:
            self.worker.poke()
        return fired

    async def retry_job(self, job_id: int) -> JobRecord:
        """A discarded or cancelled job back to available, with its attempts renewed."""
        await self.open()
        job = await self.store.retry_job(job_id, time.time())
        if self.worker is not None:
            self.worker.poke()
        return job

    async def cancel_job(self, job_id: int) -> JobRecord:
        """Cancel a job that has not finished; a running one is stopped by its worker."""
        await self.open()
        job = await self.store.cancel_job(job_id, time.time())
        if self.worker is not None:
            self.worker.stop_jobs([job_id])  # if it runs here; elsewhere its worker's heartbeat
        return job

    async def wait_job(self, job_id: int, timeout_s: float | None = None) -> JobRecord:
        """Wait until a job is completed, discarded or cancelled."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = await self.store.get_job(job_id)
            if job.state in ("completed", "discarded", "cancelled"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise UsageError(f"job {job_id} did not finish within {timeout_s}s")
            await asyncio.sleep(min(self.poll_s, 0.05))

    # -- retention -----------------------------------------------------------------------------

    async def prune(
        self,
        before: float,
        statuses: Sequence[RunStatus] = tuple(PRUNABLE),
        *,
        batch: int = 500,
        max_batches: int | None = None,
        dry_run: bool = False,
        actor: str | None = None,
    ) -> PruneResult:
        """Delete the runs and standalone jobs that ended (in ``statuses``) before ``before``,
        with everything of theirs, and cache entries that expired before it: in batches of
        ``batch`` (each a short transaction), until none is left or ``max_batches`` were
        done (``more`` then says so). Runs under way are never touched, whatever their age.

        What went is an audit entry (``prune``, by ``actor``); the audit trail itself is
        kept whole, so it still verifies. ``dry_run`` counts what would go and deletes nothing.
        """
        if batch < 1:
            raise UsageError("batch must be at least 1")
        await self.open()
        if dry_run:
            return await self.store.prune(before, statuses, limit=batch, dry_run=True)
        total, batches, idle = PruneResult(), 0, 0
        try:
            while True:
                done = await self.store.prune(before, statuses, limit=batch)
                total.add(done)
                batches += 1
                # (a batch can find what another process's prune takes first: go on, but not
                # for ever)
                idle = 0 if done.removed else idle + 1
                if not done.more or batches == max_batches or idle == 3:
                    break
                await asyncio.sleep(0)  # a batch at a time: let the rest of the process run
        finally:
            if total.removed:  # what did go is on the trail, even if a later batch failed
                await audit.record(
                    self.store,
                    actor or audit.python_actor(),
                    "prune",
                    "history",
                    before=datetime.fromtimestamp(before, UTC).isoformat(),
                    statuses=sorted(str(s) for s in statuses),
                    **total.counts(),
                )
        if total.removed:
            await self._prune_workspaces(before)
        return total

    async def _prune_workspaces(self, before: float) -> None:
        """Delete the workspaces (baton.sandbox) of runs and jobs that are gone, untouched
        since ``before``."""
        for run_id, job_id, path in await asyncio.to_thread(self.sandbox.workspaces, before):
            try:
                if job_id is not None:
                    await self.store.get_job(job_id)
                else:
                    await self.store.get_run(run_id, with_plan=False)
            except NotFound:
                await asyncio.to_thread(shutil.rmtree, path, True)

    async def apply_retention(self, now: float) -> PruneResult | None:
        """The worker's retention (``retention_s``), from its heartbeat: at most every
        RETENTION_EVERY_S, a few small batches of what ended more than ``retention_s`` before
        ``now``. None when there is no retention or it is not due."""
        if self.retention_s is None or now < self._retention_due:
            return None
        self._retention_due = now + RETENTION_EVERY_S
        actor = f"worker:{self.worker.name}" if self.worker is not None else audit.SYSTEM
        result = await self.prune(
            now - self.retention_s, batch=RETENTION_BATCH, max_batches=RETENTION_BATCHES, actor=actor
        )
        if result.removed:
            log.info("retention pruned what ended long ago", retention_s=self.retention_s, **result.counts())
        return result

    # -- reading -------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        await self.open()
        return await self.store.get_run(run_id)

    async def wait(
        self, run_id: str, poll_s: float | None = None, timeout_s: float | None = None
    ) -> RunRecord:
        """Wait for a run to stop (ended or paused, and nothing of it running any more),
        whichever processes execute it."""
        await self.open()
        run_id = (await self.store.get_run(run_id, with_plan=False)).id
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waiter = self._waiters.setdefault(run_id, asyncio.Event())
        try:
            while True:
                waiter.clear()
                if self.failure is not None:
                    raise self.failure
                run = await self.store.get_run(run_id, with_plan=False)
                if (run.status.terminal or run.status is RunStatus.PAUSED) and run.running == 0:
                    return run
                if deadline is not None and time.monotonic() > deadline:
                    raise UsageError(f"run {run_id} did not stop within {timeout_s}s")
                # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
                # comes as the waiter is set, and this loop would then wait for ever
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll_s or self.poll_s):
                        await waiter.wait()
        finally:
            self._waiters.pop(run_id, None)


__all__ = ["Engine", "RunHandle", "StepStatus", "Worker"]
