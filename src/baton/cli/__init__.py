"""The command line: ``baton run|validate|runs|show|pause|resume|cancel|worker|jobs|schedules``.

Each command is a thin layer over the Engine, run with ``asyncio.run``. Errors are mapped to
exit codes in one place (:func:`_execute`): a BatonError prints ``error: ...`` and exits with
its ``exit_code``, anything else is an internal error; no traceback reaches the user. With
``--json`` a command prints exactly one JSON document on stdout, errors included.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import importlib
import json
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from baton import logs
from baton.audit import cli_actor
from baton.cli.progress import WAVES_SHOWN, Progress, human_s, styled
from baton.engine import DEFAULT_LEASE_S, Engine, RunHandle
from baton.errors import BatonError, NotFound, PlanError, UsageError, WorkerFailed
from baton.llm.forecast import Forecast, over_budget
from baton.plan import Policy, analyze
from baton.runtime import tune_gc
from baton.sandbox import Sandbox
from baton.status import RunStatus, StepStatus
from baton.store import DEFAULT_DB, AttemptRecord, LedgerEntry, RunRecord, SQLiteStore, StepRecord, store_for
from baton.views import AttemptView, RunView, run_detail
from baton.views import seconds as _seconds

EXIT_OK, EXIT_FAILED, EXIT_PAUSED = 0, 1, 3  # bad input is 2: BatonError.exit_code
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
REFRESH_S = 0.1  # at most ~10 redraws a second
PREVIEW_CHARS = 80
WAVE_IDS_SHOWN = 8

app = typer.Typer(
    name="baton",
    help="Run plans (DAGs of steps) durably, and look at what happened.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

DbOption = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="BATON_DB",
        help="Database: a file path, sqlite:///path, postgresql://... or memory://.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout, nothing else.")]
ImportOption = Annotated[
    list[str] | None,
    typer.Option("--import", metavar="MODULE", help="Import a module so its @baton.task functions register."),
]
LeaseOption = Annotated[
    float,
    typer.Option(
        "--lease-s",
        envvar="BATON_LEASE_S",
        min=0.5,
        help="How long this process's hold on a run lasts without a heartbeat; another process "
        "may take the run over after that.",
    ),
]
PoolOption = Annotated[
    int | None,
    typer.Option(
        "--pool",
        min=1,
        metavar="N",
        help="PostgreSQL: at most N connections in this process's pool (default 10, or the URL's "
        "pool=N); a worker holds one more for LISTEN.",
        show_default=False,
    ),
]
PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        envvar="BATON_POLICY",
        metavar="FILE",
        help="What API and NATS callers may run, by role (YAML; see baton.policy). Default: "
        "operators run pure, llm and http tasks, never shell or python.",
        show_default=False,
    ),
]
WorkspacesOption = Annotated[
    Path | None,
    typer.Option(
        "--workspaces",
        envvar="BATON_WORKSPACES",
        metavar="DIR",
        help="Where API callers' runs get their workspaces (DIR/RUN_ID). Default: workspaces/ "
        "beside the SQLite database, else .baton/workspaces.",
        show_default=False,
    ),
]
SandboxUserOption = Annotated[
    str | None,
    typer.Option(
        "--sandbox-user",
        envvar="BATON_SANDBOX_USER",
        metavar="USER",
        help="When run as root: the user API callers' programs run as (default nobody).",
        show_default=False,
    ),
]
LlmOption = Annotated[
    Path | None,
    typer.Option(
        "--llm",
        envvar="BATON_LLM",
        metavar="FILE",
        help="LLM config (models, providers, cassettes) for llm.* steps.",
        show_default=False,
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress output; the result summary only.")
]
PlanArg = Annotated[
    Path, typer.Argument(metavar="PLAN", help="Plan file (YAML or JSON).", show_default=False)
]
RunArg = Annotated[
    str, typer.Argument(metavar="RUN", help="Run id, or a unique prefix of one.", show_default=False)
]


# -- plumbing ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Session:
    """What an interrupt handler needs to know about the command it interrupted."""

    json: bool
    db: str
    run_id: str | None = None
    #: what ``baton resume`` needs repeated to continue the run (--import, --llm)
    flags: str = ""


def _execute(session: _Session, body: Callable[[], Awaitable[int]]) -> NoReturn:
    """Run a command's coroutine and exit with the code its outcome maps to."""
    try:
        code = asyncio.run(_with_sigterm(body))
    except WorkerFailed as exc:
        message = exc.message
        if session.run_id is not None:
            hint = _resume_hint(session.run_id, session.db, session.flags)
            message += f"; run {session.run_id} can continue with: {hint}"
        code = _report(session, {**exc.to_dict(), "message": message}, message, exc.exit_code)
    except BatonError as exc:
        code = _report(session, exc.to_dict(), exc.message, exc.exit_code)
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        code = EXIT_INTERRUPTED if interrupted else EXIT_TERMINATED
        kind = message = "interrupted" if interrupted else "terminated"
        if session.run_id is not None:
            message += (
                f"; run {session.run_id} stopped in this process and can continue with: "
                f"{_resume_hint(session.run_id, session.db, session.flags)}"
            )
        doc: dict[str, object] = {"code": kind, "message": message, "run_id": session.run_id}
        _report(session, doc, message, code)
    except Exception as exc:
        message = f"internal: {type(exc).__name__}: {exc}"
        code = _report(session, {"code": "internal", "message": message}, message, EXIT_FAILED)
    raise typer.Exit(code)


async def _with_sigterm(body: Callable[[], Awaitable[int]]) -> int:
    """SIGTERM cancels the command like Ctrl-C does, so leases are released on the way out."""
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    installed = False
    if current is not None:
        try:
            loop.add_signal_handler(signal.SIGTERM, current.cancel)
            installed = True
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    try:
        return await body()
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGTERM)


def _report(session: _Session, doc: dict[str, object], message: str, code: int) -> int:
    _err.print(Text(f"error: {message}", style="red"))
    if session.json:
        _emit_json({"error": doc})
    return code


def _emit_json(doc: object) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def _import_modules(modules: Sequence[str] | None) -> None:
    """Import user modules so their ``@task`` declarations register (before any Engine exists)."""
    if not modules:
        return
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: modules next to the plan work
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise UsageError(f"cannot import module {name!r}: {type(exc).__name__}: {exc}") from None


def _engine(
    db: str,
    *,
    must_exist: bool = False,
    lease_s: float = DEFAULT_LEASE_S,
    llm: Path | None = None,
    pool: int | None = None,
    workspaces: Path | None = None,
    sandbox_user: str | None = None,
    audit_key: bytes | None = None,
) -> Engine:
    """An engine on ``db``; with ``must_exist``, a missing SQLite file is NotFound, not created.
    ``pool`` overrides the pool size of a PostgreSQL URL; ``workspaces`` and
    ``sandbox_user``: where confined runs' steps run and as whom (baton.sandbox)."""
    store = store_for(db, pool=pool)
    if must_exist and isinstance(store, SQLiteStore) and not store.path.exists():
        raise NotFound(f"no database at {store.path} (set --db or BATON_DB)")
    if workspaces is None:
        beside = isinstance(store, SQLiteStore) and str(store.path) != ":memory:"
        workspaces = (
            store.path.parent / "workspaces"
            if isinstance(store, SQLiteStore) and beside
            else Path(".baton") / "workspaces"
        )
    sandbox = Sandbox.of(workspaces, sandbox_user)
    engine = Engine(store, lease_s=lease_s, llm=llm, sandbox=sandbox, audit_key=audit_key)
    return engine


def _resume_hint(run_id: str, db: str, flags: str = "") -> str:
    hint = f"baton resume {run_id}"
    hint = hint if db == DEFAULT_DB else f"{hint} --db {shlex.quote(db)}"
    return f"{hint} {flags}" if flags else hint


def _flags(imports: list[str] | None, llm: Path | None) -> str:
    """The options a run's tasks need in whichever process continues it."""
    given = [f"--import {shlex.quote(m)}" for m in imports or []]
    if llm is not None:
        given.append(f"--llm {shlex.quote(str(llm))}")
    return " ".join(given)


def _local(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _preview(value: Any, limit: int = PREVIEW_CHARS) -> str:
    if value is None:
        return ""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _exit_code(status: RunStatus) -> int:
    if status is RunStatus.COMPLETED:
        return EXIT_OK
    if status is RunStatus.PAUSED:
        return EXIT_PAUSED
    return EXIT_FAILED


# -- JSON shapes -------------------------------------------------------------------------------


def _run_json(run: RunRecord) -> dict[str, Any]:
    return RunView.of(run).model_dump()


def _attempt_json(attempt: AttemptRecord) -> dict[str, Any]:
    return AttemptView.of(attempt).model_dump()


@dataclass(slots=True)
class _RunView:
    """A run as the store has it, with its steps and finished attempts."""

    run: RunRecord
    steps: list[StepRecord]
    attempts: list[AttemptRecord]
    ledger: list[LedgerEntry]

    @classmethod
    async def load(cls, engine: Engine, run_id: str) -> _RunView:
        store = engine.store
        run = await store.get_run(run_id)
        return cls(
            run,
            await store.get_steps(run.id),
            await store.get_attempts(run.id),
            await store.budget_ledger(run.id),
        )

    def to_json(self) -> dict[str, Any]:
        """The run's fields, with its steps, attempts and budget ledger nested."""
        return {
            **run_detail(self.run, self.steps),
            "attempts": [_attempt_json(a) for a in self.attempts],
            "budget": {
                e.scope: {"spent_tokens": e.spent_tokens, "spent_usd": e.spent_usd} for e in self.ledger
            },
        }

    def count(self, status: StepStatus) -> int:
        return sum(1 for s in self.steps if s.status is status)


async def _watch(engine: Engine, handle: RunHandle, view: _RunView) -> RunRecord:
    """Wait for the run, redrawing a live per-wave display at most ~10 times a second."""
    progress = Progress.of(view.run, view.steps)
    unsubscribe = engine.subscribe(progress.on_event)
    waiter = asyncio.ensure_future(handle.wait())  # shielded inside: cancelling it leaves the run
    try:
        with Live(
            progress.render(), console=_out, auto_refresh=False, redirect_stdout=False, redirect_stderr=False
        ) as live:
            while not waiter.done():
                await asyncio.wait([waiter], timeout=REFRESH_S)
                live.update(progress.render(), refresh=True)
            record = waiter.result()
            # The last frame from the store: a cancel marks idle steps without events.
            final = Progress.of(record, await engine.store.get_steps(record.id))
            final.status, final.started = str(record.status), progress.started
            final.retries, final.finished_here = progress.retries, progress.finished_here
            live.update(final.render(), refresh=True)
            return record
    finally:
        waiter.cancel()
        unsubscribe()


# -- following a run to its end ----------------------------------------------------------------


async def _recover(engine: Engine, session: _Session, quiet: bool) -> list[RunHandle]:
    """Take over runs on this database whose process died; they finish alongside ours."""
    try:
        handles = await engine.recover()
    except BatonError as exc:
        # One orphan that cannot run here (say, its tasks are not imported) must not stop ours.
        _err.print(Text(f"warning: could not recover orphaned runs: {exc.message}", style="yellow"))
        return []
    for handle in handles:
        run = await engine.store.get_run(handle.run_id)
        if not session.json and not quiet:
            _out.print(Text(f"recovered run {run.id} ({run.name}): its process stopped; continuing it here"))
    return handles


async def _follow(
    engine: Engine,
    handle: RunHandle,
    session: _Session,
    quiet: bool,
    recovered: list[RunHandle],
    verb: str,
) -> int:
    """Show progress until the run stops here, then the summary; the exit code."""
    session.run_id = handle.run_id
    view = await _RunView.load(engine, handle.run_id)
    live = not session.json and not quiet and _out.is_terminal
    if not session.json and not quiet:
        policy = Policy.model_validate((view.run.plan or {}).get("policy", {}))
        done = view.count(StepStatus.SUCCEEDED)
        _out.print(
            Text(
                f"run {view.run.id} {verb}: {view.run.name}, {len(view.steps)} steps"
                + (f" ({done} already succeeded)" if done else "")
                + f", max_parallel {policy.effective_max_parallel(engine.default_max_parallel)}"
            )
        )
    record = await _watch(engine, handle, view) if live else await handle.wait()
    session.run_id = None  # ours has stopped: an interrupt from here on leaves nothing to resume
    others = []
    for other in recovered:
        if other.run_id == handle.run_id:
            continue
        if not session.json and not quiet:
            _out.print(Text(f"waiting for recovered run {other.run_id} to finish"))
        result = await other.wait()
        others.append({"id": result.id, "name": result.name, "status": str(result.status)})
    view = await _RunView.load(engine, record.id)
    if session.json:
        _emit_json({**view.to_json(), "recovered": others})
    else:
        for other_doc in others:
            _out.print(Text(f"recovered run {other_doc['id']} ({other_doc['name']}): {other_doc['status']}"))
        _print_summary(view, session)
    return _exit_code(view.run.status)


RESULTS_SHOWN = 3
RESULT_LINES = 12


def _print_results(view: _RunView) -> None:
    """The outputs of the final steps (those no other step needs): what the run produced."""
    needed = {n for s in (view.run.plan or {}).get("steps", []) for n in s.get("needs", [])}
    finals = [s for s in view.steps if s.step_id not in needed and s.status is StepStatus.SUCCEEDED]
    for s in finals[:RESULTS_SHOWN]:
        text = s.output if isinstance(s.output, str) else json.dumps(s.output, ensure_ascii=False)
        lines = text.splitlines() or [""]
        _out.print(Text(f"  result of {s.step_id}:", style="bold"))
        for line in lines[:RESULT_LINES]:
            _out.print(Text(f"    {line[:200]}"))
        if len(lines) > RESULT_LINES:
            _out.print(Text(f"    ... ({len(lines) - RESULT_LINES} more lines: baton show {view.run.id})"))
    if len(finals) > RESULTS_SHOWN:
        _out.print(Text(f"  (+{len(finals) - RESULTS_SHOWN} more final steps: baton show {view.run.id})"))


@dataclass(slots=True)
class _Spend:
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    usd: float = 0.0
    unpriced: int = 0

    def __str__(self) -> str:
        text = f"{self.calls} calls, {self.tokens_in:,} in + {self.tokens_out:,} out tokens, ${self.usd:.6f}"
        return text + (f" ({self.unpriced} of unknown price)" if self.unpriced else "")


def _print_llm_usage(view: _RunView) -> None:
    """Model calls of the run: how many were rejected, tokens and spend by model."""
    calls = [a for a in view.attempts if a.detail and "usage" in a.detail]
    if not calls:
        return
    by_model: dict[str, _Spend] = {}
    for a in calls:
        detail = a.detail or {}
        usage = detail.get("usage") or {}
        spend = by_model.setdefault(str(detail.get("model", "?")), _Spend())
        spend.calls += 1
        spend.tokens_in += int(usage.get("input_tokens", 0))
        spend.tokens_out += int(usage.get("output_tokens", 0))
        cost = detail.get("cost_usd")
        if isinstance(cost, int | float):
            spend.usd += cost
        else:
            spend.unpriced += 1
    rejected = sum(1 for a in calls if a.status != "succeeded")
    total = sum(s.usd for s in by_model.values())
    models = "; ".join(f"{name}: {spend}" for name, spend in by_model.items())
    _out.print(
        Text(f"  model calls: {len(calls)} ({rejected} rejected and retried), ${total:.6f} — {models}")
    )
    limits = (view.run.plan or {}).get("budget") or {}
    for entry in view.ledger:
        if entry.scope == "run" and limits:
            held = []
            if limits.get("usd") is not None:
                held.append(f"${entry.spent_usd:.6f} of ${float(limits['usd']):.6f}")
            if limits.get("tokens") is not None:
                held.append(f"{entry.spent_tokens:,} of {int(limits['tokens']):,} tokens")
            _out.print(Text(f"  run budget: {', '.join(held)} spent"))


def _print_summary(view: _RunView, session: _Session) -> None:
    run = view.run
    ended = run.finished_at if run.finished_at is not None else time.time()
    _out.print(
        Text.assemble(
            f"run {run.id} ({run.name}): ",
            styled(str(run.status)),
            f" in {human_s(_seconds(run.started_at, ended))}",
        )
    )
    counts = {st: view.count(st) for st in StepStatus}
    shown = [StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED]
    shown += [st for st in StepStatus if st not in shown and counts[st]]
    _out.print(Text(f"  steps: {', '.join(f'{counts[st]} {st}' for st in shown)} ({len(view.steps)} total)"))
    failed = [s for s in view.steps if s.status is StepStatus.FAILED]
    if failed:
        _out.print(Text("  failed steps:", style="red"))
        for s in failed:
            tries = f" ({s.attempt} attempts)" if s.attempt > 1 else ""
            _out.print(Text(f"    {s.step_id}: {s.error or 'failed'}{tries}"))
    skipped = [s.step_id for s in view.steps if s.status is StepStatus.SKIPPED]
    if skipped:
        more = f" (+{len(skipped) - WAVE_IDS_SHOWN} more)" if len(skipped) > WAVE_IDS_SHOWN else ""
        ids = ", ".join(skipped[:WAVE_IDS_SHOWN])
        _out.print(Text(f"  skipped (a step they need did not succeed): {ids}{more}"))
    _print_llm_usage(view)
    _print_results(view)
    if run.status is RunStatus.PAUSED:
        _out.print(Text(f"  continue with: {_resume_hint(run.id, session.db, session.flags)}"))
    elif not run.status.terminal:
        _out.print(
            Text(f"  the run stopped executing here (another process took it over); see: baton show {run.id}")
        )


# -- commands ----------------------------------------------------------------------------------


@app.command()
def run(
    plan: PlanArg,
    db: DbOption = DEFAULT_DB,
    max_parallel: Annotated[
        int | None,
        typer.Option("--max-parallel", min=1, help="Run at most N steps at once (overrides the plan)."),
    ] = None,
    json_out: JsonOption = False,
    imports: ImportOption = None,
    quiet: QuietOption = False,
    lease_s: LeaseOption = DEFAULT_LEASE_S,
    llm: LlmOption = None,
    pool: PoolOption = None,
) -> None:
    """Validate a plan, run it to the end with live progress, and summarise the result.

    Exit codes: 0 completed, 1 failed or cancelled, 2 bad input, 3 paused, 130 interrupted.
    """
    session = _Session(json_out, db, flags=_flags(imports, llm))

    async def body() -> int:
        _import_modules(imports)
        engine = _engine(db, lease_s=lease_s, llm=llm, pool=pool)
        loaded = engine.load(plan)  # before the store opens: a bad plan writes nothing
        if max_parallel is not None:
            policy = loaded.policy.model_copy(update={"max_parallel": max_parallel})
            loaded = loaded.model_copy(update={"policy": policy})
        async with engine:
            recovered = await _recover(engine, session, quiet)
            handle = await engine.submit(loaded, actor=cli_actor())
            assert isinstance(handle, RunHandle)  # submit(start=True) always returns one
            return await _follow(engine, handle, session, quiet, recovered, "started")

    _execute(session, body)


@app.command()
def resume(
    run_id: RunArg,
    db: DbOption = DEFAULT_DB,
    json_out: JsonOption = False,
    imports: ImportOption = None,
    quiet: QuietOption = False,
    lease_s: LeaseOption = DEFAULT_LEASE_S,
    llm: LlmOption = None,
    pool: PoolOption = None,
) -> None:
    """Continue a paused run, or one whose process died, here; then like `baton run`.

    A run that another live process is executing is not taken over (exit 2).
    """
    session = _Session(json_out, db, flags=_flags(imports, llm))

    async def body() -> int:
        _import_modules(imports)
        async with _engine(db, must_exist=True, lease_s=lease_s, llm=llm, pool=pool) as engine:
            handle = await engine.resume(run_id, actor=cli_actor())
            return await _follow(engine, handle, session, quiet, [], "resumed")

    _execute(session, body)


@app.command()
def validate(
    plan: PlanArg,
    db: DbOption = DEFAULT_DB,
    json_out: JsonOption = False,
    imports: ImportOption = None,
    llm: LlmOption = None,
) -> None:
    """Check a plan without running it: steps, waves, critical path, effective max_parallel."""
    session = _Session(json_out, db)

    async def body() -> int:
        _import_modules(imports)
        engine = _engine(db, llm=llm)
        try:
            loaded = engine.load(plan)
            dag = analyze(loaded, engine.registry)
            parallel = loaded.policy.effective_max_parallel(engine.default_max_parallel)
            store = engine.store
            if not isinstance(store, SQLiteStore) or store.path.exists():
                # the history's cache hit rate, where there is a database to read it from
                with contextlib.suppress(BatonError):
                    await engine.open()
            costs, total, hit_rate = await engine.forecast(loaded)
        finally:
            await engine.close()
        cost = {
            "steps": {step_id: c.to_dict() for step_id, c in costs.items()},
            "total": total.to_dict(),
            "cache_hit_rate": hit_rate,
            "over_budget": [p.to_dict() for p in over_budget(loaded, costs, total)],
        }
        # a plan whose least cost is over its budget would be refused by `baton run`
        verdict = EXIT_OK if not cost["over_budget"] else PlanError([]).exit_code
        waves, path = dag.waves, dag.critical_path()
        if json_out:
            _emit_json(
                {
                    "valid": verdict == EXIT_OK,
                    "plan": str(plan),
                    "name": loaded.name,
                    "steps": len(loaded.steps),
                    "waves": waves,
                    "critical_path": {
                        "steps": path,
                        "length": len(path),
                        "estimate_s": dag.critical_path_weight(),
                    },
                    "max_parallel": parallel,
                    "cost": cost,
                }
            )
            return verdict
        _out.print(Text.assemble(f"plan {loaded.name} ({plan}): ", ("valid", "green")))
        _out.print(Text(f"  steps: {len(loaded.steps)}, waves: {len(waves)}, max_parallel: {parallel}"))
        _out.print(Text("  waves:"))
        for w, ids in enumerate(waves[:WAVES_SHOWN]):
            more = f" … (+{len(ids) - WAVE_IDS_SHOWN} more)" if len(ids) > WAVE_IDS_SHOWN else ""
            _out.print(Text(f"    {w}: {', '.join(ids[:WAVE_IDS_SHOWN])}{more}"))
        if len(waves) > WAVES_SHOWN:
            _out.print(Text(f"    … {len(waves) - WAVES_SHOWN} more waves"))
        plural = "" if len(path) == 1 else "s"
        estimate = human_s(dag.critical_path_weight())
        _out.print(
            Text(f"  critical path: {' -> '.join(path)} ({len(path)} step{plural}, ~{estimate} estimated)")
        )
        if costs:
            rate = (
                "no history" if hit_rate is None else f"{hit_rate:.0%} of recent calls answered by the caches"
            )
            _out.print(Text(f"  cost of its {len(costs)} model step(s), min / expected / max ({rate}):"))
            for step_id, c in [*costs.items(), ("total", total)]:
                counts = f"{c.tokens_min:,} / {c.tokens_expected:,} / {c.tokens_max:,} tokens"
                _out.print(Text(f"    {step_id}: {_usd_range(c)}, {counts}"))
            for problem in over_budget(loaded, costs, total):
                _out.print(Text(f"  {problem}: it cannot finish within its budget", style="red"))
        return verdict

    _execute(session, body)


def _usd_range(c: Forecast) -> str:
    def usd(value: float | None) -> str:
        return "?" if value is None else f"${value:.6f}"

    return f"{usd(c.usd_min)} / {usd(c.usd_expected)} / {usd(c.usd_max)}"


@app.command()
def runs(
    db: DbOption = DEFAULT_DB,
    status: Annotated[RunStatus | None, typer.Option("--status", help="Only runs with this status.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many runs, newest first.")] = 20,
    json_out: JsonOption = False,
) -> None:
    """List runs, newest first."""
    session = _Session(json_out, db)

    async def body() -> int:
        engine = _engine(db)
        store = engine.store
        found: list[RunRecord] = []
        if not (isinstance(store, SQLiteStore) and not store.path.exists()):  # no file: no runs
            async with engine:
                found = await store.list_runs(limit=limit, status=status)
        if json_out:
            _emit_json({"runs": [_run_json(r) for r in found]})
            return EXIT_OK
        if not found:
            _out.print("no runs")
            return EXIT_OK
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
        table.add_column("id", no_wrap=True)
        table.add_column("name", overflow="fold", min_width=8)
        table.add_column("status", no_wrap=True)
        table.add_column("steps", justify="right", no_wrap=True)
        table.add_column("created", no_wrap=True)
        table.add_column("duration", justify="right", no_wrap=True)
        for r in found:
            table.add_row(
                r.id,
                Text(r.name),
                styled(str(r.status)),
                str(r.total_steps),
                _local(r.created_at),
                human_s(_seconds(r.started_at, r.finished_at)),
            )
        _out.print(table)
        return EXIT_OK

    _execute(session, body)


@app.command()
def show(run_id: RunArg, db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """A run and each of its steps; the attempt history of steps that were retried."""
    session = _Session(json_out, db)

    async def body() -> int:
        async with _engine(db, must_exist=True) as engine:
            view = await _RunView.load(engine, run_id)
        if json_out:
            _emit_json(view.to_json())
            return EXIT_OK
        _print_run(view)
        return EXIT_OK

    _execute(session, body)


def _print_run(view: _RunView) -> None:
    run = view.run
    _out.print(Text.assemble(f"run {run.id} ({run.name}): ", styled(str(run.status))))
    if run.error:
        _out.print(Text(f"  error: {run.error}", style="red"))
    _out.print(
        Text(
            f"  created {_local(run.created_at)}, started {_local(run.started_at) or '-'}, "
            f"finished {_local(run.finished_at) or '-'}"
            + (f", took {human_s(_seconds(run.started_at, run.finished_at))}" if run.finished_at else "")
        )
    )
    if run.running and not run.status.terminal:
        holders = sorted({s.lease_owner for s in view.steps if s.lease_owner})
        _out.print(Text(f"  {run.running} step(s) running on {', '.join(holders) or 'workers'}"))
    heads = ("step", "wave", "status", "attempts", "duration")
    rows = [
        (
            s.step_id,
            str(s.wave),
            str(s.status),
            str(s.attempt),
            human_s(_seconds(s.started_at, s.finished_at)),
        )
        for s in view.steps
    ]
    # The output preview gets the width the other columns leave (cell padding, table edges).
    used = sum(max(len(h), *(len(r[k]) for r in rows)) + 2 for k, h in enumerate(heads))
    room = min(PREVIEW_CHARS, max(16, _out.width - used - 6))
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False)
    for h in heads:
        table.add_column(h, justify="left" if h in ("step", "status") else "right", no_wrap=True)
    table.add_column("output", overflow="ellipsis", no_wrap=True)
    for s, row in zip(view.steps, rows, strict=True):
        table.add_row(*row[:2], styled(row[2]), *row[3:], Text(_preview(s.output, room)))
    _out.print(table)
    # Errors are listed in full below the table: a table cell would cut or fold them.
    errors = [s for s in view.steps if s.error]
    if errors:
        _out.print(Text("errors:", style="bold"))
        for s in errors:
            _out.print(Text.assemble(f"  {s.step_id} ", styled(str(s.status)), f": {s.error}"))
    retried = {s.step_id for s in view.steps if s.attempt > 1}
    history = [a for a in view.attempts if a.step_id in retried]
    if history:
        _out.print(Text("attempts of retried steps:", style="bold"))
        for a in history:
            _out.print(
                Text.assemble(
                    f"  {a.step_id} #{a.attempt}: ",
                    styled(a.status),
                    f" {human_s(_seconds(a.started_at, a.finished_at))}",
                    (f"  {a.error}" if a.error else ""),
                )
            )


def _control(run_id: str, db: str, json_out: bool, status: RunStatus) -> None:
    session = _Session(json_out, db)

    async def body() -> int:
        async with _engine(db, must_exist=True) as engine:
            control = engine.pause if status is RunStatus.PAUSED else engine.cancel
            record = await control(run_id, actor=cli_actor())
        if json_out:
            _emit_json(_run_json(record))
            return EXIT_OK
        _out.print(Text.assemble(f"run {record.id} ({record.name}): ", styled(str(record.status))))
        if status is RunStatus.PAUSED:
            hint = _resume_hint(record.id, db)
            _out.print(Text(f"  steps already running finish first; continue with: {hint}"))
        else:
            _out.print(Text("  no new step starts; running steps are stopped"))
        return EXIT_OK

    _execute(session, body)


@app.command()
def pause(run_id: RunArg, db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """Pause a run: no new step starts, running ones finish; `baton resume` continues it."""
    _control(run_id, db, json_out, RunStatus.PAUSED)


@app.command()
def cancel(run_id: RunArg, db: DbOption = DEFAULT_DB, json_out: JsonOption = False) -> None:
    """Cancel a run: no new step starts, running ones are stopped."""
    _control(run_id, db, json_out, RunStatus.CANCELLED)


# The queue's commands (worker, jobs, schedules) and the API's (serve, keys) live in their
# own modules.
from baton.cli import agents as _agents  # noqa: E402, F401
from baton.cli import audit as _audit  # noqa: E402
from baton.cli import nats as _nats  # noqa: E402, F401
from baton.cli import prune as _prune  # noqa: E402, F401
from baton.cli import queue as _queue  # noqa: E402
from baton.cli import serve as _serve  # noqa: E402

__all__ = ["_audit", "_queue", "_serve", "app", "main"]


def main() -> None:
    """Entry point of the ``baton`` command."""
    # structlog prints to stdout by default; stdout belongs to results (and --json documents).
    logs.configure()
    tune_gc()
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck process is doing
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app(prog_name="baton")
    except Exception as exc:  # a last resort: commands map their own errors
        _err.print(Text(f"error: internal: {type(exc).__name__}: {exc}", style="red"))
        sys.exit(EXIT_FAILED)
