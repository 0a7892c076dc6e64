"""The queue from the command line: ``baton worker``, ``baton jobs ...``, ``baton schedules ...``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer
from rich import box
from rich.table import Table
from rich.text import Text

from baton.cli import (
    EXIT_FAILED,
    EXIT_OK,
    DbOption,
    ImportOption,
    JsonOption,
    LeaseOption,
    LlmOption,
    PoolOption,
    SandboxUserOption,
    WorkspacesOption,
    _emit_json,
    _engine,
    _err,
    _execute,
    _import_modules,
    _local,
    _out,
    _preview,
    _Session,
    app,
)
from baton.cli.progress import human_s, styled
from baton.cli.prune import parse_duration
from baton.engine import DEFAULT_LEASE_S, Engine
from baton.errors import BatonError, StoreUnavailable, UsageError
from baton.plan.reader import DocumentError, item_lines, load_yaml_node, read_text
from baton.queue.cron import describe
from baton.store import DEFAULT_DB, AttemptRecord, JobRecord, Schedule
from baton.views import AttemptView, JobView, iso

jobs_app = typer.Typer(help="Standalone jobs: enqueue task calls, list, inspect, retry, cancel.")
schedules_app = typer.Typer(help="Cron schedules: one job per tick, however many workers run.")
app.add_typer(jobs_app, name="jobs")
app.add_typer(schedules_app, name="schedules")

log = structlog.get_logger("baton.worker")

JOB_STATES = ("available", "scheduled", "running", "retryable", "completed", "discarded", "cancelled")
JobArg = Annotated[int, typer.Argument(metavar="JOB", help="Job id.", show_default=False)]
InputOption = Annotated[
    str | None,
    typer.Option("--input", "-i", metavar="JSON", help="The task's inputs, a JSON object."),
]


def _inputs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError("--input must be a JSON object, such as '{\"value\": 1}'")
    return value


def _when(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--run-at {text!r} is not an ISO 8601 time, such as 2026-11-21T18:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _emit_line(doc: dict[str, Any]) -> None:
    """One compact JSON document per line (a long-running command's events)."""
    sys.stdout.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _job_json(job: JobRecord) -> dict[str, Any]:
    return JobView.of(job).model_dump()


def _attempt_json(a: AttemptRecord) -> dict[str, Any]:
    return AttemptView.of(a).model_dump()


def _print_job(job: JobRecord) -> None:
    line = Text.assemble(f"job {job.id} ({job.task}, queue {job.queue}): ", styled(job.state))
    if job.duplicate:
        line.append(f" (already enqueued under key {job.unique_key!r})")
    _out.print(line)
    _out.print(Text(f"  attempts {job.attempt}/{job.max_attempts}, priority {job.priority}"))
    if job.state == "scheduled" and job.run_at is not None:
        _out.print(Text(f"  runs at {_local(job.run_at)}"))
    if job.output is not None:
        _out.print(Text(f"  output: {_preview(job.output)}"))
    if job.error:
        _out.print(Text(f"  error: {job.error}", style="red"))


async def _open(db: str) -> Engine:
    """An engine on an existing database (a missing SQLite file is NotFound)."""
    return _engine(db, must_exist=True)


@jobs_app.command("enqueue")
def jobs_enqueue(
    task: Annotated[str, typer.Argument(metavar="TASK", help="The task to call.", show_default=False)],
    inputs: InputOption = None,
    queue: Annotated[str, typer.Option("--queue", help="Queue name.")] = "default",
    priority: Annotated[int, typer.Option("--priority", help="Higher runs first.")] = 0,
    run_at: Annotated[str | None, typer.Option("--run-at", help="Not before this time (ISO 8601).")] = None,
    delay_s: Annotated[float | None, typer.Option("--delay-s", min=0, help="Not before this many s.")] = None,
    unique_key: Annotated[
        str | None, typer.Option("--unique-key", help="At most one job with this key, ever.")
    ] = None,
    max_attempts: Annotated[int, typer.Option("--max-attempts", min=1, help="Tries before discard.")] = 3,
    timeout_s: Annotated[float | None, typer.Option("--timeout-s", min=0, help="Per attempt.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Run a worker here until the job finishes.")] = False,
    db: DbOption = DEFAULT_DB,
    imports: ImportOption = None,
    json_out: JsonOption = False,
) -> None:
    """Put one task call in the queue for any worker."""
    session = _Session(json_out, db)

    async def body() -> int:
        _import_modules(imports)
        async with _engine(db) as engine:
            job = await engine.enqueue(
                task,
                _inputs(inputs),
                priority=priority,
                run_at=_when(run_at),
                delay_s=delay_s,
                unique_key=unique_key,
                max_attempts=max_attempts,
                queue=queue,
                timeout_s=timeout_s,
            )
            if wait:
                await engine.start_worker()
                job = await engine.wait_job(job.id)
        if json_out:
            _emit_json(_job_json(job))
        else:
            _print_job(job)
        return EXIT_FAILED if wait and job.state != "completed" else EXIT_OK

    _execute(session, body)


@jobs_app.command("list")
def jobs_list(
    state: Annotated[str | None, typer.Option("--state", help=f"One of: {', '.join(JOB_STATES)}.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", help="Only this queue.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many, newest first.")] = 20,
    db: DbOption = DEFAULT_DB,
    json_out: JsonOption = False,
) -> None:
    """List standalone jobs, newest first."""
    session = _Session(json_out, db)

    async def body() -> int:
        if state is not None and state not in JOB_STATES:
            raise UsageError(f"unknown job state {state!r} (one of: {', '.join(JOB_STATES)})")
        async with await _open(db) as engine:
            found = await engine.store.list_jobs(state=state, queue=queue, limit=limit)
        if json_out:
            _emit_json({"jobs": [_job_json(j) for j in found]})
            return EXIT_OK
        if not found:
            _out.print("no jobs")
            return EXIT_OK
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
        for column in ("id", "task", "queue", "state", "attempts", "created", "duration"):
            table.add_column(column, no_wrap=True)
        for j in found:
            duration = None if j.started_at is None or j.finished_at is None else j.finished_at - j.started_at
            table.add_row(
                str(j.id),
                Text(j.task),
                Text(j.queue),
                styled(j.state),
                f"{j.attempt}/{j.max_attempts}",
                _local(j.created_at),
                human_s(duration),
            )
        _out.print(table)
        return EXIT_OK

    _execute(session, body)


@jobs_app.command("show")
def jobs_show(job_id: JobArg, db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """A job and its attempts."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with await _open(db) as engine:
            job = await engine.store.get_job(job_id)
            history = await engine.store.get_job_attempts(job_id)
        if json_out:
            _emit_json({**_job_json(job), "attempts": [_attempt_json(a) for a in history]})
            return EXIT_OK
        _print_job(job)
        for a in history:
            _out.print(Text.assemble(f"  #{a.attempt}: ", styled(a.status), f"  {a.error or ''}"))
        return EXIT_OK

    _execute(session, body)


def _job_action(job_id: int, db: str, json_out: bool, action: str) -> None:
    session = _Session(json_out, db)

    async def body() -> int:
        async with await _open(db) as engine:
            job = await (engine.retry_job(job_id) if action == "retry" else engine.cancel_job(job_id))
        if json_out:
            _emit_json(_job_json(job))
        else:
            _print_job(job)
        return EXIT_OK

    _execute(session, body)


@jobs_app.command("retry")
def jobs_retry(job_id: JobArg, db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """Make a discarded or cancelled job available again, with its attempts renewed."""
    _job_action(job_id, db, json_out, "retry")


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobArg, db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """Cancel a job that has not finished (a running one is stopped by its worker)."""
    _job_action(job_id, db, json_out, "cancel")


# -- schedules -------------------------------------------------------------------------------


@schedules_app.command("add")
def schedules_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The schedule's name.", show_default=False)],
    task: Annotated[str, typer.Option("--task", help="The task each tick calls.")],
    cron: Annotated[str, typer.Option("--cron", help="Cron expression (UTC), such as '*/5 * * * *'.")],
    inputs: InputOption = None,
    queue: Annotated[str, typer.Option("--queue", help="Queue of the jobs.")] = "default",
    catch_up_s: Annotated[
        float, typer.Option("--catch-up-s", min=0, help="Ticks missed by at most this much still fire.")
    ] = 60.0,
    db: DbOption = DEFAULT_DB,
    imports: ImportOption = None,
    json_out: JsonOption = False,
) -> None:
    """Create or replace a schedule."""
    session = _Session(json_out, db)

    async def body() -> int:
        _import_modules(imports)
        async with _engine(db) as engine:
            schedule = await engine.schedule(
                task, cron=cron, inputs=_inputs(inputs), name=name, queue=queue, catch_up_s=catch_up_s
            )
        _print_schedules([schedule], json_out)
        return EXIT_OK

    _execute(session, body)


@schedules_app.command("list")
def schedules_list(db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """List schedules and their next tick."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with await _open(db) as engine:
            found = await engine.store.list_schedules()
        _print_schedules(found, json_out)
        return EXIT_OK

    _execute(session, body)


@schedules_app.command("remove")
def schedules_remove(
    name: Annotated[str, typer.Argument(metavar="NAME", show_default=False)],
    db: DbOption = DEFAULT_DB,
    json_out: JsonOption = False,
) -> None:
    """Delete a schedule (jobs it already enqueued stay)."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with await _open(db) as engine:
            if not await engine.store.delete_schedule(name):
                raise UsageError(f"no schedule {name!r}")
        if json_out:
            _emit_json({"removed": name})
        else:
            _out.print(f"schedule {name} removed")
        return EXIT_OK

    _execute(session, body)


def _print_schedules(found: list[Schedule], json_out: bool) -> None:
    if json_out:
        docs = [{**describe(s), "next_at": iso(s.next_at)} for s in found]
        _emit_json({"schedules": docs})
        return
    if not found:
        _out.print("no schedules")
        return
    for s in found:
        _out.print(Text(f"{s.name}: {s.task} at '{s.cron}' (queue {s.queue}), next {_local(s.next_at)} UTC"))


SCHEDULE_FIELDS = frozenset(
    {"name", "task", "cron", "with", "queue", "catch_up_s", "priority", "max_attempts"}
)


async def load_schedules(engine: Engine, path: Path) -> list[Schedule]:
    """Declare the schedules of a YAML file: a list of {name, task, cron, with, queue,
    catch_up_s, priority, max_attempts}; the ones declared.

    An entry that cannot be declared (a field missing, unknown or of the wrong type, a cron
    expression that is not valid or never fires, an unknown task, a name taken by an entry
    above) is logged with its line and skipped, and the others are declared: one mistake
    does not stop a worker's other schedules. A file that cannot be read (not YAML, or
    past the reader's bounds), or none of whose entries can be declared, is a UsageError.
    """
    try:
        entries, root = load_yaml_node(await asyncio.to_thread(read_text, path))
    except (OSError, UnicodeDecodeError, DocumentError) as exc:
        raise UsageError(f"cannot read schedules from {path}: {exc}") from None
    if not isinstance(entries, list):
        raise UsageError(f"{path}: expected a list of schedules")
    lines = item_lines(root)
    out: list[Schedule] = []
    problems: list[str] = []
    names: dict[str, int] = {}
    for n, entry in enumerate(entries):
        line = lines[n] if n < len(lines) else 0
        try:
            out.append(await _declare(engine, entry, line, names))
        except UsageError as exc:
            problems.append(f"{path}, line {line}: schedule {n + 1} {exc.message}")
    if problems and not out:
        raise UsageError("; ".join(problems))
    for problem in problems:
        log.warning("schedule skipped", problem=problem)
    return out


async def _declare(engine: Engine, entry: Any, line: int, names: dict[str, int]) -> Schedule:
    """One entry of a schedules file, declared; UsageError saying what is wrong with it."""
    if not isinstance(entry, dict) or not {"task", "cron"} <= set(entry):
        raise UsageError("needs at least 'task' and 'cron'")
    unknown = set(entry) - SCHEDULE_FIELDS
    if unknown:
        raise UsageError(f"has unknown field(s) {sorted(unknown)}")
    inputs = entry.get("with") or {}
    if not isinstance(inputs, dict):
        raise UsageError(f"has 'with' {inputs!r}: it must be a mapping of the task's inputs")
    name = str(entry.get("name") or entry["task"])
    if name in names:
        raise UsageError(f"is named {name!r}, as the schedule on line {names[name]} is")
    try:
        priority, attempts = int(entry.get("priority", 0)), int(entry.get("max_attempts", 3))
        catch_up_s = float(entry.get("catch_up_s", 60.0))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"has a field of the wrong type: {exc}") from None
    try:
        schedule = await engine.schedule(
            str(entry["task"]),
            cron=str(entry["cron"]),
            inputs=inputs,
            name=name,
            queue=str(entry.get("queue", "default")),
            priority=priority,
            max_attempts=attempts,
            catch_up_s=catch_up_s,
        )
    except UsageError as exc:
        raise UsageError(f"cannot be declared: {exc.message}") from None
    names[name] = line
    return schedule


# -- the worker ------------------------------------------------------------------------------

#: a worker whose database cannot take a connection at start tries again after 0.5 s, then
#: twice as long each time, at most 10 s apart, until it can (or is stopped)
OPEN_RETRY_S = (0.5, 10.0)


async def _open_when_reachable(engine: Engine, stop: asyncio.Event) -> bool:
    """Open the engine's store; while the database cannot take a connection (too many
    clients, starting up or shutting down, unreachable), log it and try again with a
    backoff. False when stopped first (the engine is left closed)."""
    delay, longest = OPEN_RETRY_S
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            opening = asyncio.ensure_future(engine.open())
            await asyncio.wait([opening, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not opening.done():  # stopped while connecting
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError, BatonError):
                    await opening
                await engine.close()
                return False
            try:
                opening.result()
                return True
            except StoreUnavailable as exc:
                log.warning("database unavailable; trying again", error=exc.message, retry_in_s=delay)
            await asyncio.wait([stopping], timeout=delay)
            if stop.is_set():
                return False
            delay = min(delay * 2, longest)
    finally:
        stopping.cancel()


@app.command()
def worker(
    db: DbOption = DEFAULT_DB,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Attempts at once.")] = 32,
    queues: Annotated[
        str | None, typer.Option("--queues", help="Comma-separated queues to take jobs from (default: all).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="A stable name: a restart under it rescues at once.")
    ] = None,
    grace_s: Annotated[
        float, typer.Option("--grace-s", min=0, help="On SIGTERM/Ctrl-C, let running attempts finish.")
    ] = 30.0,
    schedules: Annotated[
        Path | None, typer.Option("--schedules", metavar="FILE", help="Cron schedules to declare (YAML).")
    ] = None,
    retention: Annotated[
        str | None,
        typer.Option(
            "--retention",
            metavar="AGE",
            help="Now and then, in small batches, prune what ended more than AGE ago (30d, 12h...): "
            "runs, standalone jobs, expired cache entries, as `baton prune` does.",
        ),
    ] = None,
    imports: ImportOption = None,
    lease_s: LeaseOption = DEFAULT_LEASE_S,
    llm: LlmOption = None,
    pool: PoolOption = None,
    workspaces: WorkspacesOption = None,
    sandbox_user: SandboxUserOption = None,
    json_out: JsonOption = False,
) -> None:
    """Claim and run jobs (steps of any run, standalone jobs, cron ticks) until stopped.

    SIGTERM or Ctrl-C: stop claiming, let running attempts finish for --grace-s, then
    give back what is left for other workers; exit 0. With --json, one JSON line per event
    (started, stopped) on stdout. A database that cannot take a connection yet (too many
    clients, starting up, unreachable) is waited for, with a log line per try.
    """
    session = _Session(json_out, db)
    wanted = [q.strip() for q in queues.split(",") if q.strip()] if queues else None

    async def body() -> int:
        _import_modules(imports)
        engine = _engine(
            db, lease_s=lease_s, llm=llm, pool=pool, workspaces=workspaces, sandbox_user=sandbox_user
        )
        engine.queues = wanted
        engine.retention_s = parse_duration(retention, "--retention") if retention is not None else None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            if not await _open_when_reachable(engine, stop):  # stopped first: nothing to give back
                if not json_out:
                    _err.print(Text("worker stopped before the database took a connection"))
                return EXIT_OK
            async with engine:
                declared = await load_schedules(engine, schedules) if schedules is not None else []
                running = await engine.start_worker(name=name, concurrency=concurrency, queues=wanted)
                started = {"worker": running.id, "name": running.name, "db": engine.store.url}
                if json_out:
                    _emit_line({"event": "started", **started, "schedules": [s.name for s in declared]})
                else:
                    where = ", ".join(wanted) if wanted else "all queues"
                    _err.print(
                        Text(f"worker {running.name} on {engine.store.url}: {concurrency} at once, {where}")
                    )
                stopping = asyncio.ensure_future(stop.wait())
                ended = asyncio.ensure_future(running.finished())
                await asyncio.wait([stopping, ended], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if engine.failure is not None:  # its lease lapses: the other workers take over
                    raise engine.failure
                if not json_out:
                    _err.print(Text(f"stopping: running attempts get {grace_s:g}s to finish"))
                await running.stop(grace_s)  # stop claiming, drain what runs
                await engine.close()
                done, abandoned = running.completed, running.abandoned
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if json_out:
            _emit_line({"event": "stopped", **started, "attempts": done, "abandoned": abandoned})
        else:
            left = f" ({abandoned} sync calls left running in their threads)" if abandoned else ""
            _err.print(Text(f"worker {started['name']} stopped after {done} attempts{left}"))
        return EXIT_OK

    _execute(session, body)
