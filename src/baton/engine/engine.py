"""The Engine: the facade every interface calls (Python API, CLI, later REST and NATS).

It validates plans, writes runs to the store, executes them through the one executor,
keeps this process's leases alive, and recovers runs whose owner died.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from baton.engine.events import Event, EventBus, Subscriber
from baton.engine.executor import RunExecutor
from baton.errors import BatonError, Conflict, UsageError
from baton.llm.config import LLMConfig
from baton.llm.gateway import Gateway
from baton.llm.tasks import make_llm_tasks
from baton.plan.analysis import analyze
from baton.plan.dag import Dag
from baton.plan.model import Plan, Step
from baton.plan.validate import load_plan, parse_plan, validate_plan
from baton.status import RunStatus, StepStatus
from baton.store import RunRecord, StepRecord, Store, store_for
from baton.tasks.registry import Registry

log = structlog.get_logger("baton.engine")

#: how long a process's hold on a run lasts without a heartbeat (renewed every poll_s).
DEFAULT_LEASE_S = 15.0

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
    """A run this engine started or resumed; ``await handle.wait()`` for its end."""

    run_id: str
    task: asyncio.Task[RunStatus]
    engine: Engine
    executor: RunExecutor

    async def wait(self) -> RunRecord:
        """Wait until the run stops executing here; the run as the store has it then.

        The record comes without its plan (``engine.get_run`` reads that too).
        """
        await asyncio.shield(self.task)
        return await self.engine.store.get_run(self.run_id, with_plan=False)


class Engine:
    """One process's entry to baton: ``async with Engine("sqlite:///x.db") as engine: ...``."""

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
        workdir: str | Path | None = None,
        measure_latency: bool = False,
        llm: LLMConfig | str | Path | None = None,
    ) -> None:
        self.store: Store = db if db is not None and not isinstance(db, str) else store_for(db)
        self.registry = registry or Registry.default()
        config = llm if isinstance(llm, LLMConfig) or llm is None else LLMConfig.load(llm)
        self.gateway = Gateway(config, self.store)
        self.registry.extend(make_llm_tasks(self.gateway))
        self.owner = owner or new_owner_id()
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.cancel_grace_s = cancel_grace_s
        self.default_max_parallel = default_max_parallel
        self.workdir = Path(workdir) if workdir is not None else Path.cwd()
        self.measure_latency = measure_latency
        self.events = EventBus()
        self._executors: dict[str, RunExecutor] = {}
        self._handles: dict[str, RunHandle] = {}
        self._control: dict[str, RunStatus] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self._open = False

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        if not self._open:
            await self.store.open()
            self._open = True

    async def close(self) -> None:
        """Stop executing (leases lapse so another process can take over) and close."""
        for handle in list(self._handles.values()):
            handle.task.cancel()
        for handle in list(self._handles.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await handle.task
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        await self.gateway.aclose()
        if self._open:
            await self.store.close()
            self._open = False

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        return self.events.subscribe(fn)

    def emit(self, event: Event) -> None:
        self.events.emit(event)

    def workdir_path(self, recorded: str) -> Path:
        return Path(recorded) if recorded else self.workdir

    # -- plans -------------------------------------------------------------------------------

    def load(self, source: PlanSource) -> Plan:
        """A validated plan from a Plan, plain data, a file path or YAML/JSON text."""
        self.registry.refresh()
        if isinstance(source, Plan):
            return validate_plan(source, self.registry)
        if isinstance(source, Path):
            return load_plan(source, self.registry)
        if isinstance(source, str):
            text = source.lstrip()
            if "\n" not in text and not text.startswith(("{", "name:")):
                return load_plan(source, self.registry)
            from baton.plan.validate import read_plan_text

            return parse_plan(read_plan_text(source), self.registry)
        return parse_plan(source, self.registry)

    async def submit(self, source: PlanSource, *, start: bool = True) -> RunHandle | str:
        """Validate, write the run, and (by default) start executing it here.

        A bad plan raises PlanError before anything is written.
        """
        plan = self.load(source)
        await self.open()
        dag = analyze(plan, self.registry)
        run_id = new_run_id()
        now = time.time()
        run = RunRecord(
            id=run_id,
            name=plan.name,
            status=RunStatus.PENDING,
            plan=plan.to_dict(),
            created_at=now,
            workdir=str(self.workdir),
            total_steps=len(plan.steps),
        )
        steps = [StepRecord(run_id, i, s.id, s.task, dag.wave[i]) for i, s in enumerate(plan.steps)]
        await self.store.create_run(run, steps)
        self.emit(Event("run.pending", run_id, data={"name": plan.name, "steps": len(steps)}))
        if not start:
            return run_id
        return await self._start(run_id, (plan, dag, steps))

    async def run(self, source: PlanSource) -> RunRecord:
        """Submit a plan and wait for it to stop (completed, failed, paused or cancelled)."""
        handle = await self.submit(source)
        assert isinstance(handle, RunHandle)
        return await handle.wait()

    async def execute(self, task: str, inputs: Mapping[str, Any] | None = None, **policy: Any) -> Any:
        """Call one task directly, through the same executor, store and policies as plans."""
        step = Step.model_validate({"id": "call", "task": task, "with": dict(inputs or {}), **policy})
        record = await self.run(Plan(name=f"call:{task}", steps=[step]))
        steps = await self.store.get_steps(record.id)
        if record.status is not RunStatus.COMPLETED:
            from baton.errors import TaskFailed

            raise TaskFailed(steps[0].error or f"{task} {record.status}")
        return steps[0].output

    # -- execution ----------------------------------------------------------------------------

    async def _start(self, run_id: str, fresh: tuple[Plan, Dag, list[StepRecord]] | None = None) -> RunHandle:
        """Acquire the run and execute it here; ``fresh`` skips reading back a run just written."""
        if run_id in self._handles:
            return self._handles[run_id]
        current = await self.store.get_run(run_id) if fresh is None else None
        dead = current.owner if current is not None and owner_is_dead(current.owner) else None
        run = await self.store.acquire_run(run_id, self.owner, self.lease_s, time.time(), dead_owner=dead)
        try:
            if fresh is not None:
                plan, dag, records = fresh
            else:
                assert current is not None
                plan = validate_plan(Plan.model_validate(current.plan), self.registry)
                dag = analyze(plan, self.registry)
                records = await self.store.get_steps(run.id)
            executor = RunExecutor(self, run, plan, dag, records)
        except BaseException:
            # Cannot execute it here (say, its tasks are not imported): let others try.
            await self.store.release_run(run.id, self.owner)
            raise
        self._executors[run.id] = executor
        self._control.pop(run.id, None)
        task = asyncio.create_task(self._drive(run.id, executor), name=f"baton-run-{run.id}")
        handle = RunHandle(run.id, task, self, executor)
        self._handles[run.id] = handle
        self._ensure_heartbeat()
        return handle

    async def _drive(self, run_id: str, executor: RunExecutor) -> RunStatus:
        try:
            return await executor.execute()
        finally:
            self._executors.pop(run_id, None)
            self._handles.pop(run_id, None)
            self._control.pop(run_id, None)

    def control_of(self, run_id: str) -> RunStatus | None:
        """The latest status decided outside the executor (pause/resume/cancel), if any."""
        return self._control.get(run_id)

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="baton-heartbeat")

    async def _beat(self) -> None:
        """Renew leases and pick up pause/resume/cancel written by other processes."""
        while self._executors:
            await asyncio.sleep(self.poll_s)
            ids = list(self._executors)
            if not ids:
                break
            try:
                statuses = await self.store.heartbeat(self.owner, self.lease_s, time.time(), ids)
            except BatonError as exc:  # a busy or vanished database: try again next beat
                log.warning("heartbeat failed", owner=self.owner, error=exc.message)
                continue
            for run_id, status in statuses.items():
                executor = self._executors.get(run_id)
                if executor is None:
                    continue
                if status is None:
                    executor.lost = True
                    handle = self._handles.get(run_id)
                    if handle is not None:
                        handle.task.cancel()  # someone else owns it now: stop without writing
                elif status is not executor.run_status:
                    self._control[run_id] = status
                    executor.wake.set()

    async def pause(self, run_id: str) -> RunRecord:
        """No new step starts; running ones finish and are recorded."""
        return await self._set_status(run_id, RunStatus.PAUSED)

    async def cancel(self, run_id: str) -> RunRecord:
        """No new step starts; running ones are cancelled within the grace period."""
        return await self._set_status(run_id, RunStatus.CANCELLED)

    async def _set_status(self, run_id: str, status: RunStatus) -> RunRecord:
        await self.open()
        record = await self.store.set_run_status(run_id, status, time.time())
        executor = self._executors.get(record.id)
        if executor is not None:
            self._control[record.id] = status
            executor.wake.set()
        self.emit(Event(f"run.{status}.requested", record.id))
        return record

    async def resume(self, run_id: str) -> RunHandle:
        """Continue a paused run, or one whose owner died, in this process."""
        await self.open()
        run = await self.store.get_run(run_id)
        if run.status is RunStatus.PAUSED:
            executor = self._executors.get(run.id)
            if executor is None and self._held_elsewhere(run):
                raise Conflict(
                    f"run {run.id} is still held by {run.owner}, which is finishing its running "
                    "steps; resume it once that process has let go"
                )
            run = await self.store.set_run_status(run.id, RunStatus.RUNNING, time.time())
            if executor is not None:  # still draining here: just let it go on
                self._control[run.id] = RunStatus.RUNNING
                executor.wake.set()
                return self._handles[run.id]
        elif run.status.terminal:
            raise Conflict(f"run {run.id} is {run.status}; there is nothing to resume")
        return await self._start(run.id)

    def _held_elsewhere(self, run: RunRecord) -> bool:
        """Another live process holds the run's lease."""
        return (
            run.owner is not None
            and run.owner != self.owner
            and (run.lease_expires_at or 0.0) >= time.time()
            and not owner_is_dead(run.owner)
        )

    async def recover(self) -> list[RunHandle]:
        """Take over every run whose owner is gone, and execute it here.

        Gone: its lease expired, or it was a process of this host that no longer exists.
        """
        await self.open()
        handles: list[RunHandle] = []
        orphans = await self.store.orphaned_runs(time.time())
        for run in await self.store.list_runs(limit=1000, status=RunStatus.RUNNING):
            if run.id not in orphans and owner_is_dead(run.owner):
                orphans.append(run.id)
        for run_id in orphans:
            try:
                handles.append(await self._start(run_id))
            except Conflict:
                continue  # another process was faster
            except BatonError as exc:
                log.warning("cannot recover run here", run_id=run_id, error=exc.message)
        return handles

    # -- reading -------------------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        await self.open()
        return await self.store.get_run(run_id)

    async def wait(self, run_id: str, poll_s: float = 0.2, timeout_s: float | None = None) -> RunRecord:
        """Wait for a run to stop, whichever process executes it."""
        await self.open()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            handle = self._handles.get(run_id)
            if handle is not None:
                return await handle.wait()
            run = await self.store.get_run(run_id)
            if run.status.terminal or (run.status is RunStatus.PAUSED and run.owner is None):
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise UsageError(f"run {run_id} did not stop within {timeout_s}s")
            await asyncio.sleep(poll_s)


__all__ = ["Engine", "RunHandle", "StepStatus"]
